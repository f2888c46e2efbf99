"""R fine-tuning runs stepped together under `jax.vmap`, recording every test loss (traces).

Shapes (R runs, k batch size, m test examples, T steps, P train-pool examples):
  pool        dict of [P, L] arrays (seqio EncDecFeatureConverter names), on device, shared
  test_batch  dict of [m, L] arrays, on device, shared
  positions   int32 [R, k]   rows of `pool` consumed by each run at this step; -1 pads
  losses      float32 [R, T+1, m] host buffer; row 0 = L_0 before any step (Simfluence Eq. 1's
              L_t: the loss of every test example after step t)

A step is, per run r (vmapped over r):
  batch_r = pool[max(positions[r], 0)];  w = positions[r] >= 0
  loss_r  = sum_i w_i * l(theta_r, batch_r[i]) / max(sum_i w_i, 1)   (a short batch averages over
            its real examples)
  theta_r, opt_r <- optax update with grad of loss_r w.r.t. the trainable variables
and then, in the same jitted call, records l(theta_r, test_j) for all r, j as one [R, m] forward
(vmap over runs of a batched forward of the m test examples: matmul speed, no loop).

Runs of different length T_r share one group: the shorter are padded with all-(-1) rows, and an
all-pad step is an exact no-op (params AND optimizer state kept via `jnp.where`); the padded
steps' recorded losses are dropped when a trace is written (losses[r, :T_r + 1]).

Tuning: "full" trains every collection (frozen = {}); "ia3" trains only the "ia3" collection and
keeps "params" frozen, stored once and shared by all runs (vmap in_axes=None, not replicated).
Sharding: the runs axis is sharded over a 1-D mesh "runs" of all (global) devices; R is padded
to a multiple of the device count with all-pad runs (init_state(padded_runs=...)), which are
never written. Runs are independent, so the step needs no communication between devices (or
processes); each process reads back only the rows of the runs on its own devices
(distributed.host_array; other rows stay NaN) — see distributed.py for multi-process layout.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from simfluence_jax.training import distributed
from simfluence_jax.training.models import losses as model_losses

TUNINGS = ("full", "ia3")
OPTIMIZERS = ("adafactor", "adam")
IA3_COLLECTION = "ia3"

Batch = Mapping[str, jax.Array]
# loss_fn(variables, batch, rng) -> per-example loss [b]; rng None = deterministic (no dropout).
LossFn = Callable[[Mapping[str, Any], Batch, "jax.Array | None"], jax.Array]


def make_optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
  """Constant-LR optax optimizer: "adafactor" (the T5X default, factored 2nd moments) or "adam"."""
  if name == "adafactor":
    return optax.adafactor(learning_rate=learning_rate)
  if name == "adam":
    # eps_root: sqrt(nu + 1e-30) keeps the update differentiable where nu = 0 (a parameter
    # whose gradient is exactly 0 so far, e.g. an unused embedding row: sqrt'(0) = inf would
    # give NaN metagradients); for any nu > ~1e-22 the float32 sum is nu itself.
    return optax.adam(learning_rate=learning_rate, eps_root=1e-30)
  raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def split_variables(variables: Mapping[str, Any], tuning: str) -> tuple[dict, dict]:
  """Splits model variables into (trainable, frozen) collections for `tuning`."""
  if tuning == "full":
    return dict(variables), {}
  if tuning == "ia3":
    if IA3_COLLECTION not in variables:
      raise ValueError("tuning='ia3' needs variables with an 'ia3' collection "
                       "(init the model with use_ia3=True)")
    trainable = {IA3_COLLECTION: variables[IA3_COLLECTION]}
    return trainable, {k: v for k, v in variables.items() if k != IA3_COLLECTION}
  raise ValueError(f"tuning must be one of {TUNINGS}, got {tuning!r}")


def merge_variables(trainable: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict:
  return {**frozen, **trainable}


@flax.struct.dataclass
class TrainState:
  """The state of a group of R runs; a pytree (jit, vmap, sharding, orbax go through it)."""
  step: jax.Array       # int32 []  steps taken by the group
  trainable: Any        # leaves [R, ...]
  opt_state: Any        # leaves [R, ...]
  frozen: Any           # shared by all runs, no runs axis ({} under full tuning)
  rng: jax.Array        # uint32 [R, 2] per-run dropout keys

  @property
  def num_runs(self) -> int:
    return int(self.rng.shape[0])

  def run_variables(self, r: int) -> dict:
    """Run r's full model variables (host numpy), e.g. for a per-run checkpoint. Reads only
    this process's shards: run r must be on one of its devices (distributed.process_runs)."""
    def row(x):
      rows = distributed.local_rows(x)
      if r not in rows:
        raise ValueError(f"run {r} is not on a device of process {jax.process_index()}; "
                         "only its own runs (distributed.process_runs) can be read")
      return rows[r]
    return merge_variables(jax.tree.map(row, self.trainable),
                           jax.tree.map(np.asarray, self.frozen))


