"""models.losses against plain numpy (float64 loops) and hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simfluence_jax.training.models import losses


def _numpy_loss(logits, targets, weights, z_loss=0.0):
  """Loop reference: per token log-softmax in float64, weighted mean per example."""
  b, t, _ = logits.shape
  out = np.zeros(b)
  for i in range(b):
    num, den = 0.0, 0.0
    for j in range(t):
      row = logits[i, j].astype(np.float64)
      log_z = row.max() + math.log(np.sum(np.exp(row - row.max())))
      ce = log_z - row[targets[i, j]] + z_loss * log_z ** 2
      num += weights[i, j] * ce
      den += weights[i, j]
    out[i] = num / max(den, 1e-8)
  return out


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_per_example_loss_matches_numpy_loop(z_loss):
  rng = np.random.default_rng(0)
  b, t, v = 4, 6, 11
  logits = rng.normal(scale=3.0, size=(b, t, v)).astype(np.float32)
  targets = rng.integers(0, v, size=(b, t))
  weights = rng.uniform(size=(b, t)).astype(np.float32)
  weights[1, 3:] = 0.0              # padding tail
  weights[2] = 0.0                  # an example with no target tokens -> loss 0
  got = jax.jit(lambda *a: losses.per_example_loss(*a, z_loss=z_loss))(
      logits, targets, weights)
  want = _numpy_loss(logits, targets, weights, z_loss)
  assert got.shape == (b,) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  assert float(got[2]) == 0.0


def test_per_example_loss_hand_computed_and_stable():
  # Uniform logits over 4 classes: CE = log 4 at every token, whatever the weights.
  logits = jnp.zeros((1, 3, 4))
  got = losses.per_example_loss(logits, jnp.array([[0, 3, 1]]), jnp.array([[1.0, 2.0, 0.0]]))
  np.testing.assert_allclose(np.asarray(got), [math.log(4.0)], rtol=1e-6)
  # Huge logits in bfloat16: computed in float32, finite, target has probability ~1 -> ~0.
  big = jnp.array([[[8192.0, -8192.0, 0.0]]], jnp.bfloat16)  # exact in bfloat16
  got = losses.per_example_loss(big, jnp.array([[0]]), jnp.array([[1.0]]))
  assert np.isfinite(np.asarray(got)).all() and float(got[0]) < 1e-6
  got = losses.per_example_loss(big, jnp.array([[1]]), jnp.array([[1.0]]))
  np.testing.assert_allclose(np.asarray(got), [16384.0], rtol=1e-6)


def test_per_example_loss_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="targets"):
    losses.per_example_loss(jnp.zeros((2, 3, 5)), jnp.zeros((2, 4), jnp.int32),
                            jnp.zeros((2, 4)))


def test_shift_right_hand_example():
  targets = np.array([[7, 8, 9, 1, 0, 0], [3, 1, 0, 0, 0, 0]], np.int32)
  want = np.array([[0, 7, 8, 9, 1, 0], [0, 3, 1, 0, 0, 0]], np.int32)
  got = losses.shift_right(targets)
  np.testing.assert_array_equal(np.asarray(got), want)
  assert got.dtype == jnp.int32
