"""Per-example gradients, JL projection and the gradient cache (float64 references)."""

import jax

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from simfluence_jax.prior_methods import gradients

# Every test here compares with a float64 reference: float64 is on for the module.
pytestmark = pytest.mark.usefixtures("x64")


def _loss_fn(variables, batch, rng):
  """A tiny IA3-style model: y_hat = (tanh(x W + b) * l) V; per-example squared error [b]."""
  del rng
  p, l = variables["params"], variables["ia3"]["scale"]
  h = jnp.tanh(batch["x"] @ p["w"] + p["b"]) * l
  return 0.5 * jnp.sum((h @ p["v"] - batch["y"]) ** 2, axis=-1)


def _variables(seed=0, din=3, hidden=5, dout=2):
  rng = np.random.default_rng(seed)
  return {"params": {"w": rng.normal(size=(din, hidden)), "b": rng.normal(size=hidden),
                     "v": rng.normal(size=(hidden, dout))},
          "ia3": {"scale": 1.0 + 0.1 * rng.normal(size=hidden)}}


def _batch(n, seed=1, din=3, dout=2):
  rng = np.random.default_rng(seed)
  return {"x": rng.normal(size=(n, din)), "y": rng.normal(size=(n, dout))}


def _loop_grads(variables, batch, collection):
  """Independent reference: jax.grad of each example alone, in a python loop."""
  rows = []
  for i in range(batch["x"].shape[0]):
    one = {k: v[i:i + 1] for k, v in batch.items()}
    f = lambda c: _loss_fn({**variables, collection: c}, one, None)[0]
    g = jax.grad(f)(variables[collection])
    rows.append(np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]))
  return np.stack(rows)


@pytest.mark.parametrize("collection", ["ia3", "params"])
def test_exact_per_example_gradients_match_loop(collection):
  variables, batch = _variables(), _batch(7)
  spec = gradients.GradientSpec(collection=collection, chunk_size=3)   # 3 chunks, last padded
  got = gradients.per_example_gradients(_loss_fn, variables, batch, spec)
  np.testing.assert_allclose(got, _loop_grads(variables, batch, collection),
                             rtol=1e-12, atol=1e-14)
  assert got.dtype == np.float64


def test_leaf_slices_follow_flatten_order():
  variables = _variables()
  slices = gradients.leaf_slices({"params": variables["params"]})
  assert [(a, b) for _, a, b in slices] == [(0, 5), (5, 15), (15, 30)]   # b [5], v [5,2], w [3,5] (sorted)


def test_jl_projection_preserves_dot_products_within_bound():
  rng = np.random.default_rng(0)
  shapes = {"a": (40, 50), "b": (3000,), "c": (7, 13, 11)}   # P = 6001, leaves > block_rows
  vecs = {k: rng.normal(size=(6,) + s) for k, s in shapes.items()}
  dim = 2048
  spec = gradients.GradientSpec(collection="params", projection_dim=dim, seed=3,
                                block_rows=512)
  proj = np.asarray(gradients.flatten_or_project(vecs, spec))
  exact = np.concatenate([v.reshape(6, -1) for v in vecs.values()], axis=1)
  num_pairs = 21
  eps = gradients.jl_tolerance(dim, num_pairs, failure_prob=1e-3)    # ~0.26
  norms = np.linalg.norm(exact, axis=1)
  for i in range(6):
    for j in range(i, 6):
      err = abs(proj[i] @ proj[j] - exact[i] @ exact[j])
      assert err <= eps * norms[i] * norms[j], (i, j, err / (norms[i] * norms[j]), eps)
  # Deterministic in the seed, linear in the input, different for another seed.
  again = np.asarray(gradients.flatten_or_project(vecs, spec))
  np.testing.assert_array_equal(proj, again)
  summed = {k: v[:1] + v[1:2] for k, v in vecs.items()}
  np.testing.assert_allclose(np.asarray(gradients.flatten_or_project(summed, spec))[0],
                             proj[0] + proj[1], rtol=1e-10, atol=1e-10)
  other = gradients.GradientSpec(collection="params", projection_dim=dim, seed=4,
                                 block_rows=512)
  assert not np.allclose(np.asarray(gradients.flatten_or_project(vecs, other)), proj)


def test_projected_gradients_do_not_depend_on_chunking():
  variables, batch = _variables(), _batch(5)
  proj = [gradients.per_example_gradients(
      _loss_fn, variables, batch, gradients.GradientSpec(
          collection="params", projection_dim=8, seed=1, chunk_size=c)) for c in (1, 2, 5)]
  for p in proj[1:]:
    np.testing.assert_allclose(p, proj[0], rtol=1e-12, atol=1e-14)
  assert proj[0].shape == (5, 8)


