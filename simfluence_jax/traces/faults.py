"""Fault injection for the reliability tests: SIGKILL this process at a named moment.

    SIMFLUENCE_KILL_AT="checkpoint:2"            # the 2nd time a checkpoint save is under way
    SIMFLUENCE_KILL_AT="atomic_write:3,trace_write:1"

Points (where the library calls `maybe_kill`):
  atomic_write  atomic_io.write_with: the temporary file is written and fsynced, the rename
                has not happened (the old file, if any, is still in place);
  checkpoint    checkpoints.save: orbax has started writing asynchronously and has not
                finished or committed;
  trace_write   traces.write_run: curriculum.npy and losses.npy are written, run.json (which
                marks the run complete) is not.
Unset (always, outside tests) it costs one dict lookup per call.
"""

from __future__ import annotations

import collections
import os
import signal

ENV = "SIMFLUENCE_KILL_AT"
POINTS = ("atomic_write", "checkpoint", "trace_write")
_counts: collections.Counter = collections.Counter()


def _plan(spec: str) -> dict[str, int]:
  plan = {}
  for item in filter(None, (s.strip() for s in spec.split(","))):
    point, _, k = item.partition(":")
    if point not in POINTS or not k.isdigit() or int(k) < 1:
      raise ValueError(f"{ENV}={spec!r}: expected point:k with point in {POINTS}, k >= 1")
    plan[point] = int(k)
  return plan


_PLAN = _plan(os.environ.get(ENV, ""))


def maybe_kill(point: str) -> None:
  """SIGKILLs this process the k-th time `point` is reached, if SIMFLUENCE_KILL_AT says so."""
  if not _PLAN or point not in _PLAN:
    return
  _counts[point] += 1
  if _counts[point] == _PLAN[point]:
    os.kill(os.getpid(), signal.SIGKILL)
