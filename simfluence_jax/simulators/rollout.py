"""Simulating loss trajectories with a fitted Simfluence simulator (paper §3.1, Eq. 1).

For every test example z (one row of A and B) the simulator is the linear Markov process

    L_t(z) = α(c_t) · L_{t-1}(z) + β(c_t),   α(c_t) = Σ_{i∈c_t} A_{z,i},  β(c_t) = Σ_{i∈c_t} B_{z,i}

started from the observed L_0(z) and applied recursively (Eq. 1). The ablations fix
α ≡ 1 ("additive", = TracIn-Ideal) or β ≡ 0 ("multiplicative").

With run-shared step terms (ours; `ridge.Terms`) the step is
    L_t(z) = (α(c_t) + ρ_t(z)) · L_{t-1}(z) + β(c_t) + γ_t(z),
ρ, γ [m, T_s] fitted per step of the fit runs. A curriculum longer than T_s (a repeat makes
a run longer) needs a rule for t > T_s: `beyond="hold"` uses ρ_{T_s}, γ_{T_s} (the late
steps' shared dynamic goes on), `beyond="zero"` drops them (WORKSPACE.md says which rule a
fit records and why). Step t means the t-th row of the curriculum, whatever its batch.

Conventions shared with `design.py` / `ridge.py`:
  * A, B are [m, n]: row = test example, column = *position* into the fit's train_ids.
  * A curriculum is `batches` int32 [T, k] of positions; -1 is a pad and contributes nothing.
    An example listed twice in one batch counts twice (c_t is a multiset).
  * A short batch (|c_t| < k real examples) is the **mean** of its examples, scaled to k:
    α(c) = (k/|c|) Σ_{i∈c} A_i, β(c) = (k/|c|) Σ_{i∈c} B_i — as the trainer averages a short
    batch's loss over its real examples (the step is as large as a full one). A full batch
    is Eq. 1 exactly. This also makes a masked removal gauge-free with step terms: shifting
    every A_i by δ and ρ_t by −kδ (which no full-batch fit can tell apart) changes no
    prediction. Fits regress on full batches only (design.build_transitions).
  * A step whose batch is all pads is an **identity step** (L_t = L_{t-1}), never α = 0:
    no example was consumed, so nothing happens. This is how curricula of different lengths
    are stacked for `rollout_many` (pad whole rows with -1; see `pad_curricula`) and how an
    emptied batch of a keep-steps removal (counterfactuals / attribution) behaves.
  * An optional `step_mask` (bool [T] or [C, T]) additionally freezes steps: a step runs
    only where step_mask is True *and* its batch holds at least one example.

Shapes: `rollout` -> [T+1, m] (row 0 = L_0); `rollout_many` -> [C, T+1, m]. The last row is
the final loss of every curriculum, even a shorter one padded with identity steps.

The hot path is a module-level `jax.jit` with `kind` static; the per-step α, β are gathered
inside the `lax.scan` body (memory O(m·k) per step, never [T, m, k]). Calling `rollout` again
with the same shapes and dtypes compiles nothing.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("linear", "additive", "multiplicative")


def check_kind(kind: str) -> str:
  if kind not in KINDS:
    raise ValueError(f"unknown simulator kind {kind!r}; expected one of {KINDS}")
  return kind


def step_coefficients(a: jax.Array, b: jax.Array, batch: jax.Array, active: jax.Array,
                      *, kind: str) -> tuple[jax.Array, jax.Array]:
  """α(c_t), β(c_t) of one step for all test examples (Eq. 1).

  Args:
    a, b: [m, n] simulator parameters.
    batch: int [k] positions, -1 = pad.
    active: bool scalar; False makes the step the identity (α = 1, β = 0).
    kind: "linear" | "additive" | "multiplicative".

  Returns:
    alpha, beta: [m] each.
  """
  valid = batch >= 0                                    # [k]
  safe = jnp.where(valid, batch, 0)                     # [k]; pads gather column 0 ...
  w = valid.astype(a.dtype)                             # ... and are weighted by 0
  w = w * (batch.shape[0] / jnp.maximum(jnp.sum(w), 1.0))   # a short batch: k × its mean
  active = jnp.logical_and(active, jnp.any(valid))      # all-pad batch -> identity step
  if kind == "additive":
    alpha = jnp.ones(a.shape[:1], a.dtype)
  else:
    alpha = jnp.where(active, jnp.take(a, safe, axis=1) @ w, 1.0)      # [m, k] @ [k]
  if kind == "multiplicative":
    beta = jnp.zeros(b.shape[:1], b.dtype)
  else:
    beta = jnp.where(active, jnp.take(b, safe, axis=1) @ w, 0.0)
  return alpha, beta


def _rollout_impl(a, b, batches, initial_losses, step_mask, rho_t, gamma_t, *, kind):
  """Eq. 1 by lax.scan. a, b [m, n]; batches [T, k]; initial_losses [m]; step_mask [T];
  rho_t, gamma_t [T, m] the step terms of each step of this curriculum (zeros: none)."""

  def step(loss, xs):
    batch, active, rho, gamma = xs
    alpha, beta = step_coefficients(a, b, batch, active, kind=kind)
    live = jnp.logical_and(active, jnp.any(batch >= 0))   # identity steps get no terms
    new = (alpha + jnp.where(live, rho, 0.0)) * loss + beta + jnp.where(live, gamma, 0.0)
    return new, new

  _, traj = jax.lax.scan(step, initial_losses, (batches, step_mask, rho_t, gamma_t))
  return jnp.concatenate([initial_losses[None], traj], axis=0)        # [T+1, m]


@functools.partial(jax.jit, static_argnames=("kind",))
def _rollout_jit(a, b, batches, initial_losses, step_mask, rho_t, gamma_t, *, kind):
  return _rollout_impl(a, b, batches, initial_losses, step_mask, rho_t, gamma_t, kind=kind)


@functools.partial(jax.jit, static_argnames=("kind",))
def _rollout_many_jit(a, b, batches, initial_losses, step_mask, rho_t, gamma_t, *, kind):
  fn = functools.partial(_rollout_impl, kind=kind)
  return jax.vmap(fn, in_axes=(None, None, 0, 0, 0, None, None))(
      a, b, batches, initial_losses, step_mask, rho_t, gamma_t)


BEYOND = ("hold", "zero")


def step_terms_per_step(rho, gamma, num_steps: int, m: int, dtype, beyond: str = "hold"):
  """(ρ_t, γ_t) as [T, m] for steps t = 1..T of a curriculum, by the `beyond` rule.

  rho, gamma: [m, T_s] or None (no step terms: zeros).
  """
  if beyond not in BEYOND:
    raise ValueError(f"beyond must be one of {BEYOND}, got {beyond!r}")
  if rho is None and gamma is None:
    z = jnp.zeros((num_steps, m), dtype)
    return z, z
  out = []
  for arr in (rho, gamma):
    if arr is None:
      arr = jnp.zeros((m, jnp.shape(gamma if rho is None else rho)[1]), dtype)
    arr = jnp.asarray(arr, dtype)
    if arr.ndim != 2 or arr.shape[0] != m:
      raise ValueError(f"step terms must be [m={m}, T_s]; got {arr.shape}")
    t_s = arr.shape[1]
    if t_s == 0:
      out.append(jnp.zeros((num_steps, m), dtype))
      continue
    idx = np.minimum(np.arange(num_steps), t_s - 1)
    per = arr.T[idx]                                            # [T, m]
    if beyond == "zero":
      per = jnp.where(jnp.asarray(np.arange(num_steps) < t_s)[:, None], per, 0.0)
    out.append(per)
  return out[0], out[1]


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _common_float_dtype(*xs):
  dtype = jnp.result_type(*xs)
  if not jnp.issubdtype(dtype, jnp.floating):
    dtype = jnp.result_type(float)
  return dtype


def _check_params(a, b):
  if a.ndim != 2 or b.shape != a.shape:
    raise ValueError(f"A and B must both be [m, n]; got A {a.shape}, B {b.shape}")


def _check_batches(batches, num_train: int, *, lead: tuple[int, ...]) -> jax.Array:
  """Validates a positions array and returns it as int32.

  Values are checked on the caller's array before any int32 conversion (so a huge int64
  cannot wrap into range); under tracing only shape and dtype are checked.
  """
  if not _is_concrete(batches):
    batches = jnp.asarray(batches)
  else:
    batches = np.asarray(batches)
  if batches.ndim != len(lead) + 2:
    raise ValueError(f"batches must be int [{', '.join(['C'] * len(lead) + ['T', 'k'])}] "
                     f"positions; got shape {batches.shape}")
  if not jnp.issubdtype(batches.dtype, jnp.integer):
    raise ValueError(f"batches must be integer positions (-1 = pad); got {batches.dtype}")
  if not _is_concrete(batches):
    return batches.astype(jnp.int32)
  values = batches
  bad = np.argwhere((values < -1) | (values >= num_train))
  if bad.size:
    where = tuple(int(v) for v in bad[0])
    step = where[-2] + 1
    prefix = f"curriculum {where[0]} (0-based), " if lead else ""
    raise ValueError(
        f"{prefix}step {step} (1-based): position {int(values[where])} is outside "
        f"[0, {num_train}) and is not the pad -1; convert train ids with ids_to_positions")
  return jnp.asarray(values.astype(np.int32))


def rollout(A, B, *, kind: str, batches, initial_losses, step_mask=None, rho=None,
            gamma=None, beyond: str = "hold") -> jax.Array:
  """Simulates one curriculum for all m test examples (Eq. 1).

  Args:
    A, B: [m, n] fitted parameters (A unused for "additive", B for "multiplicative").
    kind: "linear" | "additive" | "multiplicative" (static under jit).
    batches: int [T, k] positions into the fit's train ids; -1 = pad.
    initial_losses: [m] observed L_0.
    step_mask: optional bool [T]; False freezes a step (identity). All-pad rows are
      identity steps regardless.
    rho, gamma: optional [m, T_s] run-shared step terms; beyond: their rule past T_s.

  Returns:
    [T+1, m] losses, row 0 = initial_losses, in the promoted float dtype of the inputs.
  """
  kind = check_kind(kind)
  a, b, l0 = jnp.asarray(A), jnp.asarray(B), jnp.asarray(initial_losses)
  _check_params(a, b)
  batches = _check_batches(batches, a.shape[1], lead=())
  if l0.shape != (a.shape[0],):
    raise ValueError(f"initial_losses must be [m] = [{a.shape[0]}]; got {l0.shape}")
  num_steps = batches.shape[0]
  mask = (jnp.ones((num_steps,), bool) if step_mask is None
          else jnp.asarray(step_mask, bool))
  if mask.shape != (num_steps,):
    raise ValueError(f"step_mask must be bool [T] = [{num_steps}]; got {mask.shape}")
  dtype = _common_float_dtype(a, b, l0)
  rho_t, gamma_t = step_terms_per_step(rho, gamma, num_steps, a.shape[0], dtype, beyond)
  return _rollout_jit(a.astype(dtype), b.astype(dtype), batches,
                      l0.astype(dtype), mask, rho_t, gamma_t, kind=kind)


def rollout_many(A, B, *, kind: str, batches, initial_losses, step_mask=None, rho=None,
                 gamma=None, beyond: str = "hold") -> jax.Array:
  """Simulates C curricula at once (vmap of `rollout` over curricula).

  Args:
    A, B: [m, n] fitted parameters.
    kind: "linear" | "additive" | "multiplicative" (static under jit).
    batches: int [C, T, k] positions, -1 = pad. Curricula shorter than T are padded with
      whole rows of -1 (identity steps; `pad_curricula` builds this and the mask).
    initial_losses: [C, m] (or [m], shared by all curricula).
    step_mask: optional bool [C, T]; False freezes a step.
    rho, gamma, beyond: step terms as for `rollout` (step t is row t of every curriculum).

  Returns:
    [C, T+1, m]; row T of curriculum c is its final loss whatever its unpadded length.
  """
  kind = check_kind(kind)
  a, b, l0 = jnp.asarray(A), jnp.asarray(B), jnp.asarray(initial_losses)
  _check_params(a, b)
  batches = _check_batches(batches, a.shape[1], lead=(0,))
  num_curricula, num_steps = batches.shape[:2]
  m = a.shape[0]
  if l0.shape == (m,):
    l0 = jnp.broadcast_to(l0, (num_curricula, m))
  if l0.shape != (num_curricula, m):
    raise ValueError(f"initial_losses must be [C, m] = [{num_curricula}, {m}] or [m]; "
                     f"got {l0.shape}")
  mask = (jnp.ones((num_curricula, num_steps), bool) if step_mask is None
          else jnp.asarray(step_mask, bool))
  if mask.shape != (num_curricula, num_steps):
    raise ValueError(f"step_mask must be bool [C, T] = [{num_curricula}, {num_steps}]; "
                     f"got {mask.shape}")
  dtype = _common_float_dtype(a, b, l0)
  rho_t, gamma_t = step_terms_per_step(rho, gamma, num_steps, m, dtype, beyond)
  return _rollout_many_jit(a.astype(dtype), b.astype(dtype), batches,
                           l0.astype(dtype), mask, rho_t, gamma_t, kind=kind)


def pad_curricula(curricula) -> tuple[np.ndarray, np.ndarray]:
  """Stacks curricula [T_c, k] of different lengths into ([C, T_max, k], step_mask [C, T_max]).

  Missing rows are filled with -1 (identity steps) and marked False in step_mask. All
  curricula must share the batch size k.
  """
  arrays = [np.asarray(c) for c in curricula]
  if not arrays:
    raise ValueError("pad_curricula needs at least one curriculum")
  for c, arr in enumerate(arrays):
    if arr.ndim != 2:
      raise ValueError(f"curriculum {c}: expected int [T, k]; got shape {arr.shape}")
  ks = {arr.shape[1] for arr in arrays}
  if len(ks) != 1:
    raise ValueError(f"curricula have different batch sizes {sorted(ks)}; pad batches "
                     "to a common k with -1 first")
  (k,) = ks
  t_max = max(arr.shape[0] for arr in arrays)
  out = np.full((len(arrays), t_max, k), -1, np.int32)
  mask = np.zeros((len(arrays), t_max), bool)
  for c, arr in enumerate(arrays):
    out[c, :arr.shape[0]] = arr
    mask[c, :arr.shape[0]] = True
  return out, mask


def ids_to_positions(curriculum_ids, train_ids) -> np.ndarray:
  """Maps a curriculum of train ids int [T, k] (-1 pads) to positions into `train_ids`.

  Returns int32 [T, k] with -1 kept as -1. Raises ValueError naming the first unknown id
  and its 1-based step, or a duplicate / negative id in `train_ids`.
  """
  cur = np.asarray(curriculum_ids)
  ids = np.asarray(train_ids)
  if cur.ndim != 2:
    raise ValueError(f"curriculum must be int [T, k]; got shape {cur.shape}")
  if cur.size and not np.issubdtype(cur.dtype, np.integer):
    raise ValueError(f"curriculum must hold integer train ids; got dtype {cur.dtype}")
  if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
    raise ValueError(f"train_ids must be int [n]; got {ids.dtype} {ids.shape}")
  cur = cur.astype(np.int64)
  ids = ids.astype(np.int64)
  if ids.size and ids.min() < 0:
    raise ValueError(f"train_ids must be non-negative (-1 is the pad); got {int(ids.min())}")
  order = np.argsort(ids, kind="stable")
  sorted_ids = ids[order]
  dup = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
  if dup.size:
    raise ValueError(f"train id {int(sorted_ids[dup[0]])} appears more than once in "
                     "train_ids; positions would be ambiguous")
  idx = np.clip(np.searchsorted(sorted_ids, cur), 0, max(ids.size - 1, 0))
  found = (sorted_ids[idx] == cur) if ids.size else np.zeros(cur.shape, bool)
  unknown = (cur != -1) & ~found
  if unknown.any():
    t, j = (int(v) for v in np.argwhere(unknown)[0])
    raise ValueError(f"step {t + 1} (1-based), slot {j}: train id {int(cur[t, j])} is not "
                     f"among the {ids.size} train ids of the simulator")
  return np.where(cur == -1, -1, order[idx]).astype(np.int32)
