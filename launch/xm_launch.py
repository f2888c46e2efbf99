r"""Launches an experiment's stages as XManager jobs (local executor here; Vertex AI at scale).

  pip install -e '.[xm]'      # xmanager is an optional extra (heavy dependencies)
  python launch/xm_launch.py --gin_file=experiments/quickstart.gin \
      --gin.WORKSPACE=\"/tmp/ws\" --train_shards=4 [--executor=local|vertex] [--dry_run]

The jobs are the same binaries launch/local.py runs, with the same --gin_file/--gin flags:

  pretrain -> train x S shards (each `run_experiment.run_ids` = one slice of the runs,
  written into <workspace>/shards/<i>) -> merge (shards' runs copied into <workspace>/runs,
  contents checked) -> fit x simulators -> evaluate x simulators -> report

Each stage waits for the one before; shards and per-simulator jobs run in parallel.
`--dry_run` prints the job plan (no xmanager needed) — tests/experiments/pipeline_test.py checks it.

Vertex AI / TPU requirements (not reachable from this machine): a GCP project with Vertex AI
enabled, `gcloud auth application-default login`, Docker (xm.python_container builds an
image of this repo), a GCS bucket for the workspace (--gin.WORKSPACE=\"gs://...\" needs
orbax/tensorstore GCS support, which they have), and accelerator quota, e.g.
`--accelerator=tpu_v3=8`. With `--multihost_train`, each train job is one multi-host job
(e.g. a TPU pod slice): its processes get `--num_processes=0`, so `jax.distributed.initialize()`
picks up coordinator, process count and id from the environment, the runs are sharded over
all hosts' devices and each host writes its own runs (simfluence_jax/distributed.py).
"""

from __future__ import annotations

import asyncio
import json
import math
import pathlib
import sys
from typing import Sequence

from absl import app
from absl import flags
import gin

from simfluence_jax.cli import gin_setup as gin_utils
from simfluence_jax.experiments import pipeline

_EXECUTOR = flags.DEFINE_enum("executor", "local", ["local", "vertex"], "Where jobs run.")
_TRAIN_SHARDS = flags.DEFINE_integer("train_shards", 1, "Training jobs to split runs over.")
_NUM_RUNS = flags.DEFINE_integer("num_runs", None, "Runs of the experiment (default: gin "
                                 "run_experiment.num_runs).")
_ACCELERATOR = flags.DEFINE_string("accelerator", None, "e.g. tpu_v3=8 or a100=1 (vertex).")
_DRY_RUN = flags.DEFINE_boolean("dry_run", False, "Print the job plan and exit.")
_MULTIHOST_TRAIN = flags.DEFINE_boolean(
    "multihost_train", False, "Train jobs span several hosts (a TPU pod slice, SLURM): pass "
    "--num_processes=0 so each process joins through jax.distributed's cluster detection.")

