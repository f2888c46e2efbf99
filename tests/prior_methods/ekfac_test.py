"""EK-FAC against exact damped empirical-Fisher solves (dense float64 numpy references)."""

import jax

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from simfluence_jax.prior_methods import ekfac

# Every test here compares with a float64 reference: float64 is on for the module.
pytestmark = pytest.mark.usefixtures("x64")


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


def _mlp_influence(model_seed, data_seed, scale, n=256):
  """Tiny tanh MLP 3-8-2 (50 parameters incl. biases), n train / 16 test examples, squared
  loss. Influence scores g_testᵀ (Ĝ + λI)⁻¹ g_train [16, n] with λ = scale × mean corrected
  eigenvalue (= ekfac.default_damping(state, scale) = trace(G)/P for full dense layers), for
  EK-FAC, the exact per-layer block-diagonal damped solve and the exact full solve."""
  layers = _mlp(model_seed, [3, 8, 2])
  rng = np.random.default_rng(data_seed)
  x, y = rng.normal(size=(n, 3)), rng.normal(size=(n, 2))
  xt, yt = rng.normal(size=(16, 3)), rng.normal(size=(16, 2))
  acts, deltas = ekfac.dense_statistics(layers, _sq_loss, x, y)
  state = ekfac.fit_dense(acts, deltas)
  train_grads = ekfac.layer_gradients(acts, deltas)
  g_train = np.asarray(ekfac.flatten_layer_grads(train_grads))
  t_acts, t_deltas = ekfac.dense_statistics(layers, _sq_loss, xt, yt)
  test_grads = ekfac.layer_gradients(t_acts, t_deltas)
  g_test = np.asarray(ekfac.flatten_layer_grads(test_grads))
  damping = ekfac.default_damping(state, scale)
  fisher = g_train.T @ g_train / n
  np.testing.assert_allclose(damping, scale * np.trace(fisher) / fisher.shape[0], rtol=1e-9)
  solved = ekfac.dense_apply_spectral(state, test_grads, ekfac.inverse(damping))
  approx = np.asarray(ekfac.flatten_layer_grads(solved)) @ g_train.T          # [16, n]
  exact = ekfac.exact_damped_solve(g_train, g_test, damping) @ g_train.T
  mask, start = np.zeros_like(fisher), 0
  for g in train_grads:
    size = g.shape[1] * g.shape[2]
    mask[start:start + size, start:start + size] = 1.0
    start += size
  block = np.linalg.solve(fisher * mask + damping * np.eye(len(fisher)), g_test.T).T @ g_train.T
  corr = lambda u, v: float(np.corrcoef(u.ravel(), v.ravel())[0, 1])
  return corr(approx, exact), corr(approx, block)


def test_ekfac_influence_correlates_with_exact_solve_on_tiny_mlp_default_damping():
  """Library default damping (0.1 × mean eigenvalue, ekfac.default_damping): EK-FAC vs the
  exact damped solve of the SAME per-layer block-diagonal curvature — the Kronecker-basis
  (K-FAC + eigenvalue correction) error alone — Pearson 0.966 (required ≥ 0.95). Against the
  exact full solve, cross-layer blocks included, 0.876 (required ≥ 0.85): at this damping
  the block-diagonal (per-layer) assumption, not the eigenbasis, is the dominant error
  (block-diagonal exact vs full exact is itself only 0.914). Neither the bias augmentation
  (0.853 without biases) nor the example count (0.907 at n=1024, 0.917 at n=4096) explains
  the gap to 0.9 — see the next test for the issue's ≥ 0.9 acceptance and its condition."""
  vs_full, vs_block = _mlp_influence(3, 4, scale=0.1)
  assert vs_block >= 0.95, vs_block
  assert vs_full >= 0.85, vs_full


def test_ekfac_influence_correlates_with_exact_solve_on_tiny_mlp():
  """Issue acceptance, "EK-FAC correlates ≥ 0.9 with the exact damped (empirical-Fisher)
  solve on a tiny MLP", holds at damping λ = 0.3 × mean eigenvalue (not at the library
  default 0.1×, previous test): Pearson of the 16 × 256 influence scores, full exact solve
  incl. cross-layer blocks, over three MLP/data seeds: 0.940, 0.940, 0.958 (at 0.1×: 0.876,
  0.892, 0.910; at 1×: 0.978, 0.969, 0.977). Required ≥ 0.9 for every seed."""
  for model_seed, data_seed in ((3, 4), (10, 20), (11, 21)):
    vs_full, _ = _mlp_influence(model_seed, data_seed, scale=0.3)
    assert vs_full >= 0.9, (model_seed, data_seed, vs_full)


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


