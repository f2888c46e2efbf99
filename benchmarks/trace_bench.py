r"""Trace-generation benchmark on this machine's CPU (the quickstart protocol, default model).

  .venv/bin/python benchmarks/trace_bench.py [--runs=32 --steps=64 --test=100]

Measures, in one process:
  seconds_32x64          end to end run_experiment (quickstart.gin, cpu_default model): 32 runs
                         x 64 steps, all m=100 test losses recorded after every step; includes
                         compilation, checkpoints and trace writing (pretraining is not timed)
  peak_flops             f32 matmul peak: best of a big jnp.dot on one device and one sharded
                         over all host devices
  step_flops             XLA cost analysis of the compiled train+record step (per device x
                         devices: the runs axis is split evenly; taken from the all-vmap
                         variant of the same step, since cost analysis counts a loop body once)
  mfu                    step_flops / step time / peak_flops
  vmap_speedup           8 runs stepped together under vmap vs the same 8 runs stepped one
                         after another (R=1 each) in this process, train+record, per step
Step times are the fastest of a few repeats (the machine may be shared); the load average
is reported with the result.
  record_cost_per_example  (time to record m test losses / m) / time of the train part of a step
The last line printed is one JSON object.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type= "
                      "--xla_force_host_platform_device_count=2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import json
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout

import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from simfluence_jax.cli import gin_setup as gin_utils
from simfluence_jax.traces import contract as traces
from simfluence_jax.training import models
from simfluence_jax.training import tasks
from simfluence_jax.training import trainer as trainer_lib
from simfluence_jax import pretrain as pretrain_bin
from simfluence_jax import train as train_bin


def _best_time(fn, repeats):
  """Fastest of `repeats` calls: on a shared machine the least disturbed estimate."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.min(times))


def matmul_peak(n=2048, repeats=5):
  """Best f32 FLOP/s of an [n,n]@[n,n] on one device, and of a batch sharded over all."""
  x = jnp.ones((n, n), jnp.float32)
  one = jax.jit(lambda a: a @ a)
  one(x).block_until_ready()
  best = 2 * n ** 3 / _best_time(lambda: one(x), repeats)
  devices = jax.devices()
  if len(devices) > 1:
    mesh = jax.sharding.Mesh(np.asarray(devices), ("d",))
    xs = jax.device_put(jnp.ones((len(devices), n, n)), NamedSharding(mesh, PartitionSpec("d")))
    many = jax.jit(lambda a: a @ a)
    many(xs).block_until_ready()
    best = max(best, len(devices) * 2 * n ** 3 / _best_time(lambda: many(xs), repeats))
  return best


def _cost_flops(compiled, num_devices):
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]) * num_devices


