"""The counterfactual bench: a frozen, versioned list of edited curricula, independent of
any method, that the pipeline retrains for real (the bank) and every method is scored on.

`generate(spec, base_runs, train_answers, test_answers)` is a pure function of the spec's
seed, the base runs' curricula and the examples' answers: it never looks at a fitted
simulator, so an edit does not move when a simulator changes, and two methods (or two
issues) are measured on the same edits. The procedure is versioned (`BENCH_VERSION`): a
change to it bumps the version, and a workspace's stored bench (bench.json) is checked
against a regeneration before it is reused.

Edit kinds (each from every base run; k over `removal_sizes`, pooled within a kind):
  remove_<group>/<form>  remove k train examples of the base run — group "random", or
      "same_answer" / "other_answer" (examples whose target equals / differs from the
      answer of a randomly drawn target test example) — in two forms: "repacked" (the
      survivors re-batched in order: the run gets shorter) and "masked" (same steps and
      order, the removed slots empty: the step averages over the examples left).
  reverse                the base run's steps in reverse order.
  answer_first           the examples with the target's answer first, then the others (each
                         group in its original order; re-packed, same length and multiset).
  repeat                 one random train example of the run seen `repeat_times` more
                         times, the copies spread evenly (re-packed: the run gets longer).
  half_subset            a random half of the base run's distinct examples kept, the rest
                         masked (order kept): the datamodeling bank.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Mapping, Sequence

import numpy as np

from simfluence_jax.evaluation import counterfactuals
from simfluence_jax.traces import atomic_io

BENCH_VERSION = 1
GROUPS = ("random", "same_answer", "other_answer")
FORMS = ("repacked", "masked")
REORDERS = ("reverse", "answer_first")


@dataclasses.dataclass(frozen=True)
class BenchSpec:
  """What the bench holds (gin: pipeline.bench_* in the experiment configs).

  Attributes:
    seed: the bench's own seed (not the curricula's or the split's).
    num_base_runs: held-out runs the edits start from (the first ones, in split order).
    removal_sizes: k of the removal edits.
    removal_groups, forms, reorders: which of GROUPS, FORMS, REORDERS to include.
    repeat_times: extra consumptions of the repeated example.
    num_half_subsets: masked half-subset runs (cycling over the base runs).
    record_every: the bank's runs record test losses every this many steps (and always
      after their last step).
  """
  seed: int = 0
  num_base_runs: int = 4
  removal_sizes: tuple[int, ...] = (5, 10, 20)
  removal_groups: tuple[str, ...] = GROUPS
  forms: tuple[str, ...] = FORMS
  reorders: tuple[str, ...] = REORDERS
  repeat_times: int = 10
  num_half_subsets: int = 32
  record_every: int = 8

  def __post_init__(self):
    bad = ([g for g in self.removal_groups if g not in GROUPS]
           + [f for f in self.forms if f not in FORMS]
           + [r for r in self.reorders if r not in REORDERS])
    if bad:
      raise ValueError(f"BenchSpec: unknown {bad}; groups {GROUPS}, forms {FORMS}, "
                       f"reorders {REORDERS}")
    if self.num_base_runs < 1 or self.repeat_times < 0 or self.num_half_subsets < 0:
      raise ValueError(f"BenchSpec: need num_base_runs >= 1 and non-negative counts: {self}")
    if any(int(k) < 1 for k in self.removal_sizes) or self.record_every < 1:
      raise ValueError(f"BenchSpec: removal sizes and record_every must be >= 1: {self}")


@dataclasses.dataclass(frozen=True)
class Edit:
  """One edited curriculum: run id "explicit_<edit_id>" once retrained."""
  edit_id: str
  kind: str
  base_run: str
  curriculum: np.ndarray          # int32 [T', k] train ids, -1 pads
  details: dict

  def metadata(self) -> dict:
    """What run.json records of the edit (train copies it from the curriculum file)."""
    return {"counterfactual": {"name": self.edit_id, "kind": self.kind,
                               "base_run": self.base_run, "bench_version": BENCH_VERSION,
                               **self.details}}


def _distinct(curriculum: np.ndarray) -> np.ndarray:
  cur = np.asarray(curriculum)
  return np.unique(cur[cur >= 0]).astype(np.int64)


def _choose(rng, ids: np.ndarray, k: int) -> list[int]:
  k = min(int(k), ids.size)
  return sorted(int(i) for i in rng.choice(ids, size=k, replace=False))


def generate(spec: BenchSpec, base_runs: Sequence[tuple[str, np.ndarray]],
             train_answers: Mapping[int, str], test_answers: Mapping[int, str]
             ) -> list[Edit]:
  """The bench's edits of `base_runs` [(run_id, curriculum int [T, k])], in a fixed order.

  train_answers / test_answers: each example's target text (the answer groups). Raises
  ValueError naming the run and id when a curriculum holds a train id without an answer.
  """
  if len(base_runs) < 1:
    raise ValueError("the bench needs at least one base run")
  test_ids = sorted(int(i) for i in test_answers)
  edits: list[Edit] = []
  seeds = np.random.SeedSequence([BENCH_VERSION, int(spec.seed)]).spawn(len(base_runs) + 1)
  for (run_id, cur), seed in zip(base_runs, seeds):
    rng = np.random.default_rng(seed)
    cur = counterfactuals.explicit(cur)
    ids = _distinct(cur)
    missing = [int(i) for i in ids if int(i) not in train_answers]
    if missing:
      raise ValueError(f"base run {run_id!r}: train ids {missing[:5]} have no answer in the "
                       "workspace's train examples")
    target = int(rng.choice(test_ids))
    answer = test_answers[target]
    same = np.asarray([i for i in ids if train_answers[int(i)] == answer], np.int64)
    other = np.asarray([i for i in ids if train_answers[int(i)] != answer], np.int64)
    pools = {"random": ids, "same_answer": same, "other_answer": other}
    for group in spec.removal_groups:
      for k in spec.removal_sizes:
        removed = _choose(rng, pools[group], k)
        if not removed:
          continue
        for form in spec.forms:
          edited = counterfactuals.remove_examples(cur, removed, keep_steps=form == "masked")
          details = {"k": len(removed), "removed_ids": removed, "form": form,
                     "group": group}
          if group != "random":
            details.update(target_id=target, answer=answer)
          edits.append(Edit(f"bench_{run_id}_remove_{group}_k{k}_{form}",
                            f"remove_{group}/{form}", run_id, edited, details))
    if "reverse" in spec.reorders:
      edits.append(Edit(f"bench_{run_id}_reverse", "reverse", run_id,
                        counterfactuals.reverse(cur), {}))
    if "answer_first" in spec.reorders and same.size:
      edits.append(Edit(f"bench_{run_id}_answer_first", "answer_first", run_id,
                        counterfactuals.reorder_first(cur, same.tolist()),
                        {"target_id": target, "answer": answer, "first_ids": same.tolist()}))
    if spec.repeat_times:
      example = int(rng.choice(ids))
      edits.append(Edit(f"bench_{run_id}_repeat", "repeat", run_id,
                        counterfactuals.duplicate(cur, example, spec.repeat_times,
                                                  where="spread"),
                        {"repeated_id": example, "times": spec.repeat_times}))
  rng = np.random.default_rng(seeds[-1])
  for j in range(spec.num_half_subsets):
    run_id, cur = base_runs[j % len(base_runs)]
    ids = _distinct(cur)
    kept = _choose(rng, ids, ids.size // 2)
    removed = sorted(set(ids.tolist()) - set(kept))
    edits.append(Edit(f"bench_half{j:03d}", "half_subset", run_id,
                      counterfactuals.remove_examples(cur, removed, keep_steps=True),
                      {"kept_ids": kept, "removed_ids": removed, "form": "masked"}))
  return edits


def _record(spec: BenchSpec, base_runs, edits) -> dict:
  return {"version": BENCH_VERSION, "spec": dataclasses.asdict(spec),
          "base_runs": [run_id for run_id, _ in base_runs],
          "edits": [{"edit_id": e.edit_id, "kind": e.kind, "base_run": e.base_run,
                     "num_steps": int(e.curriculum.shape[0]), **e.details} for e in edits]}


def write(directory, spec: BenchSpec, base_runs, edits: Sequence[Edit]) -> list[pathlib.Path]:
  """Writes bench.json and one curriculum file per edit (the train binary's explicit
  format, {"batches", "metadata"}); returns the curriculum files in edit order.

  An existing bench.json must describe the same bench (same version, spec, base runs and
  edits); otherwise a ValueError names it — a bench is frozen once a workspace has one.
  """
  directory = pathlib.Path(directory)
  record = _record(spec, base_runs, edits)
  path = directory / "bench.json"
  if path.exists():
    stored = json.loads(path.read_text())
    if stored != json.loads(json.dumps(record)):
      raise ValueError(f"{path}: this workspace's bench differs from the one the current "
                       f"spec and procedure (version {BENCH_VERSION}) generate; use a new "
                       "workspace (or delete the bench and its runs) to change it")
  files = []
  for e in edits:
    f = directory / f"{e.edit_id}.json"
    atomic_io.save_json(f, {"batches": np.asarray(e.curriculum).tolist(),
                            "metadata": e.metadata()})
    files.append(f)
  atomic_io.save_json(path, record)
  return files


def run_id(edit_id: str) -> str:
  """The retrained run's id (the train binary names explicit curricula by file stem)."""
  return f"explicit_{edit_id}"