def test_multi_token_correction_is_fisher_diagonal_in_kronecker_basis():
  """Tokens [N, T, d]: G_n = Σ_t a δᵀ, and Λ*[j, k] is the exact per-example second moment of
  the gradient along the Kronecker eigenvector q_Aj ⊗ q_Sk, i.e. diag(Q̃ᵀ G Q̃) with G the
  exact layer Fisher (George et al. 2018) — checked against a dense numpy reference."""
  rng = np.random.default_rng(7)
  acts, deltas = rng.normal(size=(5, 4, 3)), rng.normal(size=(5, 4, 2))
  state = ekfac.fit_dense([jnp.asarray(acts)], [jnp.asarray(deltas)])
  grads = np.einsum("nti,nto->nio", acts, deltas)
  np.testing.assert_allclose(ekfac.layer_gradients([acts], [deltas])[0], grads, rtol=1e-12)
  fa = np.einsum("nti,ntj->ij", acts, acts) / 5
  fs = np.einsum("nti,ntj->ij", deltas, deltas) / 5
  for got, want in zip(ekfac.kfac_factors([acts], [deltas])[0], (fa, fs)):
    np.testing.assert_allclose(got, want, rtol=1e-12)
  basis = np.kron(np.asarray(state.qa[0]), np.asarray(state.qs[0]))     # vec row-major
  flat = grads.reshape(5, -1)
  want = np.diag(basis.T @ (flat.T @ flat / 5) @ basis).reshape(3, 2)
  np.testing.assert_allclose(state.eig[0], want, rtol=1e-10, atol=1e-12)


# ------------------------------------------------- EK-FAC over the T5 model's dense kernels
from simfluence_jax.prior_methods import gradients  # pylint: disable=g-bad-import-order
from simfluence_jax.training import tasks
from simfluence_jax.training.models import t5

_T5 = t5.T5Config(vocab_size=384, emb_dim=16, num_heads=2, head_dim=4, mlp_dim=16,
                  num_encoder_layers=1, num_decoder_layers=1, dtype="float64")
_MODEL = t5.Transformer(_T5)


def _ce(logits, batch):
  """Mean token cross-entropy in the logits' dtype (float64 here)."""
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  ce = -jnp.take_along_axis(log_probs, batch["decoder_target_tokens"][..., None], -1)[..., 0]
  w = batch["decoder_loss_weights"].astype(logits.dtype)
  return jnp.sum(w * ce, axis=-1) / jnp.maximum(jnp.sum(w, axis=-1), 1e-8)


def _t5_loss_fn(variables, batch, rng):
  del rng
  return _ce(_MODEL.apply(variables, batch["encoder_input_tokens"],
                          batch["decoder_input_tokens"]), batch)


def _woodbury_solve(grads, vecs, damping):
  """Exact (G + λI)⁻¹ vᵀ, G = (1/N) JᵀJ, via (I/λ)(v − Jᵀ(NλI + JJᵀ)⁻¹Jv): N × N solve."""
  n = grads.shape[0]
  inner = np.linalg.solve(n * damping * np.eye(n) + grads @ grads.T, grads @ vecs.T)
  return (vecs - (grads.T @ inner).T) / damping


@functools.lru_cache(maxsize=1)
def _t5_variables():
  variables = t5.init_variables(_T5, jax.random.PRNGKey(0), use_ia3=False, input_length=8,
                                target_length=4)
  return jax.tree.map(lambda x: np.asarray(x, np.float64), variables)


def _t5_ekfac(batch, test):
  variables = _t5_variables()
  kernels, factors = gradients.kfac_factors(_MODEL, variables, batch, loss=_ce, chunk_size=8)
  bounds = gradients.kernel_bounds(kernels, variables["params"])
  spec = gradients.GradientSpec(collection="params", chunk_size=8)
  g_train = gradients.per_example_gradients(_t5_loss_fn, variables, batch, spec)
  g_test = gradients.per_example_gradients(_t5_loss_fn, variables, test, spec)
  state = ekfac.fit_kernels(factors, jnp.asarray(g_train), bounds)
  return state, bounds, g_train, g_test


