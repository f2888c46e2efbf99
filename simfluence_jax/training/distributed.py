"""Multi-process (multi-host) training: start-up, the global device order, who owns which run.

One process per host (or per group of local devices) runs the same program; jax.distributed
connects them through a coordinator, after which `jax.devices()` lists every process's devices
and a jitted computation over a Mesh of them runs on all processes together (SPMD). On CPU the
cross-process collectives are gloo's (`jax_cpu_collectives_implementation`, gloo by default).

The runs axis of the trainer is laid out contiguously over the global devices sorted by
(process, device id), so process p holds a contiguous block of runs:
  R_pad = ceil(R / D) * D runs (the last R_pad - R are padding, never written)
  run r lives on device r // (R_pad / D); process p owns the real runs of its devices.
A process writes only the runs it owns; together the processes write every run once.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """How this process joins a multi-process job (all None/1: a single process).

  coordinator_address: "host:port" of process 0's coordinator service (every process passes
    the same); None with num_processes > 1 lets JAX detect it from the cluster environment
    (Cloud TPU pods, SLURM, Open MPI) — then num_processes and process_id may be None as well.
  num_processes: processes in the job; 1 = single process (nothing initialized).
  process_id: this process's index in [0, num_processes).
  """
  coordinator_address: str | None = None
  num_processes: int | None = 1
  process_id: int | None = None

  @property
  def multi_process(self) -> bool:
    return self.num_processes is None or self.num_processes > 1

  def validate(self) -> "DistributedConfig":
    n, p = self.num_processes, self.process_id
    if n is not None and n < 1:
      raise ValueError(f"--num_processes must be >= 1, got {n}")
    if n == 1 and p not in (None, 0):
      raise ValueError(f"--process_id={p} needs --num_processes > 1")
    if n is not None and n > 1:
      if p is None or not 0 <= p < n:
        raise ValueError(f"--process_id must be in [0, {n}) with --num_processes={n}, got {p}")
      if not self.coordinator_address:
        raise ValueError("--num_processes > 1 needs --coordinator_address=host:port "
                         "(process 0's address, the same for every process)")
    return self


def initialize(config: DistributedConfig) -> bool:
  """Joins the multi-process job described by `config` (a no-op for a single process).

  Must run before anything touches a device (jax.devices(), creating an array). Returns whether
  jax.distributed was initialized.
  """
  config.validate()
  if not config.multi_process:
    return False
  jax.distributed.initialize(coordinator_address=config.coordinator_address,
                             num_processes=config.num_processes,
                             process_id=config.process_id)
  return True


def global_devices() -> list[jax.Device]:
  """Every process's devices, grouped by process (then by id): a 1-D mesh over them gives
  each process one contiguous block of the sharded axis."""
  return sorted(jax.devices(), key=lambda d: (d.process_index, d.id))


def padded_num_runs(num_runs: int, num_devices: int) -> int:
  """R rounded up to a multiple of the device count (the padding runs are all no-op steps)."""
  return -(-num_runs // num_devices) * num_devices


def process_runs(num_runs: int, devices: Sequence[jax.Device],
                 process_index: int | None = None) -> list[int]:
  """The real runs (of R) that `process_index` (default: this process) holds when the
  R_pad = padded_num_runs(R, D) runs are sharded contiguously over `devices` (in this order)."""
  process_index = jax.process_index() if process_index is None else process_index
  per_device = padded_num_runs(num_runs, len(devices)) // len(devices)
  return [r for r in range(num_runs)
          if devices[r // per_device].process_index == process_index]


def in_turn(fn: Callable[[], None], *, name: str) -> None:
  """Runs `fn` on every process, one process after another (process 0 first).

  For writes that take the workspace's single-writer lock (traces.write_run): each process's
  turn ends with a barrier of all processes, so no two hold the lock at once. A single process
  just calls `fn`.
  """
  if jax.process_count() == 1:
    fn()
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  for p in range(jax.process_count()):
    if p == jax.process_index():
      fn()
    multihost_utils.sync_global_devices(f"{name}:{p}")


def local_rows(x: jax.Array) -> dict[int, np.ndarray]:
  """{row index along axis 0: host numpy row} for the rows of `x` on this process's devices
  (an array sharded over processes cannot be read whole; each process reads its part)."""
  out = {}
  for shard in x.addressable_shards:
    start = (shard.index[0].start or 0) if shard.index else 0
    data = np.asarray(shard.data)
    for i in range(data.shape[0]):
      out.setdefault(start + i, data[i])
  return out


def host_array(x: jax.Array | np.ndarray) -> np.ndarray:
  """`x` as numpy; rows held only by other processes are NaN (float) — for [R, ...] arrays
  sharded over runs. Fully addressable arrays are read whole."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x)
  out = np.full(x.shape, np.nan, x.dtype)
  for r, row in local_rows(x).items():
    out[r] = row
  return out


def global_array(host: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
  """A global array with `sharding` from `host`, of which each process reads only the parts
  its devices hold (so rows of other processes' runs may be anything, e.g. NaN)."""
  host = np.asarray(host)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