def init_state(variables: Mapping[str, Any], *, num_runs: int, tuning: str,
               optimizer: optax.GradientTransformation, seed: int,
               mesh: Mesh | None = None, padded_runs: int | None = None) -> TrainState:
  """Every run starts from the same `variables` (the pretrained model; host numpy, or arrays
  of this process when single-process).

  mesh: build the state directly sharded over its "runs" axis (each device materializes only
    its runs; the only way with devices of several processes). None: the default device.
  padded_runs: R_pad >= R runs in the state; runs R.. are padding (give them all-pad steps).
    Run r's dropout key is the same for any R_pad (the R real keys are split from the seed
    first), so padding or sharding never changes a real run.
  """
  trainable, frozen = split_variables(variables, tuning)
  padded_runs = num_runs if padded_runs is None else padded_runs
  if padded_runs < num_runs:
    raise ValueError(f"padded_runs={padded_runs} < num_runs={num_runs}")
  build = functools.partial(_build_state, num_runs=num_runs, padded_runs=padded_runs,
                            optimizer=optimizer)
  seed = np.uint32(seed)
  if mesh is None:
    return _build_state_jit(trainable, frozen, seed, num_runs=num_runs,
                            padded_runs=padded_runs, optimizer=optimizer)
  shardings = state_shardings(jax.eval_shape(build, trainable, frozen, seed), mesh)
  return jax.jit(build, out_shardings=shardings)(trainable, frozen, seed)


def _build_state(trainable, frozen, seed, *, num_runs, padded_runs, optimizer) -> TrainState:
  stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (padded_runs,) + x.shape), trainable)
  rng = jax.random.split(jax.random.PRNGKey(seed), num_runs)
  if padded_runs > num_runs:   # padding runs reuse run 0's key (their steps are no-ops)
    rng = jnp.concatenate([rng, jnp.broadcast_to(rng[:1], (padded_runs - num_runs, 2))])
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      trainable=stacked,
      opt_state=jax.vmap(optimizer.init)(stacked),
      frozen=jax.tree.map(jnp.copy, frozen),  # a copy: train_step donates the state
      rng=rng)


# jitted: one compile, instead of one per leaf and optimizer op when run eagerly. `optimizer`
# is static; pass the same object (e.g. Trainer.optimizer) to reuse the compiled function.
_build_state_jit = jax.jit(_build_state,
                           static_argnames=("num_runs", "padded_runs", "optimizer"))


def runs_mesh(num_runs: int, devices: Iterable[jax.Device] | None = None) -> Mesh | None:
  """A 1-D mesh "runs" over `devices` (default: all, grouped by process), or None when there
  is one device or R is not divisible by their count (pad R with
  distributed.padded_num_runs first to use them all)."""
  devices = list(distributed.global_devices() if devices is None else devices)
  if len(devices) < 2 or num_runs % len(devices):
    return None
  return Mesh(np.asarray(devices), ("runs",))


