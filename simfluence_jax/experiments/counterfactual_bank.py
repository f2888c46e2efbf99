"""The counterfactual bank in a workspace: write the frozen bench's curricula, the
method-chosen removal test's, and score every method on the retrained runs.

  make_bench(workspace, spec)        -> curriculum files of evaluation.bench (after split)
  make_removal_test(workspace, ...)  -> each method's own top-k proponents of a few targets,
                                        removed (masked) from the first base run (after fit)
  score_workspace(workspace, ...)    -> <workspace>/counterfactuals/scores.json

Files live under <workspace>/counterfactuals/: bench/ (bench.json + one curriculum per edit),
removal_test/ (manifest.json + curricula), scores.json. The train binary retrains the
curricula (run ids "explicit_<file stem>") and copies each file's metadata into run.json.
"""

from __future__ import annotations

import json
import pathlib
from typing import Sequence

import numpy as np

from simfluence_jax.evaluation import attribution
from simfluence_jax.evaluation import bench as bench_lib
from simfluence_jax.evaluation import counterfactual_scores as cf_scores
from simfluence_jax.evaluation import counterfactuals
from simfluence_jax.evaluation import reports
from simfluence_jax.experiments import metagradient_bank
from simfluence_jax.simulators import rollout
from simfluence_jax.simulators import simfluence as simulators
from simfluence_jax.traces import atomic_io
from simfluence_jax.traces import contract as traces
from simfluence_jax.traces import fit_params
from simfluence_jax.yardstick import baselines

DIR = "counterfactuals"
SCORES_FILE = "scores.json"
DELTAS_FILE = "deltas.npz"   # the per-pair Δ behind scores.json (the report's plots)


def _experiment(workspace) -> dict:
  path = pathlib.Path(workspace) / "experiment.json"
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    raise FileNotFoundError(f"{path}: no experiment split yet; run the split stage") from None


def answers(workspace, split: str) -> dict[int, str]:
  """{example id: target text} of the workspace's train or test examples."""
  return {int(i): str(e.get("targets", "")) for i, e in
          traces.read_examples(workspace, split).items()}


def make_bench(workspace, spec: bench_lib.BenchSpec) -> list[pathlib.Path]:
  """Generates the bench from the first `spec.num_base_runs` held-out runs; writes it."""
  heldout = _experiment(workspace)["split"]["heldout"]
  if len(heldout) < spec.num_base_runs:
    raise ValueError(f"the bench needs {spec.num_base_runs} held-out base runs; the split "
                     f"has {len(heldout)}")
  base = [(r, traces.read_run(workspace, r).curriculum) for r in heldout[:spec.num_base_runs]]
  edits = bench_lib.generate(spec, base, answers(workspace, "train"), answers(workspace, "test"))
  return bench_lib.write(pathlib.Path(workspace) / DIR / "bench", spec, base, edits)


def make_removal_test(workspace, *, methods: Sequence[str], num_targets: int, k: int,
                      seed: int = 0) -> list[pathlib.Path]:
  """The field's removal test: for `num_targets` test examples (drawn by `seed`), each
  method's own top-k proponents (largest simulated rise of the target's final loss when
  removed, masked: `attribution.removal_effects`; for "metagradient" the exact first-order
  rise, `metagradient_bank.removal_effects`) removed from the first held-out run."""
  base_id = _experiment(workspace)["split"]["heldout"][0]
  base = traces.read_run(workspace, base_id)
  rng = np.random.default_rng(np.random.SeedSequence([bench_lib.BENCH_VERSION, seed, 1]))
  cols = sorted(int(c) for c in rng.choice(base.test_ids.size, size=min(
      num_targets, base.test_ids.size), replace=False))
  out_dir = pathlib.Path(workspace) / DIR / "removal_test"
  files, manifest = [], []
  for name in methods:
    if name == metagradient_bank.METHOD:   # exact first-order effects (reverse mode)
      train_ids, picked = metagradient_bank.removal_effects(workspace, base, cols)
      effects = dict(zip(cols, picked))
    else:
      params, _ = fit_params.load_fit(workspace, name)
      sub = fit_params.select_tests(params, simulators.columns_of(params, base))
      rho, gamma = sub.step_terms()
      effects = np.asarray(attribution.removal_effects(
          sub.A, sub.B, kind=params.kind,
          batches=rollout.ids_to_positions(base.curriculum, params.train_ids),
          initial_losses=np.asarray(base.losses[0], np.float32), rho=rho, gamma=gamma,
          beyond=params.beyond))                                 # [m, n]
      train_ids = params.train_ids
    for col in cols:
      order = np.argsort(-effects[col])[:k]
      removed = sorted(int(train_ids[i]) for i in order)
      target = int(base.test_ids[col])
      edit_id = f"removal_{name}_t{target}"
      meta = {"counterfactual": {
          "name": edit_id, "kind": "method_top_k", "base_run": base_id, "method": name,
          "target_id": target, "k": len(removed), "removed_ids": removed, "form": "masked",
          "predicted_rise": float(np.sort(effects[col])[::-1][:k].sum())}}
      f = out_dir / f"{edit_id}.json"
      atomic_io.save_json(f, {"batches": counterfactuals.remove_examples(
          base.curriculum, removed, keep_steps=True, missing_ok=True).tolist(),
          "metadata": meta})
      files.append(f)
      manifest.append(meta["counterfactual"])
  atomic_io.save_json(out_dir / "manifest.json", manifest)
  return files