def plan(workspace: str, gin_args: Sequence[str], *, num_runs: int, shards: int,
         config: pipeline.PipelineConfig, multihost_train: bool = False) -> list[list[dict]]:
  """The job plan: a list of stages, each a list of jobs {name, module, args} run together."""
  run_ids = [f"run_{r:03d}" for r in range(num_runs)]
  per = math.ceil(num_runs / shards)
  slices = [run_ids[i:i + per] for i in range(0, num_runs, per)]
  ws = f"--workspace={workspace}"
  stages = [[{"name": "pretrain", "module": "pretrain", "args": list(gin_args)}]]
  if len(slices) == 1:
    stages.append([{"name": "train", "module": "train", "args": list(gin_args)}])
  else:
    stages.append([{
        "name": f"train_shard_{i}", "module": "train",
        "args": [*gin_args, f"--gin_bindings=WORKSPACE = \"{workspace}/shards/{i}\"",
                 f"--gin_bindings=run_experiment.pretrained_dir = \"{workspace}/pretrained\"",
                 f"--gin_bindings=run_experiment.run_ids = {json.dumps(s)}"]}
        for i, s in enumerate(slices)])
    stages.append([{"name": "merge", "module": "merge_workspaces",
                    "args": [ws, *[f"--sources={workspace}/shards/{i}"
                                   for i in range(len(slices))]]}])
  if multihost_train:
    for job in stages[1]:
      job["args"].append("--num_processes=0")
  stages.append([{"name": "split", "module": "split", "args": list(gin_args)}])
  stages.append([{"name": f"fit_{s}", "module": "fit",
                  "args": [ws, f"--simulator={s}", f"--name={s}", "--from_split"]}
                 for s in config.simulators])
  stages.append([{"name": f"evaluate_{s}", "module": "evaluate",
                  "args": [ws, f"--fit={s}", "--from_split", "--unseen=mean"]} for s in config.simulators])
  if config.study:
    stages.append([{"name": "study", "module": "study", "args": [ws]}])
  if config.counterfactuals:   # the counterfactual bank (launch/local.py's last stages)
    def retrain(name, directory, record_every):
      return [{"name": name, "module": "train", "args": [
          *gin_args, f"--gin_bindings=run_experiment.curriculum_dir = \"{directory}\"",
          "--gin_bindings=run_experiment.explicit_only = True",
          f"--gin_bindings=run_experiment.record_every = {record_every}"]}]
    cf_dir = f"{workspace}/counterfactuals"
    stages.append([{"name": "bench_write", "module": "counterfactuals",
                    "args": [ws, "--write=bench", *gin_args]}])
    stages.append(retrain("bench_train", f"{cf_dir}/bench", config.bench_record_every))
    if config.metagradient:
      stages.append([{"name": "metagradient", "module": "metagradients",
                      "args": [ws, *gin_args]}])
    if (config.removal_methods()
        and config.removal_test_targets > 0):
      stages.append([{"name": "removal_test_write", "module": "counterfactuals",
                      "args": [ws, "--write=removal_test", *gin_args]}])
      stages.append(retrain("removal_test_train", f"{cf_dir}/removal_test", 1))
    stages.append([{"name": "counterfactuals", "module": "counterfactuals", "args": [ws]}])
  stages.append([{"name": "report", "module": "report", "args": [ws]}])
  return stages


async def launch(stages: list[list[dict]], title: str) -> None:  # pragma: no cover
  from xmanager import xm  # pylint: disable=g-import-not-at-top
  from xmanager import xm_local  # pylint: disable=g-import-not-at-top
  repo = str(pathlib.Path(__file__).resolve().parents[1])
  if _EXECUTOR.value == "vertex":
    requirements = xm.JobRequirements(**dict(
        [_ACCELERATOR.value.split("=")])) if _ACCELERATOR.value else xm.JobRequirements()
    executor, spec = xm_local.Vertex(requirements=requirements), xm_local.Vertex.Spec()
  else:
    executor, spec = xm_local.Local(), xm_local.Local.Spec()
  async with xm_local.create_experiment(experiment_title=title) as experiment:
    for stage in stages:
      ops = []
      for job in stage:
        [executable] = experiment.package([xm.python_container(
            executor_spec=spec, path=repo,
            entrypoint=xm.ModuleName(f"simfluence_jax.{job['module']}"))])
        ops.append(await experiment.add(xm.Job(executable=executable, executor=executor,
                                               args=job["args"])))
      for op in ops:
        await op.wait_until_complete()


def main(argv: Sequence[str]) -> None:
  del argv
  gin_utils.parse_gin_flags(skip_unknown=True)
  workspace = gin.query_parameter("%WORKSPACE")
  num_runs = _NUM_RUNS.value or gin.query_parameter("%NUM_RUNS")
  gin_args = ([f"--gin_file={f}" for f in flags.FLAGS.gin_file] +
              [f"--gin_bindings={b}" for b in flags.FLAGS.gin_bindings])
  config = gin_utils.pipeline_config()
  stages = plan(workspace, gin_args, num_runs=int(num_runs), shards=_TRAIN_SHARDS.value,
                config=config, multihost_train=_MULTIHOST_TRAIN.value)
  if _DRY_RUN.value:
    print(json.dumps(stages, indent=1))
    return
  try:
    import xmanager  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    sys.exit("launch/xm_launch.py: xmanager is not installed; pip install -e '.[xm]' "
             "(or use --dry_run, or launch/local.py)")
  asyncio.run(launch(stages, title=config.name))


if __name__ == "__main__":
  gin_utils.register_pipeline_config()
  gin_utils.define_flags()
  gin_utils.run(main, "launch/xm_launch.py")