def replicate(tree: Any, mesh: Mesh | None) -> Any:
  """Host numpy leaves -> arrays replicated on every device of `mesh` (global arrays across
  processes: every process passes the same values), or on the default device."""
  if mesh is None:
    return jax.tree.map(jnp.asarray, tree)
  rep = NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(lambda x: distributed.global_array(np.asarray(x), rep), tree)


def state_shardings(state: TrainState, mesh: Mesh) -> TrainState:
  """Runs-axis leaves sharded over "runs"; step and frozen replicated."""
  runs = NamedSharding(mesh, PartitionSpec("runs"))
  rep = NamedSharding(mesh, PartitionSpec())
  return TrainState(
      step=rep,
      trainable=jax.tree.map(lambda _: runs, state.trainable),
      opt_state=jax.tree.map(lambda _: runs, state.opt_state),
      frozen=jax.tree.map(lambda _: rep, state.frozen),
      rng=runs)


def place(state: TrainState, mesh: Mesh | None) -> TrainState:
  return state if mesh is None else jax.device_put(state, state_shardings(state, mesh))


def _gather(pool: Batch, positions: jax.Array) -> dict:
  idx = jnp.maximum(positions, 0)
  return {k: jnp.take(v, idx, axis=0) for k, v in pool.items()}


def weighted_mean_loss(per_example: jax.Array, weights: jax.Array) -> jax.Array:
  """The step's loss: sum_i w_i l_i / max(sum_i w_i, 1) over the k batch slots.

  With w = 1 on real slots and 0 on pads (the trainer's default) it is the mean over the real
  examples; w_i = 0 is the *masked* removal of slot i (the others' mean), and
  d loss / d w_i = (l_i - loss) / sum_i w_i at sum_i w_i >= 1 (metagradients.py). The
  arithmetic follows the per-example losses' dtype (float64 for exact reference tests).
  """
  w = weights.astype(per_example.dtype)
  return jnp.sum(per_example * w) / jnp.maximum(jnp.sum(w), 1.0)


def run_update(loss_fn: LossFn, optimizer: optax.GradientTransformation, trainable,
               opt_state, frozen, batch: Batch, weights: jax.Array, *, live: jax.Array,
               rng: jax.Array | None = None):
  """One run's optimizer step -> (trainable, opt_state, loss); a pure function of its inputs.

  batch: [k, ...] the slots' features; weights [k] (see weighted_mean_loss). live: bool []
  False makes the step an exact no-op (params AND optimizer state kept: an all-pad step);
  it is a separate input, not read from the weights, so that the step stays differentiable
  in the weights (metagradients.py) while the trainer's no-op rule is unchanged.
  """
  def loss_of(tr):
    return weighted_mean_loss(loss_fn(merge_variables(tr, frozen), batch, rng), weights)
  loss, grads = jax.value_and_grad(loss_of)(trainable)
  updates, new_opt_state = optimizer.update(grads, opt_state, trainable)
  new_trainable = optax.apply_updates(trainable, updates)
  keep = lambda new, old: jnp.where(live, new, old)
  return (jax.tree.map(keep, new_trainable, trainable),
          jax.tree.map(keep, new_opt_state, opt_state), loss)


