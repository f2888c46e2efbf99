"""The experiment pipeline: split, merge, and both launchers (the counterfactual bank:
counterfactual_bank_test.py).

The end-to-end test runs launch/local.py on the tiny config (pretrain -> train -> split ->
fit -> evaluate -> report), checks the report's table against metrics.json, and that a re-run
skips every finished stage.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from simfluence_jax.experiments import pipeline
from simfluence_jax.evaluation import reports as report
from simfluence_jax.simulators import simfluence as simulators
from simfluence_jax.traces import contract as traces

REPO = pathlib.Path(__file__).resolve().parents[2]


def _planted_workspace(root, num_runs=6, steps=40, n=10, m=4, k=2, seed=0):
  rng = np.random.default_rng(seed)
  train_ids = np.arange(n, dtype=np.int64) + 300
  test_ids = np.arange(m, dtype=np.int64) + 7000
  a = rng.uniform(0.45, 0.5, (m, n))
  a[0, 3] = 0.2                            # train id 303 cuts test example 7000's loss hard
  b = rng.uniform(-0.01, 0.01, (m, n))
  for r in range(num_runs):
    pos = np.stack([rng.choice(n, k, replace=False) for _ in range(steps)])
    losses = [rng.uniform(2, 3, m)]
    for row in pos:
      losses.append(a[:, row].sum(1) * losses[-1] + b[:, row].sum(1))
    traces.write_run(root, traces.RunTrace(
        run_id=f"run_{r:03d}", train_ids=train_ids, test_ids=test_ids, batch_size=k,
        curriculum=train_ids[pos].astype(np.int32),
        losses=np.asarray(losses, np.float32), metadata={}))
  return train_ids


def test_split_is_seeded_disjoint_and_complete(tmp_path):
  _planted_workspace(tmp_path, num_runs=6)
  config = pipeline.PipelineConfig(num_fit=3, num_val=1, split_seed=4)
  first = pipeline.write_split(tmp_path, config)["split"]
  again = pipeline.read_experiment(tmp_path)["split"]
  assert first == again
  everything = first["fit"] + first["val"] + first["heldout"]
  assert sorted(everything) == [f"run_{r:03d}" for r in range(6)]
  assert (len(first["fit"]), len(first["val"]), len(first["heldout"])) == (3, 1, 2)
  other = simulators.split_runs(everything, num_fit=3, num_val=1, seed=5)
  assert other != first  # the seed matters (6!/(3!1!2!) = 60 splits; these two differ)


def test_merge_workspaces_copies_runs_and_refuses_conflicts(tmp_path):
  _planted_workspace(tmp_path / "a", num_runs=2, seed=1)
  _planted_workspace(tmp_path / "b", num_runs=3, seed=1)  # run_000/001 identical to a's
  merged = pipeline.merge_workspaces(tmp_path / "all", [tmp_path / "a", tmp_path / "b"])
  assert merged == ["run_000", "run_000", "run_001", "run_001", "run_002"]
  assert traces.list_runs(tmp_path / "all") == ["run_000", "run_001", "run_002"]
  assert traces.read_run(tmp_path / "all", "run_002") == traces.read_run(tmp_path / "b",
                                                                           "run_002")
  _planted_workspace(tmp_path / "c", num_runs=1, seed=2)  # a different run_000
  with pytest.raises(traces.TraceError, match="run_000"):
    pipeline.merge_workspaces(tmp_path / "all", [tmp_path / "c"])


def _env():
  return dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")


def test_xm_launch_dry_run_plans_the_same_stages(tmp_path):
  res = subprocess.run(
      [sys.executable, str(REPO / "launch" / "xm_launch.py"),
       "--gin_file=experiments/quickstart.gin", f"--gin.WORKSPACE=\"{tmp_path}\"",
       "--train_shards=4", "--dry_run"], capture_output=True, text=True, env=_env(),
      timeout=120)
  assert res.returncode == 0, res.stderr
  stages = json.loads(res.stdout)
  names = [[job["name"] for job in stage] for stage in stages]
  assert names[0] == ["pretrain"]
  assert names[1] == [f"train_shard_{i}" for i in range(4)]
  shard_runs = [json.loads(job["args"][-1].split(" = ", 1)[1]) for job in stages[1]]
  assert sum(shard_runs, []) == [f"run_{r:03d}" for r in range(32)]  # each run exactly once
  assert names[2] == ["merge"] and names[3] == ["split"]
  assert names[4] == [f"fit_{s}" for s in (
      "linear", "linear_paper", "additive", "additive_paper", "multiplicative",
      "multiplicative_paper", "tracin_cp", "influence", "source", "hypothetical_linear",
      "featurized")]
  assert names[5] == [f"evaluate_{s[4:]}" for s in names[4]]
  assert names[6] == ["study"]
  # the counterfactual bank, as launch/local.py runs it: write the curricula, retrain them
  # (only them, every 8th step recorded), the metagradient's predictions, the removal test
  # likewise, then score
  assert names[7:-1] == [["bench_write"], ["bench_train"], ["metagradient"],
                         ["removal_test_write"], ["removal_test_train"], ["counterfactuals"]]
  assert stages[9][0]["module"] == "metagradients"
  bench_train = stages[8][0]["args"]
  assert f'--gin_bindings=run_experiment.curriculum_dir = "{tmp_path}/counterfactuals/bench"' \
      in bench_train
  assert "--gin_bindings=run_experiment.explicit_only = True" in bench_train
  assert "--gin_bindings=run_experiment.record_every = 8" in bench_train
  assert names[-1] == ["report"]


@pytest.mark.slow
def test_local_pipeline_end_to_end_and_rerun_skips(tmp_path):
  ws = tmp_path / "ws"
  cmd = [sys.executable, str(REPO / "launch" / "local.py"),
         "--gin_file=experiments/quickstart.gin", "--gin_file=local_tiny.gin",
         f"--gin.WORKSPACE=\"{ws}\""]
  res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  for stage in ("pretrain", "train", "split", "fit:linear", "evaluate:linear", "report"):
    assert (ws / "stages" / f"{stage}.json").exists(), stage
  report_md = (ws / "report" / "report.md").read_text()
  for sim in ("linear", "additive", "multiplicative", "tracin_cp", "influence"):
    metrics = json.loads((ws / "fits" / sim / "metrics.json").read_text())
    assert np.isfinite(metrics["mse"]["mean"])
    assert report.format_pm(metrics["mse"]) in report_md, (sim, metrics["mse"])
  again = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count("finished earlier, skipped") >= 9, again.stdout
  assert ": running" not in again.stdout


def test_study_binary_writes_the_library_table(tmp_path):
  """The study stage is data_efficiency.study on the recorded split (see its own tests)."""
  from simfluence_jax.evaluation import data_efficiency
  _planted_workspace(tmp_path, num_runs=6)
  pipeline.write_split(tmp_path, pipeline.PipelineConfig(num_fit=4, num_val=0))
  res = subprocess.run([sys.executable, "-m", "simfluence_jax.study",
                        f"--workspace={tmp_path}", "--num_runs=2,4,9"],
                       capture_output=True, text=True, env=_env(), timeout=300)
  assert res.returncode == 0, res.stderr
  rows = json.loads((tmp_path / "study" / "data_efficiency.json").read_text())["rows"]
  assert [(r["num_runs"], r["simulator"]) for r in rows] == [
      (n, s) for n in (2, 4)                                 # 9 > 4 runs: skipped
      for s in ("linear", "featurized", "mean_trajectory")]
  split = pipeline.read_experiment(tmp_path)["split"]
  want = data_efficiency.study(simulators.read_runs(tmp_path, split["fit"]),
                               simulators.read_runs(tmp_path, split["heldout"]),
                               num_runs_list=[2], simulators=("linear",))
  assert rows[0]["mse_mean"] == pytest.approx(want[0]["mse_mean"], rel=1e-6)
  assert (tmp_path / "study" / "data_efficiency.md").read_text().strip() == \
      data_efficiency.markdown_table(rows).strip()
