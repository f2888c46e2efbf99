"""TraceWriter: what read_run gives back is exactly the arrays fed in; a failed loop writes
nothing and an existing run of that id stays byte-identical (also under kill -9 mid-write);
rewriting replaces; every bad input is a TraceError naming the run and step; no JAX import."""

import hashlib
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from simfluence_jax.traces import contract as traces
from simfluence_jax.traces import writer as writer_lib
from simfluence_jax.traces.contract import TraceError
from simfluence_jax.traces.writer import TraceWriter

REPO = pathlib.Path(__file__).resolve().parents[2]
TRAIN_IDS = [100, 7, 42]   # ids, not positions; any order
TEST_IDS = [5, 900]
NAN = np.nan


def _writer(ws, run_id="r", **changes):
  kwargs = dict(train_ids=TRAIN_IDS, test_ids=TEST_IDS, batch_size=2,
                metadata={"seed": 3, "framework": "numpy"})
  kwargs.update(changes)
  return TraceWriter(ws, run_id, **kwargs)


def _tree_bytes(root: pathlib.Path) -> dict:
  """Every file and directory under root, files by content hash."""
  return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest()
                                     if p.is_file() else "dir")
          for p in sorted(root.rglob("*"))}


def _write_v1(ws):
  with _writer(ws) as w:
    w.initial([3.0, 4.0])
    w.step([100, 7], [2.0, 3.5])
  return _tree_bytes(ws / "runs")


def test_round_trip_equals_the_arrays_fed_in(tmp_path):
  ws = tmp_path / "ws"
  with _writer(ws) as w:
    w.initial(np.array([3.0, 4.0]))           # float64 in: rounded to float32
    w.step([100, 7], [2.5, 3.25])              # a full batch
    w.step(np.array([42]), [2.0, 1 / 3])       # a short batch: padded with -1
    w.step([7, 7], None)                       # a duplicated example; losses not recorded
    w.step([], [1.5, 0.75])                    # an empty (no-op) step
    assert w.num_steps == 4
  # The hand-built trace of those calls.
  want = traces.RunTrace(
      run_id="r", train_ids=np.array(TRAIN_IDS, np.int64),
      test_ids=np.array(TEST_IDS, np.int64), batch_size=2,
      curriculum=np.array([[100, 7], [42, -1], [7, 7], [-1, -1]], np.int32),
      losses=np.array([[3.0, 4.0], [2.5, 3.25], [2.0, np.float32(1 / 3)], [NAN, NAN],
                       [1.5, 0.75]], np.float32),
      metadata={"seed": 3, "framework": "numpy"})
  assert traces.read_run(ws, "r") == want
  assert traces.list_runs(ws) == ["r"] and traces.incomplete_runs(ws) == []
  assert sorted(p.name for p in (ws / "runs").iterdir()) == ["r"]
  assert not (ws / ".lock").exists()
  assert w.close() == ws / "runs" / "r"       # a second close is a no-op


def test_explicit_close_without_with_block(tmp_path):
  w = _writer(tmp_path, metadata=None)
  w.initial([1.0, 2.0])
  w.step([42], [0.5, 1.0])
  assert not (tmp_path / "runs").exists()     # nothing visible before close
  assert w.close() == tmp_path / "runs" / "r"
  run = traces.read_run(tmp_path, "r")
  assert run.curriculum.tolist() == [[42, -1]] and run.metadata == {}
  np.testing.assert_array_equal(run.losses, np.array([[1.0, 2.0], [0.5, 1.0]], np.float32))


def test_exception_in_with_block_writes_nothing_and_keeps_the_existing_run(tmp_path):
  ws = tmp_path / "ws"
  with pytest.raises(ZeroDivisionError):
    with _writer(ws) as w:
      w.initial([3.0, 4.0])
      w.step([100, 7], [2.0, 3.5])
      _ = 1 / 0
  assert not (ws / "runs").exists()  # no run, not even an incomplete one
  with pytest.raises(TraceError, match=r"run 'r': the writer was abandoned"):
    w.step([42], [1.0, 1.0])

  before = _write_v1(ws)
  with pytest.raises(RuntimeError, match="diverged"):
    with _writer(ws, metadata={"seed": 4}) as w:
      w.initial([9.0, 9.0])
      w.step([42, 42], [8.0, 8.0])
      raise RuntimeError("diverged")
  assert _tree_bytes(ws / "runs") == before  # byte-identical, no staging directory left


def test_rewriting_a_run_id_replaces_it(tmp_path):
  _write_v1(tmp_path)
  inode = os.stat(tmp_path / "runs" / "r").st_ino
  with _writer(tmp_path, metadata={"seed": 4}) as w:   # longer, other content
    w.initial([1.0, 1.0])
    w.step([42], [0.5, 0.5])
    w.step([7, 100], [0.25, 0.125])
  run = traces.read_run(tmp_path, "r")
  assert run.curriculum.tolist() == [[42, -1], [7, 100]]
  np.testing.assert_array_equal(run.losses, [[1.0, 1.0], [0.5, 0.5], [0.25, 0.125]])
  assert run.metadata == {"seed": 4}
  assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["r"]
  assert os.stat(tmp_path / "runs" / "r").st_ino != inode  # a new directory swapped in