class _StepBench:
  """A Trainer on the quickstart data (pool, m test examples) for R runs."""

  def __init__(self, config, variables, pool, test, num_runs, batch_size, seed=0):
    self.mesh = trainer_lib.runs_mesh(num_runs)
    make = lambda chunk: trainer_lib.Trainer(
        trainer_lib.t5_loss_fn(models.Transformer(config)),
        trainer_lib.make_optimizer("adafactor", 1e-3), mesh=self.mesh, record_chunk=chunk)
    self.trainer = make(1)          # what train.py runs
    self.vmap_trainer = make(None)  # same math; its HLO has no loop, so cost analysis counts all
    self.state = trainer_lib.place(trainer_lib.init_state(
        variables, num_runs=num_runs, tuning="full", optimizer=self.trainer.optimizer,
        seed=seed), self.mesh)
    rng = np.random.default_rng(seed)
    size = pool["encoder_input_tokens"].shape[0]
    sharding = None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec("runs"))
    self.positions = [jax.device_put(rng.integers(0, size, (num_runs, batch_size))
                                     .astype(np.int32), sharding) for _ in range(4)]
    self.pool, self.test = pool, test
    self.i = 0

  def step(self):
    self.state, train_loss, test_losses = self.trainer.train_step(
        self.state, self.positions[self.i % 4], self.pool, self.test)
    self.i += 1
    return test_losses

  def record(self):
    return self.trainer.record(self.state, self.test)

  def flops(self):
    devices = 1 if self.mesh is None else self.mesh.size
    return _cost_flops(self.vmap_trainer.train_step.lower(
        self.state, self.positions[0], self.pool, self.test).compile(), devices)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--runs", type=int, default=32)
  parser.add_argument("--steps", type=int, default=64)
  parser.add_argument("--test", type=int, default=100)
  parser.add_argument("--workspace", default=None)
  args = parser.parse_args()
  ws = pathlib.Path(args.workspace or tempfile.mkdtemp(prefix="trace_bench_"))
  # The quickstart protocol (runs/few_shot.gin: 64 examples x 4 epochs / batch 4 = 64 steps).
  gin_utils.parse_gin(["gin_configs/experiments/quickstart.gin"], [
      f'WORKSPACE = "{ws}"', "run_pretraining.num_steps = 20", f"NUM_RUNS = {args.runs}",
      f"SUBSET_SIZE = {args.steps}", f"run_experiment.num_test_examples = {args.test}",
      # Full-model tuning (the heavier step; the quickstart itself tunes IA3 vectors).
      'run_experiment.tuning = "full"', "run_experiment.learning_rate = 1e-3"],
      skip_unknown=("pipeline",))
  print(json.dumps(pretrain_bin.run_pretraining()), flush=True)
  start = time.perf_counter()
  summary = train_bin.run_experiment()
  seconds = time.perf_counter() - start
  print(json.dumps(summary), flush=True)
  assert summary["steps"] == args.steps and summary["runs"] == args.runs, summary

  batch_size = gin.query_parameter("%BATCH_SIZE")
  config = gin.get_configurable("model_config")()
  input_length = gin.query_parameter("%INPUT_LENGTH")
  target_length = gin.query_parameter("%TARGET_LENGTH")
  # The examples the runs trained on, from a run's metadata (as every consumer gets them).
  pools = tasks.pools_from_metadata(traces.read_run(ws, traces.list_runs(ws)[0]).metadata)
  encode = lambda ex: {k: jnp.asarray(v) for k, v in tasks.encode_examples(
      ex, input_length=input_length, target_length=target_length).items()}
  pool, test = encode(pools.train), encode(pools.test[:args.test])
  variables = models.init_variables(config, jax.random.PRNGKey(0), use_ia3=False,
                                    input_length=input_length, target_length=target_length)

  peak = matmul_peak()
  big = _StepBench(config, variables, pool, test, args.runs, batch_size)
  step_flops = big.flops()
  big.step()
  step_s = _best_time(big.step, 5)
  big.record()
  record_s = _best_time(big.record, 5)

  group = _StepBench(config, variables, pool, test, 8, batch_size)
  alone = [_StepBench(config, variables, pool, test, 1, batch_size, seed=r) for r in range(8)]
  group.step()
  for a in alone:
    a.step()
  group_s = _best_time(lambda: [group.step() for _ in range(3)], 3)
  alone_s = _best_time(lambda: [a.step() for a in alone for _ in range(3)], 3)

  result = {
      "seconds_32x64": round(seconds, 2),
      "mfu": round(step_flops / step_s / peak, 4),
      "vmap_speedup": round(alone_s / group_s, 3),
      "record_cost_per_example": round(record_s / args.test / max(step_s - record_s, 1e-9), 5),
      "step_seconds": round(step_s, 4), "record_seconds": round(record_s, 4),
      "step_gflop": round(step_flops / 1e9, 2), "peak_gflops": round(peak / 1e9, 1),
      "runs": args.runs, "steps": args.steps, "test_examples": args.test,
      "devices": len(jax.devices()), "model_params": models.num_parameters(variables["params"]),
      "input_length": input_length, "target_length": target_length,
      "load_average_1min": os.getloadavg()[0], "cpu_count": os.cpu_count(),
  }
  print(json.dumps(result))


if __name__ == "__main__":
  main()
