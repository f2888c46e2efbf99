"""The experiment's stages after training, as library functions (launch/local.py runs them).

pretrain -> train -> split -> bench (edited curricula retrained) -> fit (each simulator) ->
evaluate -> removal_test (each method's own top proponents removed, retrained) ->
counterfactuals (every method scored on the change it predicts) -> report

This module holds what is experiment-specific but not a binary of its own:
  * `PipelineConfig`: the split sizes, the simulators to fit, the counterfactual questions;
  * `write_split`: the paper's random split of runs (20 fit / 2 validation / 10 held out),
    recorded in <workspace>/experiment.json (read by the report);
  * the counterfactual bank's settings (`bench_spec`); the bank itself is
    experiments/counterfactual_bank.py over evaluation/bench.py.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Sequence

from simfluence_jax.traces import atomic_io
from simfluence_jax.evaluation import bench as bench_lib
from simfluence_jax.evaluation import reports
from simfluence_jax.simulators import simfluence as simulators
from simfluence_jax.traces import contract as traces

_DEFAULT_LAM_GRID = simulators.DEFAULT_LAM_GRID
EXPERIMENT_FILE = "experiment.json"
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
    counterfactuals: whether to build the counterfactual bank (the bench's edits retrained
      for real), run the removal test and score every method on them.
    study: whether to run the data-efficiency study (Linear vs featurized, 2..20 past runs).
    bench_*: the bench (evaluation/bench.py BenchSpec): seed, base runs, removal sizes k,
      half-subset runs, repeat count, and the bank's recording interval.
    removal_test_methods / _targets / _k: the method-chosen removal test — each method's own
      top-k proponents of this many targets removed and retrained (methods not fitted are
      skipped; "metagradient" needs `metagradient`).
    metagradient: exact metagradients through training (prior_methods/metagradients.py) as a
      method on the bank: the first-order prediction of every edit, scored as
      "metagradient" (experiments/metagradient_bank.py).
    oracle_fits / oracle_steps: the oracle check — exact one-step effects of every train
      example at these steps of the first fit run against these fits' A_i, B_i.
  """
  name: str = "experiment"
  num_fit: int = 20
  num_val: int = 2
  split_seed: int = 0
  simulators: tuple[str, ...] = ("linear", "additive", "multiplicative")
  lam_grid: tuple[float, ...] = _DEFAULT_LAM_GRID
  counterfactuals: bool = True
  study: bool = True
  bench_seed: int = 0
  bench_base_runs: int = 4
  bench_removal_sizes: tuple[int, ...] = (5, 10, 20)
  bench_half_subsets: int = 32
  bench_repeat_times: int = 10
  bench_record_every: int = 8
  removal_test_methods: tuple[str, ...] = ("linear", "tracin_cp")
  removal_test_targets: int = 3
  removal_test_k: int = 10
  metagradient: bool = False
  oracle_fits: tuple[str, ...] = ("linear_paper", "linear")
  oracle_steps: tuple[int, ...] = (1, 16, 32, 64)

  def removal_methods(self) -> list[str]:
    """The removal test's methods that this experiment has (fitted, or the metagradient)."""
    return [m for m in self.removal_test_methods if m in self.simulators
            or (m == "metagradient" and self.metagradient)]

  def bench_spec(self) -> bench_lib.BenchSpec:
    return bench_lib.BenchSpec(
        seed=self.bench_seed, num_base_runs=self.bench_base_runs,
        removal_sizes=tuple(self.bench_removal_sizes), repeat_times=self.bench_repeat_times,
        num_half_subsets=self.bench_half_subsets, record_every=self.bench_record_every)

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
