"""design.build_transitions / identifiability against hand-built expectations."""

import dataclasses

import jax
import numpy as np
import pytest

from simfluence_jax.simulators import design
from tests import planted_traces


Run = planted_traces.Run


TRAIN_IDS = np.array([50, 10, 30, 20], np.int64)  # position p <-> id; ids are not positions
TEST_IDS = np.array([7, 3, 9], np.int64)


def _two_runs():
  r1 = Run("a", TRAIN_IDS, TEST_IDS, 2,
           np.array([[10, 50], [30, -1], [20, 20]], np.int32),
           np.array([[4.0, 3.0, 2.0], [3.5, np.nan, 1.9], [3.0, 2.5, 1.8], [2.0, 2.4, 1.7]],
                    np.float32))
  # Second run: permuted subset of the test ids plus one the fit does not know (ignored).
  r2 = Run("b", TRAIN_IDS, np.array([9, 7, 1234], np.int64), 1,
           np.array([[30], [50]], np.int32),
           np.array([[5.0, 6.0, 0.0], [4.0, 5.0, 0.0], [3.0, 4.0, 0.0]], np.float32))
  return [r1, r2]


def test_build_transitions_by_hand():
  tr = design.build_transitions(_two_runs(), train_ids=TRAIN_IDS, test_ids=TEST_IDS)
  np.testing.assert_array_equal(
      tr.batches, [[1, 0], [2, -1], [3, 3], [2, -1], [0, -1]])
  nan = np.nan
  prev_raw = np.array([[4.0, 3.0, 2.0], [3.5, nan, 1.9], [3.0, 2.5, 1.8],
                       [6.0, nan, 5.0], [5.0, nan, 4.0]])
  target_raw = np.array([[3.5, nan, 1.9], [3.0, 2.5, 1.8], [2.0, 2.4, 1.7],
                         [5.0, nan, 4.0], [4.0, nan, 3.0]])
  want_mask = np.isfinite(prev_raw) & np.isfinite(target_raw)
  # run a's step 2 holds 1 of its 2 slots: a short batch, not a regression row (run b's
  # batches of 1, padded to the fit's width 2, are full for b)
  want_mask[1] = False
  np.testing.assert_array_equal(tr.mask, want_mask.astype(np.float32))
  np.testing.assert_array_equal(tr.prev, np.where(want_mask, prev_raw, 0).astype(np.float32))
  np.testing.assert_array_equal(tr.target,
                                np.where(want_mask, target_raw, 0).astype(np.float32))
  assert tr.num_train == 4 and tr.prev.dtype == np.float32
  assert np.isfinite(tr.prev).all() and np.isfinite(tr.target).all()


def test_float64_losses_keep_float64():
  runs = [dataclasses.replace(r, losses=r.losses.astype(np.float64)) for r in _two_runs()]
  tr = design.build_transitions(runs, train_ids=TRAIN_IDS, test_ids=TEST_IDS)
  assert tr.prev.dtype == tr.mask.dtype == np.float64


def test_unknown_train_id_names_run_step_and_id():
  runs = _two_runs()
  bad = dataclasses.replace(runs[1], curriculum=np.array([[30], [77]], np.int32))
  with pytest.raises(ValueError, match=r"run 'b' step 2 .*train id 77") as err:
    design.build_transitions([runs[0], bad], train_ids=TRAIN_IDS, test_ids=TEST_IDS)
  try:
    from simfluence_jax.traces.contract import TraceError
  except ImportError:
    return
  assert isinstance(err.value, TraceError)


def test_transitions_is_a_pytree():
  tr = design.build_transitions(_two_runs(), train_ids=TRAIN_IDS, test_ids=TEST_IDS)
  leaves, treedef = jax.tree.flatten(tr)
  assert len(leaves) == 5     # batches, prev, target, mask, steps
  # steps: each row's 0-based step within its run (two runs: 3 steps, then 2)
  np.testing.assert_array_equal(tr.steps, [0, 1, 2, 0, 1])
  doubled = jax.tree.map(lambda a: a * 2, tr)
  assert doubled.num_train == 4
  np.testing.assert_array_equal(doubled.prev, 2 * tr.prev)
  assert jax.tree.unflatten(treedef, leaves).num_train == 4


def test_identifiability_reports_single_observation_and_constant_loss():
  # Batch size 1; position 3 (id 20) is consumed once, position 2 (id 30) twice but one of
  # those steps is unrecorded for test column 0. Test column 2 has a constant loss.
  cur = np.array([[50], [10], [30], [50], [10], [20], [30]], np.int32)
  losses = np.stack([
      np.linspace(5, 2, 8),                              # column 0, varying
      np.linspace(3, 1, 8),                              # column 1, varying
      np.full(8, 2.5),                                   # column 2, constant
  ], axis=1)
  losses[7, 0] = np.nan                                  # last step of column 0 unrecorded
  run = Run("r", TRAIN_IDS, TEST_IDS, 1, cur, losses)
  tr = design.build_transitions([run], train_ids=TRAIN_IDS, test_ids=TEST_IDS)
  report = design.identifiability(tr)
  assert report["unidentified"] == {0: [2, 3], 1: [3], 2: [3]}
  assert report["constant_loss"] == [2]
  assert report["num_unidentified"] == 4
  assert report["min_steps_per_train"] == 1
  np.testing.assert_array_equal(design.step_counts(tr)[0], [2, 2, 1, 1])


def test_duplicate_in_batch_counts_one_step():
  run = Run("d", TRAIN_IDS, TEST_IDS, 2, np.array([[10, 10], [10, 50]], np.int32),
            np.tile(np.array([[3.0], [2.0], [1.0]]), (1, 3)))
  tr = design.build_transitions([run], train_ids=TRAIN_IDS, test_ids=TEST_IDS)
  np.testing.assert_array_equal(design.step_counts(tr)[0], [1, 2, 0, 0])
