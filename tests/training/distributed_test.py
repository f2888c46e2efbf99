"""Sharded and multi-process training give the traces of one device.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (as the project's test command
does) so the in-process test shards the runs over 8 host devices.

Tolerances: a run's computation is the same on any layout, but XLA compiles a device's step
for its own number of runs (vmapped), so float32 rounding may differ between layouts: sharded
vs one device agree to atol 1e-6 on the stand-in model (measured 2.4e-7) and 1e-5 on the tiny
T5 (measured 9.5e-7). The same global layout (2 processes x 2 devices vs 1 process x 4 devices)
is bit-identical.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from simfluence_jax.training import checkpoints
from simfluence_jax.training import distributed
from simfluence_jax.training import models
from simfluence_jax.traces import contract as traces
from simfluence_jax.training import trainer as trainer_lib

from tests.training import trainer_test  # the stand-in model, pool and curricula

REPO = pathlib.Path(__file__).resolve().parents[2]


def _devices(per_process):
  """Stand-in devices: per_process[p] devices for process p (only .process_index is read)."""
  return [types.SimpleNamespace(process_index=p, id=10 * p + i)
          for p, n in enumerate(per_process) for i in range(n)]


def test_process_runs_partition_runs_contiguously_and_padding_is_nobodys():
  assert distributed.padded_num_runs(3, 4) == 4 and distributed.padded_num_runs(8, 4) == 8
  assert distributed.padded_num_runs(5, 4) == 8
  devices = _devices([2, 2])
  assert [distributed.process_runs(3, devices, p) for p in (0, 1)] == [[0, 1], [2]]
  assert [distributed.process_runs(5, devices, p) for p in (0, 1)] == [[0, 1, 2, 3], [4]]
  assert [distributed.process_runs(8, devices, p) for p in (0, 1)] == [[0, 1, 2, 3],
                                                                      [4, 5, 6, 7]]
  # Every run is owned exactly once, whatever the layout.
  for per_process in ([1, 1], [2, 2], [4, 4], [3, 1, 2]):
    for num_runs in range(1, 13):
      owned = [r for p in range(len(per_process))
               for r in distributed.process_runs(num_runs, _devices(per_process), p)]
      assert owned == list(range(num_runs))
  assert distributed.process_runs(3, jax.devices()) == [0, 1, 2]   # one process owns all


def test_distributed_config_validation():
  assert not distributed.DistributedConfig().validate().multi_process
  assert not distributed.initialize(distributed.DistributedConfig())  # single: no-op
  assert distributed.DistributedConfig(num_processes=None).multi_process   # auto-detect
  with pytest.raises(ValueError, match="--coordinator_address"):
    distributed.DistributedConfig(num_processes=2, process_id=0).validate()
  with pytest.raises(ValueError, match=r"--process_id must be in \[0, 2\)"):
    distributed.DistributedConfig("localhost:1", num_processes=2, process_id=2).validate()
  with pytest.raises(ValueError, match="needs --num_processes > 1"):
    distributed.DistributedConfig(num_processes=1, process_id=1).validate()


def test_padded_init_keeps_each_real_runs_key():
  _, variables, trainer = trainer_test._setup()
  a = trainer_lib.init_state(variables, num_runs=3, tuning="full",
                             optimizer=trainer.optimizer, seed=7)
  b = trainer_lib.init_state(variables, num_runs=3, tuning="full",
                             optimizer=trainer.optimizer, seed=7, padded_runs=8)
  assert b.num_runs == 8
  np.testing.assert_array_equal(np.asarray(a.rng), np.asarray(b.rng)[:3])


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs >= 2 (host) devices")
@pytest.mark.parametrize("optimizer,dropout", [("adam", False), ("adafactor", True)])
def test_sharded_over_all_devices_with_padding_matches_one_device(optimizer, dropout):
  # R = 5 runs (one shorter, padded with no-op steps) over all devices: padded to a multiple
  # of the device count, each device holds R_pad / D runs.
  positions = np.concatenate([trainer_test.CURRICULA, trainer_test.CURRICULA[:2, ::-1]])
  num_runs = positions.shape[0]
  devices = distributed.global_devices()
  padded = distributed.padded_num_runs(num_runs, len(devices))
  mesh = trainer_lib.runs_mesh(padded, devices)
  assert mesh is not None and mesh.size == len(devices)
  model = trainer_test._BagModel()
  variables = model.init(jax.random.PRNGKey(0), trainer_test.POOL["encoder_input_tokens"][:2])

  def train(mesh, padded):
    trainer = trainer_lib.Trainer(trainer_test._loss_fn(model),
                                  trainer_lib.make_optimizer(optimizer, 0.05),
                                  dropout=dropout, mesh=mesh)
    pad = np.full((padded - num_runs,) + positions.shape[1:], -1, np.int32)
    state = trainer_lib.init_state(variables, num_runs=num_runs, tuning="full",
                                   optimizer=trainer.optimizer, seed=3, mesh=mesh,
                                   padded_runs=padded)
    progress = trainer_lib.Progress.empty(padded, positions.shape[1], 5)
    state, progress = trainer_lib.train_group(
        trainer, state, progress, positions=np.concatenate([positions, pad]),
        pool=trainer_lib.replicate(trainer_test.POOL, mesh),
        test_batch=trainer_lib.replicate(trainer_test.TEST, mesh), mesh=mesh)
    return state, progress

  state, sharded = train(mesh, padded)
  assert state.rng.sharding.spec[0] == "runs"
  assert len(state.trainable["params"]["Dense_0"]["kernel"].addressable_shards) == len(devices)
  _, single = train(None, num_runs)
  assert np.isfinite(sharded.losses).all()
  np.testing.assert_allclose(sharded.losses[:num_runs], single.losses, rtol=0, atol=1e-6)
  np.testing.assert_allclose(sharded.train_losses[:num_runs], single.train_losses, rtol=0,
                             atol=1e-6)
  # A run's variables read back from its own shard are that run's.
  for r in (0, num_runs - 1):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, np.asarray(y)[r]),
                 state.run_variables(r)["params"], state.trainable["params"])


# ---- a real 2-process run of the train binary on localhost ----------------------------------

GIN = ["--gin_file=gin_configs/experiments/quickstart.gin",
       "--gin_file=gin_configs/local_tiny.gin"]


def _env(devices, cache):
  return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_COMPILATION_CACHE_DIR": str(cache),
          "XLA_FLAGS": ("--xla_cpu_experimental_ynn_fusion_type= "
                        f"--xla_force_host_platform_device_count={devices}"),
          "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _train_command(workspace, pretrained, *extra):
  # 3 runs over 4 devices (2 per process): 4 with padding; process 0 holds runs 0 and 1,
  # process 1 run 2 and the padding run.
  return [sys.executable, "-m", "simfluence_jax.train", *GIN, f'--gin.WORKSPACE="{workspace}"',
          f'--gin.PRETRAINED_DIR="{pretrained}"', "--gin.NUM_RUNS=3",
          "--gin.run_experiment.checkpoint_every=4", *extra]


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _summary(proc_stdout):
  return json.loads(proc_stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny_pretrained(tmp_path_factory):
  """A randomly initialized tiny T5 (models/tiny.gin) as the pretrained checkpoint."""
  path = tmp_path_factory.mktemp("pretrained")
  config = models.T5Config(vocab_size=384, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                           num_encoder_layers=1, num_decoder_layers=1)
  variables = models.init_variables(config, jax.random.PRNGKey(0), use_ia3=False,
                                    input_length=64, target_length=16)
  checkpoints.save(checkpoints.checkpoint_path(path, 1),
                   {"params": jax.tree.map(np.asarray, variables["params"])})
  return path


@pytest.mark.slow
def test_two_processes_write_their_own_runs_and_match_one_process(tmp_path, tiny_pretrained):
  multi, single = tmp_path / "multi", tmp_path / "single"
  address = f"localhost:{_free_port()}"
  procs = [subprocess.Popen(
      _train_command(multi, tiny_pretrained, "--num_processes=2", f"--process_id={p}",
                     f"--coordinator_address={address}"),
      cwd=tmp_path, env=_env(2, tmp_path / f"cache_{p}"), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for p in (0, 1)]
  # The single-process reference on the same 4 devices, meanwhile.
  reference = subprocess.run(_train_command(single, tiny_pretrained), cwd=tmp_path,
                             env=_env(4, tmp_path / "cache_single"), capture_output=True,
                             text=True, timeout=240)
  outputs = []
  for proc in procs:
    try:
      out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      raise
    assert proc.returncode == 0, err[-3000:]
    outputs.append(_summary(out))
  assert reference.returncode == 0, reference.stderr[-3000:]
  assert _summary(reference.stdout)["devices"] == 4

  assert [o["process_id"] for o in outputs] == [0, 1]
  assert all(o["devices"] == 4 and o["runs"] == 3 for o in outputs)
  owned = [o["process_runs"] for o in outputs]
  assert owned == [["run_000", "run_001"], ["run_002"]]
  # Each process wrote its own runs' per-run checkpoints; the union is every run, once.
  run_ids = traces.list_runs(single)
  assert sorted(owned[0] + owned[1]) == run_ids == traces.list_runs(multi)
  for run_id in run_ids:
    assert (checkpoints.all_steps(multi / "checkpoints" / run_id)
            == checkpoints.all_steps(single / "checkpoints" / run_id) == [4, 8])
    a, b = traces.read_run(multi, run_id), traces.read_run(single, run_id)
    assert a == b, run_id   # bit-identical: losses, curriculum, ids, metadata
    assert np.isfinite(a.losses).all()
  # The group checkpoint was written by both processes together: one, complete.
  assert checkpoints.all_steps(checkpoints.group_dir(multi / "checkpoints", "all")) == [4]
  assert sorted(p.name for p in (multi / "tensorboard").iterdir()) == ["process_0",
                                                                       "process_1"]
