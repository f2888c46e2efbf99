"""Tests for counterfactuals.py: hand-built curricula and multiset invariants."""

import collections

import numpy as np
import pytest

from simfluence_jax.evaluation import counterfactuals as cf
from simfluence_jax.simulators import rollout as rollout_lib

CUR = np.array([[1, 2, 3],
                [4, 2, -1],
                [5, 6, 7]], np.int32)


def counts(cur):
  return collections.Counter(int(i) for i in np.asarray(cur).reshape(-1) if i != -1)


def test_consumption_sequence_and_rebatch():
  np.testing.assert_array_equal(cf.consumption_sequence(CUR), [1, 2, 3, 4, 2, 5, 6, 7])
  np.testing.assert_array_equal(cf.rebatch([1, 2, 3, 4, 5], 2), [[1, 2], [3, 4], [5, -1]])
  assert cf.rebatch([], 3).shape == (0, 3)
  with pytest.raises(ValueError, match="batch_size"):
    cf.rebatch([1, 2], 0)


def test_remove_repacks_and_shortens():
  out = cf.remove_examples(CUR, [2, 6])
  np.testing.assert_array_equal(out, [[1, 3, 4], [5, 7, -1]])
  assert out.dtype == np.int32


def test_remove_keep_steps_pads_in_place():
  out = cf.remove_examples(CUR, [2, 6], keep_steps=True)
  np.testing.assert_array_equal(out, [[1, 3, -1], [4, -1, -1], [5, 7, -1]])
  emptied = cf.remove_examples(np.array([[1], [2], [1]]), [1], keep_steps=True)
  np.testing.assert_array_equal(emptied, [[-1], [2], [-1]])


def test_remove_keep_steps_is_identity_step_in_simulation():
  # removing z_0 (A = 0.5) from a batch-size-1 run leaves identity steps
  a = np.array([[0.5, 0.9]])
  cur = cf.remove_examples(np.array([[0], [1], [0]]), [0], keep_steps=True)
  traj = rollout_lib.rollout(a, np.zeros_like(a), kind="linear", batches=cur,
                             initial_losses=np.array([10.0]))
  np.testing.assert_allclose(np.asarray(traj)[:, 0], [10.0, 10.0, 9.0, 9.0], rtol=1e-6)


def test_remove_validation_and_missing():
  with pytest.raises(ValueError, match=r"ids \[9\] never occur"):
    cf.remove_examples(CUR, [2, 9])
  np.testing.assert_array_equal(cf.remove_examples(CUR, [9], missing_ok=True),
                                cf.rebatch(cf.consumption_sequence(CUR), 3))
  with pytest.raises(ValueError, match="empty"):
    cf.remove_examples(CUR, [])
  assert cf.remove_examples(CUR, [1, 2, 3, 4, 5, 6, 7]).shape == (0, 3)


def test_random_removal_multiset_and_order():
  rng = np.random.default_rng(0)
  for _ in range(20):
    cur = rng.integers(0, 12, size=(int(rng.integers(1, 9)), 3))
    cur[rng.random(cur.shape) < 0.2] = -1
    remove = rng.choice(12, size=3, replace=False)
    for keep_steps in (False, True):
      out = cf.remove_examples(cur, remove, keep_steps=keep_steps, missing_ok=True)
      expected = [int(i) for i in cur.reshape(-1) if i != -1 and i not in remove]
      np.testing.assert_array_equal(cf.consumption_sequence(out), expected)
      if keep_steps:
        assert out.shape == cur.shape
      else:
        assert out.shape == (-(-len(expected) // 3), 3)


def test_reorder_first_stable_partition():
  out = cf.reorder_first(CUR, [6, 2])
  # Y = {2, 6} in original order: 2, 2, 6; then X: 1, 3, 4, 5, 7
  np.testing.assert_array_equal(out, [[2, 2, 6], [1, 3, 4], [5, 7, -1]])
  assert counts(out) == counts(CUR)
  with pytest.raises(ValueError, match="never occur"):
    cf.reorder_first(CUR, [42])


def test_reverse_reverses_steps_and_keeps_batches():
  np.testing.assert_array_equal(cf.reverse(CUR), [[5, 6, 7], [4, 2, -1], [1, 2, 3]])
  np.testing.assert_array_equal(cf.reverse(cf.reverse(CUR)), CUR)


def test_reverse_same_final_loss_for_multiplicative_simulator():
  rng = np.random.default_rng(1)
  a = rng.uniform(0.2, 0.3, size=(3, 8))
  cur = rng.integers(0, 8, size=(10, 4)).astype(np.int32)
  l0 = np.array([1.0, 2.0, 3.0])
  fwd = np.asarray(rollout_lib.rollout(a, np.zeros_like(a), kind="multiplicative",
                                       batches=cur, initial_losses=l0))
  rev = np.asarray(rollout_lib.rollout(a, np.zeros_like(a), kind="multiplicative",
                                       batches=cf.reverse(cur), initial_losses=l0))
  np.testing.assert_allclose(rev[-1], fwd[-1], rtol=1e-5)
  assert np.abs(rev[1:-1] - fwd[1:-1]).max() > 1e-3


@pytest.mark.parametrize("where,expected", [
    ("end", [[1, 2, 3], [4, 2, 5], [6, 7, 9], [9, -1, -1]]),
    ("start", [[9, 9, 1], [2, 3, 4], [2, 5, 6], [7, -1, -1]]),
    # N = 8, times = 2: copies before original elements floor(8/3) = 2 and floor(16/3) = 5
    ("spread", [[1, 2, 9], [3, 4, 2], [9, 5, 6], [7, -1, -1]]),
])
def test_duplicate(where, expected):
  out = cf.duplicate(CUR, 9, 2, where=where)
  np.testing.assert_array_equal(out, expected)
  c = counts(CUR)
  c[9] += 2
  assert counts(out) == c


def test_duplicate_existing_example_spread_more_than_n():
  out = cf.duplicate(np.array([[1, 2]]), 1, 3, where="spread")
  # N = 2, times = 3: indices floor(2/4), floor(4/4), floor(6/4) = 0, 1, 1
  np.testing.assert_array_equal(out, [[1, 1], [1, 1], [2, -1]])


def test_input_is_not_modified():
  cur = CUR.copy()
  cf.remove_examples(cur, [2], keep_steps=True)
  cf.reorder_first(cur, [7])
  cf.duplicate(cur, 1, 3, where="spread")
  cf.reverse(cur)[0, 0] = 99
  np.testing.assert_array_equal(cur, CUR)


def test_validation_errors():
  with pytest.raises(ValueError, match="int \\[T, k\\]"):
    cf.explicit(np.array([1, 2, 3]))
  with pytest.raises(ValueError, match="integer"):
    cf.explicit(np.array([[1.0, 2.0]]))
  with pytest.raises(ValueError, match=r"step 2 \(1-based\).*-3"):
    cf.explicit(np.array([[1, 2], [-3, 4]]))
  with pytest.raises(ValueError, match="batch size 2, expected 4"):
    cf.explicit(np.array([[1, 2]]), batch_size=4)
  with pytest.raises(ValueError, match="where"):
    cf.duplicate(CUR, 1, 2, where="middle")
  with pytest.raises(ValueError, match="times"):
    cf.duplicate(CUR, 1, 0)
  with pytest.raises(ValueError, match="example_id"):
    cf.duplicate(CUR, -1, 2)
  with pytest.raises(ValueError, match=">= 0"):
    cf.remove_examples(CUR, [-1])
  np.testing.assert_array_equal(cf.explicit([[3, -1]]), [[3, -1]])