def test_a_read_racing_a_replacement_gives_the_new_run_not_a_mixture(tmp_path, monkeypatch):
  _write_v1(tmp_path)
  load, swapped = traces._load_npy, []  # pylint: disable=protected-access
  def load_then_replace(path, run_id):
    if not swapped:   # between reading run.json (old) and curriculum.npy, the run is replaced
      swapped.append(True)
      with _writer(tmp_path, metadata={"seed": 4}) as w:
        w.initial([1.0, 1.0])
        w.step([42], [0.5, 0.5])
        w.step([7], [0.25, 0.25])
    return load(path, run_id)
  monkeypatch.setattr(traces, "_load_npy", load_then_replace)
  run = traces.read_run(tmp_path, "r")
  assert swapped and run.metadata == {"seed": 4}
  assert run.curriculum.tolist() == [[42, -1], [7, -1]]
  np.testing.assert_array_equal(run.losses, [[1.0, 1.0], [0.5, 0.5], [0.25, 0.25]])


def test_replacement_without_renameat2_falls_back_to_renames(tmp_path, monkeypatch):
  _write_v1(tmp_path)
  def no_libc(*args, **kwargs):
    raise OSError("no C library")
  monkeypatch.setattr(traces.ctypes, "CDLL", no_libc)
  with _writer(tmp_path) as w:
    w.initial([1.0, 1.0])
    w.step([42], [0.5, 0.5])
  assert traces.read_run(tmp_path, "r").curriculum.tolist() == [[42, -1]]
  assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["r"]


def test_kill_9_while_replacing_leaves_the_old_run(tmp_path):
  before = _write_v1(tmp_path)
  code = ("from simfluence_jax.traces.writer import TraceWriter\n"
          f"with TraceWriter({str(tmp_path)!r}, 'r', train_ids={TRAIN_IDS}, "
          f"test_ids={TEST_IDS}, batch_size=2) as w:\n"
          "  w.initial([1.0, 1.0])\n  w.step([42], [0.5, 0.5])\n")
  # trace_write: the new curriculum.npy and losses.npy are written, run.json is not.
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                        env={**os.environ, "SIMFLUENCE_KILL_AT": "trace_write:1"}, timeout=60)
  assert proc.returncode == -signal.SIGKILL, proc.stderr
  assert traces.list_runs(tmp_path) == ["r"] and traces.incomplete_runs(tmp_path) == []
  after = _tree_bytes(tmp_path / "runs")
  assert {k: v for k, v in after.items() if not k.startswith(".")} == before
  assert any(k.startswith(".r.replace-") for k in after)  # the half-staged new run, hidden
  assert traces.read_run(tmp_path, "r").curriculum.tolist() == [[100, 7]]
  with _writer(tmp_path, metadata={"seed": 5}) as w:  # the next replace clears the debris
    w.initial([1.0, 1.0])
    w.step([42], [0.5, 0.5])
  assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["r"]


# Each case: after initial([3, 4]) and two good steps, a bad call at step 3.
BAD_STEPS = [
    (lambda w: w.step([100], [1.0]), r"step 3: losses has shape \(1,\), expected \[m=2\]"),
    (lambda w: w.step([100], [1.0, 2.0, 3.0]), r"step 3: losses has shape \(3,\)"),
    (lambda w: w.step([100], [[1.0, 2.0]]), r"step 3: losses has shape \(1, 2\)"),
    (lambda w: w.step([100], [1.0, NAN]),
     r"step 3: loss of test example id 900 \(column 1\) is nan, not a finite"),
    (lambda w: w.step([100], [np.inf, 1.0]), r"step 3: loss of test example id 5 .* is inf"),
    (lambda w: w.step([100], [1e39, 1.0]), r"step 3: loss of test example id 5 .* is 1e\+39"),
    (lambda w: w.step([100], ["a", "b"]), r"step 3: losses must be numbers, got dtype <U1"),
    (lambda w: w.step([100, 8], [1.0, 1.0]),
     r"step 3: batch id 8 is not in the run's train_ids"),
    (lambda w: w.step([100, -1], [1.0, 1.0]), r"step 3: batch id -1 .*pads a short batch"),
    (lambda w: w.step([100, 7, 42], [1.0, 1.0]), r"step 3: 3 batch ids, more than "
     r"batch_size=2"),
    (lambda w: w.step([100.0], [1.0, 1.0]), r"step 3: batch_ids must be integer ids"),
    (lambda w: w.step([[100]], [1.0, 1.0]), r"step 3: batch_ids must be a 1-D list"),
    (lambda w: w.initial([1.0, 1.0]), r": initial\(\) was already called"),
]


@pytest.mark.parametrize("call, match", BAD_STEPS, ids=[
    "short_losses", "long_losses", "2d_losses", "nan", "inf", "beyond_float32", "strings",
    "unknown_id", "pad_id", "too_many_ids", "float_ids", "2d_ids", "initial_twice"])