def test_t5_dense_ekfac_exact_for_one_single_token_example():
  """Exact case on the T5: ONE example with one encoder and one decoder token. Every kernel
  then has T = 1, G_1 = a δᵀ, A = a aᵀ, S = δ δᵀ, so each kernel's block g gᵀ is diagonal in
  Q_A ⊗ Q_S and EK-FAC equals the exact damped solve of the per-kernel block-diagonal
  curvature restricted to the dense-kernel parameters (measured max rel. error 1.6e-12).
  Non-kernel parameters (embeddings, norms, position tables) must come back 0."""
  one = {"encoder_input_tokens": np.array([[5]], np.int32),
         "decoder_input_tokens": np.array([[0]], np.int32),
         "decoder_target_tokens": np.array([[7]], np.int32),
         "decoder_loss_weights": np.array([[1.0]])}
  state, bounds, g_train, _ = _t5_ekfac(one, one)
  assert len(bounds) == 19           # 3 attentions × 4 + 2 MLPs × 3 + logits_dense
  vecs = np.random.default_rng(0).normal(size=(3, g_train.shape[1]))
  damping = 0.05 * float(np.sum(g_train ** 2)) / sum(b - a for a, b, _, _ in bounds)
  got = np.asarray(ekfac.kernel_apply_spectral(state, jnp.asarray(vecs),
                                               ekfac.inverse(damping)))
  want = np.zeros_like(vecs)
  for a, b, _, _ in bounds:
    want[:, a:b] = _woodbury_solve(g_train[:, a:b], vecs[:, a:b], damping)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-10 * np.abs(want).max())


def test_t5_dense_ekfac_correlates_with_exact_solve():
  """16 train / 8 test country_yesno examples (64 input, 8 target tokens), T5 1+1 layers at
  init, float64, 15,600 dense-kernel parameters (19 kernels). Influence scores
  g_testᵀ (Ĝ + λI)⁻¹ g_train [8, 16] at the library default λ = 0.1 × mean Λ*, against the
  exact damped empirical-Fisher solve restricted to the dense kernels (Woodbury, exact).
  Measured Pearson: EK-FAC vs full exact 0.511 (required ≥ 0.4); EK-FAC vs the exact
  per-kernel block-diagonal solve 0.616 (≥ 0.5); for scale, the identity (TracIn-like
  g_testᵀ g_train) vs full exact 0.256: EK-FAC must beat it by ≥ 0.15. With N = 16 ≪ P the
  exact G has rank 16, which no Kronecker eigenbasis captures well — this is the regime of
  a small fine-tuning pool, not a bug (the exact cases above and below hold to round-off).
  Also: Λ* is exactly diag(Q̃ᵀ G_k Q̃) of each kernel's exact Fisher G_k (float64, 1e-9)."""
  pools = tasks.get_pools("country_yesno")
  batch = tasks.encode_examples(pools.train[:16], input_length=64, target_length=8)
  test = tasks.encode_examples(pools.test[:8], input_length=64, target_length=8)
  state, bounds, g_train, g_test = _t5_ekfac(batch, test)
  damping = ekfac.default_damping(state)
  cols = np.concatenate([np.arange(a, b) for a, b, _, _ in bounds])
  approx = np.asarray(ekfac.kernel_apply_spectral(state, jnp.asarray(g_test),
                                                  ekfac.inverse(damping)))
  assert not np.any(np.delete(approx, cols, axis=1))
  full = _woodbury_solve(g_train[:, cols], g_test[:, cols], damping)
  block = np.concatenate([_woodbury_solve(g_train[:, a:b], g_test[:, a:b], damping)
                          for a, b, _, _ in bounds], axis=1)
  train = g_train[:, cols].T
  corr = lambda u, v: float(np.corrcoef(u.ravel(), v.ravel())[0, 1])
  vs_full, vs_block = corr(approx[:, cols] @ train, full @ train), corr(
      approx[:, cols] @ train, block @ train)
  identity = corr(g_test[:, cols] @ train, full @ train)
  assert vs_full >= 0.4 and vs_block >= 0.5 and vs_full >= identity + 0.15, (
      vs_full, vs_block, identity)
  for (a, b, din, dout), qa, qs, eig in zip(bounds, state.dense.qa, state.dense.qs,
                                            state.dense.eig):
    rotated = np.einsum("ij,nik,kl->njl", qa, g_train[:, a:b].reshape(-1, din, dout), qs)
    np.testing.assert_allclose(eig, np.mean(rotated ** 2, axis=0), rtol=1e-9, atol=1e-14)
