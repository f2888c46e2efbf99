"""Exact metagradients (prior_methods/metagradients.py) on a workspace's counterfactual bank.

  predict_bank(workspace, edited)  every edited run's first-order prediction from its base run:
                                L̂^e_t = L^b_t + Σ_ts ∂L^b_t/∂w_ts Δw_ts at the bench's recorded
                                steps (the base's observed trajectory plus the exact
                                directional derivative along the edit's weight change), written
                                to <workspace>/counterfactuals/metagradient/predictions.npz
                                with cost.json (seconds, per base run and per edit).
  oracle(workspace, ...)        the exact one-step effect of adding each train example to a
                                step of a fit run, dL_t(z)/dε, against what fitted simulators
                                say (the mean rule: (A_p − Ā_c) L_{t−1}(z) + (B_p − B̄_c)),
                                written to <workspace>/counterfactuals/metagradient/oracle.json.

A run is replayed from the workspace's pretrained model (the run.json settings: task,
tuning, optimizer, learning rate, model config), and the replay must reproduce the run's
recorded final losses (else an error names the run). An edited run's prediction is its
base's trajectory plus the derivative at the steps both record; for an edit of another
length its final row is the base's final loss plus the derivative at the base's end.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from simfluence_jax.evaluation import counterfactual_scores as cf_scores
from simfluence_jax.prior_methods import metagradients as mg
from simfluence_jax.prior_methods import methods as prior
from simfluence_jax.simulators import simfluence
from simfluence_jax.traces import atomic_io
from simfluence_jax.traces import contract as traces
from simfluence_jax.traces import fit_params
from simfluence_jax.training import checkpoints
from simfluence_jax.training import tasks
from simfluence_jax.training import trainer as trainer_lib

DIR = pathlib.Path("counterfactuals") / "metagradient"
PREDICTIONS = "predictions.npz"
COST = "cost.json"
ORACLE = "oracle.json"
REPLAY_TOLERANCE = 1e-3   # max |replayed − recorded| final loss (float32 reassociation)
METHOD = "metagradient"
LABEL = "Metagradient (exact, first order)"


@dataclasses.dataclass(frozen=True)
class Replay:
  """What replaying one run needs: the differentiator and its inputs."""
  grads: mg.Metagradients
  trainable: Any
  frozen: Any
  pool: dict            # [P, ...] the task's train pool, encoded
  test_batch: dict      # [m, ...] the run's test examples, in its test_ids order
  id_to_pos: dict       # train id -> pool row


@functools.lru_cache(maxsize=4)
def _metagradients(config, use_ia3: bool, optimizer: str, learning_rate: float):
  loss_fn = trainer_lib.t5_loss_fn(prior._model(config, use_ia3))   # pylint: disable=protected-access
  return mg.Metagradients(loss_fn, trainer_lib.make_optimizer(optimizer, learning_rate))


def replay_of(run: traces.RunTrace, pretrained_dir) -> Replay:
  """The Replay of a run written by simfluence_jax.train (its run.json settings)."""
  where = f"run {run.run_id!r}"
  config, use_ia3, li, lt, task, lr = prior.model_settings(run.metadata, where)
  tuning = run.metadata["tuning"]
  if config.dropout_rate > 0:
    raise traces.TraceError(f"{where}: trained with dropout; a replay needs a deterministic "
                            "run (dropout_rate = 0)")
  variables = checkpoints.load_pretrained(pretrained_dir, config, tuning=tuning,
                                          seed=int(run.metadata.get("seed", 0)),
                                          input_length=li, target_length=lt)
  trainable, frozen = trainer_lib.split_variables(variables, tuning)
  pools = tasks.pools_from_metadata(run.metadata)
  test_by_id = {e.id: e for e in pools.test}
  missing = [int(i) for i in run.test_ids if int(i) not in test_by_id]
  if missing:
    raise traces.TraceError(f"{where}: test ids {missing[:5]} are not in task {task!r}")
  encode = lambda exs: jax.tree.map(np.asarray, tasks.encode_examples(
      exs, input_length=li, target_length=lt))
  return Replay(grads=_metagradients(config, use_ia3, str(run.metadata["optimizer"]), lr),
                trainable=trainable, frozen=frozen, pool=encode(pools.train),
                test_batch=encode([test_by_id[int(i)] for i in run.test_ids]),
                id_to_pos={e.id: p for p, e in enumerate(pools.train)})


def _directions(replay: Replay, base: traces.RunTrace, edits: Sequence[traces.RunTrace],
                every: int, chunk: int):
  """-> (replayed L [T/e+1, m], {run id: dL [T/e+1, m]}, {run id: form})."""
  dirs = {e.run_id: mg.pad_steps(mg.edit_direction(base.curriculum, e.curriculum,
                                                   replay.id_to_pos), every) for e in edits}
  args = (replay.trainable, replay.frozen, replay.pool, replay.test_batch)
  out, primal = {}, None
  shared = [r for r, d in dirs.items() if d.form != "aligned"]
  own = [r for r, d in dirs.items() if d.form == "aligned"]
  for group, batched in ((shared, False), (own, True)):
    for i in range(0, len(group), chunk):
      ids = group[i:i + chunk]
      ds = [dirs[r] for r in ids]
      stack = lambda f: np.stack([getattr(d, f) for d in ds])
      if batched:
        lo, dl = replay.grads.directional(
            *args, stack("positions"), stack("weights").astype(np.float32), stack("live"),
            stack("delta").astype(np.float32), record_every=every, batched_positions=True)
        lo = np.asarray(lo)[0]
      else:
        d0 = ds[0]
        lo, dl = replay.grads.directional(
            *args, d0.positions, d0.weights.astype(np.float32), d0.live,
            stack("delta").astype(np.float32), record_every=every)
        lo = np.asarray(lo)
      primal = lo if primal is None else primal
      out.update(zip(ids, np.asarray(dl, np.float64)))
  return primal, out, {r: d.form for r, d in dirs.items()}


def _prediction(base: traces.RunTrace, edit: traces.RunTrace, d_loss: np.ndarray,
                every: int) -> np.ndarray:
  """[T_e + 1, m]: base_t + dL_t at the recorded steps t = j·e ≤ min(T_b, T_e); the final
  row = base final + dL at the base's end (d_loss's last row: pad_steps' steps are no-ops),
  the first-order change of the final loss. Other rows NaN (not predicted)."""
  t_b, t_e = base.num_steps, edit.num_steps
  base_l = np.asarray(base.losses, np.float64)
  pred = np.full((t_e + 1, base_l.shape[1]), np.nan)
  for j in range(d_loss.shape[0]):
    if j * every <= min(t_b, t_e):
      pred[j * every] = base_l[j * every] + d_loss[j]
  pred[t_e] = base_l[t_b] + d_loss[-1]
  return pred


def predict_bank(workspace, edited: Sequence[traces.RunTrace], *, pretrained_dir=None,
                 record_every: int = 8, chunk: int = 16) -> dict:
  """First-order metagradient predictions of the edited runs (counterfactual_bank.edited_runs,
  which imports this module); writes them.

  record_every: the derivative is computed at every e-th step and the base's end (the
  bench's runs record every `bench_record_every` steps); chunk: edits per vmapped pass.
  Returns the cost record written to cost.json.
  """
  workspace = pathlib.Path(workspace)
  pretrained_dir = pathlib.Path(pretrained_dir or workspace / "pretrained")
  if not edited:
    raise ValueError(f"{workspace}: no edited runs (metadata.counterfactual) to predict")
  by_base: dict[str, list] = {}
  for e in edited:
    by_base.setdefault(e.metadata["counterfactual"]["base_run"], []).append(e)
  preds, cost = {}, {"bases": {}, "record_every": record_every, "edits": len(edited)}
  for base_id, edits in sorted(by_base.items()):
    base = traces.read_run(workspace, base_id)
    replay = replay_of(base, pretrained_dir)
    every = min(record_every, base.num_steps)
    start = time.perf_counter()
    primal, d_loss, forms = _directions(replay, base, edits, every, chunk)
    seconds = time.perf_counter() - start
    error = float(np.max(np.abs(primal[-1] - np.asarray(base.losses[-1], np.float64))))
    if not error <= REPLAY_TOLERANCE:
      raise ValueError(
          f"replaying run {base_id!r} from {pretrained_dir} does not reproduce its recorded "
          f"final losses (max |difference| {error:.3g} > {REPLAY_TOLERANCE}): another "
          "pretrained model or settings than the run was trained with?")
    for e in edits:
      preds[e.run_id] = _prediction(base, e, d_loss[e.run_id], every)
    cost["bases"][base_id] = {"seconds": round(seconds, 2), "edits": len(edits),
                              "replay_error": error,
                              "forms": {f: sum(v == f for v in forms.values())
                                        for f in mg.DIRECTIONS}}
  cost["seconds"] = round(sum(b["seconds"] for b in cost["bases"].values()), 2)
  out = workspace / DIR
  atomic_io.save_npz(out / PREDICTIONS, **preds)
  atomic_io.save_json(out / COST, cost)
  return cost


def removal_effects(workspace, run: traces.RunTrace, cols: Sequence[int], *,
                    pretrained_dir=None) -> tuple[np.ndarray, np.ndarray]:
  """(train ids [n], effects [len(cols), n]): the first-order rise of the final loss of the
  test examples at `cols` when every slot of train id i is removed (masked),
  −Σ_{(t,s): x_ts = i} ∂L_T/∂w_ts (reverse mode, one backward pass per column)."""
  workspace = pathlib.Path(workspace)
  replay = replay_of(run, pathlib.Path(pretrained_dir or workspace / "pretrained"))
  d = mg.edit_direction(run.curriculum, run.curriculum, replay.id_to_pos)
  _, g = replay.grads.final_grads(replay.trainable, replay.frozen, replay.pool,
                                  replay.test_batch, d.positions, d.weights.astype(np.float32),
                                  d.live, np.asarray(cols, np.int32))
  g = np.asarray(g, np.float64)                                               # [c, T, k]
  ids = np.asarray(run.train_ids, np.int64)
  col = {int(i): j for j, i in enumerate(ids)}
  effects = np.zeros((g.shape[0], ids.size))
  for (t, s), i in np.ndenumerate(run.curriculum):
    if i >= 0:
      effects[:, col[int(i)]] -= g[:, t, s]
  return ids, effects


def read_predictions(workspace) -> dict[str, np.ndarray] | None:
  path = pathlib.Path(workspace) / DIR / PREDICTIONS
  if not path.exists():
    return None
  with np.load(path, allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


def predictor(predictions: Mapping[str, np.ndarray]) -> cf_scores.Predictor:
  """The bench Predictor: stored predictions for edited runs, the observed trace for a base."""
  def predict(run: traces.RunTrace) -> np.ndarray:
    if (run.metadata.get("counterfactual") or {}).get("base_run"):
      if run.run_id not in predictions:
        raise KeyError(f"edited run {run.run_id!r} has no metagradient prediction in "
                       f"{DIR / PREDICTIONS}; rerun `python -m simfluence_jax.metagradients`")
      return predictions[run.run_id]
    return np.asarray(run.losses, np.float64)
  return predict


def _pearson(x, y) -> float:
  x, y = np.ravel(x), np.ravel(y)
  return float(np.corrcoef(x, y)[0, 1]) if x.std() > 0 and y.std() > 0 else float("nan")


def oracle(workspace, *, run_id: str, fits: Sequence[str], steps: Sequence[int],
           pretrained_dir=None) -> dict:
  """Exact one-step effects dL_t(z)/dε of adding each of the fit's train examples (ε × the
  example in step t's batch of fit run `run_id`), against each fit's one-step derivative
  (A_p − Ā_c) L_{t−1}(z) + (B_p − B̄_c) (the mean rule at a full batch; A ≡ 0 for additive,
  B ≡ 0 for multiplicative fits). Per step and fit: Pearson over all (p, z), the mean over z
  of the Pearson over p (does it rank the examples for each test example?), and the least-
  squares slope of simulated on exact (1 = the right size). Writes oracle.json."""
  workspace = pathlib.Path(workspace)
  run = traces.read_run(workspace, run_id)
  replay = replay_of(run, pathlib.Path(pretrained_dir or workspace / "pretrained"))
  result = {"run": run_id, "steps": {}, "fits": list(fits)}
  loaded = {name: fit_params.load_fit(workspace, name)[0] for name in fits}
  train_ids = np.asarray(loaded[fits[0]].train_ids) if fits else np.asarray(run.train_ids)
  extra = np.asarray([replay.id_to_pos[int(i)] for i in train_ids], np.int32)
  full = mg.edit_direction(run.curriculum, run.curriculum, replay.id_to_pos)   # Δw = 0
  for t in steps:
    if not 1 <= t <= run.num_steps:
      raise ValueError(f"oracle: step {t} is not a step of run {run_id!r} (1..{run.num_steps})")
    start = time.perf_counter()
    state = replay.grads.state_at(replay.trainable, replay.frozen, replay.pool,
                                  full.positions[:t - 1],
                                  full.weights[:t - 1].astype(np.float32), full.live[:t - 1])
    exact = np.asarray(replay.grads.step_derivatives(
        state[0], state[1], replay.frozen, replay.pool, replay.test_batch,
        full.positions[t - 1], full.weights[t - 1].astype(np.float32), extra),
        np.float64).T                                                        # [m, n]
    seconds = time.perf_counter() - start
    level = np.asarray(run.losses[t - 1], np.float64)[:, None]              # L_{t-1} [m, 1]
    row = {"seconds": round(seconds, 2), "exact_abs_mean": float(np.abs(exact).mean()),
           "fits": {}}
    for name, params in loaded.items():
      sub = fit_params.select_tests(params, simfluence.columns_of(params, run))
      pos = {int(i): j for j, i in enumerate(np.asarray(params.train_ids))}
      batch = [pos[int(i)] for i in run.curriculum[t - 1] if i >= 0 and int(i) in pos]
      a = np.asarray(sub.A, np.float64) if params.kind != "additive" else 0.0 * sub.B
      b = np.asarray(sub.B, np.float64) if params.kind != "multiplicative" else 0.0 * sub.A
      sim = ((a - a[:, batch].mean(1, keepdims=True)) * level
             + (b - b[:, batch].mean(1, keepdims=True)))                     # [m, n]
      within = [_pearson(sim[z], exact[z]) for z in range(exact.shape[0])]
      row["fits"][name] = {
          "pearson": _pearson(sim, exact),
          "pearson_within_test": float(np.nanmean(within)),
          "slope": float(np.sum(sim * exact) / np.sum(exact * exact)),
          "kind": params.kind}
    result["steps"][str(t)] = row
  atomic_io.save_json(workspace / DIR / ORACLE, result)
  return result


def read_json(workspace, name: str) -> dict | None:
  path = pathlib.Path(workspace) / DIR / name
  return json.loads(path.read_text()) if path.exists() else None
