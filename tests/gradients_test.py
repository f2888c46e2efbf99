"""Per-example gradients, JL projection and the gradient cache (float64 references)."""

import jax

jax.config.update("jax_enable_x64", True)

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp
import numpy as np
import pytest

from simfluence_jax import gradients


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
