"""Training curricula: the paper's sampled runs (Simfluence §5) and explicit curriculum files.

Protocol (Guu et al. 2023, §5 "Training runs"): each run draws `subset_size` examples of the
pool without replacement, trains `epochs` epochs over them, reshuffling every epoch, with
`batch_size` examples per step.
  few-shot (RTE, COPA):  64 of 100, 4 epochs, batch 4   -> 64 steps
  many-shot (Winogrande): 1024 of 1536, 1.5 epochs, batch 4 -> 384 steps

Fractional epochs: 1.5 = one full shuffled pass, then the first half (round(0.5 * n)) of a
fresh shuffle. The stream of all epochs is cut into steps of `batch_size`; a final short step
is padded with -1 (the pad id everywhere in traces: consumers skip negative ids).
Run r uses np.random.default_rng([seed, r]), so adding runs never changes earlier ones.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import numpy as np

from simfluence_jax.traces import atomic_io

PAD = -1


@dataclasses.dataclass(frozen=True)
class Curriculum:
  run_id: str
  train_ids: np.ndarray   # int64 [n_r]  the pool subset drawn for this run (sorted)
  batches: np.ndarray     # int32 [T, k] train ids consumed at each step; -1 pads

  @property
  def num_steps(self) -> int:
    return int(self.batches.shape[0])


def num_steps(*, subset_size: int, epochs: float, batch_size: int) -> int:
  """Steps of one run: ceil(examples seen / batch_size)."""
  return math.ceil(_examples_seen(subset_size, epochs) / batch_size)


def _examples_seen(subset_size: int, epochs: float) -> int:
  full = int(math.floor(epochs))
  return full * subset_size + int(round((epochs - full) * subset_size))


def sample_curricula(pool_ids, *, num_runs: int, subset_size: int, epochs: float,
                     batch_size: int, seed: int, run_prefix: str = "run") -> list[Curriculum]:
  """num_runs curricula "<run_prefix>_000", ... over pool_ids (int ids, not positions)."""
  pool = np.asarray(pool_ids, np.int64).reshape(-1)
  if len(np.unique(pool)) != len(pool):
    raise ValueError("pool_ids contains duplicate ids")
  if not 0 < subset_size <= len(pool):
    raise ValueError(f"subset_size={subset_size} must be in [1, pool size {len(pool)}]")
  if epochs <= 0 or batch_size <= 0 or num_runs < 0:
    raise ValueError(f"need epochs > 0, batch_size > 0, num_runs >= 0; got {epochs}, "
                     f"{batch_size}, {num_runs}")
  seen = _examples_seen(subset_size, epochs)
  steps = math.ceil(seen / batch_size)
  out = []
  for r in range(num_runs):
    rng = np.random.default_rng([seed, r])
    subset = pool[rng.choice(len(pool), subset_size, replace=False)]
    n_epochs = math.ceil(seen / subset_size)
    stream = np.concatenate([rng.permutation(subset) for _ in range(n_epochs)])[:seen]
    padded = np.full(steps * batch_size, PAD, np.int64)
    padded[:seen] = stream
    out.append(Curriculum(run_id=f"{run_prefix}_{r:03d}", train_ids=np.sort(subset),
                          batches=padded.reshape(steps, batch_size).astype(np.int32)))
  return out


def load_curriculum(path) -> np.ndarray:
  """int32 [T, k] train ids from .npy (int [T, k]) or .json (list of equal-length lists, or
  {"batches": <that list>, "metadata": {...}} — see `load_curriculum_metadata`)."""
  path = pathlib.Path(path)
  if path.suffix == ".npy":
    arr = np.load(path, allow_pickle=False)
  elif path.suffix == ".json":
    rows = json.loads(path.read_text())
    if isinstance(rows, dict):
      rows = rows.get("batches")
    if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
      raise ValueError(f"{path}: expected a JSON list of lists of train ids")
    lengths = {len(r) for r in rows}
    if len(lengths) > 1:
      raise ValueError(f"{path}: steps have different batch sizes {sorted(lengths)}; pad short "
                       f"steps with -1")
    arr = np.asarray(rows)
  else:
    raise ValueError(f"{path}: curriculum files must be .npy or .json")
  if arr.ndim != 2 or arr.shape[0] == 0 or (arr.size and not np.issubdtype(arr.dtype,
                                                                           np.integer)):
    raise ValueError(f"{path}: expected a non-empty integer [T, k] array, got dtype "
                     f"{arr.dtype} shape {arr.shape}")
  if (arr < PAD).any():
    step = int(np.argwhere(arr < PAD)[0, 0])
    raise ValueError(f"{path}: step {step} has an id < -1 (only -1 may pad)")
  return arr.astype(np.int32)


def load_curriculum_metadata(path) -> dict:
  """The "metadata" object of a .json curriculum {"batches", "metadata"} ({} otherwise).

  The train binary copies it into the retrained run's run.json (e.g. which counterfactual
  question the curriculum asks)."""
  path = pathlib.Path(path)
  if path.suffix != ".json":
    return {}
  content = json.loads(path.read_text())
  meta = content.get("metadata", {}) if isinstance(content, dict) else {}
  if not isinstance(meta, dict):
    raise ValueError(f"{path}: \"metadata\" must be a JSON object")
  return meta


def save_curriculum(path, batches) -> pathlib.Path:
  """Writes int [T, k] train ids as .npy or .json (atomically); returns the path."""
  path = pathlib.Path(path)
  arr = np.asarray(batches).astype(np.int32)
  if path.suffix == ".npy":
    atomic_io.save_npy(path, arr)
  elif path.suffix == ".json":
    atomic_io.save_json(path, arr.tolist())
  else:
    raise ValueError(f"{path}: curriculum files must be .npy or .json")
  return path
