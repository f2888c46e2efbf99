"""traces: exact round trips, every contract violation named, corruption never escapes as a
non-TraceError, overwrite protection, incomplete runs, examples, workspace lock."""

import json
import pathlib
import subprocess
import sys

import hypothesis
from hypothesis import strategies as st
import numpy as np
import pytest

from simfluence_jax.traces import contract as traces
from simfluence_jax.traces.contract import RunTrace, TraceError

NAN = np.nan


def _trace(run_id="r1", **changes):
  base = dict(
      run_id=run_id,
      train_ids=np.array([100, 7, 42], np.int64),  # ids, not positions; any order
      test_ids=np.array([5, 900], np.int64),
      batch_size=2,
      curriculum=np.array([[100, 7], [42, -1], [7, 7]], np.int32),
      losses=np.array([[NAN, 3.0], [2.0, 2.5], [1.5, NAN], [1.0, 1.25]], np.float32),
      metadata={"seed": 3, "task": "toy", "tuning": ["ia3"]})
  base.update(changes)
  return RunTrace(**base)


def _write_raw(root, run_id="r1", meta=None, cur=None, losses=None):
  """A run written with numpy + json alone (independent of write_run)."""
  d = pathlib.Path(root) / "runs" / run_id
  d.mkdir(parents=True, exist_ok=True)
  t = _trace(run_id)
  np.save(d / "curriculum.npy", t.curriculum if cur is None else cur)
  np.save(d / "losses.npy", t.losses if losses is None else losses)
  body = {"schema": 1, "run_id": run_id, "train_ids": [100, 7, 42], "test_ids": [5, 900],
          "batch_size": 2, "num_steps": 3, "seed": 3, "task": "toy", "tuning": ["ia3"]}
  body.update(meta or {})
  (d / "run.json").write_text(json.dumps(body))
  return d


def test_round_trip_is_exact_with_canonical_dtypes(tmp_path):
  t = _trace()
  d = traces.write_run(tmp_path, t)
  assert d == tmp_path / "runs" / "r1"
  back = traces.read_run(tmp_path, "r1")
  assert back == t and back.num_steps == 3
  assert back.curriculum.dtype == np.int32 and back.losses.dtype == np.float32
  assert back.train_ids.dtype == np.int64 and back.test_ids.dtype == np.int64
  assert np.load(d / "curriculum.npy").dtype == np.int32
  assert back.metadata == {"seed": 3, "task": "toy", "tuning": ["ia3"]}
  assert traces.list_runs(tmp_path) == ["r1"]
  assert not (tmp_path / ".lock").exists()


def test_read_of_hand_written_run_equals_hand_built_trace(tmp_path):
  _write_raw(tmp_path, cur=np.array([[100, 7], [42, -1], [7, 7]], np.int64),
             losses=np.array([[NAN, 3.0], [2.0, 2.5], [1.5, NAN], [1.0, 1.25]], np.float64))
  assert traces.read_run(tmp_path, "r1") == _trace()  # int64/float64 accepted on read


def test_write_is_strict_about_dtypes_and_converts(tmp_path):
  t = _trace(curriculum=_trace().curriculum.astype(np.int64),
             losses=_trace().losses.astype(np.float64))
  d = traces.write_run(tmp_path, t)
  assert np.load(d / "curriculum.npy").dtype == np.int32
  assert np.load(d / "losses.npy").dtype == np.float32
  assert traces.read_run(tmp_path, "r1") == _trace()


