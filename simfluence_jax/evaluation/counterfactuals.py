"""Counterfactual curricula: the "what if" questions of the paper (§1, §2).

  * "What if I had removed group X?"               -> `remove_examples`
  * "What if I had trained on Y first, then X?"     -> `reorder_first`
  * "What if the run had gone in reverse order?"    -> `reverse`
  * "What if I duplicated Z ten times?"             -> `duplicate`
  * an explicit curriculum given as an array        -> `explicit`

All functions are pure numpy on *id* curricula: int [T, k] train ids consumed at step t
(row t-1), -1 = pad (the trace contract). They return new int32 [T', k] arrays and never
modify their input. Convert to simulator positions with `rollout.ids_to_positions`.

Re-packing. Several edits work on the *consumption sequence*: the curriculum read row by
row, pads dropped (`consumption_sequence`). The edited sequence is cut again into batches
of the same size k, in order, the last batch padded with -1 (`rebatch`). Re-packing
therefore squeezes out pads that sat inside the original run, and the run length becomes
ceil(N' / k) for N' consumptions.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

_WHERE = ("end", "spread", "start")


def explicit(curriculum, *, batch_size: int | None = None) -> np.ndarray:
  """Validates an explicit curriculum and returns it as a fresh int32 [T, k] array.

  Raises ValueError when it is not a 2-D integer array, when an entry is negative other
  than the pad -1 (naming the 1-based step), or when k differs from `batch_size`.
  """
  cur = np.asarray(curriculum)
  if cur.ndim != 2:
    raise ValueError(f"a curriculum must be int [T, k] (train ids per step, -1 pads); "
                     f"got shape {cur.shape}")
  if cur.size and (not np.issubdtype(cur.dtype, np.integer) or cur.dtype == bool):
    raise ValueError(f"a curriculum must hold integer train ids; got dtype {cur.dtype}")
  if cur.shape[1] < 1:
    raise ValueError("a curriculum needs batch size k >= 1; got k = 0")
  if batch_size is not None and cur.shape[1] != batch_size:
    raise ValueError(f"curriculum has batch size {cur.shape[1]}, expected {batch_size}")
  cur = cur.astype(np.int64)
  bad = np.argwhere(cur < -1)
  if bad.size:
    t, j = (int(v) for v in bad[0])
    raise ValueError(f"step {t + 1} (1-based), slot {j}: id {int(cur[t, j])} is negative; "
                     "train ids are >= 0 and -1 is the only pad")
  if cur.size and cur.max() > np.iinfo(np.int32).max:
    raise ValueError(f"train id {int(cur.max())} does not fit the int32 curriculum format")
  return cur.astype(np.int32)


def consumption_sequence(curriculum) -> np.ndarray:
  """The ids in the order they are consumed (row-major, pads dropped): int32 [N]."""
  cur = explicit(curriculum)
  flat = cur.reshape(-1)
  return flat[flat != -1]


def rebatch(sequence, batch_size: int) -> np.ndarray:
  """Cuts a consumption sequence [N] into int32 [ceil(N/k), k], last batch padded with -1."""
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
  seq = np.asarray(sequence)
  if seq.ndim != 1:
    raise ValueError(f"a consumption sequence must be 1-D; got shape {seq.shape}")
  seq = explicit(seq.reshape(-1, 1)).reshape(-1)           # same id checks
  if np.any(seq == -1):
    raise ValueError("a consumption sequence holds no pads (-1)")
  num_steps = -(-seq.size // batch_size)
  out = np.full(num_steps * batch_size, -1, np.int32)
  out[:seq.size] = seq
  return out.reshape(num_steps, batch_size)


def _id_set(ids, name: str) -> np.ndarray:
  arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1)
  if arr.size == 0:
    raise ValueError(f"{name} is empty; name at least one train id")
  if not np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool:
    raise ValueError(f"{name} must be integer train ids; got dtype {arr.dtype}")
  if arr.min() < 0:
    raise ValueError(f"{name} holds {int(arr.min())}; train ids are >= 0")
  return np.unique(arr.astype(np.int64))


def _check_present(ids: np.ndarray, cur: np.ndarray, name: str):
  missing = ids[~np.isin(ids, cur)]
  if missing.size:
    raise ValueError(f"{name}: ids {missing.tolist()[:10]} never occur in the curriculum "
                     f"({missing.size} missing); pass missing_ok=True to allow this")


def remove_examples(curriculum, ids: Iterable[int], *, keep_steps: bool = False,
                    missing_ok: bool = False) -> np.ndarray:
  """Removes every consumption of the given train ids ("what if X had been removed?").

  Args:
    curriculum: int [T, k] ids, -1 pads.
    ids: the train ids to remove (a group X).
    keep_steps: False (default): the remaining consumptions are re-packed into batches of
      size k in the same order, so removal *shortens* the run to ceil(N'/k) steps — the
      natural reading of "train without X" with a fixed batch size. True: the run keeps its
      T steps and each batch just loses the removed ids; the survivors keep their order and
      the batch is filled up with trailing -1 pads (an emptied batch is an identity step for
      the simulator). keep_steps=True is the leave-one-out semantics of
      `attribution.removal_effects`.
    missing_ok: when False, an id that never occurs in the curriculum is a ValueError
      (usually a typo or the wrong id space).

  Returns:
    int32 [T', k].
  """
  cur = explicit(curriculum)
  remove = _id_set(ids, "ids to remove")
  if not missing_ok:
    _check_present(remove, cur, "remove_examples")
  drop = np.isin(cur, remove)
  if not keep_steps:
    flat = cur.reshape(-1)
    keep = (flat != -1) & ~drop.reshape(-1)
    return rebatch(flat[keep], cur.shape[1])
  out = np.full_like(cur, -1)
  for t in range(cur.shape[0]):
    row = cur[t][(cur[t] != -1) & ~drop[t]]
    out[t, :row.size] = row
  return out


def reorder_first(curriculum, first_ids: Iterable[int], *,
                  missing_ok: bool = False) -> np.ndarray:
  """"Train on Y first, then X": a stable partition of the consumption sequence.

  Every consumption of an id in `first_ids` (group Y) is moved before all other
  consumptions (group X); both groups keep their original relative order (and their
  repetitions). The result is re-packed into batches of k (see module docstring), so it has
  ceil(N/k) steps and the same multiset of consumptions as the input.
  """
  cur = explicit(curriculum)
  first = _id_set(first_ids, "first_ids")
  if not missing_ok:
    _check_present(first, cur, "reorder_first")
  seq = consumption_sequence(cur)
  in_first = np.isin(seq, first)
  return rebatch(np.concatenate([seq[in_first], seq[~in_first]]), cur.shape[1])


def reverse(curriculum) -> np.ndarray:
  """The run in reverse step order: step t of the result is step T+1-t of the input.

  Each batch keeps its composition (and its pads), so α(c_t), β(c_t) are the same multiset
  of per-step factors, applied in the opposite order.
  """
  return explicit(curriculum)[::-1].copy()


def duplicate(curriculum, example_id: int, times: int, *, where: str = "end") -> np.ndarray:
  """"What if z had been duplicated N times?": adds `times` extra consumptions of one id.

  Args:
    curriculum: int [T, k] ids, -1 pads.
    example_id: the train id to duplicate. It need not occur in the curriculum yet (then
      this adds it `times` times), but must be a valid id (>= 0).
    times: number of extra consumptions, >= 1.
    where: "end" appends the copies after the last consumption; "start" puts them before
      the first; "spread" inserts copy j (j = 0..times-1) into the consumption sequence of
      length N just before original element floor((j+1)·N/(times+1)), i.e. evenly spaced
      (consecutive copies when times > N).

  Returns:
    int32 [ceil((N+times)/k), k], re-packed in batches of the original size k. Copies may
    share a batch (the simulator then counts the example once per copy).
  """
  cur = explicit(curriculum)
  if isinstance(example_id, (bool, np.bool_)) or not isinstance(example_id,
                                                                (int, np.integer)):
    raise ValueError(f"example_id must be an integer train id; got {example_id!r}")
  if example_id < 0:
    raise ValueError(f"example_id must be a train id >= 0; got {example_id}")
  if isinstance(times, (bool, np.bool_)) or not isinstance(times, (int, np.integer)) \
      or times < 1:
    raise ValueError(f"times must be a positive integer; got {times!r}")
  if where not in _WHERE:
    raise ValueError(f"where must be one of {_WHERE}; got {where!r}")
  seq = consumption_sequence(cur)
  copies = np.full(int(times), example_id, np.int32)
  if where == "end":
    new = np.concatenate([seq, copies])
  elif where == "start":
    new = np.concatenate([copies, seq])
  else:
    before = (np.arange(1, times + 1) * seq.size) // (times + 1)     # [times], sorted
    new = np.insert(seq, before, example_id)
  return rebatch(new, cur.shape[1])