class Trainer:
  """Holds the model's loss and the optimizer; its jitted functions are compiled once.

  Attributes:
    train_step(state, positions [R,k], pool, test_batch) -> (state, train_loss [R], test [R,m])
      (`state` is donated.)
    update_step(state, positions [R,k], pool) -> (state, train_loss [R]): the same step
      without recording (a step whose test losses are not wanted: ~90% of a step's cost
      on our CPU experiments is the recording forward).
    Both take optional slot weights [R, k] as a last argument (default: 1 on real slots, 0
    on pads; see weighted_mean_loss), without a mesh only (finite-difference references).
    record(state, test_batch) -> [R, m] test losses of the current state (L_0).

  mesh: when given, both run under `jax.shard_map` over its "runs" axis: each device steps and
    records its own R/devices runs, with no communication (the state built by
    `init_state(mesh=...)`, or `place`d on it when single-process).
  record_chunk: how recording goes over runs. None: vmap over all runs at once. c >= 1:
    `lax.map` over runs, c runs at a time (vmapped). Each run's m test examples are always one
    batched forward. On CPU, c=1 measured 1.9x faster than vmap for full fine-tuning
    and 1.4x faster for IA3 (16 runs x 100 test examples, 345k-param model, 2 cores): vmap
    turns every dot into a batched matmul, which XLA CPU runs well below plain-matmul speed.
  """

  def __init__(self, loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
               dropout: bool = False, mesh: Mesh | None = None,
               record_chunk: int | None = 1):
    self.loss_fn = loss_fn
    self.optimizer = optimizer
    self.dropout = dropout
    self.mesh = mesh
    self.record_chunk = record_chunk
    self.train_step = jax.jit(self._sharded(self._train_step, num_outputs=3), donate_argnums=0)
    self.update_step = jax.jit(self._sharded(self._update_step, num_outputs=2),
                               donate_argnums=0)
    self.record = jax.jit(self._sharded(self._record, num_outputs=1))

  def _sharded(self, fn, num_outputs):
    if self.mesh is None:
      return fn
    runs, rep = PartitionSpec("runs"), PartitionSpec()
    spec = TrainState(step=rep, trainable=runs, opt_state=runs, frozen=rep, rng=runs)
    in_specs = {3: (spec, runs, rep, rep), 2: (spec, runs, rep), 1: (spec, rep)}[num_outputs]
    out_specs = {3: (spec, runs, runs), 2: (spec, runs), 1: runs}[num_outputs]
    return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs)

  def _run_update(self, trainable, opt_state, rng, frozen, pool, positions, weights):
    rng, step_rng = jax.random.split(rng)
    w = (positions >= 0).astype(jnp.float32) if weights is None else weights
    new_trainable, new_opt_state, loss = run_update(
        self.loss_fn, self.optimizer, trainable, opt_state, frozen, _gather(pool, positions),
        w, live=jnp.any(positions >= 0), rng=step_rng if self.dropout else None)
    return new_trainable, new_opt_state, rng, loss

  def _record(self, state: TrainState, test_batch: Batch) -> jax.Array:
    run_record = lambda trainable: self.loss_fn(merge_variables(trainable, state.frozen),
                                                test_batch, None)        # [m]
    if self.record_chunk is None:
      return jax.vmap(run_record)(state.trainable)                      # [R, m]
    return jax.lax.map(run_record, state.trainable, batch_size=self.record_chunk)

  def _update_step(self, state: TrainState, positions: jax.Array, pool: Batch,
                   weights: jax.Array | None = None):
    trainable, opt_state, rng, train_loss = jax.vmap(
        self._run_update, in_axes=(0, 0, 0, None, None, 0, 0))(
            state.trainable, state.opt_state, state.rng, state.frozen, pool, positions,
            weights)
    state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state,
                          rng=rng)
    return state, train_loss

  def _train_step(self, state: TrainState, positions: jax.Array, pool: Batch,
                  test_batch: Batch, weights: jax.Array | None = None):
    state, train_loss = self._update_step(state, positions, pool, weights)
    return state, train_loss, self._record(state, test_batch)


@dataclasses.dataclass
class Progress:
  """The host-side record of a group: what a resumed group needs besides its TrainState."""
  losses: np.ndarray        # float32 [R, T+1, m]; NaN = not yet recorded
  train_losses: np.ndarray  # float32 [R, T]; NaN = not yet trained

  @classmethod
  def empty(cls, num_runs: int, num_steps: int, num_test: int) -> "Progress":
    return cls(np.full((num_runs, num_steps + 1, num_test), np.nan, np.float32),
               np.full((num_runs, num_steps), np.nan, np.float32))


