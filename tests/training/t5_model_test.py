"""models.t5 against independent references.

References: a float64 numpy forward pass of the whole encoder-decoder written here from the
paper's equations (T5 bucketing as a scalar loop, RMSNorm, gated GELU, masked softmax
attention); IA3 checked by folding the vectors into the K/V/wo kernels of the plain model;
causality and padding as invariances; hand-computed bucket ids.
"""

import functools
import math
import pathlib

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simfluence_jax.cli import gin_setup
from simfluence_jax.training.models import losses
from simfluence_jax.training.models import t5

# 2+2 layers so that the per-stack shared position bias and the layer loop are exercised.
CFG = t5.T5Config(vocab_size=384, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                  num_encoder_layers=2, num_decoder_layers=2,
                  relative_attention_num_buckets=8, relative_attention_max_distance=12)
# 1+1 layers (cheaper to compile) for the gradient and dropout tests.
CFG1 = t5.T5Config(**{**CFG.__dict__, "num_encoder_layers": 1, "num_decoder_layers": 1})
LI, LT = 9, 5
GIN_DIR = gin_setup.GIN_CONFIGS_DIR / "models"


def _batch(seed=0, b=2):
  rng = np.random.default_rng(seed)
  enc = rng.integers(1, CFG.vocab_size, size=(b, LI)).astype(np.int32)
  enc[0, 6:] = 0                                                    # encoder padding
  targets = rng.integers(1, CFG.vocab_size, size=(b, LT)).astype(np.int32)
  return enc, targets, np.asarray(losses.shift_right(targets))


@functools.lru_cache(maxsize=None)
def _jitted_apply(cfg, use_ia3, static):
  return jax.jit(t5.Transformer(cfg, use_ia3=use_ia3).apply, static_argnames=static)


def _apply(cfg, use_ia3, variables, enc, dec, **kwargs):
  """Jitted Transformer(cfg, use_ia3).apply, compiled once per (config, kwargs) (eager flax is
  slow op by op). Returns numpy logits."""
  static = tuple(sorted(k for k, v in kwargs.items() if isinstance(v, bool)))
  return np.asarray(_jitted_apply(cfg, use_ia3, static)(variables, enc, dec, **kwargs))


def _first_layers(variables):
  """The variables of CFG1 (1+1 layers): layers_0 of each stack of CFG's variables."""
  def keep(stack):
    return {n: w for n, w in stack.items() if n == "layers_0" or not n.startswith("layers_")}
  return {col: {k: keep(v) if k in ("encoder", "decoder") else v for k, v in tree.items()}
          for col, tree in variables.items()}


def _random_ia3(ia3, seed=1):
  leaves, treedef = jax.tree.flatten(ia3)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [jax.random.uniform(k, x.shape, minval=0.3, maxval=2.0)
                                      for k, x in zip(keys, leaves)])


@pytest.fixture(scope="module")
def variables():
  return t5.init_variables(CFG, jax.random.key(0), use_ia3=True, input_length=LI,
                           target_length=LT)


# ------------------------------- numpy reference ------------------------------------------
def _bucket_ref(rel, bidirectional, num_buckets, max_distance):
  """T5 bucketing of one offset rel = key - query, scalar python/numpy float32."""
  if bidirectional:
    half, offset, dist = num_buckets // 2, (num_buckets // 2 if rel > 0 else 0), abs(rel)
  else:
    half, offset, dist = num_buckets, 0, max(-rel, 0)
  exact = half // 2
  if dist < exact:
    return offset + dist
  f32 = np.float32
  scaled = (np.log(f32(dist) / f32(exact) + np.finfo(f32).eps)
            / f32(math.log(max_distance / exact)) * f32(half - exact))
  return offset + min(exact + int(scaled), half - 1)


def _np_rms(x, scale):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