def _predictors(workspace, fits, fit_runs) -> dict[str, tuple[str, cf_scores.Predictor]]:
  """{name: (label, predict)}: every fit, then the no-curriculum baselines."""
  out = {}
  for f in fits:
    plain = lambda run, p=f.params: simulators.simulate_run(p, run, unseen="mean")
    if f.rescaled:   # σ fitted on the fit runs: no ground truth exists for an edit
      sigma = cf_scores.sigma_from_runs(plain, fit_runs)

      def predict(run, plain=plain, sigma=sigma):
        pred = np.asarray(plain(run), np.float64).copy()
        pred[1:] *= sigma
        return pred
      out[f.name] = (f.label + " (σ from fit runs)",
                     predict)
    else:
      out[f.name] = (f.label, plain)
  predictions = metagradient_bank.read_predictions(workspace)
  if predictions is not None:   # written by the metagradient stage (metagradient_bank.py)
    out[metagradient_bank.METHOD] = (metagradient_bank.LABEL,
                                     metagradient_bank.predictor(predictions))
  mean = baselines.mean_trajectory(fit_runs)
  out["mean_trajectory"] = (baselines.LABELS["mean_trajectory"],
                            lambda run: baselines.predict_mean_trajectory(mean, run))
  out["initial_loss"] = (baselines.LABELS["initial_loss"], baselines.predict_initial_loss)
  return out


def edited_runs(workspace, run_ids: Sequence[str] | None = None) -> list[traces.RunTrace]:
  """The given runs, or every run whose run.json has a "counterfactual" with a base_run."""
  ids = run_ids if run_ids is not None else traces.list_runs(workspace)
  out = []
  for r in ids:
    run = traces.read_run(workspace, r)
    if (run.metadata.get("counterfactual") or {}).get("base_run"):
      out.append(run)
    elif run_ids is not None:
      raise ValueError(f"run {r!r} has no metadata.counterfactual.base_run: it is not an "
                       "edit of a base run (see WORKSPACE.md)")
  return out


def score_workspace(workspace, *, run_ids: Sequence[str] | None = None,
                    fit_names: Sequence[str] | None = None, write: bool = True) -> dict:
  """Scores every fit (or `fit_names`) and the baselines on the edited runs; writes
  <workspace>/counterfactuals/scores.json. Method-chosen removal runs (kind "method_top_k")
  are reported under "removal_test", not pooled into the kinds."""
  workspace = pathlib.Path(workspace)
  experiment = _experiment(workspace)
  fits = reports.load_fits(workspace, experiment)
  if fit_names is not None:
    unknown = sorted(set(fit_names) - {f.name for f in fits})
    if unknown:
      raise ValueError(f"fits {unknown} are not evaluated fits of {workspace}")
    fits = [f for f in fits if f.name in set(fit_names)]
  fit_runs = simulators.read_runs(workspace, experiment["split"]["fit"])
  runs = edited_runs(workspace, run_ids)
  if not runs:
    raise ValueError(f"{workspace}: no edited runs (run.json metadata.counterfactual) to score")
  bench_runs = [r for r in runs if cf_scores.kind_of_run(r) != "method_top_k"]
  removal_runs = [r for r in runs if cf_scores.kind_of_run(r) == "method_top_k"]
  bases = {b: traces.read_run(workspace, b)
           for b in sorted({r.metadata["counterfactual"]["base_run"] for r in runs})}
  test_answers = answers(workspace, "test")
  predictors = _predictors(workspace, fits, fit_runs)
  result = {"runs": len(bench_runs), "kinds": sorted({cf_scores.kind_of_run(r)
                                                     for r in bench_runs}),
            "methods": {}, "removal_test": []}
  bench_json = workspace / DIR / "bench" / "bench.json"
  if bench_json.exists():
    stored = json.loads(bench_json.read_text())
    result["bench"] = {"version": stored["version"], "spec": stored["spec"]}
  arrays: dict[str, np.ndarray] = {}
  for name, (label, predict) in predictors.items():
    raw: dict = {}
    scores = (cf_scores.score_method(predict, bench_runs, bases, test_answers,
                                     cf_scores.kind_of_run, raw=raw) if bench_runs else {})
    result["methods"][name] = {"label": label, **scores}
    if raw:
      arrays["kind"], arrays["obs"] = raw["kind"].astype(str), raw["obs"]
      arrays[f"sim/{name}"] = raw["sim"]
      for kind, (obs_t, sim_t) in raw["trajectories"].items():
        arrays[f"traj_obs/{kind}"] = obs_t
        arrays[f"traj_sim/{name}/{kind}"] = sim_t
  for run in removal_runs:
    cf = run.metadata["counterfactual"]
    base = bases[cf["base_run"]]
    col = list(run.test_ids.tolist()).index(int(cf["target_id"]))
    obs = float(cf_scores.final(run.losses)[col] - cf_scores.final(base.losses)[col])
    others = cf_scores.final(run.losses) - cf_scores.final(base.losses)
    result["removal_test"].append({
        "method": cf["method"], "target_id": int(cf["target_id"]), "k": int(cf["k"]),
        "predicted_rise": cf.get("predicted_rise"), "observed_rise": obs,
        "observed_mean_rise_all_tests": float(np.mean(others)), "run_id": run.run_id})
  if write:
    if arrays:
      atomic_io.save_npz(workspace / DIR / DELTAS_FILE,
                         **{k.replace("/", "__"): v for k, v in arrays.items()})
    atomic_io.save_json(workspace / DIR / SCORES_FILE, result)
  return result


def read_scores(workspace) -> dict | None:
  path = pathlib.Path(workspace) / DIR / SCORES_FILE
  return json.loads(path.read_text()) if path.exists() else None
