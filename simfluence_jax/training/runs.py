"""Train runs of any model (a Flax module, or a loss over a params pytree) and write traces.

  train_runs(workspace, loss_fn=, variables=, optimizer=, pool=, pool_ids=, test=, test_ids=,
             curricula={run_id: int [T_r, k_r] train ids, -1 pads}) -> [run_id, ...]

trains every curriculum together under `jax.vmap` with the multi-run trainer (trainer.py:
`Trainer`, `init_state`, `train_group`) and writes one trace per run through the trace contract
(`traces.contract.write_run`), so `python -m simfluence_jax.fit` / `evaluate` work on it.

Shapes (R runs, P pool examples, m test examples, T = max_r T_r, k = max_r k_r):
  pool        {name: [P, ...]}  row p is the example pool_ids[p]   (the user's ids, any order)
  test        {name: [m, ...]}  row j is the example test_ids[j]
  curricula   {run_id: int [T_r, k_r]}  row t-1 = the pool ids consumed at step t; -1 pads
  positions   int32 [R, T, k]   rows of `pool` per run and step (-1 pads): run r's own batches,
              padded with -1 to k slots and with all-pad (no-op) steps to T
  losses      float32 [R, T+1, m] -> run r's trace keeps losses[r, :T_r + 1]

Every run starts from the same `variables`; a step is trainer.run_update: the mean loss over
the batch's real examples, one optimizer update of the trainable leaves, frozen leaves shared
by all runs (stored once, not per run); an all-pad step keeps parameters and optimizer state.

Which leaves are trained (`trainable`): "all"; a collection name or names (e.g. "lora" for
adapters kept in their own collection: everything else is frozen); or a predicate over leaf
paths, `fn(("params", "Dense_0", "kernel")) -> bool`, for any finer choice. The trainer merges
its trainable and frozen trees at the top level only, so the two halves are stored under the
keys "trained" / "frozen" and joined leaf by leaf before every call of `loss_fn`.
"""

from __future__ import annotations

import functools
import os
import pathlib
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import flax.core
import flax.linen as nn
import jax
import numpy as np
import optax
from flax import traverse_util

from simfluence_jax.traces import contract as traces
from simfluence_jax.training import distributed
from simfluence_jax.training import trainer as trainer_lib

LossFn = trainer_lib.LossFn
# "all" | a collection name | collection names | a predicate over leaf paths (collection first).
Trainable = Union[str, Sequence[str], Callable[[tuple], bool]]
_TRAINED, _FROZEN = "trained", "frozen"   # the trainer's top-level keys of the two halves


def flax_loss(module: nn.Module,
              per_example_loss: Callable[[Any, Mapping[str, jax.Array]], jax.Array], *,
              inputs: str | Sequence[str] = "x",
              deterministic: str | None = None) -> LossFn:
  """A trainer.LossFn from a Flax module: loss_fn(variables, batch, rng) -> [b] losses.

  outputs = module.apply(variables, batch[inputs[0]], batch[inputs[1]], ...), then
  per_example_loss(outputs, batch) -> float [b] (e.g. optax's softmax cross-entropy with
  batch["y"]; b = the batch's leading size). rng is None when recording test losses and in a
  step without dropout; otherwise it is passed as rngs={"dropout": rng}, and, if the module
  takes one, as `deterministic` = (rng is None) under that keyword's name. A module that
  mutates a collection in apply (BatchNorm in training mode) needs a loss_fn of its own.
  """
  names = (inputs,) if isinstance(inputs, str) else tuple(inputs)

  def loss_fn(variables, batch, rng):
    kwargs: dict[str, Any] = {} if rng is None else {"rngs": {"dropout": rng}}
    if deterministic is not None:
      kwargs[deterministic] = rng is None
    return per_example_loss(module.apply(variables, *(batch[n] for n in names), **kwargs),
                            batch)

  return loss_fn


