"""Tests for rollout.py against hand-computed values and a plain python loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simfluence_jax.simulators import rollout as rollout_lib

KINDS = ("linear", "additive", "multiplicative")
# float32 rollouts of <= 40 steps with α ≈ 1: rounding grows ~ T·k·eps32 ≈ 2e-5 relative.
RTOL = {np.float64: 1e-12, np.float32: 1e-4}


def loop_rollout(a, b, kind, batches, l0, step_mask=None):
  """Eq. 1 by a python loop in float64, one scalar at a time; a batch with pads is k × the
  mean of its examples (rollout's short-batch rule)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  m = a.shape[0]
  out = [np.asarray(l0, np.float64).copy()]
  for t, row in enumerate(np.asarray(batches)):
    prev = out[-1]
    ids = [int(i) for i in row if i >= 0]
    if not ids or (step_mask is not None and not step_mask[t]):
      out.append(prev.copy())
      continue
    new = np.empty(m)
    scale = len(row) / len(ids)          # a short batch: k × the mean of its examples
    for z in range(m):
      alpha = 1.0 if kind == "additive" else scale * sum(a[z, i] for i in ids)
      beta = 0.0 if kind == "multiplicative" else scale * sum(b[z, i] for i in ids)
      new[z] = alpha * prev[z] + beta
    out.append(new)
  return np.stack(out)


def random_problem(seed, *, m=5, n=7, steps=30, k=4):
  rng = np.random.default_rng(seed)
  a = rng.uniform(0.18, 0.3, size=(m, n))          # α = Σ of k ≈ 0.72..1.2
  b = rng.normal(0.0, 0.05, size=(m, n))
  batches = rng.integers(0, n, size=(steps, k))     # repeats within a batch happen
  batches[rng.random((steps, k)) < 0.2] = -1        # scattered pads
  batches[min(3, steps - 1)] = -1                   # an all-pad step
  batches[steps // 2 + 1, :] = 2                    # one example k-1 times in a batch
  batches[steps // 2 + 1, -1] = -1
  l0 = rng.uniform(1.0, 3.0, size=m)
  return a, b, batches.astype(np.int32), l0


def test_paper_worked_example():
  # §3.1: A_1 = A_2 = 0.5, B = 0, L_0 = 100: step on z_1 -> 50, then z_2 -> 25.
  a = np.array([[0.5, 0.5]])
  b = np.zeros((1, 2))
  for kind in ("linear", "multiplicative"):
    traj = rollout_lib.rollout(a, b, kind=kind, batches=np.array([[0], [1]]),
                               initial_losses=np.array([100.0]))
    np.testing.assert_array_equal(np.asarray(traj), [[100.0], [50.0], [25.0]])


def test_reversed_order_same_final_different_path():
  # Non-identical examples A = (0.5, 0.8): 100 -> 50 -> 40 versus 100 -> 80 -> 40.
  a = np.array([[0.5, 0.8]])
  b = np.zeros((1, 2))
  fwd = rollout_lib.rollout(a, b, kind="linear", batches=np.array([[0], [1]]),
                            initial_losses=np.array([100.0]))
  rev = rollout_lib.rollout(a, b, kind="linear", batches=np.array([[1], [0]]),
                            initial_losses=np.array([100.0]))
  np.testing.assert_allclose(np.asarray(fwd)[:, 0], [100.0, 50.0, 40.0], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(rev)[:, 0], [100.0, 80.0, 40.0], rtol=1e-6)


def test_hand_computed_linear_with_pads_and_repeats():
  # one test example; A = (0.3, 0.6), B = (-1, 2); L_0 = 10
  a = np.array([[0.3, 0.6]])
  b = np.array([[-1.0, 2.0]])
  batches = np.array([[0, 1], [1, 1], [-1, -1], [0, -1]])
  # step 1: α = 0.9, β = 1   -> 10
  # step 2: α = 1.2, β = 4   -> 16
  # step 3: all pads: identity -> 16
  # step 4: a short batch, k × its mean: α = 2·0.3, β = 2·(−1)  -> 7.6
  with jax.enable_x64(True):
    traj = rollout_lib.rollout(a, b, kind="linear", batches=batches,
                               initial_losses=np.array([10.0]))
    np.testing.assert_allclose(np.asarray(traj)[:, 0], [10.0, 10.0, 16.0, 16.0, 7.6],
                               rtol=1e-14)
    add = rollout_lib.rollout(a, b, kind="additive", batches=batches,
                              initial_losses=np.array([10.0]))
    np.testing.assert_allclose(np.asarray(add)[:, 0], [10.0, 11.0, 15.0, 15.0, 13.0],
                               rtol=1e-14)
    mul = rollout_lib.rollout(a, b, kind="multiplicative", batches=batches,
                              initial_losses=np.array([10.0]))
    np.testing.assert_allclose(np.asarray(mul)[:, 0], [10.0, 9.0, 10.8, 10.8, 6.48],
                               rtol=1e-14)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_python_loop(kind, dtype):
  a, b, batches, l0 = random_problem(0)
  a, b, l0 = a.astype(dtype), b.astype(dtype), l0.astype(dtype)
  expected = loop_rollout(a, b, kind, batches, l0)
  with jax.enable_x64(dtype == np.float64):
    got = rollout_lib.rollout(a, b, kind=kind, batches=batches, initial_losses=l0)
    assert got.dtype == dtype
    assert got.shape == (batches.shape[0] + 1, a.shape[0])
    np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=RTOL[dtype],
                               atol=0)


def test_float32_close_to_float64():
  a, b, batches, l0 = random_problem(1)
  with jax.enable_x64(True):
    hi = np.asarray(rollout_lib.rollout(a, b, kind="linear", batches=batches,
                                        initial_losses=l0))
  lo = np.asarray(rollout_lib.rollout(a.astype(np.float32), b.astype(np.float32),
                                      kind="linear", batches=batches,
                                      initial_losses=l0.astype(np.float32)))
  np.testing.assert_allclose(lo, hi, rtol=1e-4)


def test_step_mask_freezes_steps():
  a, b, batches, l0 = random_problem(2, steps=12)
  mask = np.ones(12, bool)
  mask[[0, 5, 11]] = False
  with jax.enable_x64(True):
    got = rollout_lib.rollout(a, b, kind="linear", batches=batches, initial_losses=l0,
                              step_mask=mask)
  np.testing.assert_allclose(np.asarray(got), loop_rollout(a, b, "linear", batches, l0, mask),
                             rtol=1e-12)
  np.testing.assert_array_equal(np.asarray(got)[1], l0)          # frozen first step


def test_all_pad_row_is_identity_not_zero():
  a = np.full((2, 3), 0.4)
  b = np.full((2, 3), 0.1)
  traj = rollout_lib.rollout(a, b, kind="linear", batches=np.full((3, 2), -1),
                             initial_losses=np.array([2.0, 5.0]))
  np.testing.assert_array_equal(np.asarray(traj), np.tile([[2.0, 5.0]], (4, 1)))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_rollout_many_equals_per_curriculum(dtype):
  rng = np.random.default_rng(3)
  a, b, _, _ = random_problem(3)
  a, b = a.astype(dtype), b.astype(dtype)
  curricula = [random_problem(s, steps=t)[2] for s, t in ((10, 9), (11, 14), (12, 5))]
  l0 = rng.uniform(1.0, 3.0, size=(3, a.shape[0])).astype(dtype)
  batches, mask = rollout_lib.pad_curricula(curricula)
  assert batches.shape == (3, 14, 4)
  np.testing.assert_array_equal(mask.sum(1), [9, 14, 5])
  with jax.enable_x64(dtype == np.float64):
    many = np.asarray(rollout_lib.rollout_many(a, b, kind="linear", batches=batches,
                                               initial_losses=l0, step_mask=mask))
    # padding rows are identity steps even without the mask
    unmasked = np.asarray(rollout_lib.rollout_many(a, b, kind="linear", batches=batches,
                                                   initial_losses=l0))
    for c, cur in enumerate(curricula):
      single = np.asarray(rollout_lib.rollout(a, b, kind="linear", batches=cur,
                                              initial_losses=l0[c]))
      t = cur.shape[0]
      np.testing.assert_allclose(many[c, :t + 1], single, rtol=RTOL[dtype])
      np.testing.assert_allclose(many[c, t:], np.broadcast_to(single[-1], many[c, t:].shape),
                                 rtol=RTOL[dtype])
      np.testing.assert_allclose(single, loop_rollout(a, b, "linear", cur, l0[c]),
                                 rtol=RTOL[dtype])
    np.testing.assert_array_equal(unmasked, many)


def test_rollout_many_broadcasts_initial_losses():
  a, b, cur, l0 = random_problem(4, steps=6)
  many = rollout_lib.rollout_many(a, b, kind="additive", batches=np.stack([cur, cur[::-1]]),
                                  initial_losses=l0)
  np.testing.assert_allclose(np.asarray(many[1]),
                             loop_rollout(a, b, "additive", cur[::-1], l0), rtol=1e-5)


def test_no_recompilation_for_same_shapes():
  a, b, batches, l0 = random_problem(5, steps=8)
  a, b, l0 = a.astype(np.float32), b.astype(np.float32), l0.astype(np.float32)
  rollout_lib.rollout(a, b, kind="linear", batches=batches, initial_losses=l0)
  size = rollout_lib._rollout_jit._cache_size()
  rollout_lib.rollout(a * 0.9, b + 1.0, kind="linear", batches=batches[::-1],
                      initial_losses=l0 + 1.0)
  assert rollout_lib._rollout_jit._cache_size() == size


def test_traceable_under_jit():
  a, b, batches, l0 = random_problem(6, steps=8)
  f = jax.jit(lambda bt: rollout_lib.rollout(jnp.asarray(a, jnp.float32),
                                             jnp.asarray(b, jnp.float32), kind="linear",
                                             batches=bt, initial_losses=jnp.asarray(
                                                 l0, jnp.float32))[-1])
  np.testing.assert_allclose(np.asarray(f(batches)),
                             loop_rollout(a, b, "linear", batches, l0)[-1], rtol=1e-4)


def test_validation_errors():
  a = np.ones((2, 3))
  with pytest.raises(ValueError, match="unknown simulator kind"):
    rollout_lib.rollout(a, a, kind="tracin", batches=np.zeros((1, 1), int),
                        initial_losses=np.ones(2))
  with pytest.raises(ValueError, match=r"step 2 \(1-based\): position 3"):
    rollout_lib.rollout(a, a, kind="linear", batches=np.array([[0, 1], [3, -1]]),
                        initial_losses=np.ones(2))
  with pytest.raises(ValueError, match=r"position 4294967296"):     # would wrap to 0 in int32
    rollout_lib.rollout(a, a, kind="linear", batches=np.array([[2**32]], np.int64),
                        initial_losses=np.ones(2))
  with pytest.raises(ValueError, match=r"curriculum 1 \(0-based\), step 1"):
    rollout_lib.rollout_many(a, a, kind="linear", batches=np.array([[[0]], [[-2]]]),
                             initial_losses=np.ones((2, 2)))
  with pytest.raises(ValueError, match="integer positions"):
    rollout_lib.rollout(a, a, kind="linear", batches=np.zeros((1, 1)),
                        initial_losses=np.ones(2))
  with pytest.raises(ValueError, match="initial_losses"):
    rollout_lib.rollout(a, a, kind="linear", batches=np.zeros((1, 1), int),
                        initial_losses=np.ones(3))
  with pytest.raises(ValueError, match=r"A and B"):
    rollout_lib.rollout(a, np.ones((2, 4)), kind="linear", batches=np.zeros((1, 1), int),
                        initial_losses=np.ones(2))
  with pytest.raises(ValueError, match="step_mask"):
    rollout_lib.rollout_many(a, a, kind="linear", batches=np.zeros((2, 3, 1), int),
                             initial_losses=np.ones((2, 2)), step_mask=np.ones((2, 2)))
  with pytest.raises(ValueError, match="batch sizes"):
    rollout_lib.pad_curricula([np.zeros((2, 2), int), np.zeros((2, 3), int)])


def test_ids_to_positions():
  train_ids = np.array([40, 10, 30, 20], np.int64)
  cur = np.array([[10, 20], [40, -1], [30, 30]], np.int32)
  pos = rollout_lib.ids_to_positions(cur, train_ids)
  assert pos.dtype == np.int32
  np.testing.assert_array_equal(pos, [[1, 3], [0, -1], [2, 2]])
  np.testing.assert_array_equal(np.where(pos >= 0, train_ids[pos], -1), cur)


def test_ids_to_positions_errors():
  train_ids = np.array([40, 10, 30])
  with pytest.raises(ValueError, match=r"step 2 \(1-based\).*train id 99"):
    rollout_lib.ids_to_positions(np.array([[10, 40], [30, 99]]), train_ids)
  with pytest.raises(ValueError, match="more than once"):
    rollout_lib.ids_to_positions(np.array([[10]]), np.array([10, 3, 10]))
  with pytest.raises(ValueError, match="not among"):
    rollout_lib.ids_to_positions(np.array([[5]]), np.array([], np.int64))
  with pytest.raises(ValueError, match="int \\[T, k\\]"):
    rollout_lib.ids_to_positions(np.array([10, 40]), train_ids)