@pytest.mark.parametrize("changes, match", [
    (dict(curriculum=np.array([[100, 7], [42, -1], [7, 8]], np.int32)),
     r"run 'r1'.*step 3 \(row 2\).*example id 8 .*not in the run's train_ids"),
    (dict(curriculum=np.array([[100, 7], [-1, 42], [7, 7]], np.int32)),
     r"step 2 \(row 1\).*padding before an id.*trail"),
    (dict(curriculum=np.array([[-1, -1], [-1, -1], [-1, -1]], np.int32)),
     r"every step is all padding"),
    (dict(curriculum=np.array([[100, 7], [42, -5], [7, 7]], np.int32)),
     r"step 2 \(row 1\) holds id -5"),
    (dict(curriculum=np.array([[100.0, 7], [42, -1], [7, 7]])), r"integer ids.*float64"),
    (dict(curriculum=np.array([[True, False]] * 3)), r"integer ids.*bool"),
    (dict(curriculum=np.zeros((0, 2), np.int32), losses=np.zeros((1, 2), np.float32)),
     r"empty run \(T = 0"),
    (dict(curriculum=np.array([[100], [42], [7]], np.int32)),
     r"shape \[T, batch_size=2\], got \(3, 1\)"),
    (dict(losses=np.zeros((3, 2), np.float32)), r"losses must have shape \[T\+1=4, m=2\]"),
    (dict(losses=np.array([[1, 1]] * 4)), r"losses must be floating.*int64"),
    (dict(losses=np.array([[1, 1], [1, 1], [1, np.inf], [1, 1]], np.float32)),
     r"run 'r1'.*test example id 900 is inf at step 2 \(row 2\)"),
    (dict(losses=np.array([[-np.inf, 1]] + [[1, 1]] * 3, np.float32)),
     r"id 5 is -inf before the first step"),
    (dict(losses=np.array([[1e300, 1]] + [[1, 1]] * 3)), r"id 5 is 1e\+300.*beyond float32"),
    (dict(train_ids=np.array([100, 7, 42, 7])), r"train_ids has duplicate id 7"),
    (dict(test_ids=np.array([5, 5])), r"test_ids has duplicate id 5"),
    (dict(test_ids=np.array([5, -900])), r"test_ids has negative id -900"),
    (dict(test_ids=np.array([], np.int64), losses=np.zeros((4, 0), np.float32)),
     r"test_ids is empty"),
    (dict(batch_size=0), r"batch_size must be an integer >= 1"),
    (dict(run_id="../x"), r"run_id '\.\./x' is not a valid name"),
    (dict(metadata={"num_steps": 9}), r"metadata keys \['num_steps'\] are reserved"),
    (dict(metadata={"f": object()}), r"not JSON-serializable"),
])
def test_bad_traces_are_refused_before_anything_is_written(tmp_path, changes, match):
  with pytest.raises(TraceError, match=match):
    traces.write_run(tmp_path, _trace(**changes))
  assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.*"))


def test_nan_means_not_recorded_anywhere_including_row_0(tmp_path):
  t = _trace(losses=np.full((4, 2), NAN, np.float32))
  traces.write_run(tmp_path, t)
  assert np.isnan(traces.read_run(tmp_path, "r1").losses).all()


@pytest.mark.parametrize("meta, match", [
    ({"schema": 2}, r"run\.json: schema 2 is not supported"),
    ({"run_id": "other"}, r"run_id 'other' does not match its directory name 'r1'"),
    ({"batch_size": 3}, r"curriculum\.npy \(run 'r1'\): shape \(3, 2\) does not match "
                        r"run\.json \[num_steps=3, batch_size=3\]"),
    ({"num_steps": 4}, r"curriculum\.npy.*num_steps=4"),
    ({"test_ids": [5, 900, 1]}, r"losses\.npy \(run 'r1'\).*len\(test_ids\)=3"),
    ({"train_ids": [100, 7]}, r"run 'r1'.*step 2 \(row 1\).*example id 42 .*not in"),
    ({"train_ids": [100, 7, 42, True]}, r"'train_ids' must be a list of integer ids"),
    ({"test_ids": [5, 5]}, r"test_ids has duplicate id 5"),
    ({"test_ids": [5, -1]}, r"'test_ids' has id -1"),
    ({"batch_size": "2"}, r"'batch_size' must be an integer"),
])
def test_bad_run_json_is_named(tmp_path, meta, match):
  _write_raw(tmp_path, meta=meta)
  with pytest.raises(TraceError, match=match):
    traces.read_run(tmp_path, "r1")


