"""Atomic file writes: a crash never leaves a half-written file under the final name.

Every writer serializes into a temporary file in the destination's own directory (so the
rename stays on one filesystem), flushes and fsyncs it, then `os.replace`s it over the final
name and fsyncs the directory. Readers therefore see either the previous complete version or
the new complete version, never a mixture; if serialization fails midway the temporary file
is removed and the previous version is untouched. Nothing here pickles: arrays go through
`np.save(..., allow_pickle=False)` and object arrays are refused.

`exclusive_lock` is the writers' lock file (O_CREAT|O_EXCL holding pid and host).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import tempfile
import threading
from typing import Any, Callable, IO, Iterator

from absl import logging
import numpy as np

from simfluence_jax.traces import faults

PathLike = str | os.PathLike


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _fsync_dir(directory: pathlib.Path) -> None:
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:  # e.g. platforms that cannot open directories; the rename is still atomic
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def write_with(path: PathLike, write: Callable[[IO[bytes]], None]) -> pathlib.Path:
  """Calls `write(f)` on a temporary binary file, then atomically renames it to `path`.

  If `write` raises, the temporary file is deleted, `path` keeps its previous content (or
  stays absent) and the exception propagates.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
    faults.maybe_kill("atomic_write")
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise
  _fsync_dir(path.parent)
  return path


def write_bytes(path: PathLike, data: bytes) -> pathlib.Path:
  """Atomically writes `data` to `path` (parent directories are created)."""
  return write_with(path, lambda f: f.write(data))


def write_text(path: PathLike, text: str, *, encoding: str = "utf-8") -> pathlib.Path:
  """Atomically writes `text` to `path`."""
  return write_bytes(path, text.encode(encoding))


def _json_default(obj: Any) -> Any:
  """numpy scalars and arrays become plain JSON values; anything else is an error."""
  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  if isinstance(obj, pathlib.PurePath):
    return str(obj)
  raise TypeError(f"{type(obj).__name__} is not JSON-serializable")


def dumps_json(obj: Any, *, indent: int | None = 2, sort_keys: bool = False) -> str:
  """json.dumps with numpy values converted; NaN/Infinity kept as Python's json writes them."""
  return json.dumps(obj, indent=indent, sort_keys=sort_keys, default=_json_default,
                    ensure_ascii=False) + "\n"


def save_json(path: PathLike, obj: Any, *, indent: int | None = 2,
              sort_keys: bool = False) -> pathlib.Path:
  """Atomically writes `obj` as JSON (UTF-8). The text is built before any file is touched."""
  return write_text(path, dumps_json(obj, indent=indent, sort_keys=sort_keys))


def _refuse_objects(name: str, array: np.ndarray) -> None:
  if array.dtype.hasobject:
    raise ValueError(f"{name}: object arrays are not saved (no pickle); got dtype object")


def save_npy(path: PathLike, array: Any) -> pathlib.Path:
  """Atomically writes one array as .npy (never pickled)."""
  array = np.asarray(array)
  _refuse_objects(str(path), array)
  return write_with(path, lambda f: np.save(f, array, allow_pickle=False))


def save_npz(path: PathLike, **arrays: Any) -> pathlib.Path:
  """Atomically writes named arrays as an uncompressed .npz (never pickled)."""
  arrays = {k: np.asarray(v) for k, v in arrays.items()}
  for k, v in arrays.items():
    _refuse_objects(f"{path}[{k}]", v)

  return write_with(path, lambda f: np.savez(f, allow_pickle=False, **arrays))


# ----------------------------------------------------------------------------- lock files

_HELD: dict[str, int] = {}  # realpath of a lock file -> re-entry depth in this process
_HELD_GUARD = threading.Lock()


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  except (OverflowError, ValueError):
    return False
  return True


def _read_holder(path: pathlib.Path) -> dict | None:
  """The lock file's {"pid", "host"}; None when absent; {} when unreadable (mid-write)."""
  try:
    holder = json.loads(path.read_text())
    return holder if isinstance(holder, dict) else {}
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}


def _is_stale(holder: dict, key: str) -> bool:
  pid, host = holder.get("pid"), holder.get("host")
  if isinstance(pid, bool) or not isinstance(pid, int) or host != socket.gethostname():
    return False  # unreadable, or another host's: cannot tell, so treat it as held
  if pid == os.getpid():
    return key not in _HELD  # our pid but not held by us: left by an earlier process
  return not _pid_alive(pid)


def _create_exclusive(path: pathlib.Path, content: str) -> bool:
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w") as f:
    f.write(content)
  return True


def _acquire(path: pathlib.Path, key: str, content: str) -> bool:
  if _create_exclusive(path, content):
    return True
  holder = _read_holder(path)
  if holder is None:  # released between our two looks
    return _create_exclusive(path, content)
  if not _is_stale(holder, key):
    return False
  # Take-over of a dead process's lock, serialized by a second O_EXCL file so that two
  # processes cannot both delete the stale lock and both believe they hold it.
  guard = path.with_name(path.name + ".takeover")
  if not _create_exclusive(guard, content):
    return False
  try:
    if _read_holder(path) == holder:
      logging.warning("taking over stale lock %s from dead pid %s", path, holder.get("pid"))
      with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return _create_exclusive(path, content)
  finally:
    os.unlink(guard)


@contextlib.contextmanager
def exclusive_lock(path: PathLike, *, what: str,
                   error: type[Exception] = RuntimeError) -> Iterator[pathlib.Path]:
  """Holds the lock file `path` (O_CREAT|O_EXCL, content {"pid", "host"}) for this process.

  Re-entrant within a process (threads of one process share it). If another live process
  holds it, raises `error` naming `what`, the holder's pid and host and the lock file. A lock
  whose pid is dead on this host is taken over. Released (file removed) on exit.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  key = os.path.realpath(path)
  content = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
  with _HELD_GUARD:
    acquired = bool(_HELD.get(key)) or _acquire(path, key, content)
    if acquired:
      _HELD[key] = _HELD.get(key, 0) + 1
  if not acquired:
    holder = _read_holder(path) or {}
    raise error(
        f"{what} is locked by another writer (pid {holder.get('pid', '?')} on host "
        f"{holder.get('host', '?')}, lock file {path}); wait for it to finish, or delete "
        "the lock file if that process is gone")
  try:
    yield path
  finally:
    with _HELD_GUARD:
      _HELD[key] -= 1
      if not _HELD[key]:
        del _HELD[key]
        with contextlib.suppress(FileNotFoundError):
          os.unlink(path)