def split_trainable(variables: Mapping[str, Any],
                    trainable: Trainable) -> tuple[dict, dict, str | list[str]]:
  """(trained, frozen, description) nested dicts of `variables`' leaves; `description` is
  what run.json records ("all", the collection names, or "predicate")."""
  flat = traverse_util.flatten_dict(flax.core.unfreeze(variables))
  if not flat:
    raise ValueError("variables has no leaves (pass the model's variables, e.g. "
                     "module.init(key, x))")
  collections = sorted({path[0] for path in flat})
  if callable(trainable):
    keep, description = trainable, "predicate"
  elif isinstance(trainable, str) and trainable == "all":
    keep, description = (lambda path: True), "all"
  else:
    names = [trainable] if isinstance(trainable, str) else list(trainable)
    missing = [n for n in names if n not in collections]
    if missing or not names:
      raise ValueError(f"trainable={trainable!r}: no collection {missing} in variables "
                       f"(it has {collections}); pass 'all', collection names or a "
                       "predicate over leaf paths")
    keep, description = (lambda path: path[0] in names), sorted(names)
  mask = {path: bool(keep(path)) for path in flat}
  if not any(mask.values()):
    raise ValueError(f"trainable={trainable!r} selects no leaf of variables (collections "
                     f"{collections}); nothing would be trained")
  half = lambda want: traverse_util.unflatten_dict(
      {path: np.asarray(leaf) for path, leaf in flat.items() if mask[path] == want})
  return half(True), half(False), description