def test_missing_keys_duplicate_keys_and_garbage_json(tmp_path):
  d = _write_raw(tmp_path)
  (d / "run.json").write_text('{"schema": 1}')
  with pytest.raises(TraceError, match=r"run\.json: missing keys \['run_id', 'train_ids'"):
    traces.read_run(tmp_path, "r1")
  (d / "run.json").write_text('{"schema": 1, "schema": 1}')
  with pytest.raises(TraceError, match=r"run\.json: not readable JSON.*duplicate key 'schema'"):
    traces.read_run(tmp_path, "r1")
  (d / "run.json").write_text('{"schema": 1, ')
  with pytest.raises(TraceError, match=rf"{d}/run\.json: not readable JSON"):
    traces.read_run(tmp_path, "r1")


def test_missing_and_truncated_files_name_the_path(tmp_path):
  d = traces.write_run(tmp_path, _trace())
  data = (d / "losses.npy").read_bytes()
  (d / "losses.npy").write_bytes(data[:-5])
  with pytest.raises(TraceError, match=rf"{d}/losses\.npy \(run 'r1'\): file is "
                     rf"{len(data) - 5} bytes .* needs {len(data)}; truncated"):
    traces.read_run(tmp_path, "r1")
  (d / "losses.npy").write_bytes(data[:20])
  with pytest.raises(TraceError, match=rf"{d}/losses\.npy \(run 'r1'\): not a readable"):
    traces.read_run(tmp_path, "r1")
  (d / "curriculum.npy").unlink()
  with pytest.raises(TraceError, match=rf"{d}/curriculum\.npy: missing file \(run 'r1'\)"):
    traces.read_run(tmp_path, "r1")
  np.save(d / "curriculum.npy", np.array([["a", "b"]] * 3))
  with pytest.raises(TraceError, match=r"curriculum\.npy \(run 'r1'\): dtype <U1 is not"):
    traces.read_run(tmp_path, "r1")
  with pytest.raises(TraceError, match=r"runs/nope/run\.json: run 'nope' is not found"):
    traces.read_run(tmp_path, "nope")


def test_incomplete_runs_are_listed_apart_and_refused(tmp_path):
  traces.write_run(tmp_path, _trace("a"))
  traces.write_run(tmp_path, _trace("b"))
  (tmp_path / "runs" / "b" / "run.json").unlink()  # as if the writer died before run.json
  assert traces.list_runs(tmp_path) == ["a"]
  assert traces.incomplete_runs(tmp_path) == ["b"]
  with pytest.raises(TraceError, match=r"run 'b' is incomplete"):
    traces.read_run(tmp_path, "b")
  traces.write_run(tmp_path, _trace("b"))  # an incomplete run may be rewritten freely
  assert traces.list_runs(tmp_path) == ["a", "b"] and traces.incomplete_runs(tmp_path) == []
  with pytest.raises(TraceError, match=r"workspace .*missing does not exist"):
    traces.list_runs(tmp_path / "missing")


def test_overwrite_protection(tmp_path):
  traces.write_run(tmp_path, _trace())
  traces.write_run(tmp_path, _trace())  # identical content: a no-op, not an error
  changed = _trace(metadata={"seed": 4})
  with pytest.raises(TraceError, match=r"run 'r1' already exists with different content.*"
                     r"overwrite=True"):
    traces.write_run(tmp_path, changed)
  assert traces.read_run(tmp_path, "r1") == _trace()
  traces.write_run(tmp_path, changed, overwrite=True)
  assert traces.read_run(tmp_path, "r1") == changed


def test_workspace_lock_names_the_holder(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c",
       "import sys; from simfluence_jax.traces import contract as traces\n"
       f"with traces.workspace_lock({str(tmp_path)!r}):\n"
       "  print('held', flush=True); sys.stdin.readline()"],
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(TraceError, match=rf"workspace {tmp_path} is locked .*pid "
                       rf"{holder.pid}"):
      traces.write_run(tmp_path, _trace())
  finally:
    holder.communicate("\n", timeout=30)
  assert not (tmp_path / "runs").exists()
  with traces.workspace_lock(tmp_path):
    traces.write_run(tmp_path, _trace())  # re-entrant: a lock holder may write runs
  assert traces.list_runs(tmp_path) == ["r1"]


