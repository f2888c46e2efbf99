"""Exact metagradients through training (REPLAY / MAGIC, Ilyas & Engstrom 2025), in JAX.

A run is a pure function of the weights w [T, S] on its (step, slot) pairs
(training.trainer.run_update, the trainer's own step):

  θ_t, o_t = U(θ_{t-1}, o_{t-1}; x_t, w_t)   the optax update (Adam, Adafactor; state o) of
                                             the gradient of Σ_s w_ts l(θ, x_ts) / max(Σ_s w_ts, 1)
  L_t(z)   = l(θ_t, z)                        every test example z

so w = 1 on the run's real slots (0 on pads) replays it exactly; w_ts = 0 is the bench's *masked*
removal of slot s at step t (the step averages over the slots left, as the trainer does), and
∂L_t(z)/∂w_ts = ∂L_t/∂θ_t · Π(∂(θ,o)_u/∂(θ,o)_{u-1}) · ∂(θ,o)_t/∂w_ts is exact, through every
later step and the optimizer's state. Two ways to get it (both jitted once per shape):

  directional  forward mode (`jax.jvp`) along one Δw [T, S] per edit: Σ_ts ∂L_t(z)/∂w_ts Δw_ts
               for every test example z and every recorded step t at once; vmapped over edits
               (the primal run is computed once, the tangents batched).
  final_grads  reverse mode (`jax.vjp`): ∂L_T(z)/∂w [T, S] for every (t, s) at once, one
               backward pass per test example (vmapped in chunks). The steps are
               rematerialised (`jax.checkpoint`): the backward pass stores one (θ, o) carry per
               step and recomputes the step's forward, instead of storing its activations.

The dtype follows the variables (float64 variables and model: exact reference tests).

Edits as weight changes (`edit_direction`), first order: ΔL ≈ Σ_ts ∂L/∂w_ts Δw_ts.
  masked      the same steps, each edited batch a sub-multiset of the base's: Δw = −1 on the
              removed slots. The path w0 + τΔw reaches the edit at τ = 1 (except on a step
              that loses every slot, which the trainer skips and the path does not).
  aligned     the same number of steps, other batches (reverse, answer_first): S = 2k, the
              base's and the edit's batch side by side, w0 = [1, 0], Δw = [−1, +1]: w(τ) trains
              step t on a (1−τ, τ) mix of both batches — a relaxed curriculum (the straight path
              from the base's step assignment to the edit's, the natural relaxation of a
              reordering) whose end τ = 1 is the edit; first order = its derivative at τ = 0.
  reweighted  another length (repacked removals, repeats): each train id x reweighted where
              the base saw it, Δw = count_edit(x) / count_base(x) − 1 on every base slot of x
              (removed: −1; r× as often: r − 1). This models the change of *what* is seen,
              not of *when* (the shifted schedule, the missing or extra steps are not
              modelled). An id the base never saw cannot be expressed (ValueError).

Shapes: T steps, S slots per step, k batch size, m test examples, E edits, P pool rows.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from simfluence_jax.training import trainer as trainer_lib

Batch = Mapping[str, jax.Array]
DIRECTIONS = ("masked", "aligned", "reweighted")


@dataclasses.dataclass(frozen=True)
class Direction:
  """One edit as a weight change of its base run (see the module docstring).

  positions: int32 [T, S] pool rows of the slots (-1: empty); weights: [T, S] w0 (the base
  run); delta: [T, S] Δw; live: bool [T] steps that are not no-ops in the base (or the edit);
  form: one of DIRECTIONS.
  """
  positions: np.ndarray
  weights: np.ndarray
  delta: np.ndarray
  live: np.ndarray
  form: str


def _live_weights(ids: np.ndarray) -> np.ndarray:
  return (np.asarray(ids) >= 0).astype(np.float64)


def edit_direction(base: np.ndarray, edited: np.ndarray, id_to_pos: Mapping[int, int]
                   ) -> Direction:
  """The edit `edited` [T', k] (train ids, -1 pads) of the base curriculum `base` [T, k] as
  a weight change (module docstring: masked, aligned or reweighted)."""
  base = np.asarray(base, np.int64)
  edited = np.asarray(edited, np.int64)
  to_pos = np.vectorize(lambda i: id_to_pos[int(i)] if i >= 0 else -1, otypes=[np.int32])
  unknown = sorted({int(i) for i in np.concatenate([base.ravel(), edited.ravel()])
                    if i >= 0 and int(i) not in id_to_pos})
  if unknown:
    raise ValueError(f"edit_direction: train ids {unknown[:5]} are not in the pool")
  w0 = _live_weights(base)
  pos = to_pos(base) if base.size else np.zeros(base.shape, np.int32)
  live = np.any(base >= 0, axis=1)
  if edited.shape[0] == base.shape[0]:
    delta = -w0.copy()
    masked = True
    for t in range(base.shape[0]):
      free = collections.defaultdict(list)
      for s, i in enumerate(base[t]):
        if i >= 0:
          free[int(i)].append(s)
      for i in edited[t]:
        if i < 0:
          continue
        if not free[int(i)]:
          masked = False
          break
        delta[t, free[int(i)].pop(0)] = 0.0
      if not masked:
        break
    if masked:
      return Direction(pos, w0, delta, live, "masked")
    k = max(base.shape[1], edited.shape[1])
    pad = lambda a: np.pad(a, ((0, 0), (0, k - a.shape[1])), constant_values=-1)
    both = np.concatenate([pad(base), pad(edited)], axis=1)
    w_both = np.concatenate([_live_weights(pad(base)), np.zeros((base.shape[0], k))], axis=1)
    d_both = np.concatenate([-_live_weights(pad(base)), _live_weights(pad(edited))], axis=1)
    return Direction(to_pos(both), w_both, d_both, live | np.any(edited >= 0, axis=1),
                     "aligned")
  count_b = collections.Counter(int(i) for i in base.ravel() if i >= 0)
  count_e = collections.Counter(int(i) for i in edited.ravel() if i >= 0)
  new = sorted(set(count_e) - set(count_b))
  if new:
    raise ValueError(f"edit_direction: the edit trains on ids {new[:5]} that its base never "
                     "saw; a reweighting of the base cannot express that")
  ratio = np.vectorize(lambda i: count_e[int(i)] / count_b[int(i)] if i >= 0 else 1.0)(base)
  return Direction(pos, w0, w0 * (ratio - 1.0), live, "reweighted")


def pad_steps(d: Direction, multiple: int) -> Direction:
  """Appends no-op steps so that T is a multiple of `multiple` (recording segments)."""
  extra = (-d.positions.shape[0]) % multiple
  if not extra:
    return d
  grow = lambda a, v: np.concatenate([a, np.full((extra,) + a.shape[1:], v, a.dtype)])
  return Direction(grow(d.positions, -1), grow(d.weights, 0.0), grow(d.delta, 0.0),
                   grow(d.live, False), d.form)


class Metagradients:
  """Replays a run as a pure function of its slot weights and differentiates it.

  loss_fn(variables, batch, rng) -> [b] per-example losses (trainer.LossFn; no dropout), and
  the optax optimizer the run was trained with. Every method takes the run's initial
  trainable variables θ_0 (no runs axis), the frozen ones, the encoded `pool` [P, ...] (rows
  addressed by `positions`) and `test_batch` [m, ...].

    replay(θ_0, frozen, pool, test, positions [T,S], weights [T,S], live [T], record_every=e)
        -> L [T/e + 1, m]: row 0 = L_0, row j = L_{j e} (T must be a multiple of e).
    directional(..., deltas [E,T,S], record_every=e) -> (L [T/e+1, m], dL [E, T/e+1, m]).
        With batched_positions=True, positions / weights / live carry the edits' axis too
        ([E, T, S], [E, T, S], [E, T]: aligned edits, whose slots differ per edit).
    final_grads(..., test_cols=None, chunk=c) -> (L_T [m], dL_T(z)/dw [m', T, S]): reverse
        mode for the test examples at `test_cols` [m'] (None: all m), c backward passes at a
        time.
    state_at(θ_0, frozen, pool, positions, weights, live) -> (θ_T, o_T): the carry after the
        given steps (e.g. the state before a step of interest).
    step_derivatives(θ, o, frozen, pool, test, positions [k], weights [k], extra [P'])
        -> [P', m]: dL(z)/dε of one step on the batch plus ε × pool row `extra[p]`,
        for every p (the exact one-step effect of adding an example; the oracle the
        simulators' A_i, B_i approximate).
  """

  def __init__(self, loss_fn: trainer_lib.LossFn, optimizer: optax.GradientTransformation,
               *, remat: bool = True):
    self.loss_fn, self.optimizer, self.remat = loss_fn, optimizer, remat
    self.replay = jax.jit(self._replay, static_argnames=("record_every",))
    self.directional = jax.jit(self._directional,
                               static_argnames=("record_every", "batched_positions"))
    self.final_grads = jax.jit(self._final_grads, static_argnames=("chunk",))
    self.state_at = jax.jit(self._state_at)
    self.step_derivatives = jax.jit(self._step_derivatives)

  # one step of the run (the trainer's own update), rematerialised under reverse mode
  def _step(self, frozen, pool, carry, xs):
    trainable, opt_state = carry
    positions, weights, live = xs
    batch = {k: jnp.take(v, jnp.maximum(positions, 0), axis=0) for k, v in pool.items()}
    trainable, opt_state, _ = trainer_lib.run_update(
        self.loss_fn, self.optimizer, trainable, opt_state, frozen, batch, weights, live=live)
    return (trainable, opt_state), None

  def _scan_steps(self, frozen, pool, carry, xs):
    step = lambda c, x: self._step(frozen, pool, c, x)
    if self.remat:
      step = jax.checkpoint(step)
    return jax.lax.scan(step, carry, xs)[0]

  def _record(self, frozen, test_batch, trainable):
    return self.loss_fn(trainer_lib.merge_variables(trainable, frozen), test_batch, None)

  def _replay(self, trainable, frozen, pool, test_batch, positions, weights, live, *,
              record_every: int):
    num_steps = positions.shape[0]
    if num_steps % record_every:
      raise ValueError(f"replay: T={num_steps} is not a multiple of record_every="
                       f"{record_every} (metagradients.pad_steps)")
    seg = lambda a: a.reshape((num_steps // record_every, record_every) + a.shape[1:])
    weights = weights.astype(jax.tree.leaves(trainable)[0].dtype)

    def segment(carry, xs):
      carry = self._scan_steps(frozen, pool, carry, xs)
      return carry, self._record(frozen, test_batch, carry[0])
    carry = (trainable, self.optimizer.init(trainable))
    _, recorded = jax.lax.scan(segment, carry, (seg(positions), seg(weights), seg(live)))
    return jnp.concatenate([self._record(frozen, test_batch, trainable)[None], recorded])

  def _directional(self, trainable, frozen, pool, test_batch, positions, weights, live,
                   deltas, *, record_every: int, batched_positions: bool = False):
    def one(pos, w, lv, dw):
      f = lambda w_: self._replay(trainable, frozen, pool, test_batch, pos, w_, lv,
                                  record_every=record_every)
      return jax.jvp(f, (w,), (dw.astype(w.dtype),))
    if batched_positions:
      return jax.vmap(one)(positions, weights, live, deltas)
    return jax.vmap(one, in_axes=(None, None, None, 0), out_axes=(None, 0))(
        positions, weights, live, deltas)

  def _final_grads(self, trainable, frozen, pool, test_batch, positions, weights, live,
                   test_cols=None, *, chunk: int = 8):
    f = lambda w: self._replay(trainable, frozen, pool, test_batch, positions, w, live,
                               record_every=positions.shape[0])[-1]
    final, vjp = jax.vjp(f, weights.astype(jax.tree.leaves(trainable)[0].dtype))
    cols = jnp.arange(final.shape[0]) if test_cols is None else jnp.asarray(test_cols)
    cotangents = jax.nn.one_hot(cols, final.shape[0], dtype=final.dtype)     # [c, m]
    grads = jax.lax.map(lambda ct: vjp(ct)[0], cotangents, batch_size=chunk)
    return final, grads

  def _state_at(self, trainable, frozen, pool, positions, weights, live):
    weights = weights.astype(jax.tree.leaves(trainable)[0].dtype)
    return self._scan_steps(frozen, pool, (trainable, self.optimizer.init(trainable)),
                            (positions, weights, live))

  def _step_derivatives(self, trainable, opt_state, frozen, pool, test_batch, positions,
                        weights, extra):
    dtype = jax.tree.leaves(trainable)[0].dtype
    w0 = jnp.concatenate([weights.astype(dtype), jnp.zeros((1,), dtype)])
    dw = jnp.zeros_like(w0).at[-1].set(1.0)

    def one(p):
      pos = jnp.concatenate([positions, p[None]])
      f = lambda w: self._record(frozen, test_batch, self._step(
          frozen, pool, (trainable, opt_state), (pos, w, jnp.asarray(True)))[0][0])
      return jax.jvp(f, (w0,), (dw,))[1]
    return jax.lax.map(one, extra)