def _np_attention(p, ia3, xq, xkv, bias):
  h, d = CFG.num_heads, CFG.head_dim
  q = np.einsum("bqe,ehd->bqhd", xq, p["query"])
  k = np.einsum("bke,ehd->bkhd", xkv, p["key"])
  v = np.einsum("bke,ehd->bkhd", xkv, p["value"])
  if ia3 is not None:
    k, v = k * ia3["l_k"].reshape(h, d), v * ia3["l_v"].reshape(h, d)
  s = np.einsum("bqhd,bkhd->bhqk", q, k) + bias                   # no 1/sqrt(d): folded in init
  w = np.exp(s - s.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum("bqhd,hde->bqe", np.einsum("bhqk,bkhd->bqhd", w, v), p["out"])


def _np_mlp(p, ia3, x):
  a = x @ p["wi_0"]
  gelu = 0.5 * a * (1 + np.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a ** 3)))
  hidden = gelu * (x @ p["wi_1"])
  if ia3 is not None:
    hidden = hidden * ia3["l_ff"]
  return hidden @ p["wo"]


def _np_pos_bias(table, n, bidirectional):
  ids = np.array([[_bucket_ref(k - q, bidirectional, CFG.relative_attention_num_buckets,
                               CFG.relative_attention_max_distance) for k in range(n)]
                  for q in range(n)])
  return table[:, ids][None]                                        # [1, h, n, n]


