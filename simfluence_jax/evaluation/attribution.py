"""Proponents and opponents of training examples, read off a fitted simulator.

Two scores per (test example z, training example z_i), both [m, n] like A and B:

`removal_effects` — simulated leave-one-out on a reference curriculum (paper §2.2's LOO,
done by the simulator instead of retraining). For a curriculum of positions [T, k]:

    effect[z, i] = L̂_T(z | curriculum with every occurrence of z_i removed) − L̂_T(z | curriculum)

Removal uses keep_steps semantics (`counterfactuals.remove_examples(keep_steps=True)`): the
run keeps its T steps, z_i's slots become pads, and a batch emptied entirely is an identity
step. effect > 0: without z_i the final loss would be higher, so z_i helps z -> **proponent**.
effect < 0: z_i hurts z -> **opponent**. Training examples absent from the curriculum get
exactly 0. Because the simulator is not additive, effects depend on order and on the other
examples (redundancy shows up as small effects for each of several redundant examples).

`step_effects` — curriculum-free one-step score: z_i's contribution to one training step
relative to a neutral batch-mate, at loss level L. In a batch of size k a neutral example has
A = 1/k, B = 0 (k neutral examples give α = 1, β = 0: the identity step). Swapping a
neutral batch-mate for z_i changes L_t by

    linear:          (A_i − 1/k)·L + B_i
    additive:        B_i              (α ≡ 1 is not attributable to single examples)
    multiplicative:  (A_i − 1/k)·L

This is a *change in loss*: negative = z_i lowers z's loss = helpful. Its orientation is
therefore opposite to `removal_effects`; rank it with `rank(..., higher_is_helpful=False)`.

`rank` turns either score into per-test-example top-k proponent / opponent lists.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from simfluence_jax.simulators import rollout as rollout_lib

DEFAULT_CHUNK_SIZE = 128


def _removal_chunk(a, b, batches, initial_losses, rho_t, gamma_t, removed, *, kind):
  """Final losses of the reference run and of |chunk| leave-one-out runs, in one scan.

  a, b [m, n]; batches int32 [T, k]; initial_losses [m]; rho_t, gamma_t [T, m] the step
  terms of each step (zeros: none); removed int32 [c] positions.
  Returns (final_ref [m], final_removed [c, m]).
  """
  def coefficients(batch, weights):                      # weights [..., k] -> [..., m]
    alpha = (jnp.ones(weights.shape[:-1] + a.shape[:1], a.dtype) if kind == "additive"
             else weights @ jnp.take(a, jnp.where(batch >= 0, batch, 0), axis=1).T)
    beta = (jnp.zeros(weights.shape[:-1] + b.shape[:1], b.dtype) if kind == "multiplicative"
            else weights @ jnp.take(b, jnp.where(batch >= 0, batch, 0), axis=1).T)
    return alpha, beta

  def step(carry, xs):
    batch, rho, gamma = xs
    ref, cf = carry                                       # [m], [c, m]
    valid = batch >= 0                                    # [k]
    keep = valid[None, :] & (batch[None, :] != removed[:, None])      # [c, k]
    k = batch.shape[0]            # a short batch is k × its mean (rollout.step_coefficients)
    w_ref = valid.astype(a.dtype)
    w_ref = w_ref * (k / jnp.maximum(jnp.sum(w_ref), 1.0))
    w_cf = keep.astype(a.dtype)
    w_cf = w_cf * (k / jnp.maximum(jnp.sum(w_cf, axis=1, keepdims=True), 1.0))
    # identical summation order for reference and counterfactual: entries are only zeroed
    # (and the survivors of a short batch reweighted).
    alpha_r, beta_r = coefficients(batch, w_ref)          # [m]
    alpha_c, beta_c = coefficients(batch, w_cf)           # [c, m]
    act_r = jnp.any(valid)                                # an all-pad batch is identity
    act_c = jnp.any(keep, axis=1)[:, None]                # [c, 1]
    ref = jnp.where(act_r, (alpha_r + rho) * ref + beta_r + gamma, ref)
    cf = jnp.where(act_c, (alpha_c + rho) * cf + beta_c + gamma, cf)
    return (ref, cf), None

  cf0 = jnp.broadcast_to(initial_losses, removed.shape + initial_losses.shape)
  (ref, cf), _ = jax.lax.scan(step, (initial_losses, cf0), (batches, rho_t, gamma_t))
  return ref, cf


@functools.partial(jax.jit, static_argnames=("kind", "chunk_size"))
def _removal_effects_jit(a, b, batches, initial_losses, rho_t, gamma_t, *, kind, chunk_size):
  n = a.shape[1]
  num_chunks = -(-n // chunk_size)
  # pad the position list to whole chunks with position 0 (its extra results are dropped).
  positions = jnp.arange(num_chunks * chunk_size, dtype=jnp.int32)
  positions = jnp.where(positions < n, positions, 0).reshape(num_chunks, chunk_size)
  fn = functools.partial(_removal_chunk, a, b, batches, initial_losses, rho_t, gamma_t,
                         kind=kind)
  ref, cf = jax.lax.map(lambda removed: fn(removed), positions)   # [N, m], [N, c, m]
  ref = ref[0]
  cf = cf.reshape(num_chunks * chunk_size, -1)[:n]                  # [n, m]
  return (cf - ref[None, :]).T                                      # [m, n]


def removal_effects(A, B, *, kind: str, batches, initial_losses,
                    chunk_size: int | None = None, rho=None, gamma=None,
                    beyond: str = "hold") -> jax.Array:
  """Simulated leave-one-out effect of every training example on every test example.

  Args:
    A, B: [m, n] fitted parameters.
    kind: "linear" | "additive" | "multiplicative".
    batches: int [T, k] positions of the reference curriculum (-1 pads).
    initial_losses: [m] L_0 of the reference run.
    chunk_size: training examples removed per vectorised scan (memory O(chunk·m) per step);
      default min(n, 128). Results do not depend on it.
    rho, gamma, beyond: the fit's run-shared step terms (rollout.rollout).

  Returns:
    [m, n]: effect[z, i] = final loss without z_i − final loss with it (> 0 proponent,
    < 0 opponent, exactly 0 for examples absent from the curriculum).
  """
  kind = rollout_lib.check_kind(kind)
  a, b, l0 = jnp.asarray(A), jnp.asarray(B), jnp.asarray(initial_losses)
  rollout_lib._check_params(a, b)                              # pylint: disable=protected-access
  batches = rollout_lib._check_batches(batches, a.shape[1], lead=())  # pylint: disable=protected-access
  m, n = a.shape
  if l0.shape != (m,):
    raise ValueError(f"initial_losses must be [m] = [{m}]; got {l0.shape}")
  if n == 0:
    raise ValueError("removal_effects needs at least one training example (n >= 1)")
  if chunk_size is None:
    chunk_size = min(n, DEFAULT_CHUNK_SIZE)
  if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive integer; got {chunk_size!r}")
  dtype = rollout_lib._common_float_dtype(a, b, l0)            # pylint: disable=protected-access
  rho_t, gamma_t = rollout_lib.step_terms_per_step(rho, gamma, batches.shape[0], m, dtype,
                                                   beyond)
  return _removal_effects_jit(a.astype(dtype), b.astype(dtype), batches,
                              l0.astype(dtype), rho_t, gamma_t, kind=kind,
                              chunk_size=int(min(chunk_size, n)))


def step_effects(A, B, *, kind: str, loss_level, batch_size: int) -> jax.Array:
  """z_i's contribution to one step relative to a neutral batch-mate, at loss level L.

  Args:
    A, B: [m, n] fitted parameters.
    kind: "linear" | "additive" | "multiplicative".
    loss_level: L, a scalar or [m] (one level per test example, e.g. its initial loss).
    batch_size: k of the runs the simulator was fitted on.

  Returns:
    [m, n] change in loss (negative = helpful): (A − 1/k)·L + B for linear, B for additive,
    (A − 1/k)·L for multiplicative. Rank with `rank(..., higher_is_helpful=False)`.
  """
  kind = rollout_lib.check_kind(kind)
  a, b = jnp.asarray(A), jnp.asarray(B)
  rollout_lib._check_params(a, b)                              # pylint: disable=protected-access
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
      or batch_size < 1:
    raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
  level = jnp.asarray(loss_level)
  if level.ndim == 0:
    level = jnp.broadcast_to(level, a.shape[:1])
  if level.shape != a.shape[:1]:
    raise ValueError(f"loss_level must be a scalar or [m] = [{a.shape[0]}]; "
                     f"got {level.shape}")
  dtype = rollout_lib._common_float_dtype(a, b, level)         # pylint: disable=protected-access
  a, b, level = a.astype(dtype), b.astype(dtype), level.astype(dtype)[:, None]
  if kind == "additive":
    return b
  multiplicative = (a - 1.0 / batch_size) * level
  return multiplicative if kind == "multiplicative" else multiplicative + b


class Ranking(NamedTuple):
  """Top-k lists per test example; rows follow the rows of the scores.

  proponent_ids / proponent_scores: [m, top_k], most helpful first; opponent_ids /
  opponent_scores: [m, top_k], most harmful first. Only strictly helpful (resp. harmful)
  examples are listed; unused slots hold id -1 and score nan. Scores are the input scores.
  """
  proponent_ids: np.ndarray
  proponent_scores: np.ndarray
  opponent_ids: np.ndarray
  opponent_scores: np.ndarray


def rank(scores, train_ids, top_k: int, *, higher_is_helpful: bool = True) -> Ranking:
  """Top-k proponents and opponents of each test example.

  Args:
    scores: [m, n] (or [n] for one test example) effects; column i is train_ids[i].
    train_ids: int [n] ids of the columns (e.g. FitParams.train_ids).
    top_k: list length, >= 1; capped at n.
    higher_is_helpful: True for `removal_effects` (> 0 = proponent); False for
      `step_effects` and other loss changes (< 0 = proponent).

  Returns:
    Ranking; for scores [n] each field is 1-D [top_k]. Ties keep column order; nan scores
    are neither proponents nor opponents.
  """
  s = np.asarray(scores, np.float64)
  ids = np.asarray(train_ids)
  squeeze = s.ndim == 1
  if squeeze:
    s = s[None]
  if s.ndim != 2:
    raise ValueError(f"scores must be [m, n] or [n]; got shape {s.shape}")
  if ids.shape != (s.shape[1],):
    raise ValueError(f"train_ids must be [n] = [{s.shape[1]}]; got shape {ids.shape}")
  if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
    raise ValueError(f"top_k must be a positive integer; got {top_k!r}")
  kk = int(min(top_k, s.shape[1]))
  helpful = s if higher_is_helpful else -s                      # > 0 = proponent
  fields = []
  for sign in (1.0, -1.0):
    h = sign * helpful                                          # > 0 = wanted
    h = np.where(np.isnan(h), -np.inf, h)
    order = np.argsort(-h, axis=1, kind="stable")[:, :kk]      # [m, kk]
    picked = np.take_along_axis(h, order, axis=1) > 0
    fields.append(np.where(picked, ids[order], -1).astype(np.int64))
    fields.append(np.where(picked, np.take_along_axis(s, order, axis=1), np.nan))
  out = Ranking(*fields)
  return Ranking(*(f[0] for f in out)) if squeeze else out


def repacked_removal_effects(A, B, *, kind: str, batches, initial_losses,
                             chunk_size: int | None = None, rho=None, gamma=None,
                             beyond: str = "hold") -> np.ndarray:
  """Leave-one-out effects where the run is re-packed into full batches without z_i.

  Simfluence's α(c) = Σ_{i∈c} A_i sums over the batch, so a batch with an empty slot (the
  keep_steps semantics of `removal_effects`) is also a *smaller batch*: with A_i ≈ 1/k each
  slot carries ≈ 1/k of the identity, and emptying one mixes "without z_i" with "a step
  that scales the loss by ≈ (k−1)/k". Re-packing (`counterfactuals.remove_examples`, the
  default, and what the counterfactual check retrains) keeps every batch full and shortens
  the run by |T_i|/k steps instead: the faithful "train without z_i" at a fixed batch size.

  Same arguments and orientation as `removal_effects` (> 0 proponent); numpy [m, n].
  Examples absent from the curriculum get exactly 0. With step terms, the shortened run
  also misses its last steps' shared terms — as the real shortened run misses those steps.
  """
  from simfluence_jax.evaluation import counterfactuals  # pylint: disable=g-import-not-at-top
  a, b = np.asarray(A), np.asarray(B)
  l0 = np.asarray(initial_losses)
  batches = np.asarray(batches)
  m, n = a.shape
  chunk_size = int(chunk_size or min(n, DEFAULT_CHUNK_SIZE))
  terms = {"rho": rho, "gamma": gamma, "beyond": beyond}
  reference = np.asarray(rollout_lib.rollout(a, b, kind=kind, batches=batches,
                                             initial_losses=l0, **terms))[-1]
  present = np.unique(batches[batches >= 0])
  out = np.zeros((m, n), dtype=np.result_type(a.dtype, l0.dtype))
  for start in range(0, present.size, chunk_size):
    chunk = present[start:start + chunk_size]
    curricula = [counterfactuals.remove_examples(batches, [int(i)]) for i in chunk]
    stacked, mask = rollout_lib.pad_curricula(curricula)
    finals = np.asarray(rollout_lib.rollout_many(
        a, b, kind=kind, batches=stacked, initial_losses=l0, step_mask=mask,
        **terms))[:, -1]
    out[:, chunk] = (finals - reference).T                       # [m, chunk]
  return out