def train_group(trainer: Trainer, state: TrainState, progress: Progress, *,
                positions: np.ndarray, pool: Batch, test_batch: Batch,
                mesh: Mesh | None = None, save_steps: Iterable[int] = (),
                on_save: Callable[[TrainState, Progress], None] | None = None,
                on_steps: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
                sync_every: int = 4,
                record_steps: Iterable[int] | None = None) -> tuple[TrainState, Progress]:
  """Steps the group from `state.step` to T = positions.shape[1], filling `progress`.

  positions: int32 [R, T, k] (host). L_0 is recorded first when state.step == 0.
  on_save(state, progress) runs after each step in `save_steps`, with progress complete up to it.
  on_steps(step, train_loss [R], test_losses [R, m]) runs for each step as losses reach the host.
  Losses come back to the host every `sync_every` steps so dispatch runs ahead of the device.
  With devices of several processes, each process fills only the rows of its own runs
  (distributed.process_runs); the other rows stay NaN, in `progress` and in `on_steps`.
  record_steps: the steps (1..T) whose test losses are recorded (None: every step; L_0 is
  always recorded); the others stay NaN ("not recorded" in the trace contract) and are
  stepped by `trainer.update_step`. The same seed gives the same parameters either way.
  """
  positions = np.asarray(positions, np.int32)
  num_runs, num_steps, _ = positions.shape
  save_steps = set(save_steps)
  start = int(distributed.host_array(state.step))
  if start == 0:
    progress.losses[:, 0] = distributed.host_array(trainer.record(state, test_batch))
  pos_sharding = None if mesh is None else NamedSharding(mesh, PartitionSpec("runs"))
  pending = []

  def flush():
    for step, train_loss, test_losses in pending:
      train_loss = distributed.host_array(train_loss)
      test_losses = (np.full(progress.losses[:, step].shape, np.nan, np.float32)
                     if test_losses is None else distributed.host_array(test_losses))
      progress.train_losses[:, step - 1] = train_loss
      progress.losses[:, step] = test_losses
      if on_steps is not None:
        on_steps(step, train_loss, test_losses)
    pending.clear()

  record = None if record_steps is None else set(int(s) for s in record_steps)
  for t in range(start, num_steps):
    batch_positions = (jax.device_put(positions[:, t]) if mesh is None
                       else distributed.global_array(positions[:, t], pos_sharding))
    if record is None or t + 1 in record:
      state, train_loss, test_losses = trainer.train_step(state, batch_positions, pool,
                                                          test_batch)
    else:
      state, train_loss = trainer.update_step(state, batch_positions, pool)
      test_losses = None
    pending.append((t + 1, train_loss, test_losses))
    if t + 1 in save_steps or t + 1 == num_steps or len(pending) >= sync_every:
      flush()
    if t + 1 in save_steps and on_save is not None:
      on_save(state, progress)
  flush()
  return state, progress


def tracin_steps(num_steps: int, count: int) -> list[int]:
  """`count` evenly spaced steps in 1..T, the last being T (TracIn-CP checkpoints)."""
  if count <= 0 or num_steps <= 0:
    return []
  steps = np.ceil(np.linspace(num_steps / count, num_steps, count)).astype(int)
  return sorted(set(int(s) for s in steps))


def t5_loss_fn(model) -> LossFn:
  """per-example mean token cross-entropy of a models.t5.Transformer on a feature batch."""
  def loss_fn(variables, batch, rng):
    kwargs = {} if rng is None else {"rngs": {"dropout": rng}}
    logits = model.apply(variables, batch["encoder_input_tokens"],
                         batch["decoder_input_tokens"], deterministic=rng is None, **kwargs)
    return model_losses.per_example_loss(logits, batch["decoder_target_tokens"],
                                   batch["decoder_loss_weights"])

  return loss_fn