def _np_forward(params, ia3, enc, dec):
  """Float64 T5.1.1 forward (no dropout), written from the equations."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  ia3 = None if ia3 is None else jax.tree.map(lambda x: np.asarray(x, np.float64), ia3)
  sub = lambda tree, *keys: None if tree is None else tree[keys[0]][keys[1]][keys[2]]
  emb = p["token_embedder"]
  pad = np.asarray(enc) > 0
  mask = lambda qm, km: np.where(qm[:, None, :, None] & km[:, None, None, :], 0.0, -1e10)
  # Encoder.
  x = emb[enc]
  bias = _np_pos_bias(p["encoder"]["relpos_bias"]["rel_embedding"], LI, True) + mask(pad, pad)
  for i in range(CFG.num_encoder_layers):
    lp, name = p["encoder"][f"layers_{i}"], f"layers_{i}"
    y = _np_rms(x, lp["pre_attention_layer_norm"]["scale"])
    x = x + _np_attention(lp["attention"], sub(ia3, "encoder", name, "attention"), y, y, bias)
    y = _np_rms(x, lp["pre_mlp_layer_norm"]["scale"])
    x = x + _np_mlp(lp["mlp"], sub(ia3, "encoder", name, "mlp"), y)
  encoded = _np_rms(x, p["encoder"]["encoder_norm"]["scale"])
  # Decoder.
  x = emb[dec]
  n = dec.shape[1]
  causal = np.where(np.arange(n)[None, :] <= np.arange(n)[:, None], 0.0, -1e10)
  self_bias = _np_pos_bias(p["decoder"]["relpos_bias"]["rel_embedding"], n, False) + causal
  cross_bias = mask(np.ones(dec.shape, bool), pad)
  for i in range(CFG.num_decoder_layers):
    lp, name = p["decoder"][f"layers_{i}"], f"layers_{i}"
    y = _np_rms(x, lp["pre_self_attention_layer_norm"]["scale"])
    x = x + _np_attention(lp["self_attention"], sub(ia3, "decoder", name, "self_attention"),
                          y, y, self_bias)
    y = _np_rms(x, lp["pre_cross_attention_layer_norm"]["scale"])
    x = x + _np_attention(lp["encoder_decoder_attention"],
                          sub(ia3, "decoder", name, "encoder_decoder_attention"),
                          y, encoded, cross_bias)
    y = _np_rms(x, lp["pre_mlp_layer_norm"]["scale"])
    x = x + _np_mlp(lp["mlp"], sub(ia3, "decoder", name, "mlp"), y)
  return _np_rms(x, p["decoder"]["decoder_norm"]["scale"]) @ p["logits_dense"]


def _fold_ia3_into_kernels(params, ia3):
  """Plain-model params computing the IA3 model: K/V kernels and wo scaled by the vectors."""
  h, d = CFG.num_heads, CFG.head_dim
  def fold(p, v):
    p = dict(p)
    for key, sub in v.items():
      if "l_k" in sub:                 # an attention block
        att = dict(p[key])
        att["key"] = att["key"] * sub["l_k"].reshape(1, h, d)
        att["value"] = att["value"] * sub["l_v"].reshape(1, h, d)
        p[key] = att
      elif "l_ff" in sub:              # an MLP block
        p[key] = dict(p[key], wo=p[key]["wo"] * sub["l_ff"][:, None])
      else:
        p[key] = fold(p[key], sub)
    return p
  return fold(params, ia3)


# ------------------------------------ tests -----------------------------------------------
def test_relative_position_bucket_matches_scalar_reference_and_hand_values():
  rel = np.arange(-300, 301)
  for nb, md in ((32, 128), (8, 12), (16, 40)):
    for bidi in (True, False):
      got = t5.relative_position_bucket(rel, bidirectional=bidi, num_buckets=nb,
                                        max_distance=md)
      want = [_bucket_ref(int(r), bidi, nb, md) for r in rel]
      np.testing.assert_array_equal(got, want, err_msg=f"buckets={nb} max={md} bidi={bidi}")
  # Hand-computed, T5 defaults (32 buckets, max distance 128); rel = key - query.
  bidi = dict(zip([0, -1, -8, -12, -127, -1000, 3, 100], [0, 1, 8, 9, 15, 15, 19, 31]))
  uni = dict(zip([0, -3, -16, -40, -127, 7, 500], [0, 3, 16, 23, 31, 0, 0]))
  for table, bidirectional in ((bidi, True), (uni, False)):
    got = t5.relative_position_bucket(np.array(list(table)), bidirectional=bidirectional,
                                      num_buckets=32, max_distance=128)
    np.testing.assert_array_equal(got, list(table.values()))


def test_rms_norm_matches_numpy():
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(3, 4, 7)) + 5.0).astype(np.float32)       # large mean: not removed
  scale = rng.normal(size=(7,)).astype(np.float32)
  got = t5.RMSNorm().apply({"params": {"scale": scale}}, x)
  x64 = x.astype(np.float64)
  want = x64 / np.sqrt(np.mean(x64 ** 2, -1, keepdims=True) + 1e-6) * scale
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_forward_matches_numpy_reference_with_random_ia3(variables):
  enc, _, dec = _batch()
  params = variables["params"]
  # Random RMSNorm scales (init: ones) so that they matter; position tables are random already.
  rng = np.random.default_rng(7)
  params = jax.tree.map(
      lambda x: x * rng.uniform(0.5, 1.5, x.shape).astype(np.float32) if x.ndim == 1 else x,
      params)
  ia3 = _random_ia3(variables["ia3"])
  got = _apply(CFG, True, {"params": params, "ia3": ia3}, enc, dec)
  want = _np_forward(params, ia3, enc, dec)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)
  # And IA3 equals the plain model with the vectors folded into its kernels.
  folded = _apply(CFG, False, {"params": _fold_ia3_into_kernels(params, ia3)}, enc, dec)
  np.testing.assert_allclose(got, folded, rtol=1e-5, atol=1e-5)


def test_ia3_ones_equals_plain_model_exactly(variables):
  enc, _, dec = _batch()
  assert all(np.all(np.asarray(x) == 1.0) for x in jax.tree.leaves(variables["ia3"]))
  assert set(variables) == {"params", "ia3"}
  plain_vars = t5.init_variables(CFG, jax.random.key(0), use_ia3=False, input_length=LI,
                                 target_length=LT)
  assert set(plain_vars) == {"params"}
  chex_equal = jax.tree.map(np.array_equal, plain_vars["params"], variables["params"])
  assert all(jax.tree.leaves(chex_equal))                           # same init for params
  a = _apply(CFG, True, variables, enc, dec)
  b = _apply(CFG, False, plain_vars, enc, dec)
  np.testing.assert_array_equal(a, b)


def test_gradients_wrt_ia3_and_params(variables):
  enc, targets, dec = _batch()
  weights = (targets > 0).astype(np.float32)
  ia3_model, plain = t5.Transformer(CFG1, use_ia3=True), t5.Transformer(CFG1)
  variables = _first_layers(variables)

  def loss_ia3(params, ia3):
    logits = ia3_model.apply({"params": params, "ia3": ia3}, enc, dec)
    return jnp.mean(losses.per_example_loss(logits, targets, weights))

  def loss_plain(params):
    logits = plain.apply({"params": params}, enc, dec)
    return jnp.mean(losses.per_example_loss(logits, targets, weights))

  params = variables["params"]
  # Two compiled gradients, (params, ia3) -> grads: the IA3 model, and the plain model whose
  # K/V/wo kernels have the vectors folded in (identity at ones).
  grad_ia3 = jax.jit(jax.grad(loss_ia3, argnums=(0, 1)))
  grad_ref = jax.jit(jax.grad(lambda p, v: loss_plain(_fold_ia3_into_kernels(p, v)),
                              argnums=(0, 1)))
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
  # At IA3 = ones, d/dparams of the IA3 model is the plain model's gradient.
  (gp, gv), (gp_ref, gv_ref) = grad_ia3(params, variables["ia3"]), grad_ref(
      params, variables["ia3"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), gp, gp_ref)
  jax.tree.map(close, gv, gv_ref)
  # d/dia3 at random vectors matches the folded-kernel route too.
  ia3 = _random_ia3(variables["ia3"], seed=5)
  (_, g), (_, g_ref) = grad_ia3(params, ia3), grad_ref(params, ia3)
  assert jax.tree.structure(g) == jax.tree.structure(ia3)
  jax.tree.map(close, g, g_ref)
  assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(g))


def test_decoder_is_causal(variables):
  enc, _, dec = _batch()
  base = _apply(CFG, True, variables, enc, dec)
  for j in (1, 3):
    changed = dec.copy()
    changed[:, j] = (changed[:, j] + 17) % CFG.vocab_size + 1
    out = _apply(CFG, True, variables, enc, changed)
    np.testing.assert_allclose(out[:, :j], base[:, :j], rtol=0, atol=1e-6)
    assert np.abs(out[:, j:] - base[:, j:]).max(axis=-1).min() > 1e-4  # later positions move


def test_encoder_padding_is_invisible(variables):
  enc, _, dec = _batch()
  model = t5.Transformer(CFG, use_ia3=True)
  base = _apply(CFG, True, variables, enc, dec)
  # More padding after the real tokens of every row: nothing changes.
  longer = np.concatenate([enc, np.zeros((enc.shape[0], 7), np.int32)], axis=1)
  np.testing.assert_allclose(_apply(CFG, True, variables, longer, dec), base,
                             rtol=1e-5, atol=1e-5)   # float reassociation only
  # Whereas changing a real encoder token does change the outputs.
  changed = enc.copy()
  changed[0, 2] += 1
  assert np.abs(_apply(CFG, True, variables, changed, dec)[0] - base[0]).max() > 1e-4
  # Decoder padding (targets == 0) masks padded positions only; real positions unchanged.
  targets = np.array([[5, 6, 7, 0, 0], [8, 9, 1, 2, 0]], np.int32)
  dec = np.asarray(losses.shift_right(targets))
  masked = _apply(CFG, True, variables, enc, dec, decoder_target_tokens=targets)
  free = _apply(CFG, True, variables, enc, dec)
  real = targets > 0
  np.testing.assert_allclose(masked[real], free[real], rtol=0, atol=2e-6)


def test_logits_via_embedding_ties_the_output_layer():
  cfg = t5.T5Config(**{**CFG.__dict__, "logits_via_embedding": True})
  tied = t5.init_variables(cfg, jax.random.key(2), use_ia3=False, input_length=LI,
                           target_length=LT)
  assert "logits_dense" not in tied["params"] and "token_embedder" in tied["params"]
  enc, _, dec = _batch()
  got = _apply(cfg, False, tied, enc, dec)
  untied = dict(tied["params"],
                logits_dense=tied["params"]["token_embedder"].T / math.sqrt(cfg.emb_dim))
  want = _apply(CFG, False, {"params": untied}, enc, dec)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  n_tied, n_untied = t5.num_parameters(tied["params"]), t5.num_parameters(untied)
  assert n_untied - n_tied == cfg.vocab_size * cfg.emb_dim


def test_scan_layers_equals_python_loop(variables):
  enc, _, dec = _batch()
  ia3 = _random_ia3(variables["ia3"])
  def stack(tree, n):
    layers = [tree.pop(f"layers_{i}") for i in range(n)]
    tree["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  scanned = jax.tree.map(lambda x: x, {"params": variables["params"], "ia3": ia3})
  for col in scanned.values():
    stack(col["encoder"], CFG.num_encoder_layers)
    stack(col["decoder"], CFG.num_decoder_layers)
  cfg = t5.T5Config(**{**CFG.__dict__, "scan_layers": True})
  fresh = jax.eval_shape(lambda: t5.init_variables(
      cfg, jax.random.key(0), use_ia3=True, input_length=LI, target_length=LT))
  assert (jax.tree.map(lambda x: x.shape, fresh)
          == jax.tree.map(lambda x: x.shape, scanned))
  got = _apply(cfg, True, scanned, enc, dec)
  want = _apply(CFG, True, {"params": variables["params"], "ia3": ia3}, enc, dec)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_dropout_and_bfloat16(variables):
  enc, _, dec = _batch()
  # Dropout on the 1+1-layer model, to keep the compile of the random masks short.
  small_vars = _first_layers(variables)
  cfg = t5.T5Config(**{**CFG1.__dict__, "dropout_rate": 0.3})
  run = lambda seed: _apply(cfg, True, small_vars, enc, dec, deterministic=False,
                            rngs={"dropout": jax.random.key(seed)})
  det = _apply(cfg, True, small_vars, enc, dec, deterministic=True, rngs={})
  np.testing.assert_array_equal(run(0), run(0))
  assert np.abs(run(0) - run(1)).max() > 1e-3 and np.abs(run(0) - det).max() > 1e-3
  no_dropout = t5.T5Config(**{**cfg.__dict__, "dropout_rate": 0.0})
  np.testing.assert_array_equal(det, _apply(no_dropout, True, small_vars, enc, dec))
  # bfloat16 compute: float32 logits out, close to the float32 model (bf16 has ~3 digits).
  det = _apply(CFG, True, variables, enc, dec)
  low = _apply(t5.T5Config(**{**CFG.__dict__, "dtype": "bfloat16"}), True, variables, enc, dec)
  assert low.dtype == np.float32
  assert np.abs(low - det).max() < 0.05 * np.abs(det).max()


def test_config_validation_names_the_field():
  with pytest.raises(ValueError, match="dtype"):
    t5.T5Config(**{**CFG.__dict__, "dtype": "float16"})
  with pytest.raises(ValueError, match="num_heads"):
    t5.T5Config(**{**CFG.__dict__, "num_heads": 0})


@pytest.mark.parametrize("name,expected_params", [
    ("tiny", 49_504), ("cpu_default", 345_088), ("small", 76_961_152), ("base", 247_577_856)])
def test_gin_size_files_bind_model_config(name, expected_params):
  """Parses each size file with gin's own parser (no registration: the binary owns that)."""
  text = (GIN_DIR / f"{name}.gin").read_text()
  assert 'gin.external_configurable(T5Config, "model_config")' in text     # header
  kwargs = {}
  for statement in gin.config_parser.ConfigParser(text, gin.config.ParserDelegate()):
    assert statement.selector == "model_config", statement
    kwargs[statement.arg_name] = statement.value
  cfg = t5.T5Config(**kwargs)
  # Parameter count from the shapes alone (eval_shape: no memory for small/base).
  shapes = jax.eval_shape(lambda: t5.Transformer(cfg).init(
      jax.random.key(0), jnp.ones((1, 4), jnp.int32), jnp.ones((1, 3), jnp.int32)))
  assert t5.num_parameters(shapes["params"]) == expected_params
