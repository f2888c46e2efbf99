r"""Runs an experiment's stages on this machine, skipping the stages already finished.

  python launch/local.py --gin_file=experiments/quickstart.gin --gin.WORKSPACE=\"workspaces/qs\"
  python launch/local.py --gin_file=experiments/yesno_ia3.gin \
      --gin_file=local_tiny.gin --gin.WORKSPACE=\"/tmp/tiny\"

Stages: pretrain -> train -> split -> fit (each simulator) -> evaluate (each fit) -> study ->
bench (the frozen bench's edited curricula, retrained for real under vmap) -> metagradient
(exact first-order predictions of every edit, when pipeline.metagradient) -> removal_test
(each method's own top proponents removed, retrained) -> counterfactuals (every method
scored on the change it predicts: counterfactuals/scores.json) -> report. Each stage is the
project's own binary run as a subprocess with the same --gin_file / --gin flags (exactly what
launch/xm_launch.py launches as XManager jobs). A finished stage leaves
<workspace>/stages/<stage>.json; re-running skips it (--redo=stage,... forces it).
The stage list and its settings come from the experiment's `pipeline.*` gin bindings.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Sequence

from absl import app
from absl import flags
import gin

from simfluence_jax.traces import atomic_io
from simfluence_jax.cli import gin_setup as gin_utils
from simfluence_jax.experiments import counterfactual_bank
from simfluence_jax.experiments import pipeline

_REDO = flags.DEFINE_list("redo", [], "Stages to run again even if finished.")
_STOP_AFTER = flags.DEFINE_string("stop_after", None, "Stop after this stage.")

STAGES = ("pretrain", "train", "split", "fit", "evaluate", "study", "bench", "metagradient",
          "removal_test", "counterfactuals", "report")


class Stages:
  """Runs named stages once: a finished one leaves <workspace>/stages/<name>.json."""

  def __init__(self, workspace: pathlib.Path, redo: Sequence[str]):
    self.workspace = workspace
    self.redo = set(redo)
    self.start = time.time()

  def marker(self, name: str) -> pathlib.Path:
    return self.workspace / "stages" / f"{name}.json"

  def run(self, name: str, fn) -> None:
    if self.marker(name).exists() and name.split(":")[0] not in self.redo:
      print(f"[{self._clock()}] {name}: finished earlier, skipped", flush=True)
      return
    print(f"[{self._clock()}] {name}: running", flush=True)
    t0 = time.time()
    fn()
    seconds = round(time.time() - t0, 1)
    atomic_io.save_json(self.marker(name), {"stage": name, "seconds": seconds,
                                            "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    print(f"[{self._clock()}] {name}: done in {seconds} s", flush=True)

  def _clock(self) -> str:
    s = int(time.time() - self.start)
    return f"{s // 60:02d}:{s % 60:02d}"


def binary(module: str, *args: str) -> None:
  """Runs `python -m simfluence_jax.<module> args`; a failure stops the pipeline."""
  cmd = [sys.executable, "-m", f"simfluence_jax.{module}", *args]
  result = subprocess.run(cmd, check=False)
  if result.returncode != 0:
    raise SystemExit(f"launch/local.py: stage command failed (exit {result.returncode}): "
                     f"{' '.join(cmd)}")


def gin_args() -> list[str]:
  return ([f"--gin_file={f}" for f in flags.FLAGS.gin_file] +
          [f"--gin_bindings={b}" for b in flags.FLAGS.gin_bindings] +
          ([f"--gin_search_paths={','.join(flags.FLAGS.gin_search_paths)}"]
           if flags.FLAGS.gin_search_paths else []))


def main(argv: Sequence[str]) -> None:
  del argv
  gin_utils.parse_gin_flags(skip_unknown=True)
  workspace = pathlib.Path(gin.query_parameter("%WORKSPACE"))
  config = gin_utils.pipeline_config()
  workspace.mkdir(parents=True, exist_ok=True)
  stages = Stages(workspace, _REDO.value)
  common = gin_args()
  ws = f"--workspace={workspace}"

  def done(stage: str) -> bool:
    return _STOP_AFTER.value == stage

  stages.run("pretrain", lambda: binary("pretrain", *common))
  if done("pretrain"):
    return
  stages.run("train", lambda: binary("train", *common))
  if done("train"):
    return
  stages.run("split", lambda: binary("split", *common))
  split = pipeline.read_experiment(workspace)["split"]
  print(f"  split: {len(split['fit'])} fit / {len(split['val'])} validation / "
        f"{len(split['heldout'])} held-out runs", flush=True)
  if done("split"):
    return
  for sim in config.simulators:
    args = [ws, f"--simulator={sim}", f"--name={sim}", "--from_split",
            f"--lam_grid={','.join(str(x) for x in config.lam_grid)}"]
    stages.run(f"fit:{sim}", lambda args=args: binary("fit", *args))
  if done("fit"):
    return
  for sim in config.simulators:
    stages.run(f"evaluate:{sim}", lambda sim=sim: binary(
        "evaluate", ws, f"--fit={sim}", "--from_split", "--unseen=mean"))
  if done("evaluate"):
    return
  if config.study:
    stages.run("study", lambda: binary("study", ws))
  if config.counterfactuals:
    def retrain(files, record_every=1):
      files = [str(f) for f in files]
      run_ids = json.dumps([f"explicit_{pathlib.Path(f).stem}" for f in files])
      binary("train", *common, f"--gin_bindings=run_experiment.curriculum_files = "
             f"{json.dumps(files)}", f"--gin_bindings=run_experiment.run_ids = {run_ids}",
             f"--gin_bindings=run_experiment.record_every = {record_every}")

    spec = config.bench_spec()
    stages.run("bench", lambda: retrain(counterfactual_bank.make_bench(workspace, spec),
                                        spec.record_every))
    if config.metagradient:
      stages.run("metagradient", lambda: binary("metagradients", ws, *common))
    methods = config.removal_methods()
    if methods and config.removal_test_targets > 0:
      stages.run("removal_test", lambda: retrain(counterfactual_bank.make_removal_test(
          workspace, methods=methods, num_targets=config.removal_test_targets,
          k=config.removal_test_k, seed=config.bench_seed)))
    stages.run("counterfactuals", lambda: binary("counterfactuals", ws))
  if done("counterfactuals"):
    return
  stages.run("report", lambda: binary("report", ws))
  report = workspace / "report" / "report.html"
  print(f"\nReport: {report}\n        {workspace / 'report' / 'report.md'}", flush=True)


if __name__ == "__main__":
  os.environ.setdefault("PYTHONUNBUFFERED", "1")
  gin_utils.register_pipeline_config()
  gin_utils.define_flags()
  gin_utils.run(main, "launch/local.py")
