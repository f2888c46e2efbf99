"""The counterfactual bench: every edit is what it claims (multiset and order invariants,
re-packing, answer groups), generation is a pure function of its seed, and a stored bench
is frozen."""

import collections
import json

import numpy as np
import pytest

from simfluence_jax.evaluation import bench

K = 4


def _base(seed, n=40, steps=24):
  rng = np.random.default_rng(seed)
  chosen = rng.choice(np.arange(100, 100 + n), size=32, replace=False)
  order = np.concatenate([rng.permutation(chosen) for _ in range(3)])[:steps * K]
  return order.reshape(steps, K).astype(np.int32)


TRAIN_ANSWERS = {i: ("yes" if i % 3 else "no") for i in range(100, 140)}
TEST_ANSWERS = {i: ("yes" if i % 2 else "no") for i in range(7000, 7010)}
SPEC = bench.BenchSpec(seed=3, num_base_runs=2, removal_sizes=(2, 5), num_half_subsets=4,
                       repeat_times=6)
BASES = [("run_a", _base(0)), ("run_b", _base(1))]


def _counts(cur):
  return collections.Counter(int(i) for i in np.asarray(cur).reshape(-1) if i >= 0)


def _seq(cur):
  flat = np.asarray(cur).reshape(-1)
  return flat[flat >= 0]


@pytest.fixture(scope="module")
def edits():
  return bench.generate(SPEC, BASES, TRAIN_ANSWERS, TEST_ANSWERS)


def test_the_bench_holds_every_kind_in_a_fixed_count(edits):
  kinds = collections.Counter(e.kind for e in edits)
  # per base run: 3 groups × 2 sizes in 2 forms, reverse, answer_first, repeat
  for group in bench.GROUPS:
    for form in bench.FORMS:
      assert kinds[f"remove_{group}/{form}"] == 2 * 2
  assert kinds["reverse"] == kinds["answer_first"] == kinds["repeat"] == 2
  assert kinds["half_subset"] == 4
  assert len({e.edit_id for e in edits}) == len(edits)


def test_removals_masked_keep_steps_and_order_repacked_refill_batches(edits):
  base = dict(BASES)
  for e in (e for e in edits if e.kind.startswith("remove_")):
    cur = base[e.base_run]
    removed = set(e.details["removed_ids"])
    assert len(removed) == e.details["k"]
    assert removed <= set(_counts(cur))                       # removes what the run has
    assert not removed & set(_counts(e.curriculum))            # and all of it
    survivors = [int(i) for i in _seq(cur) if int(i) not in removed]
    if e.details["form"] == "masked":
      assert e.curriculum.shape == cur.shape                   # same steps
      for row, edited in zip(cur, e.curriculum):               # each step minus the removed
        assert [int(i) for i in edited if i >= 0] == [int(i) for i in row
                                                      if int(i) not in removed]
    else:
      assert e.curriculum.shape == (-(-len(survivors) // K), K)
      assert _seq(e.curriculum).tolist() == survivors           # same order, re-batched
      assert (e.curriculum[:-1] >= 0).all()                    # pads only in the last batch
    group = e.details["group"]
    if group != "random":
      answer = TEST_ANSWERS[e.details["target_id"]]
      assert e.details["answer"] == answer
      same = {TRAIN_ANSWERS[i] == answer for i in removed}
      assert same == ({True} if group == "same_answer" else {False})


def test_reorders_repeats_and_half_subsets(edits):
  base = dict(BASES)
  for e in edits:
    cur = base[e.base_run]
    if e.kind == "reverse":
      np.testing.assert_array_equal(e.curriculum, cur[::-1])
    elif e.kind == "answer_first":
      assert _counts(e.curriculum) == _counts(cur) and e.curriculum.shape == cur.shape
      answer = e.details["answer"]
      seq = _seq(cur)
      first = [int(i) for i in seq if TRAIN_ANSWERS[int(i)] == answer]
      rest = [int(i) for i in seq if TRAIN_ANSWERS[int(i)] != answer]
      assert _seq(e.curriculum).tolist() == first + rest
    elif e.kind == "repeat":
      z = e.details["repeated_id"]
      want = _counts(cur)
      want[z] += SPEC.repeat_times
      assert _counts(e.curriculum) == want
      assert [i for i in _seq(e.curriculum) if i != z] == [i for i in _seq(cur) if i != z]
      assert e.curriculum.shape[0] == -(-(cur.size + SPEC.repeat_times) // K)
    elif e.kind == "half_subset":
      ids = set(_counts(cur))
      kept, removed = set(e.details["kept_ids"]), set(e.details["removed_ids"])
      assert len(kept) == len(ids) // 2 and kept | removed == ids and not kept & removed
      assert e.curriculum.shape == cur.shape
      assert set(_counts(e.curriculum)) == kept
      assert _counts(e.curriculum) == collections.Counter(
          {i: c for i, c in _counts(cur).items() if i in kept})


def test_generation_is_a_pure_function_of_the_seed(edits):
  again = bench.generate(SPEC, BASES, TRAIN_ANSWERS, TEST_ANSWERS)
  assert [e.edit_id for e in again] == [e.edit_id for e in edits]
  assert all(np.array_equal(a.curriculum, b.curriculum) and a.details == b.details
             for a, b in zip(again, edits))
  other = bench.generate(bench.BenchSpec(**{**SPEC.__dict__, "seed": 4}), BASES,
                         TRAIN_ANSWERS, TEST_ANSWERS)
  assert any(a.details != b.details for a, b in zip(other, edits))


def test_a_stored_bench_is_frozen(tmp_path, edits):
  files = bench.write(tmp_path, SPEC, BASES, edits)
  assert [f.stem for f in files] == [e.edit_id for e in edits]
  stored = json.loads((tmp_path / "bench.json").read_text())
  assert stored["version"] == bench.BENCH_VERSION and stored["base_runs"] == ["run_a", "run_b"]
  first = json.loads(files[0].read_text())
  np.testing.assert_array_equal(first["batches"], edits[0].curriculum)
  assert first["metadata"]["counterfactual"]["base_run"] == edits[0].base_run
  bench.write(tmp_path, SPEC, BASES, edits)          # the same bench again: fine
  changed = bench.BenchSpec(**{**SPEC.__dict__, "repeat_times": 7})
  with pytest.raises(ValueError, match="bench.json: this workspace's bench differs"):
    bench.write(tmp_path, changed, BASES,
                bench.generate(changed, BASES, TRAIN_ANSWERS, TEST_ANSWERS))


def test_bad_specs_and_unknown_answers_are_named():
  with pytest.raises(ValueError, match="unknown"):
    bench.BenchSpec(forms=("sideways",))
  with pytest.raises(ValueError, match=r"base run 'run_a': train ids \[100"):
    bench.generate(SPEC, BASES, {}, TEST_ANSWERS)
