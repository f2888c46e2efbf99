"""Tests for attribution.py: removal effects equal explicit leave-one-out rollouts."""

import jax
import numpy as np
import pytest

from simfluence_jax.evaluation import attribution
from simfluence_jax.evaluation import counterfactuals as cf

KINDS = ("linear", "additive", "multiplicative")


def loop_final(a, b, kind, batches, l0):
  """Final loss of Eq. 1 by a python loop (float64); an all-pad step is the identity and a
  short batch k × the mean of its examples."""
  loss = np.asarray(l0, np.float64).copy()
  for row in np.asarray(batches):
    ids = [int(i) for i in row if i >= 0]
    if not ids:
      continue
    scale = len(row) / len(ids)          # a short batch: k × the mean of its examples
    alpha = 1.0 if kind == "additive" else scale * sum(a[:, i] for i in ids)
    beta = 0.0 if kind == "multiplicative" else scale * sum(b[:, i] for i in ids)
    loss = alpha * loss + beta
  return loss


def loop_removal_effects(a, b, kind, batches, l0):
  """Leave-one-out by counterfactuals.remove_examples(keep_steps=True) + loop rollouts."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  ref = loop_final(a, b, kind, batches, l0)
  out = np.zeros(a.shape)
  for i in range(a.shape[1]):
    removed = cf.remove_examples(batches, [i], keep_steps=True, missing_ok=True)
    out[:, i] = loop_final(a, b, kind, removed, l0) - ref
  return out


def random_problem(seed, *, m=4, n=9, steps=25, k=3):
  rng = np.random.default_rng(seed)
  a = rng.uniform(0.25, 0.42, size=(m, n))
  b = rng.normal(0.0, 0.05, size=(m, n))
  batches = rng.integers(0, n - 1, size=(steps, k))       # position n-1 never occurs
  batches[rng.random((steps, k)) < 0.2] = -1
  batches[2] = [4, -1, -1]                                 # removing 4 empties step 3
  batches[5] = [1, 1, 3]                                   # repeat within a batch
  return a, b, batches.astype(np.int32), rng.uniform(1.0, 3.0, size=m)


@pytest.mark.parametrize("kind", KINDS)
def test_removal_effects_match_loop_float64(kind):
  a, b, batches, l0 = random_problem(0)
  expected = loop_removal_effects(a, b, kind, batches, l0)
  with jax.enable_x64(True):
    got = attribution.removal_effects(a, b, kind=kind, batches=batches, initial_losses=l0,
                                      chunk_size=4)
    assert got.dtype == np.float64 and got.shape == a.shape
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-9, atol=1e-12)
  assert np.all(np.asarray(got)[:, -1] == 0.0)              # absent example: exactly 0
  assert np.abs(expected).max() > 1e-2                       # the test is not vacuous


def test_removal_effects_float32():
  a, b, batches, l0 = random_problem(1)
  expected = loop_removal_effects(a.astype(np.float32), b.astype(np.float32), "linear",
                                  batches, l0.astype(np.float32))
  got = attribution.removal_effects(a.astype(np.float32), b.astype(np.float32),
                                    kind="linear", batches=batches,
                                    initial_losses=l0.astype(np.float32))
  assert got.dtype == np.float32
  # differences of two float32 final losses of order 1: absolute error ~ 1e-6
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-3, atol=2e-5)


def test_chunk_size_invariance():
  a, b, batches, l0 = random_problem(2)
  with jax.enable_x64(True):
    results = [np.asarray(attribution.removal_effects(a, b, kind="linear", batches=batches,
                                                      initial_losses=l0, chunk_size=c))
               for c in (1, 4, 9, 50)]
  for r in results[1:]:
    np.testing.assert_array_equal(r, results[0])


def test_paper_example_removal_effects():
  # A_1 = A_2 = 0.5, L_0 = 100: 100 -> 50 -> 25. Without either example: 50. Effect +25.
  got = attribution.removal_effects(np.array([[0.5, 0.5]]), np.zeros((1, 2)), kind="linear",
                                    batches=np.array([[0], [1]]),
                                    initial_losses=np.array([100.0]))
  np.testing.assert_allclose(np.asarray(got), [[25.0, 25.0]], rtol=1e-6)


def test_planted_halving_example_is_top_proponent():
  # batch size 1; neutral examples have A = 1, B = 0. Example 3 halves the loss of test
  # example 0; example 5 raises it by 20%; test example 1 is only hurt by example 1.
  n = 8
  a = np.ones((2, n))
  b = np.zeros((2, n))
  a[0, 3] = 0.5
  a[0, 5] = 1.2
  a[1, 1] = 1.5
  batches = np.arange(n, dtype=np.int32)[:, None]
  l0 = np.array([4.0, 2.0])
  effects = attribution.removal_effects(a, b, kind="linear", batches=batches,
                                        initial_losses=l0)
  # final loss 0: 4·0.5·1.2 = 2.4; without 3: 4.8 (+2.4); without 5: 2.0 (−0.4)
  np.testing.assert_allclose(np.asarray(effects)[0, [3, 5]], [2.4, -0.4], rtol=1e-6)
  train_ids = np.arange(100, 100 + n)
  r = attribution.rank(effects, train_ids, top_k=2)
  np.testing.assert_array_equal(r.proponent_ids, [[103, -1], [-1, -1]])
  np.testing.assert_array_equal(r.opponent_ids, [[105, -1], [101, -1]])
  np.testing.assert_allclose(r.proponent_scores[0], [2.4, np.nan], rtol=1e-6)
  # the curriculum-free score agrees on the direction (k = 1: neutral A = 1)
  s = attribution.step_effects(a, b, kind="linear", loss_level=l0, batch_size=1)
  r2 = attribution.rank(s, train_ids, top_k=2, higher_is_helpful=False)
  np.testing.assert_array_equal(r2.proponent_ids, r.proponent_ids)
  np.testing.assert_array_equal(r2.opponent_ids, r.opponent_ids)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_step_effects_formulas(dtype):
  a = np.array([[0.3, 0.25], [0.1, 0.5]], dtype)
  b = np.array([[-0.2, 0.0], [0.4, -1.0]], dtype)
  level = np.array([2.0, 10.0], dtype)
  with jax.enable_x64(dtype == np.float64):
    lin = np.asarray(attribution.step_effects(a, b, kind="linear", loss_level=level,
                                              batch_size=4))
    add = np.asarray(attribution.step_effects(a, b, kind="additive", loss_level=level,
                                              batch_size=4))
    mul = np.asarray(attribution.step_effects(a, b, kind="multiplicative", loss_level=3.0,
                                              batch_size=4))
  assert lin.dtype == dtype
  # (A − 1/4)·L + B by hand
  np.testing.assert_allclose(lin, [[0.05 * 2 - 0.2, 0.0], [-0.15 * 10 + 0.4, 2.5 - 1.0]],
                             rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(add, b)
  np.testing.assert_allclose(mul, [[0.15, 0.0], [-0.45, 0.75]], rtol=1e-6, atol=1e-7)


def test_step_effect_is_one_step_change_against_neutral_batch():
  # one step on (z_i, neutral, neutral, neutral) minus one step on 4 neutrals (identity)
  rng = np.random.default_rng(3)
  a = rng.uniform(0.1, 0.4, size=(3, 6))
  b = rng.normal(0, 0.1, size=(3, 6))
  a[:, 5], b[:, 5] = 0.25, 0.0                              # position 5 is neutral
  level = np.array([1.0, 2.0, 3.0])
  with jax.enable_x64(True):
    s = np.asarray(attribution.step_effects(a, b, kind="linear", loss_level=level,
                                            batch_size=4))
  for i in range(5):
    one_step = loop_final(a, b, "linear", np.array([[i, 5, 5, 5]]), level)
    np.testing.assert_allclose(s[:, i], one_step - level, rtol=1e-12, atol=1e-14)


def test_rank_ties_nan_and_cap():
  scores = np.array([1.0, -2.0, np.nan, 3.0, 1.0, 0.0])
  ids = np.array([10, 11, 12, 13, 14, 15])
  r = attribution.rank(scores, ids, top_k=10)
  np.testing.assert_array_equal(r.proponent_ids, [13, 10, 14, -1, -1, -1])
  np.testing.assert_array_equal(r.opponent_ids, [11, -1, -1, -1, -1, -1])
  np.testing.assert_array_equal(r.proponent_scores[:3], [3.0, 1.0, 1.0])
  assert np.isnan(r.proponent_scores[3:]).all()
  flipped = attribution.rank(scores, ids, top_k=1, higher_is_helpful=False)
  np.testing.assert_array_equal(flipped.proponent_ids, [11])
  np.testing.assert_array_equal(flipped.opponent_ids, [13])
  np.testing.assert_array_equal(flipped.opponent_scores, [3.0])


def test_validation_errors():
  a = np.ones((2, 3))
  with pytest.raises(ValueError, match="initial_losses"):
    attribution.removal_effects(a, a, kind="linear", batches=np.zeros((2, 1), int),
                                initial_losses=np.ones(3))
  with pytest.raises(ValueError, match="chunk_size"):
    attribution.removal_effects(a, a, kind="linear", batches=np.zeros((2, 1), int),
                                initial_losses=np.ones(2), chunk_size=0)
  with pytest.raises(ValueError, match=r"step 1 \(1-based\)"):
    attribution.removal_effects(a, a, kind="linear", batches=np.array([[5]]),
                                initial_losses=np.ones(2))
  with pytest.raises(ValueError, match="batch_size"):
    attribution.step_effects(a, a, kind="linear", loss_level=1.0, batch_size=0)
  with pytest.raises(ValueError, match="loss_level"):
    attribution.step_effects(a, a, kind="linear", loss_level=np.ones(3), batch_size=2)
  with pytest.raises(ValueError, match="train_ids"):
    attribution.rank(a, np.arange(2), top_k=1)
  with pytest.raises(ValueError, match="top_k"):
    attribution.rank(a, np.arange(3), top_k=0)


def test_repacked_removal_effects_match_a_loop_of_rollouts():
  """Re-packed leave-one-out vs an explicit numpy loop (remove, re-batch, roll out)."""
  rng = np.random.default_rng(11)
  m, n, k, steps = 3, 7, 2, 12
  a = rng.uniform(0.4, 0.55, (m, n))
  b = rng.uniform(-0.05, 0.05, (m, n))
  batches = np.stack([rng.choice(n - 1, k, replace=False) for _ in range(steps)])  # n-1 unused
  l0 = rng.uniform(1, 2, m)

  def loop_final(cur):
    loss = l0.copy()
    for row in cur:
      scale = len(row) / len([p for p in row if p >= 0])     # short batch: k × its mean
      row = [p for p in row if p >= 0]
      loss = scale * a[:, row].sum(1) * loss + scale * b[:, row].sum(1)
    return loss

  reference = loop_final(batches)
  want = np.zeros((m, n))
  for i in range(n):
    seq = [p for p in batches.reshape(-1) if p != i]
    cur = [seq[j:j + k] + [-1] * (k - len(seq[j:j + k])) for j in range(0, len(seq), k)]
    if i in batches:
      want[:, i] = loop_final(np.array(cur)) - reference
  with jax.enable_x64(True):
    got = attribution.repacked_removal_effects(a, b, kind="linear", batches=batches,
                                               initial_losses=l0, chunk_size=3)
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
  assert np.all(got[:, n - 1] == 0.0)  # never consumed -> exactly 0