def test_examples_round_trip_and_errors(tmp_path):
  exs = [{"id": 9, "inputs": "q?", "targets": "yes", "meta": {"country": "Perú"}},
         {"id": 2, "inputs": "x", "targets": "no"}]
  traces.write_examples(tmp_path, "train", exs)
  assert traces.read_examples(tmp_path, "train") == {9: exs[0], 2: exs[1]}
  with pytest.raises(TraceError, match=r"duplicate example id 9"):
    traces.write_examples(tmp_path, "test", exs + [exs[0]])
  with pytest.raises(TraceError, match=r"split must be one of"):
    traces.write_examples(tmp_path, "dev", exs)
  path = traces.examples_path(tmp_path, "test")
  path.write_text('{"id": 1, "inputs": "a", "targets": "b"}\n\n{"id": 2, "inputs": 3}\n')
  with pytest.raises(TraceError, match=rf"{path}:3: example id 2 needs a string 'inputs'"):
    traces.read_examples(tmp_path, "test")
  path.write_text('{"id": 1, "inputs": "a", "targets": "b"}\n{oops\n')
  with pytest.raises(TraceError, match=rf"{path}:2: not valid JSON"):
    traces.read_examples(tmp_path, "test")


@st.composite
def _random_traces(draw):
  pool = draw(st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=6, unique=True))
  tests = draw(st.lists(st.integers(0, 2**40), min_size=1, max_size=4, unique=True))
  k = draw(st.integers(1, 3))
  steps = draw(st.integers(1, 5))
  rows = []
  for _ in range(steps):
    used = draw(st.integers(1, k))
    rows.append([draw(st.sampled_from(pool)) for _ in range(used)] + [-1] * (k - used))
  losses = draw(st.lists(st.one_of(st.just(float("nan")),
                                   st.floats(-1e6, 1e6, width=32)),
                         min_size=(steps + 1) * len(tests), max_size=(steps + 1) * len(tests)))
  return RunTrace(run_id=draw(st.from_regex(r"[a-z0-9_][a-z0-9._-]{0,8}", fullmatch=True)),
                  train_ids=np.array(pool, np.int64), test_ids=np.array(tests, np.int64),
                  batch_size=k, curriculum=np.array(rows, np.int32),
                  losses=np.array(losses, np.float32).reshape(steps + 1, len(tests)),
                  metadata={"seed": draw(st.integers(0, 9))})


_SETTINGS = hypothesis.settings(max_examples=40, deadline=None, database=None,
                                suppress_health_check=[hypothesis.HealthCheck.too_slow])


@_SETTINGS
@hypothesis.given(trace=_random_traces())
def test_property_random_valid_traces_round_trip(tmp_path_factory, trace):
  root = tmp_path_factory.mktemp("ws")
  traces.write_run(root, trace)
  assert traces.read_run(root, trace.run_id) == trace


@_SETTINGS
@hypothesis.given(trace=_random_traces(),
                  name=st.sampled_from(["run.json", "curriculum.npy", "losses.npy"]),
                  data=st.data())
def test_property_corruption_reads_valid_or_raises_trace_error(tmp_path_factory, trace,
                                                               name, data):
  root = tmp_path_factory.mktemp("ws")
  path = traces.write_run(root, trace) / name
  raw = bytearray(path.read_bytes())
  if data.draw(st.booleans(), label="truncate"):
    path.write_bytes(bytes(raw[:data.draw(st.integers(0, len(raw) - 1), label="keep")]))
    with pytest.raises(TraceError, match=name.replace(".", r"\.")):
      traces.read_run(root, trace.run_id)
    return
  for _ in range(data.draw(st.integers(1, 3), label="flips")):
    i = data.draw(st.integers(0, len(raw) - 1), label="at")
    raw[i] ^= data.draw(st.integers(1, 255), label="xor")
  path.write_bytes(bytes(raw))
  try:
    got = traces.read_run(root, trace.run_id)
  except TraceError:
    return
  # Corruption that still reads must give a trace that passes the contract and round trips.
  other = tmp_path_factory.mktemp("ws2")
  traces.write_run(other, got)
  assert traces.read_run(other, got.run_id) == got
