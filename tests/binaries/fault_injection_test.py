"""kill -9 the train binary at many moments and restart it: nothing lost, nothing doubled.

One uninterrupted run is the reference. A second workspace is trained through a schedule of
SIGKILLs, each followed by a restart of the same command:
  * injected (faults.py, SIMFLUENCE_KILL_AT): during an orbax checkpoint save (twice, at
    different saves), during an atomic file write (between the fsynced temporary file and
    its rename; twice), and during the trace write (losses.npy written, run.json not);
  * timed: at seeded random moments after training has begun (during steps; 2 kills).
Every kill must really happen (exit status −9). After the final, uninterrupted restart the
traces must equal the reference bit for bit, with exactly T+1 recorded rows per run (no
duplicated or missing step), and no half-written file may be visible.
"""

import os
import pathlib
import random
import signal
import subprocess
import time

import numpy as np
import pytest

from simfluence_jax.training import checkpoints
from simfluence_jax.traces import faults
from simfluence_jax.traces import contract as traces
from tests.binaries import train_test as tb

pytestmark = pytest.mark.slow

# (kind, value): ("inject", "point:k") or ("timed", None).
# Each restart resumes further on, so the order matters: timed kills need a checkpoint
# still to come, trace_write needs the end of training, the last atomic_write then hits
# the rewrite of the traces the trace_write kill left incomplete.
SCHEDULE = [("inject", "checkpoint:1"), ("timed", None), ("inject", "atomic_write:2"),
            ("timed", None), ("inject", "checkpoint:2"), ("inject", "trace_write:1"),
            ("inject", "atomic_write:3")]


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  tb.ENV["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  root = tmp_path_factory.mktemp("pre")
  tb._run("pretrain", root / "ws", root / "pretrained", root)  # pylint: disable=protected-access
  return root / "pretrained"


def _train(ws, pretrained, cwd, env):
  return subprocess.Popen(tb._command("train", ws, pretrained, *tb.TRAIN_FLAGS),  # pylint: disable=protected-access
                          cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)


def _visible_files(ws: pathlib.Path) -> list[pathlib.Path]:
  return [p for p in ws.rglob("*") if p.is_file()]


def test_kill_9_at_many_moments_then_restart_gives_identical_traces(tmp_path, pretrained):
  reference = tmp_path / "reference"
  proc = _train(reference, pretrained, tmp_path, tb.ENV)
  assert proc.wait(timeout=180) == 0, proc.stderr.read()[-3000:]

  ws = tmp_path / "faulted"
  rng = random.Random(0)
  for kind, value in SCHEDULE:
    env = dict(tb.ENV)
    if kind == "inject":
      env[faults.ENV] = value
      proc = _train(ws, pretrained, tmp_path, env)
      code = proc.wait(timeout=180)
    else:
      group = ws / "checkpoints" / "_group_all"
      before = checkpoints.latest_step(group) or 0
      proc = _train(ws, pretrained, tmp_path, env)
      # Once this process's step loop is running (it has saved a newer resume checkpoint)
      # wait a seeded random part of a step-loop's length, then kill.
      deadline = time.time() + 120
      while (checkpoints.latest_step(group) or 0) <= before and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.01)
      time.sleep(rng.uniform(0.0, 0.4))      # a step of the tiny model takes ~0.3-0.5 s
      proc.send_signal(signal.SIGKILL)
      code = proc.wait(timeout=60)
      assert not traces.list_runs(ws), "the timed kill came after training had finished"
    assert code == -signal.SIGKILL, (kind, value, code, proc.stderr.read()[-2000:])
    # No half-written file is ever visible: every .npy / .json that exists parses.
    for path in _visible_files(ws):
      if path.name.endswith(".tmp"):
        continue   # an atomic write's temporary file (named .<name>.*.tmp), never read
      if path.suffix == ".npy" and "runs" in path.parts:
        np.load(path, allow_pickle=False)
      if path.suffix == ".json" and "runs" in path.parts:
        traces.load_json(path)

  proc = _train(ws, pretrained, tmp_path, tb.ENV)               # the final restart
  assert proc.wait(timeout=180) == 0, proc.stderr.read()[-3000:]
  assert traces.incomplete_runs(ws) == []
  assert traces.list_runs(ws) == traces.list_runs(reference)
  for run_id in traces.list_runs(reference):
    got, want = traces.read_run(ws, run_id), traces.read_run(reference, run_id)
    # curriculum, losses, ids, metadata: bit-identical (so exactly T+1 rows, none doubled)
    assert got == want, run_id
    assert np.isfinite(got.losses).all(), f"{run_id}: a step is missing"
