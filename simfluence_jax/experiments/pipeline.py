"""The experiment's stages after training, as library functions (launch/local.py runs them).

pretrain -> train -> split -> fit (each simulator) -> evaluate -> counterfactuals -> report

This module holds what is experiment-specific but not a binary of its own:
  * `PipelineConfig`: the split sizes, the simulators to fit, the counterfactual questions;
  * `write_split`: the paper's random split of runs (20 fit / 2 validation / 10 held out),
    recorded in <workspace>/experiment.json (read by the report);
  * `make_counterfactuals`: curricula the simulators were *not* fitted on — remove the top-10
    proponents of a test example, reverse the order, duplicate one example ten times — written
    as explicit curriculum files that the train binary retrains for real, so the report can
    put simulated and real trajectories side by side.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Sequence

import numpy as np

from simfluence_jax.traces import atomic_io
from simfluence_jax.evaluation import attribution
from simfluence_jax.evaluation import counterfactuals
from simfluence_jax.evaluation import reports
from simfluence_jax.traces import fit_params
from simfluence_jax.simulators import rollout
from simfluence_jax.simulators import simfluence as simulators
from simfluence_jax.traces import contract as traces

_DEFAULT_LAM_GRID = simulators.DEFAULT_LAM_GRID
EXPERIMENT_FILE = "experiment.json"
COUNTERFACTUAL_DIR = "counterfactuals"
SIMULATOR_LABELS = reports.LABELS


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """What the stages after training do.

  Attributes:
    name: experiment name (report title).
    num_fit, num_val: runs used to fit parameters / to choose λ; the rest are held out.
    split_seed: seed of the random split of runs.
    simulators: simulators to fit and score, by `simfluence_jax.fit --simulator` name.
    lam_grid: λ candidates (chosen by validation all-steps MSE).
    counterfactuals: whether to retrain edited curricula for the counterfactual check.
    study: whether to run the data-efficiency study (Linear vs featurized, 2..20 past runs).
    num_removed: how many top proponents the "remove" question removes.
    num_duplicates: how many times the "duplicate" question repeats one example.
  """
  name: str = "experiment"
  num_fit: int = 20
  num_val: int = 2
  split_seed: int = 0
  simulators: tuple[str, ...] = ("linear", "additive", "multiplicative")
  lam_grid: tuple[float, ...] = _DEFAULT_LAM_GRID
  counterfactuals: bool = True
  study: bool = True
  num_removed: int = 10
  num_duplicates: int = 10

  def __post_init__(self):
    if not self.simulators:
      raise ValueError("PipelineConfig.simulators is empty")
    if self.num_fit < 1 or self.num_val < 0:
      raise ValueError(f"num_fit must be >= 1 and num_val >= 0, got {self}")


def sampled_run_ids(workspace) -> list[str]:
  """Runs of the experiment's protocol (explicit/counterfactual retrainings excluded)."""
  return [r for r in traces.list_runs(workspace) if not r.startswith("explicit_")]


def write_split(workspace, config: PipelineConfig) -> dict:
  """Splits the sampled runs into fit / val / held-out and records it in experiment.json."""
  split = simulators.split_runs(sampled_run_ids(workspace), num_fit=config.num_fit,
                                num_val=config.num_val, seed=config.split_seed)
  experiment = {
      "name": config.name,
      "split": split,
      "fits": {s: {"simulator": s, "label": SIMULATOR_LABELS.get(s, s)}
               for s in config.simulators},
      "config": dataclasses.asdict(config),
  }
  atomic_io.save_json(pathlib.Path(workspace) / EXPERIMENT_FILE, experiment)
  return experiment


def read_experiment(workspace) -> dict:
  path = pathlib.Path(workspace) / EXPERIMENT_FILE
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    raise FileNotFoundError(f"{path}: no experiment split yet; run the split stage") from None


def _positions(params: fit_params.FitParams, curriculum: np.ndarray) -> np.ndarray:
  return rollout.ids_to_positions(curriculum, params.train_ids)