def test_bad_step_is_named_and_not_recorded(tmp_path, call, match):
  w = _writer(tmp_path)
  w.initial([3.0, 4.0])
  w.step([100, 7], [2.0, 3.0])
  w.step([42], [1.5, 2.5])
  with pytest.raises(TraceError, match=rf"TraceWriter\(.*\): run 'r'.*{match}"):
    call(w)
  assert w.num_steps == 2 and not (tmp_path / "runs").exists()
  w.close()  # the writer is still usable: exactly the good steps are written
  run = traces.read_run(tmp_path, "r")
  assert run.curriculum.tolist() == [[100, 7], [42, -1]]
  np.testing.assert_array_equal(run.losses, [[3.0, 4.0], [2.0, 3.0], [1.5, 2.5]])


def test_losses_at_step_zero_are_checked_too(tmp_path):
  w = _writer(tmp_path)
  with pytest.raises(TraceError, match=r"run 'r', initial losses \(step 0\): loss of test "
                     r"example id 5 \(column 0\) is nan"):
    w.initial([NAN, 1.0])
  with pytest.raises(TraceError, match=r"run 'r', step 1: step\(\) before initial\(\)"):
    w.step([100], [1.0, 1.0])
  with pytest.raises(TraceError, match=r"run 'r': closed before initial\(\); nothing was "
                     r"written"):
    w.close()
  w.initial([1.0, 1.0])
  with pytest.raises(TraceError, match=r"run 'r': empty run \(T = 0 steps\)"):
    w.close()  # the contract's own check, at close
  assert not (tmp_path / "runs").exists()


def test_use_after_close_is_an_error(tmp_path):
  with _writer(tmp_path) as w:
    w.initial([1.0, 1.0])
    w.step([7], [0.5, 0.5])
  for call in (lambda: w.step([7], [0.5, 0.5]), lambda: w.initial([1.0, 1.0])):
    with pytest.raises(TraceError, match=r"run 'r': the writer is closed \(the run is "
                       r"written to .*runs/r\); open a new TraceWriter"):
      call()


@pytest.mark.parametrize("run_id, changes, match", [
    ("a/b", {}, r"run_id 'a/b' is not a valid name"),
    ("r", {"train_ids": [1, 1]}, r"run 'r': train_ids has duplicate id 1"),
    ("r", {"train_ids": []}, r"run 'r': train_ids is empty"),
    ("r", {"test_ids": []}, r"run 'r': test_ids is empty"),
    ("r", {"test_ids": [-3]}, r"run 'r': test_ids has negative id -3"),
    ("r", {"batch_size": 0}, r"run 'r': batch_size must be an integer >= 1, got 0"),
    ("r", {"batch_size": 2.0}, r"run 'r': batch_size must be an integer >= 1, got 2\.0"),
    ("r", {"metadata": {"num_steps": 3}}, r"metadata keys \['num_steps'\] are reserved"),
    ("r", {"metadata": {"f": object()}}, r"run 'r': metadata is not JSON-serializable"),
])
def test_bad_header_fails_before_the_loop(tmp_path, run_id, changes, match):
  with pytest.raises(TraceError, match=match):
    _writer(tmp_path / "ws", run_id, **changes)
  assert not (tmp_path / "ws").exists()


def test_close_waits_for_another_writers_lock(tmp_path, monkeypatch):
  holder = subprocess.Popen(
      [sys.executable, "-c",
       "import sys; from simfluence_jax.traces import contract as traces\n"
       f"with traces.workspace_lock({str(tmp_path)!r}):\n"
       "  print('held', flush=True); sys.stdin.readline()"],
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
  try:
    assert holder.stdout.readline().strip() == "held"
    w = _writer(tmp_path)
    w.initial([1.0, 1.0])
    w.step([7], [0.5, 0.5])
    monkeypatch.setattr(writer_lib, "LOCK_WAIT_S", 0.2)
    start = time.monotonic()
    with pytest.raises(TraceError, match=rf"is locked .*pid {holder.pid}"):
      w.close()
    assert time.monotonic() - start >= 0.2
    assert not (tmp_path / "runs").exists()
    holder.stdin.write("\n")
    holder.stdin.flush()           # the holder releases the lock and exits
    monkeypatch.setattr(writer_lib, "LOCK_WAIT_S", 30.0)
    w.close()                      # the writer stayed open; it waits for the lock now
  finally:
    holder.communicate(timeout=30)
  assert traces.read_run(tmp_path, "r").curriculum.tolist() == [[7, -1]]


def test_the_writer_never_imports_jax(tmp_path):
  code = ("import sys\nimport simfluence_jax\nfrom simfluence_jax import TraceWriter\n"
          f"with TraceWriter({str(tmp_path)!r}, 'r', train_ids=[1], test_ids=[2], "
          "batch_size=1) as w:\n  w.initial([1.0])\n  w.step([1], [0.5])\n"
          "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
          "('jax', 'jaxlib', 'flax', 'optax', 'orbax', 'tensorflow', 'gin'))\n"
          "print(heavy)\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                        text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == "[]"
  assert traces.read_run(tmp_path, "r").curriculum.tolist() == [[1]]
