"""atomic_io: content round trips, old file intact on failure, no temp litter, lock files."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from simfluence_jax.traces import atomic_io


def test_round_trips_are_exact(tmp_path):
  a = np.arange(6, dtype=np.int32).reshape(2, 3) - 1
  atomic_io.save_npy(tmp_path / "sub" / "a.npy", a)  # parent directory is created
  got = np.load(tmp_path / "sub" / "a.npy", allow_pickle=False)
  assert got.dtype == np.int32 and np.array_equal(got, a)

  atomic_io.save_npz(tmp_path / "p.npz", x=np.float32([1.5, 2.0]), kind=np.str_("linear"))
  with np.load(tmp_path / "p.npz", allow_pickle=False) as z:
    assert z["x"].tolist() == [1.5, 2.0] and z["x"].dtype == np.float32
    assert str(z["kind"]) == "linear" and z["kind"].dtype.kind == "U"

  atomic_io.save_json(tmp_path / "d.json", {"a": np.float32(0.5), "b": np.arange(2),
                                            "c": "é"})
  assert json.loads((tmp_path / "d.json").read_text("utf-8")) == {"a": 0.5, "b": [0, 1],
                                                                  "c": "é"}
  atomic_io.write_text(tmp_path / "t.txt", "hello\n")
  atomic_io.write_bytes(tmp_path / "b.bin", b"\x00\x01")
  assert (tmp_path / "t.txt").read_text() == "hello\n"
  assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "d.json", "p.npz", "sub",
                                                        "t.txt"]


def test_object_arrays_are_refused(tmp_path):
  with pytest.raises(ValueError, match="object"):
    atomic_io.save_npy(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object))
  with pytest.raises(ValueError, match=r"o\.npz\[bad\].*object"):
    atomic_io.save_npz(tmp_path / "o.npz", bad=np.array([None], dtype=object))
  assert list(tmp_path.iterdir()) == []


def test_failed_serializer_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
  path = tmp_path / "x.npy"
  atomic_io.save_npy(path, np.float32([1, 2, 3]))
  old = path.read_bytes()

  def broken_save(f, arr, allow_pickle):
    f.write(b"\x93NUMPY half")  # bytes hit the temp file, then the serializer dies
    raise RuntimeError("disk full")

  monkeypatch.setattr(np, "save", broken_save)
  with pytest.raises(RuntimeError, match="disk full"):
    atomic_io.save_npy(path, np.float32([9, 9, 9]))
  assert path.read_bytes() == old
  assert [p.name for p in tmp_path.iterdir()] == ["x.npy"]


def test_failed_rename_keeps_old_file(tmp_path, monkeypatch):
  path = tmp_path / "d.json"
  atomic_io.save_json(path, {"v": 1})

  def broken_replace(src, dst):
    raise OSError("crash before rename")

  monkeypatch.setattr(os, "replace", broken_replace)
  with pytest.raises(OSError, match="crash before rename"):
    atomic_io.save_json(path, {"v": 2})
  assert json.loads(path.read_text()) == {"v": 1}
  assert [p.name for p in tmp_path.iterdir()] == ["d.json"]


def test_unserializable_json_touches_nothing(tmp_path):
  path = tmp_path / "d.json"
  atomic_io.save_json(path, {"v": 1})
  with pytest.raises(TypeError, match="set is not JSON"):
    atomic_io.save_json(path, {"v": {1, 2}})
  assert json.loads(path.read_text()) == {"v": 1}
  assert [p.name for p in tmp_path.iterdir()] == ["d.json"]


def test_lock_is_exclusive_between_processes_and_reentrant(tmp_path):
  lock = tmp_path / ".lock"
  holder = subprocess.Popen(
      [sys.executable, "-c",
       "import sys, time; from simfluence_jax.traces import atomic_io\n"
       f"with atomic_io.exclusive_lock({str(lock)!r}, what='ws'):\n"
       "  print('held', flush=True); sys.stdin.readline()"],
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RuntimeError, match=rf"ws is locked .*pid {holder.pid} .*\.lock"):
      with atomic_io.exclusive_lock(lock, what="ws"):
        pass
  finally:
    holder.communicate("\n", timeout=30)
  assert not lock.exists()  # released on exit
  with atomic_io.exclusive_lock(lock, what="ws"):
    with atomic_io.exclusive_lock(lock, what="ws"):  # re-entrant in one process
      assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert lock.exists()  # still held by the outer block
  assert not lock.exists()


def test_stale_lock_of_dead_pid_is_taken_over(tmp_path):
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  lock = tmp_path / ".lock"
  lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
  with atomic_io.exclusive_lock(lock, what="ws"):
    assert json.loads(lock.read_text())["pid"] == os.getpid()
  assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_lock_of_another_host_is_never_taken_over(tmp_path):
  lock = tmp_path / ".lock"
  lock.write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
  with pytest.raises(RuntimeError, match="pid 1 on host elsewhere"):
    with atomic_io.exclusive_lock(lock, what="ws"):
      pass
  assert json.loads(lock.read_text()) == {"pid": 1, "host": "elsewhere"}