def make_counterfactuals(workspace, *, fit_name: str, config: PipelineConfig,
                         base_run: str | None = None) -> list[dict]:
  """Writes explicit curriculum files for the counterfactual check; returns their manifest.

  The base is the first held-out run. Proponents are ranked by re-packed leave-one-out
  effects (`attribution.repacked_removal_effects`). The targeted test example is the one
  whose simulated final loss the fitted simulator says depends most on its top proponents
  (largest sum of the top `num_removed` removal effects), so the question is one the simulator has an
  opinion about. Each file is JSON {"batches": [[id, ...], ...], "metadata": {...}} and the
  train binary copies "metadata" into the retrained run's run.json.
  """
  experiment = read_experiment(workspace)
  base_id = base_run or experiment["split"]["heldout"][0]
  base = traces.read_run(workspace, base_id)
  params, _ = fit_params.load_fit(workspace, fit_name)
  sub = fit_params.select_tests(params, simulators.columns_of(params, base))
  rho, gamma = sub.step_terms()
  l0 = np.asarray(base.losses[0], np.float32)
  effects = np.asarray(attribution.repacked_removal_effects(
      sub.A, sub.B, kind=params.kind, batches=_positions(params, base.curriculum),
      initial_losses=l0, rho=rho, gamma=gamma,
      beyond=params.beyond))                                 # [m, n], > 0 = proponent
  top = np.sort(effects, axis=1)[:, ::-1][:, :config.num_removed]
  target_col = int(np.argmax(top.sum(axis=1)))
  test_id = int(base.test_ids[target_col])
  order = np.argsort(-effects[target_col])[:config.num_removed]
  proponent_ids = [int(params.train_ids[i]) for i in order if effects[target_col, i] > 0]
  top_id = proponent_ids[0] if proponent_ids else int(base.curriculum[0, 0])
  curriculum = np.asarray(base.curriculum)
  edits = [
      ("remove_top_proponents",
       counterfactuals.remove_examples(curriculum, proponent_ids, missing_ok=True)
       if proponent_ids else curriculum,
       f"{base_id} without the top-{len(proponent_ids)} proponents of test example {test_id}"),
      ("reverse", counterfactuals.reverse(curriculum), f"{base_id} in reverse order"),
      ("duplicate_top_proponent",
       counterfactuals.duplicate(curriculum, top_id, config.num_duplicates, where="spread"),
       f"{base_id} with train example {top_id} (top proponent of test example {test_id}) "
       f"seen {config.num_duplicates} more times"),
  ]
  out_dir = pathlib.Path(workspace) / COUNTERFACTUAL_DIR
  manifest = []
  for name, batches, description in edits:
    meta = {"counterfactual": {"name": name, "base_run": base_id, "test_id": test_id,
                               "description": description, "fit": fit_name,
                               "removed_ids": proponent_ids if name.startswith("remove")
                               else []}}
    path = out_dir / f"{name}.json"
    atomic_io.save_json(path, {"batches": np.asarray(batches).tolist(), "metadata": meta})
    manifest.append({"name": name, "path": str(path), "run_id": f"explicit_{name}", **meta})
  atomic_io.save_json(out_dir / "manifest.json", manifest)
  return manifest


def counterfactual_run_ids(manifest: Sequence[dict]) -> list[str]:
  return [m["run_id"] for m in manifest]


def merge_workspaces(destination, sources: Sequence) -> list[str]:
  """Copies the runs (and examples) of shard workspaces into `destination`.

  Each run is read and validated from its shard and written with traces.write_run, which
  refuses to replace a different run of the same id (so two shards that both trained a run
  must agree bit for bit). Returns the merged run ids.
  """
  merged = []
  for source in sources:
    for split in ("train", "test"):
      if not traces.examples_path(source, split).exists():
        continue
      examples = traces.read_examples(source, split)
      if examples:
        traces.write_examples(destination, split, list(examples.values()))
    for run_id in traces.list_runs(source):
      traces.write_run(destination, traces.read_run(source, run_id))
      merged.append(run_id)
  return sorted(merged)
