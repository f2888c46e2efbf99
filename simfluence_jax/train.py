r"""Fine-tunes R runs together under jax.vmap and writes their traces into a workspace.

  python -m simfluence_jax.pretrain --gin_file=gin_configs/experiments/quickstart.gin \
      --gin.WORKSPACE=\"/tmp/ws\"
  python -m simfluence_jax.train --gin_file=gin_configs/experiments/quickstart.gin \
      [--gin_file=gin_configs/local_tiny.gin] --gin.WORKSPACE=\"/tmp/ws\"

The examples come from any seqio task or mixture (T5X's macros): MIXTURE_OR_TASK_NAME, and
MIXTURE_OR_TASK_MODULE, the python module imported first to register it (the built-in
countryinfo tasks: "simfluence_jax.training.country_tasks"); the pool from
run_experiment.train_split, the test examples from run_experiment.test_split
(tasks.load_pools).

Writes W/runs/<run_id>/ (traces.write_run), W/examples/{train,test}.jsonl, W/checkpoints/
(per-run checkpoint_<step> for TracIn-CP, and the group's resume state), W/tensorboard/ and
W/config.gin (the operative gin config). Re-running the same command resumes from the latest
complete group checkpoint; the traces are bit-identical to an uninterrupted run.

Runs of different lengths (e.g. explicit --gin.run_experiment.curriculum_files) share one vmapped
group: shorter runs are padded with no-op steps, and each trace keeps only its own steps.

The runs are sharded over all devices. Multi-process (multi-host), one such command per
process, with the same gin flags and workspace (a filesystem all processes share):

  python -m simfluence_jax.train ... --num_processes=2 --process_id=0|1 \
      --coordinator_address=host0:12345
  (--num_processes=0: detect all three from the cluster, e.g. a Cloud TPU pod or SLURM)

Each process trains, checkpoints and writes only the runs on its own devices; the traces are
those of a single-process run.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorBoard's TF import: no banner
if "XLA_FLAGS" not in os.environ:  # must precede the first jax import
  # No YNNPACK fused attention (1.5-1.7x on CPU); 2 host devices to shard the runs axis over.
  os.environ["XLA_FLAGS"] = ("--xla_cpu_experimental_ynn_fusion_type= "
                             "--xla_force_host_platform_device_count=2")

# pylint: disable=g-import-not-at-top,wrong-import-position
import dataclasses
import hashlib
import json
import pathlib
import time
from typing import Sequence

from absl import flags
from absl import logging
import gin
import jax
import numpy as np
import tqdm

from simfluence_jax.training import checkpoints
from simfluence_jax.training import curricula
from simfluence_jax.training import distributed
from simfluence_jax.cli import gin_setup as gin_utils
from simfluence_jax.training import tasks
from simfluence_jax.traces import contract as traces
from simfluence_jax.training import trainer as trainer_lib
from simfluence_jax.training import models

gin_utils.register_model_config()
# Experiment files also bind pretrain.py's function; this binary ignores those bindings.
OTHER_BINARIES_CONFIGURABLES = ("run_pretraining", "pipeline")

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process: host:port of process 0's coordinator "
    "(the same for every process).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", 1, "Processes training together (1: this one alone; 0: detect "
    "coordinator, count and id from the cluster environment, e.g. a Cloud TPU pod).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in "
                                   "[0, num_processes).")


def _summary_writer(logdir: pathlib.Path):
  """TensorBoard scalars only: the progress bar is the console display (clu's default writer
  would also log every step's scalars to the console)."""
  from clu import metric_writers
  if jax.process_count() > 1:   # one event file (its runs) per process
    logdir = logdir / f"process_{jax.process_index()}"
  return metric_writers.SummaryWriter(str(logdir))


def explicit_curricula(files: Sequence[str], pool_ids: np.ndarray) -> list:
  """Curriculum per explicit file: run id = "explicit_<file stem>", train ids = ids it uses."""
  out = []
  for path in files:
    batches = np.asarray(curricula.load_curriculum(path), np.int32)
    used = np.unique(batches[batches >= 0]).astype(np.int64)
    unknown = np.setdiff1d(used, pool_ids)
    if unknown.size:
      raise ValueError(f"curriculum file {path}: ids {unknown[:5].tolist()} are not in the "
                       f"task's train pool")
    out.append(curricula.Curriculum(run_id=f"explicit_{pathlib.Path(path).stem}",
                                    train_ids=used, batches=batches))
  return out


def to_positions(runs: Sequence, id_to_pos: dict[int, int], num_steps: int) -> np.ndarray:
  """[R, T, k] pool positions for the group; -1 pads, also after a run's own last step."""
  k = max(c.batches.shape[1] for c in runs)
  out = np.full((len(runs), num_steps, k), -1, np.int32)
  lookup = np.vectorize(lambda i: id_to_pos[int(i)] if i >= 0 else -1, otypes=[np.int32])
  for r, c in enumerate(runs):
    b = np.asarray(c.batches)
    if b.size:
      out[r, :b.shape[0], :b.shape[1]] = lookup(b)
  return out


@gin.configurable
def run_experiment(
    workspace: str = gin.REQUIRED,
    mixture_or_task_name: str = gin.REQUIRED,
    model_config: models.T5Config = gin.REQUIRED,
    *,
    mixture_or_task_module: str | None = None,
    train_split: str = "train",
    test_split: str = "validation",
    pool_size: int | None = None,
    tuning: str = "full",
    optimizer: str = "adafactor",
    learning_rate: float = 1e-3,
    num_runs: int = 32,
    subset_size: int = 64,
    epochs: float = 4.0,
    batch_size: int = 4,
    seed: int = 0,
    num_test_examples: int | None = None,
    input_length: int = 64,
    target_length: int = 16,
    curriculum_files: Sequence[str] = (),
    curriculum_dir: str | None = None,
    explicit_only: bool = False,
    run_ids: Sequence[str] | None = None,
    pretrained_dir: str | None = None,
    checkpoint_every: int = 0,
    num_tracin_checkpoints: int = 10,
    record_every: int = 1,
) -> dict:
  """Trains the sampled (+ explicit) curricula, writes traces; returns a summary dict.

  mixture_or_task_name / mixture_or_task_module: the seqio task (or mixture) and the module
    that registers it (imported first; None: registered already), as T5X names them.
  train_split / test_split: the splits the train pool and the test examples come from.
  pool_size: the pool is the train split's first pool_size examples (None: all of it).
  num_test_examples: the test split's first that many examples (None: all of it).
  checkpoint_every: steps between resume checkpoints (group state + per-run params); 0 = none.
  num_tracin_checkpoints: per-run checkpoints at this many evenly spaced steps (incl. final).
  curriculum_dir: every curriculum file (*.json but bench.json / manifest.json) of this
    directory, in name order, after `curriculum_files` — for jobs planned before the files
    exist (launch/xm_launch.py's counterfactual bank).
  explicit_only: train only the explicit curricula, not the experiment's sampled runs.
  run_ids: train only these runs of the experiment (to split it across jobs).
  pretrained_dir: defaults to <workspace>/pretrained (written by simfluence_jax.pretrain).
  record_every: record the test losses after every `record_every`-th step and after each
    run's last step (others NaN: "not recorded"); 1 = every step (what fits need). The
    counterfactual bank uses more: recording is most of a step's cost.
  """
  if record_every < 1:
    raise ValueError(f"record_every must be >= 1, got {record_every}")
  start_time = time.time()
  ws = pathlib.Path(workspace)
  primary = jax.process_index() == 0
  # The examples first: a bad task, split or size stops the run before anything is written.
  pools = tasks.load_pools(mixture_or_task_name, mixture_or_task_module,
                           train_split=train_split, test_split=test_split,
                           pool_size=pool_size, num_test_examples=num_test_examples,
                           subset_size=subset_size)
  tasks.check_vocabulary(pools, model_config.vocab_size)
  if primary:
    gin_utils.write_config(ws)
  test = list(pools.test)
  pool_ids = np.asarray([e.id for e in pools.train], np.int64)
  runs = curricula.sample_curricula(pool_ids, num_runs=num_runs, subset_size=subset_size,
                                    epochs=epochs, batch_size=batch_size, seed=seed)
  if curriculum_dir is not None:
    found = sorted(p for p in pathlib.Path(curriculum_dir).glob("*.json")
                   if p.name not in ("bench.json", "manifest.json"))
    if not found:
      raise ValueError(f"curriculum_dir {curriculum_dir}: no curriculum files (*.json)")
    curriculum_files = list(curriculum_files) + [str(p) for p in found]
  explicit = explicit_curricula(curriculum_files, pool_ids)
  if explicit_only and not explicit:
    raise ValueError("explicit_only needs curriculum_files or a curriculum_dir")
  runs = explicit if explicit_only else list(runs) + explicit
  if run_ids is not None:
    unknown = sorted(set(run_ids) - {c.run_id for c in runs})
    if unknown:
      raise ValueError(f"run_ids {unknown} are not runs of this experiment "
                       f"(it has {[c.run_id for c in runs][:4]}...)")
    runs = [c for c in runs if c.run_id in set(run_ids)]
  if primary:
    with traces.workspace_lock(ws):
      traces.write_examples(ws, "train", [_example_dict(e) for e in pools.train])
      traces.write_examples(ws, "test", [_example_dict(e) for e in test])

  lengths = [int(c.batches.shape[0]) for c in runs]
  num_steps = max(lengths)
  id_to_pos = {int(i): p for p, i in enumerate(pool_ids)}
  # The runs axis over all devices (of all processes), padded with all-pad runs to fill them.
  devices = distributed.global_devices()
  padded = distributed.padded_num_runs(len(runs), len(devices))
  mesh = trainer_lib.runs_mesh(padded, devices)
  positions = to_positions(runs, id_to_pos, num_steps)
  positions = np.concatenate(
      [positions, np.full((padded - len(runs),) + positions.shape[1:], -1, np.int32)])
  mine = distributed.process_runs(len(runs), devices)   # the runs this process writes
  encode = lambda ex: trainer_lib.replicate(tasks.encode_examples(
      ex, input_length=input_length, target_length=target_length), mesh)
  pool, test_batch = encode(pools.train), encode(test)

  variables = checkpoints.load_pretrained(pathlib.Path(pretrained_dir or ws / "pretrained"), model_config,
                              tuning=tuning, seed=seed, input_length=input_length,
                              target_length=target_length)
  model = models.Transformer(model_config, use_ia3=tuning == "ia3")
  trainer = trainer_lib.Trainer(trainer_lib.t5_loss_fn(model),
                                trainer_lib.make_optimizer(optimizer, learning_rate),
                                dropout=model_config.dropout_rate > 0, mesh=mesh)
  state = trainer_lib.init_state(variables, num_runs=len(runs), tuning=tuning,
                                 optimizer=trainer.optimizer, seed=seed, mesh=mesh,
                                 padded_runs=padded)
  progress = trainer_lib.Progress.empty(padded, num_steps, len(test))

  ckpt_dir = ws / "checkpoints"
  ids = [c.run_id for c in runs]
  group = ("all" if run_ids is None and not explicit_only
           else hashlib.sha1(",".join(ids).encode()).hexdigest()[:10])
  # tasks.pools_metadata: what gets the same examples back (tasks.pools_from_metadata).
  meta = {**tasks.pools_metadata(pools), "tuning": tuning, "optimizer": optimizer,
          "learning_rate": learning_rate, "seed": seed,
          "model_config": dataclasses.asdict(model_config),
          "input_length": input_length, "target_length": target_length,
          **({"record_every": record_every} if record_every != 1 else {})}
  extra = {pathlib.Path(f).stem: curricula.load_curriculum_metadata(f)
           for f in curriculum_files}
  # A resume must continue the same experiment: same runs, steps, test set and settings.
  checkpoints.check_group(ckpt_dir, group, {"run_ids": ids, "num_steps": num_steps,
                                            "test_ids": [e.id for e in test], **meta})
  restored = checkpoints.restore_group(ckpt_dir, group, state, progress)
  if restored is not None:
    state, progress = restored
    logging.info("resuming group %s from step %d", group, int(state.step))
  run_saves = [set(trainer_lib.tracin_steps(t, num_tracin_checkpoints)) |
               (set(range(checkpoint_every, t + 1, checkpoint_every)) if checkpoint_every
                else set()) for t in lengths]
  group_saves = set(range(checkpoint_every, num_steps, checkpoint_every)) \
      if checkpoint_every else set()

  def on_save(s: trainer_lib.TrainState, p: trainer_lib.Progress) -> None:
    step = int(s.step)
    for r in mine:
      if step in run_saves[r]:
        checkpoints.save(checkpoints.checkpoint_path(ckpt_dir / ids[r], step),
                         s.run_variables(r), local=True)
    if step in group_saves:   # last, so a resume point implies its run checkpoints exist
      checkpoints.save_group(ckpt_dir, group, s, p)   # all processes together

  writer = _summary_writer(ws / "tensorboard")
  bar = tqdm.tqdm(total=num_steps, initial=int(state.step), desc="train", unit="step")

  def on_steps(step: int, train_loss: np.ndarray, test_losses: np.ndarray) -> None:
    scalars = {"train_loss/mean": float(train_loss[mine].mean())} if mine else {}
    scalars.update({f"test_loss/{ids[r]}": float(test_losses[r].mean()) for r in mine})
    writer.write_scalars(step, scalars)
    bar.update(1)

  state, progress = trainer_lib.train_group(
      trainer, state, progress, positions=positions, pool=pool, test_batch=test_batch,
      mesh=mesh, save_steps=set().union(*run_saves, group_saves), on_save=on_save,
      on_steps=on_steps,
      record_steps=None if record_every == 1 else (
          set(range(record_every, num_steps + 1, record_every)) | set(lengths)))
  bar.close()
  writer.flush()

  test_ids = np.asarray([e.id for e in test], np.int64)

  def write_mine() -> None:
    for r in mine:
      c = runs[r]
      traces.write_run(ws, traces.RunTrace(
          run_id=c.run_id, train_ids=np.asarray(c.train_ids, np.int64), test_ids=test_ids,
          batch_size=int(c.batches.shape[1]), curriculum=np.asarray(c.batches, np.int32),
          losses=progress.losses[r, :lengths[r] + 1],
          metadata={**meta, **extra.get(c.run_id.removeprefix("explicit_"), {})}))

  # One process at a time: write_run holds the workspace's single-writer lock.
  distributed.in_turn(write_mine, name="write_runs")
  summary = {"workspace": str(ws), "runs": len(runs), "steps": num_steps, "test": len(test),
             "devices": 1 if mesh is None else mesh.size,
             "seconds": round(time.time() - start_time, 2)}
  if jax.process_count() > 1:
    summary.update(process_id=jax.process_index(), process_runs=[ids[r] for r in mine])
  return summary


def _example_dict(e) -> dict:
  return {**dict(e.meta), "id": int(e.id), "inputs": e.inputs, "targets": e.targets}


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}; use --gin_file / --gin.NAME=VALUE")
  # Before anything touches a device: with several processes, jax.devices() is all of theirs.
  distributed.initialize(distributed.DistributedConfig(
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value or None, process_id=_PROCESS_ID.value))
  gin_utils.parse_gin_flags(skip_unknown=OTHER_BINARIES_CONFIGURABLES)
  print(json.dumps(run_experiment()))


if __name__ == "__main__":
  gin_utils.define_flags()
  gin_utils.run(main, "simfluence_jax.train")