def join_trainable(trained: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict:
  """The model's variables back from split_trainable's two halves (leaf by leaf)."""
  flat = traverse_util.flatten_dict(dict(frozen))
  flat.update(traverse_util.flatten_dict(dict(trained)))
  return traverse_util.unflatten_dict(flat)


def _split_loss(loss_fn: LossFn) -> LossFn:
  """loss_fn over the trainer's {"trained", "frozen"} variables, checking its output is [b]."""
  def wrapped(variables, batch, rng):
    losses = loss_fn(join_trainable(variables[_TRAINED], variables.get(_FROZEN, {})),
                     batch, rng)
    b = next(iter(batch.values())).shape[0]
    if np.shape(losses) != (b,):
      raise ValueError(f"loss_fn must return one loss per example, shape [{b}] for a batch "
                       f"of {b}; got shape {np.shape(losses)} (a mean over the batch?)")
    return losses
  return wrapped


def _examples_table(table: Mapping[str, Any], ids: np.ndarray, what: str) -> dict:
  """{name: numpy [n, ...]} with every array's leading size = len(ids)."""
  if not isinstance(table, Mapping) or not table:
    raise ValueError(f"{what} must be a non-empty dict of arrays, one row per example")
  out = {}
  for name, value in table.items():
    arr = np.asarray(value)
    if arr.ndim < 1 or arr.shape[0] != ids.size:
      raise ValueError(f"{what}[{name!r}] has shape {arr.shape}; its first axis must have "
                       f"one row per id ({what}_ids has {ids.size})")
    out[name] = arr
  return out


def _trainer(loss_fn: LossFn, optimizer: optax.GradientTransformation, dropout: bool,
             mesh: jax.sharding.Mesh | None) -> trainer_lib.Trainer:
  """The Trainer for these four, reused across calls (its jitted steps compile once for the
  same loss_fn and optimizer objects and shapes: retraining edits in a loop compiles nothing
  after the first call); built fresh when loss_fn or optimizer is unhashable."""
  try:
    hash((loss_fn, optimizer))
  except TypeError:
    return trainer_lib.Trainer(_split_loss(loss_fn), optimizer, dropout=dropout, mesh=mesh)
  return _cached_trainer(loss_fn, optimizer, dropout, mesh)


@functools.lru_cache(maxsize=8)
def _cached_trainer(loss_fn, optimizer, dropout, mesh) -> trainer_lib.Trainer:
  return trainer_lib.Trainer(_split_loss(loss_fn), optimizer, dropout=dropout, mesh=mesh)


def _check_curriculum(run_id: str, batches: Any, pool_ids: np.ndarray) -> np.ndarray:
  """int32 [T, k] train ids, each -1 or an id of pool_ids; errors name the run and step."""
  where = f"train_runs: curriculum of run {run_id!r}"
  cur = np.asarray(batches)
  if cur.ndim != 2 or cur.shape[0] < 1 or cur.shape[1] < 1:
    raise ValueError(f"{where} must be a 2-D array [T >= 1 steps, k >= 1] of train ids, "
                     f"got shape {cur.shape}")
  if cur.dtype.kind not in "iu":
    raise ValueError(f"{where} must hold integer ids, got dtype {cur.dtype}")
  unknown = (cur != -1) & ~np.isin(cur, pool_ids)
  if unknown.any():
    t, j = (int(x[0]) for x in np.nonzero(unknown))
    raise ValueError(f"{where}: step {t + 1} (row {t}) consumes id {int(cur[t, j])}, which "
                     "is not in pool_ids (ids are the pool's ids, not row positions; "
                     "-1 pads)")
  return cur.astype(np.int32)


def _positions(curricula: Sequence[np.ndarray], pool_ids: np.ndarray) -> np.ndarray:
  """int32 [R, T, k] rows of the pool (T, k the largest over runs); -1 pads each run's
  batches to k slots and its steps to T (all-pad, no-op steps)."""
  num_steps = max(int(c.shape[0]) for c in curricula)
  batch_size = max(int(c.shape[1]) for c in curricula)
  order = np.argsort(pool_ids, kind="stable")
  out = np.full((len(curricula), num_steps, batch_size), -1, np.int32)
  for r, cur in enumerate(curricula):
    rows = order[np.searchsorted(pool_ids[order], np.maximum(cur, 0))]
    out[r, :cur.shape[0], :cur.shape[1]] = np.where(cur >= 0, rows, -1)
  return out


def train_runs(
    workspace: str | os.PathLike,
    *,
    loss_fn: LossFn,
    variables: Mapping[str, Any],
    optimizer: optax.GradientTransformation,
    pool: Mapping[str, Any],
    pool_ids: Any,
    test: Mapping[str, Any],
    test_ids: Any,
    curricula: Mapping[str, Any],
    trainable: Trainable = "all",
    seed: int = 0,
    dropout: bool = False,
    record_every: int = 1,
    metadata: Mapping[str, Any] | None = None,
    run_metadata: Mapping[str, Mapping[str, Any]] | None = None,
    train_examples: Iterable[dict] | None = None,
    test_examples: Iterable[dict] | None = None,
    devices: Sequence[jax.Device] | None = None,
    overwrite: bool = False,
) -> list[str]:
  """Trains one run per curriculum, all together, and writes their traces; returns run ids.

  loss_fn(variables, batch, rng) -> float [b]: the per-example loss of a batch (a dict of the
    pool's or test's arrays, b rows), e.g. `flax_loss(module, per_example_loss)`. rng is a
    per-run, per-step key when `dropout`, else None; test losses are recorded with None.
  variables: the model's starting variables (e.g. `module.init(key, x)`), shared by all runs.
  optimizer: any optax GradientTransformation (its state is per run).
  pool / test: {name: array [P, ...] / [m, ...]}, row p = the example pool_ids[p] / test_ids[p].
  pool_ids / test_ids: int [P] / [m] unique ids >= 0 (what curricula and traces name).
  curricula: {run_id: int [T_r, k_r]} pool ids per step, -1 pads trailing a row (an all-pad
    row is a no-op step). Runs may differ in T_r and k_r; each trace keeps its own shape, its
    train_ids are the ids it consumes. A bad curriculum is a ValueError naming the run and
    step.
  trainable: "all", a collection name or names, or a predicate over leaf paths (module doc).
  seed: the dropout keys: run r's is jax.random.split(PRNGKey(seed), R)[r], in curricula
    order (init_state).
  record_every: record the test losses every `record_every` steps and at each run's last
    step (for the whole group: a run also records at the others' last steps; the rest are
    NaN, "not recorded"); 1 = every step, which fits need.
  metadata: JSON written into every run.json (with "trainer", "seed", "trainable",
    "num_trained_params", "record_every" if != 1); run_metadata: per run, over it.
  train_examples / test_examples: optional {"id", "inputs", "targets", ...} dicts for
    examples/{train,test}.jsonl (reports show their texts); ids must be pool_ids / test_ids.
  devices: the runs axis is sharded over these (default: all local devices; R padded to a
    multiple of their count with no-op runs). Single process only (multi-host: the train
    binary).
  overwrite: replace existing runs of these ids with different content (else a TraceError
    before any run is written; an identical run is left as it is). The examples files, when
    given, are written before training (a bad one stops it), as the train binary does.

  The same inputs and seed give bit-identical traces.
  """
  if record_every < 1:
    raise ValueError(f"record_every must be >= 1, got {record_every}")
  if jax.process_count() > 1:
    raise ValueError("train_runs trains in one process; for several use "
                     "python -m simfluence_jax.train")
  ws = pathlib.Path(workspace)
  pool_ids = traces.check_ids(pool_ids, "pool_ids", "train_runs")
  test_ids = traces.check_ids(test_ids, "test_ids", "train_runs")
  if pool_ids.size == 0 or test_ids.size == 0:
    raise ValueError("train_runs: pool_ids and test_ids need at least one id each")
  pool = _examples_table(pool, pool_ids, "pool")
  test = _examples_table(test, test_ids, "test")
  if not curricula:
    raise ValueError("train_runs: curricula is empty; pass {run_id: int [T, k] ids}")
  run_ids = list(curricula)
  batches = [_check_curriculum(r, curricula[r], pool_ids) for r in run_ids]
  unknown = sorted(set(run_metadata or {}) - set(run_ids))
  if unknown:
    raise ValueError(f"run_metadata names runs {unknown} that are not in curricula")
  trained, frozen, description = split_trainable(variables, trainable)
  shared = {"trainer": "simfluence_jax.train_runs", "seed": int(seed),
            "trainable": description,
            "num_trained_params": int(sum(np.size(x) for x in jax.tree.leaves(trained))),
            **({"record_every": record_every} if record_every != 1 else {}),
            **dict(metadata or {})}
  meta = [{**shared, **dict((run_metadata or {}).get(r, {}))} for r in run_ids]
  # Everything else the contract checks, before training (run ids, -1 only trailing a row,
  # a run consumes an example, JSON metadata), with placeholder losses.
  for r, cur, m in zip(run_ids, batches, meta):
    traces.validate(_trace(r, test_ids, cur, None, m), "train_runs")
  examples = {"train": _checked_examples(train_examples, pool_ids, "train_examples"),
              "test": _checked_examples(test_examples, test_ids, "test_examples")}
  if any(rows is not None for rows in examples.values()):
    with traces.workspace_lock(ws):
      for split, rows in examples.items():
        if rows is not None:
          traces.write_examples(ws, split, rows)

  losses = _train_group(loss_fn, optimizer, trained, frozen, run_ids=run_ids, pool=pool,
                        test=test, test_ids=test_ids, positions=_positions(batches, pool_ids),
                        lengths=[int(c.shape[0]) for c in batches], seed=seed,
                        dropout=dropout, record_every=record_every, devices=devices)
  out = [traces.validate(_trace(r, test_ids, cur, run_losses, m), "train_runs")
         for r, cur, run_losses, m in zip(run_ids, batches, losses, meta)]
  with traces.workspace_lock(ws):
    if not overwrite:   # all clashes before any write: never half of the runs replaced
      clash = [t.run_id for t in out if _exists_different(ws, t)]
      if clash:
        raise traces.TraceError(f"{traces.runs_dir(ws)}: runs {clash} already exist with "
                                "different content; pass overwrite=True to replace them")
    for trace in out:
      traces.write_run(ws, trace, overwrite=overwrite)
  return run_ids


def _train_group(loss_fn: LossFn, optimizer: optax.GradientTransformation, trained: dict,
                 frozen: dict, *, run_ids: Sequence[str], pool: dict, test: dict,
                 test_ids: np.ndarray, positions: np.ndarray,
                 lengths: Sequence[int], seed: int, dropout: bool, record_every: int,
                 devices: Sequence[jax.Device] | None) -> list[np.ndarray]:
  """Trains the R runs of positions [R, T, k] as one vmapped group; returns run r's
  float32 [T_r + 1, m] test losses (NaN where not recorded). A NaN or inf among the recorded
  losses is a diverged run: a ValueError naming run, step and test example."""
  num_runs, num_steps, _ = positions.shape
  devices = list(jax.local_devices() if devices is None else devices)
  padded = distributed.padded_num_runs(num_runs, len(devices))
  mesh = trainer_lib.runs_mesh(padded, devices)
  positions = np.concatenate(   # the padding runs (to fill the devices) are all no-ops
      [positions, np.full((padded - num_runs,) + positions.shape[1:], -1, np.int32)])
  trainer = _trainer(loss_fn, optimizer, dropout, mesh)
  # init_state ("full") over the trained half, then the frozen half: shared by all runs (not
  # per run) and a fresh device copy, as train_step donates the state.
  state = trainer_lib.init_state({_TRAINED: trained}, num_runs=num_runs, tuning="full",
                                 optimizer=optimizer, seed=seed, mesh=mesh,
                                 padded_runs=padded)
  state = state.replace(frozen={_FROZEN: trainer_lib.replicate(frozen, mesh)})
  record_steps = None if record_every == 1 else (
      set(range(record_every, num_steps + 1, record_every)) | set(lengths))
  _, progress = trainer_lib.train_group(
      trainer, state, trainer_lib.Progress.empty(padded, num_steps, int(test_ids.size)),
      positions=positions, pool=trainer_lib.replicate(pool, mesh),
      test_batch=trainer_lib.replicate(test, mesh), mesh=mesh, record_steps=record_steps)
  recorded = set(range(num_steps + 1)) if record_steps is None else {0, *record_steps}
  for r, t in enumerate(lengths):
    steps = sorted(s for s in recorded if s <= t)
    _check_finite(run_ids[r], progress.losses[r, steps], steps, test_ids)
  return [progress.losses[r, :t + 1] for r, t in enumerate(lengths)]


def _trace(run_id: str, test_ids: np.ndarray, cur: np.ndarray, losses: np.ndarray | None,
           metadata: dict) -> traces.RunTrace:
  """Run `run_id`'s trace; its train_ids are the ids it consumes (as the train binary's
  explicit curricula). losses None = all NaN (a placeholder to validate the rest)."""
  if losses is None:
    losses = np.full((cur.shape[0] + 1, test_ids.size), np.nan, np.float32)
  return traces.RunTrace(run_id=run_id, train_ids=np.unique(cur[cur >= 0]).astype(np.int64),
                         test_ids=test_ids, batch_size=int(cur.shape[1]), curriculum=cur,
                         losses=np.asarray(losses, np.float32), metadata=metadata)


def _checked_examples(rows: Iterable[dict] | None, ids: np.ndarray,
                      what: str) -> list[dict] | None:
  if rows is None:
    return None
  rows = list(rows)
  have = sorted(int(r["id"]) for r in rows if isinstance(r, dict) and "id" in r)
  if have != sorted(ids.tolist()):
    missing = sorted(set(ids.tolist()) - set(have))[:5]
    extra = sorted(set(have) - set(ids.tolist()))[:5]
    raise ValueError(f"train_runs: {what} must hold one dict per id (missing {missing}, "
                     f"not an id {extra}, {len(rows)} rows for {ids.size} ids)")
  return rows


def _check_finite(run_id: str, losses: np.ndarray, steps: Sequence[int],
                  test_ids: np.ndarray) -> None:
  """losses [len(steps), m]: the rows recorded after `steps` (0 = before the first step)."""
  bad = ~np.isfinite(losses)
  if bad.any():
    t, j = (int(x[0]) for x in np.nonzero(bad))
    at = "before the first step" if steps[t] == 0 else f"after step {steps[t]}"
    raise ValueError(f"train_runs: run {run_id!r} diverged: the loss of test example "
                     f"{int(test_ids[j])} {at} is {float(losses[t, j])} (no run was "
                     "written; lower the learning rate?)")


def _exists_different(ws: pathlib.Path, trace: traces.RunTrace) -> bool:
  if not (traces.run_dir(ws, trace.run_id) / "run.json").is_file():
    return False
  try:
    return traces.read_run(ws, trace.run_id) != trace
  except traces.TraceError:
    return True