def test_cache_round_trip_and_reuse(tmp_path):
  variables, batch = _variables(), _batch(4)
  spec = gradients.GradientSpec(collection="ia3")
  ids = np.array([10, 3, 7, 5])
  calls = []

  def compute():
    calls.append(1)
    return gradients.per_example_gradients(_loss_fn, variables, batch, spec)

  first, reused = gradients.cached_gradients(tmp_path, "run_a", 4, "train", ids, spec, compute)
  assert not reused and len(calls) == 1
  path = gradients.cache_path(tmp_path, "run_a", 4, "train")
  assert path == tmp_path / "gradients" / "run_a" / "checkpoint_4" / "train.npz"
  with np.load(path, allow_pickle=False) as npz:
    np.testing.assert_array_equal(npz["ids"], ids)
    assert int(npz["projection_dim"]) == -1 and int(npz["projection_seed"]) == 0
    assert str(npz["collection"]) == "ia3"
  second, reused = gradients.cached_gradients(tmp_path, "run_a", 4, "train", ids, spec, compute)
  assert reused and len(calls) == 1
  np.testing.assert_array_equal(first, second)
  np.testing.assert_allclose(second, _loop_grads(variables, batch, "ia3"), rtol=1e-6)
  # Another id order or another projection spec is a miss, recomputed and overwritten.
  gradients.cached_gradients(tmp_path, "run_a", 4, "train", ids[::-1], spec, compute)
  assert len(calls) == 2
  other = gradients.GradientSpec(collection="ia3", projection_dim=3, seed=9)
  gradients.cached_gradients(tmp_path, "run_a", 4, "train", ids[::-1], other,
                             lambda: np.zeros((4, 3)))
  assert gradients.load_cached(path, ids[::-1], spec) is None
  assert gradients.load_cached(path, ids[::-1], other).shape == (4, 3)


def test_bad_spec_and_collection_are_errors():
  with pytest.raises(ValueError, match="collection"):
    gradients.GradientSpec(collection="opt")
  with pytest.raises(ValueError, match="use_ia3"):
    gradients.split_collection({"params": {}}, "ia3")


def test_second_call_compiles_nothing():
  variables, batch = _variables(), _batch(6)
  spec = gradients.GradientSpec(collection="ia3", chunk_size=4)
  gradients.per_example_gradients(_loss_fn, variables, batch, spec)
  size = gradients._grads_jit._cache_size()  # pylint: disable=protected-access
  other = _batch(6, seed=7)                   # same shapes, new values
  gradients.per_example_gradients(_loss_fn, _variables(seed=3), other, spec)
  assert gradients._grads_jit._cache_size() == size  # pylint: disable=protected-access


# ------------------------------------------------ T5 dense-kernel statistics (K-FAC taps)
def test_t5_dense_kernel_statistics_give_exact_kernel_gradients():
  """Per example n and kernel W [din, dout]: Σ_t a_nt δ_ntᵀ from the t5.py taps equals
  jax.grad of that example's loss w.r.t. W (float64 T5 1+1 layers, real country_yesno
  examples with encoder padding; measured max rel. error 1.6e-15, required 1e-12). Also:
  kfac_factors are the per-example-normalised token sums of these statistics, whatever
  the chunk size, and the kernel bounds index the exact flattened "params" gradient.
  Neutrality of the taps: init makes only "params" (t5_model_test checks the forward pass)."""
  from simfluence_jax.training import tasks
  from simfluence_jax.training.models import t5
  cfg = t5.T5Config(vocab_size=384, emb_dim=16, num_heads=2, head_dim=4, mlp_dim=16,
                    num_encoder_layers=1, num_decoder_layers=1, dtype="float64")
  model = t5.Transformer(cfg)
  variables = jax.tree.map(lambda x: np.asarray(x, np.float64), t5.init_variables(
      cfg, jax.random.PRNGKey(1), use_ia3=False, input_length=8, target_length=4))

  def ce(logits, batch):
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    tok = -jnp.take_along_axis(log_probs, batch["decoder_target_tokens"][..., None], -1)[..., 0]
    w = batch["decoder_loss_weights"].astype(logits.dtype)
    return jnp.sum(w * tok, axis=-1) / jnp.maximum(jnp.sum(w, axis=-1), 1e-8)

  assert set(variables) == {"params"}                  # init records no tap collections
  batch = tasks.encode_examples(tasks.get_pools("country_yesno").train[:3], input_length=64,
                                target_length=8)
  stats = gradients.dense_kernel_statistics(model, variables, batch, loss=ce)
  kernels = gradients.dense_kernels(model, variables, batch)
  assert len(kernels) == 19 and set(stats) == {k.path for k in kernels}
  assert "['token_embedder']" not in stats

  @jax.jit
  def grad_one(params, one):                       # independent: jax.grad of one example
    return jax.grad(lambda p: ce(model.apply({"params": p}, one["encoder_input_tokens"],
                                             one["decoder_input_tokens"]), one)[0])(params)

  bounds = gradients.kernel_bounds(kernels, variables["params"])
  for n in range(3):
    g = grad_one(variables["params"], {k: v[n:n + 1] for k, v in batch.items()})
    leaves = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(g)[0]}
    flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves({"params": g})])
    for k, (start, stop, din, dout) in zip(kernels, bounds):
      a, d = stats[k.path]
      assert a.shape[:2] == d.shape[:2] and (a.shape[2], d.shape[2]) == (din, dout)
      got = np.einsum("ti,to->io", a[n], d[n])
      want = np.asarray(leaves[k.path]).reshape(din, dout)
      np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(want).max())
      np.testing.assert_array_equal(flat[start:stop], np.ravel(leaves[k.path]))
  for chunk in (3, 2):
    _, factors = gradients.kfac_factors(model, variables, batch, loss=ce, chunk_size=chunk)
    for k, (fa, fs) in zip(kernels, factors):
      a, d = (np.asarray(x) for x in stats[k.path])
      np.testing.assert_allclose(fa, np.einsum("nti,ntj->ij", a, a) / 3, rtol=1e-12,
                                 atol=1e-14)
      np.testing.assert_allclose(fs, np.einsum("nti,ntj->ij", d, d) / 3, rtol=1e-12,
                                 atol=1e-14)

