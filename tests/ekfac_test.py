"""EK-FAC against exact damped empirical-Fisher solves (dense float64 numpy references)."""

import jax

jax.config.update("jax_enable_x64", True)

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp
import numpy as np

from simfluence_jax import ekfac


def _sq_loss(out, y):
  return 0.5 * jnp.sum((out - y) ** 2)


def _mlp(seed, sizes):
  rng = np.random.default_rng(seed)
  return [{"w": rng.normal(size=(a, b)) / np.sqrt(a), "b": 0.1 * rng.normal(size=b)}
          for a, b in zip(sizes[:-1], sizes[1:])]


def _flat_loop_grads(layers, x, y):
  """Independent reference: jax.grad of each example's loss w.r.t. all weights, flattened
  per layer as [W; b] (din+1, dout) row-major — the layout of ekfac.flatten_layer_grads."""
  rows = []
  for xn, yn in zip(x, y):
    g = jax.grad(lambda ls: _sq_loss(ekfac.mlp_apply(ls, xn[None])[0][0], yn))(layers)
    rows.append(np.concatenate([np.concatenate([l["w"], l["b"][None]], 0).ravel() for l in g]))
  return np.stack(rows)


def test_dense_statistics_give_exact_per_example_gradients():
  layers = _mlp(0, [3, 4, 2])
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 2))
  acts, deltas = ekfac.dense_statistics(layers, _sq_loss, x, y)
  flat = ekfac.flatten_layer_grads(ekfac.layer_gradients(acts, deltas))
  np.testing.assert_allclose(flat, _flat_loop_grads(layers, x, y), rtol=1e-12, atol=1e-13)


def _ekfac_vs_exact(acts, deltas, vecs, damping):
  state = ekfac.fit_dense([jnp.asarray(acts)], [jnp.asarray(deltas)])
  got = ekfac.dense_apply_spectral(state, [jnp.asarray(vecs)], ekfac.inverse(damping))[0]
  grads = np.einsum("ni,no->nio", acts, deltas).reshape(acts.shape[0], -1)
  want = ekfac.exact_damped_solve(grads, vecs.reshape(vecs.shape[0], -1), damping)
  return np.asarray(got).reshape(want.shape), want


def test_ekfac_exact_for_single_layer_with_orthogonal_examples():
  """Exact case: ONE dense layer (no bias), N examples whose inputs a_n are orthogonal with
  distinct norms and whose output gradients δ_n are orthogonal with distinct norms. Then
  G = (1/N) Σ (a_n a_nᵀ) ⊗ (δ_n δ_nᵀ) is diagonal in Q_A ⊗ Q_S and EK-FAC's corrected
  eigenvalues are G's own: (G + λI)⁻¹ v must match to float64 round-off."""
  rng = np.random.default_rng(0)
  din, dout, n = 5, 4, 3
  qa, _ = np.linalg.qr(rng.normal(size=(din, din)))
  qs, _ = np.linalg.qr(rng.normal(size=(dout, dout)))
  acts = qa[:, :n].T * np.array([1.0, 2.0, 3.5])[:, None]        # [N, din] orthogonal rows
  deltas = qs[:, :n].T * np.array([0.7, 1.9, 2.8])[:, None]      # [N, dout]
  vecs = rng.normal(size=(4, din, dout))
  got, want = _ekfac_vs_exact(acts, deltas, vecs, damping=0.05)
  np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10)


def test_ekfac_exact_for_one_example():
  rng = np.random.default_rng(1)
  acts, deltas = rng.normal(size=(1, 6)), rng.normal(size=(1, 3))
  got, want = _ekfac_vs_exact(acts, deltas, rng.normal(size=(2, 6, 3)), damping=0.3)
  np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10)


def test_ekfac_not_exact_in_general_single_layer():
  """Guards the test above: with generic data the Kronecker eigenbasis is an approximation."""
  rng = np.random.default_rng(2)
  acts, deltas = rng.normal(size=(20, 4)), rng.normal(size=(20, 3))
  got, want = _ekfac_vs_exact(acts, deltas, rng.normal(size=(2, 4, 3)), damping=0.01)
  assert np.max(np.abs(got - want)) > 1e-3 * np.max(np.abs(want))


def test_ekfac_influence_correlates_with_exact_solve_on_tiny_mlp():
  """Tiny tanh MLP 3-8-2, 256 train / 16 test examples: EK-FAC influence scores
  g_testᵀ (Ĝ + λI)⁻¹ g_train vs the exact damped empirical-Fisher solve over all 50
  parameters (cross-layer blocks included). λ = 0.3 × mean exact eigenvalue: Pearson 0.94
  here (measured: 0.88 at 0.1×, 0.98 at 1× — less damping exposes more of the K-FAC and
  block-diagonal error). Required: ≥ 0.9."""
  layers = _mlp(3, [3, 8, 2])
  rng = np.random.default_rng(4)
  x, y = rng.normal(size=(256, 3)), rng.normal(size=(256, 2))
  xt, yt = rng.normal(size=(16, 3)), rng.normal(size=(16, 2))
  acts, deltas = ekfac.dense_statistics(layers, _sq_loss, x, y)
  state = ekfac.fit_dense(acts, deltas)
  g_train = np.asarray(ekfac.flatten_layer_grads(ekfac.layer_gradients(acts, deltas)))
  t_acts, t_deltas = ekfac.dense_statistics(layers, _sq_loss, xt, yt)
  test_grads = ekfac.layer_gradients(t_acts, t_deltas)
  g_test = np.asarray(ekfac.flatten_layer_grads(test_grads))
  damping = 0.3 * np.trace(g_train.T @ g_train / 256) / g_train.shape[1]
  solved = ekfac.dense_apply_spectral(state, test_grads, ekfac.inverse(damping))
  approx = np.asarray(ekfac.flatten_layer_grads(solved)) @ g_train.T          # [16, 256]
  exact = ekfac.exact_damped_solve(g_train, g_test, damping) @ g_train.T
  corr = np.corrcoef(approx.ravel(), exact.ravel())[0, 1]
  assert corr >= 0.9, corr


def test_blocks_equal_block_diagonal_exact_solve():
  rng = np.random.default_rng(5)
  grads = rng.normal(size=(30, 9)) * np.array([1, 2, 3, 1, 1, 4, 2, 1, 3.0])
  bounds = [(0, 2), (2, 6), (6, 9)]
  vecs = rng.normal(size=(4, 9))
  state = ekfac.fit_blocks(jnp.asarray(grads), bounds)
  got = np.asarray(ekfac.block_apply_spectral(state, jnp.asarray(vecs), ekfac.inverse(0.2)))
  g = grads.T @ grads / 30
  mask = np.zeros_like(g)
  for a, b in bounds:
    mask[a:b, a:b] = 1
  want = np.linalg.solve(g * mask + 0.2 * np.eye(9), vecs.T).T
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
  # One block spanning everything is the exact full solve.
  full = ekfac.fit_blocks(jnp.asarray(grads), [(0, 9)])
  np.testing.assert_allclose(
      np.asarray(ekfac.block_apply_spectral(full, jnp.asarray(vecs), ekfac.inverse(0.2))),
      ekfac.exact_damped_solve(grads, vecs, 0.2), rtol=1e-10, atol=1e-12)


def test_bad_blocks_and_damping_are_errors():
  import pytest  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="tile"):
    ekfac.fit_blocks(jnp.zeros((3, 4)), [(0, 2), (3, 4)])
  with pytest.raises(ValueError, match="damping"):
    ekfac.inverse(0.0)
