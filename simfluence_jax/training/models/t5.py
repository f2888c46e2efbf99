"""A T5.1.1-style encoder-decoder in Flax (linen), with optional IA3 vectors.

Architecture (Raffel et al. 2020, with the T5.1.1 changes):
  * one token embedding shared by the encoder and decoder inputs;
  * pre-norm residual blocks with RMSNorm (scale only: no bias, no mean subtraction);
  * T5 relative position bias: one table [heads, buckets] per stack, shared by all layers of
    that stack; bidirectional buckets in the encoder, causal (unidirectional) buckets in the
    decoder; no position bias in cross-attention;
  * attention without biases and WITHOUT a 1/sqrt(head_dim) factor in the dot product. As in
    T5 / T5X, the scaling is folded into the initialisation of the query kernel (its init
    stddev is divided by sqrt(head_dim)), so a converted T5 checkpoint works unchanged;
  * gated-GELU MLP: wo(gelu(x wi_0) * (x wi_1)), tanh-approximate GELU ("gelu_new");
  * a final RMSNorm per stack; logits through an untied `logits_dense` (T5.1.1 default) or the
    shared embedding scaled by 1/sqrt(emb_dim) (`logits_via_embedding=True`, T5 1.0).

IA3 (Liu et al. 2022): when `use_ia3=True` every attention (encoder self, decoder self and
cross) rescales its keys and values elementwise by learned vectors l_k, l_v
[num_heads * head_dim], and every MLP rescales its hidden activation (after the gated product,
before wo) by l_ff [mlp_dim]. They live in the variable collection "ia3", initialised to ones,
so at init the IA3 model computes exactly the non-IA3 model.

Masks come from token id 0 = padding: encoder self-attention and cross-attention mask padded
encoder keys; the decoder self-attention is causal. Decoder inputs start with 0 (shift_right)
so they cannot define decoder padding; pass `decoder_target_tokens` for that (optional: with a
causal mask, padded decoder positions never influence real ones anyway).

Shapes: b batch, l/q/k sequence positions, e emb_dim, h heads, d head_dim, f mlp_dim,
v vocab. Parameters are always float32; `config.dtype` is the compute dtype. Attention logits,
softmax, RMSNorm statistics and the returned logits are float32 (float64 when the compute
dtype is "float64", which exists for exact reference tests with float64 variables).

Dense-kernel taps (for K-FAC / EK-FAC, gradients.dense_kernel_statistics): every dense kernel
(attention query/key/value/out, MLP wi_0/wi_1/wo, logits_dense) is applied by `_dense`, which
  * sows its input a [b, T, din...] into the collection "dense_inputs" (only when that
    collection is mutable in `apply`, never in `init`; otherwise a no-op), and
  * adds the variable "dense_perturbations"/<same path> [b, T, dout...] to its output s when
    the caller passes that collection (zeros), so ∂L/∂s = δ is ∂L/∂perturbation.
Without those collections `_dense` is exactly the einsum (bit-identical outputs). Embeddings,
RMSNorm scales and the relative-position tables are not tapped.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}
# Additive attention bias for masked positions (as T5X): large but finite, so fully masked
# query rows (encoder padding) give a uniform softmax instead of NaN.
_MASK_BIAS = -1e10
IA3_COLLECTION = "ia3"
DENSE_INPUTS = "dense_inputs"                 # sown kernel inputs a (K-FAC taps, see above)
DENSE_PERTURBATIONS = "dense_perturbations"   # zeros added to kernel outputs s (for δ)


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Model dimensions and options. See gin_configs/models/*.gin for named sizes."""
  vocab_size: int
  emb_dim: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  num_encoder_layers: int
  num_decoder_layers: int
  dropout_rate: float = 0.0
  logits_via_embedding: bool = False
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dtype: str = "float32"
  # Stack the layers of each stack with nn.scan (one compiled layer body; parameters get a
  # leading [layers] axis under "layers"). False = a python loop ("layers_0", "layers_1", ...).
  scan_layers: bool = False

  def __post_init__(self):
    for name in ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim",
                 "num_encoder_layers", "num_decoder_layers",
                 "relative_attention_num_buckets", "relative_attention_max_distance"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"T5Config.{name} must be >= 1, got {getattr(self, name)!r}")
    if self.relative_attention_num_buckets % 2:
      raise ValueError("T5Config.relative_attention_num_buckets must be even (bidirectional "
                       f"buckets split in halves), got {self.relative_attention_num_buckets}")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"T5Config.dropout_rate must be in [0, 1), got {self.dropout_rate}")
    if self.dtype not in _DTYPES:
      raise ValueError(f"T5Config.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def accum_dtype(self):
    """Logits / softmax / norm statistics: float32, or float64 for a float64 model."""
    return jnp.promote_types(jnp.float32, self.compute_dtype)


# ----------------------------------------------------------------------------------------
# Relative position buckets (T5, Raffel et al. 2020 §2.1; mesh_tensorflow / T5X convention).
# ----------------------------------------------------------------------------------------
def relative_position_bucket(relative_position: np.ndarray, *, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> np.ndarray:
  """Bucket ids int32 for relative_position = key_position - query_position (numpy).

  Offsets |n| < max_exact get their own bucket; larger ones share logarithmically wider
  buckets up to max_distance, beyond which they all fall in the last bucket. Bidirectional:
  half of the buckets for keys before the query (n > 0 below), half for keys after.
  Unidirectional: keys after the query (future) all map to bucket 0 (they are masked anyway).
  Computed in float32 numpy at trace time (shapes are static), as T5X does.
  """
  n = -np.asarray(relative_position, dtype=np.int32)      # n > 0: key precedes the query
  bucket = np.zeros_like(n)
  if bidirectional:
    num_buckets //= 2
    bucket += (n < 0).astype(np.int32) * num_buckets
    n = np.abs(n)
  else:
    n = np.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  # log-spaced buckets for max_exact <= n < max_distance.
  ratio = n.astype(np.float32) / np.float32(max_exact) + np.finfo(np.float32).eps
  with np.errstate(divide="ignore"):                    # n == 0 only hits the is_small branch
    large = max_exact + (np.log(ratio) / np.float32(math.log(max_distance / max_exact))
                         * np.float32(num_buckets - max_exact)).astype(np.int32)
  large = np.minimum(large, num_buckets - 1)
  return bucket + np.where(is_small, n, large).astype(np.int32)


def _normal(stddev: float) -> Callable:
  return nn.initializers.normal(stddev=stddev)


def _dense(module: nn.Module, name: str, equation: str, x, kernel, **kwargs):
  """einsum(equation, x, kernel) for the kernel param `name`, with the K-FAC taps of the
  module docstring: sow x into DENSE_INPUTS, add DENSE_PERTURBATIONS/name if given."""
  y = jnp.einsum(equation, x, kernel, **kwargs)
  if not module.is_initializing():         # init (all collections mutable) records nothing
    module.sow(DENSE_INPUTS, name, x)
  if module.has_variable(DENSE_PERTURBATIONS, name):
    y = y + module.get_variable(DENSE_PERTURBATIONS, name)
  return y


class RMSNorm(nn.Module):
  """y = x / sqrt(mean(x^2) + eps) * scale; statistics in float32."""
  epsilon: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    x = x.astype(jnp.promote_types(jnp.float32, self.dtype))
    y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
    return (y * scale).astype(self.dtype)


class RelativePositionBias(nn.Module):
  """Learned scalar bias per (head, bucket); returns [1, h, q, k] float32."""
  config: T5Config
  bidirectional: bool

  @nn.compact
  def __call__(self, q_len: int, k_len: int):
    cfg = self.config
    table = self.param(
        "rel_embedding",
        nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
        (cfg.num_heads, cfg.relative_attention_num_buckets), jnp.float32)
    rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]            # [q, k]
    buckets = relative_position_bucket(
        rel, bidirectional=self.bidirectional,
        num_buckets=cfg.relative_attention_num_buckets,
        max_distance=cfg.relative_attention_max_distance)
    # Gather as a one-hot contraction: [h, B] x [q, k, B] -> [h, q, k] (cheap; B = 32).
    one_hot = jax.nn.one_hot(buckets, cfg.relative_attention_num_buckets, dtype=jnp.float32)
    return jnp.einsum("hn,qkn->hqk", table, one_hot)[None]


class Attention(nn.Module):
  """Multi-head dot-product attention, T5 style (no biases, scaling folded into q init)."""
  config: T5Config
  use_ia3: bool
  deterministic: bool

  @nn.compact
  def __call__(self, x_q, x_kv, bias):
    """x_q [b, q, e], x_kv [b, k, e], bias [b or 1, h, q, k] float32 -> [b, q, e]."""
    cfg = self.config
    dt = cfg.compute_dtype
    e, h, d = cfg.emb_dim, cfg.num_heads, cfg.head_dim
    init_in = 1.0 / math.sqrt(e)
    wq = self.param("query", _normal(init_in / math.sqrt(d)), (e, h, d), jnp.float32)
    wk = self.param("key", _normal(init_in), (e, h, d), jnp.float32)
    wv = self.param("value", _normal(init_in), (e, h, d), jnp.float32)
    wo = self.param("out", _normal(1.0 / math.sqrt(h * d)), (h, d, e), jnp.float32)

    q = _dense(self, "query", "bqe,ehd->bqhd", x_q, wq.astype(dt))
    k = _dense(self, "key", "bke,ehd->bkhd", x_kv, wk.astype(dt))
    v = _dense(self, "value", "bke,ehd->bkhd", x_kv, wv.astype(dt))
    if self.use_ia3:
      l_k = self.variable(IA3_COLLECTION, "l_k", jnp.ones, (h * d,), jnp.float32).value
      l_v = self.variable(IA3_COLLECTION, "l_v", jnp.ones, (h * d,), jnp.float32).value
      k = k * l_k.reshape(h, d).astype(dt)
      v = v * l_v.reshape(h, d).astype(dt)

    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=cfg.accum_dtype)
    weights = jax.nn.softmax(logits + bias, axis=-1).astype(dt)
    if cfg.dropout_rate > 0.0 and not self.deterministic:
      weights = nn.Dropout(cfg.dropout_rate)(weights, deterministic=False)
    y = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    return _dense(self, "out", "bqhd,hde->bqe", y, wo.astype(dt))


class GatedGeluMlp(nn.Module):
  """wo((gelu(x wi_0) * (x wi_1)) [* l_ff]) — T5.1.1 gated-GELU feed-forward."""
  config: T5Config
  use_ia3: bool
  deterministic: bool

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dt = cfg.compute_dtype
    e, f = cfg.emb_dim, cfg.mlp_dim
    wi_0 = self.param("wi_0", _normal(1.0 / math.sqrt(e)), (e, f), jnp.float32)
    wi_1 = self.param("wi_1", _normal(1.0 / math.sqrt(e)), (e, f), jnp.float32)
    wo = self.param("wo", _normal(1.0 / math.sqrt(f)), (f, e), jnp.float32)
    hidden = (nn.gelu(_dense(self, "wi_0", "ble,ef->blf", x, wi_0.astype(dt)),
                      approximate=True)
              * _dense(self, "wi_1", "ble,ef->blf", x, wi_1.astype(dt)))
    if self.use_ia3:
      l_ff = self.variable(IA3_COLLECTION, "l_ff", jnp.ones, (f,), jnp.float32).value
      hidden = hidden * l_ff.astype(dt)
    if cfg.dropout_rate > 0.0 and not self.deterministic:
      hidden = nn.Dropout(cfg.dropout_rate)(hidden, deterministic=False)
    return _dense(self, "wo", "blf,fe->ble", hidden, wo.astype(dt))


def _dropout(cfg: T5Config, x, deterministic: bool):
  """Residual-stream dropout, mask shared over positions (T5X broadcast_dims=(-2,))."""
  if cfg.dropout_rate == 0.0 or deterministic:
    return x
  return nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=False)


class EncoderLayer(nn.Module):
  config: T5Config
  use_ia3: bool
  deterministic: bool

  @nn.compact
  def __call__(self, x, bias):
    """x [b, l, e]; bias [b, h, l, l] (position bias + padding mask). Returns (x, None)."""
    cfg, det = self.config, self.deterministic
    y = RMSNorm(dtype=cfg.compute_dtype, name="pre_attention_layer_norm")(x)
    y = Attention(cfg, self.use_ia3, det, name="attention")(y, y, bias)
    x = x + _dropout(cfg, y, det)
    y = RMSNorm(dtype=cfg.compute_dtype, name="pre_mlp_layer_norm")(x)
    y = GatedGeluMlp(cfg, self.use_ia3, det, name="mlp")(y)
    return x + _dropout(cfg, y, det), None


class DecoderLayer(nn.Module):
  config: T5Config
  use_ia3: bool
  deterministic: bool

  @nn.compact
  def __call__(self, x, self_bias, encoded, cross_bias):
    """x [b, q, e]; self_bias [b, h, q, q]; encoded [b, k, e]; cross_bias [b, 1, q, k]."""
    cfg, det = self.config, self.deterministic
    y = RMSNorm(dtype=cfg.compute_dtype, name="pre_self_attention_layer_norm")(x)
    y = Attention(cfg, self.use_ia3, det, name="self_attention")(y, y, self_bias)
    x = x + _dropout(cfg, y, det)
    y = RMSNorm(dtype=cfg.compute_dtype, name="pre_cross_attention_layer_norm")(x)
    y = Attention(cfg, self.use_ia3, det, name="encoder_decoder_attention")(
        y, encoded, cross_bias)
    x = x + _dropout(cfg, y, det)
    y = RMSNorm(dtype=cfg.compute_dtype, name="pre_mlp_layer_norm")(x)
    y = GatedGeluMlp(cfg, self.use_ia3, det, name="mlp")(y)
    return x + _dropout(cfg, y, det), None


def _run_layers(parent_cfg: T5Config, layer_cls, num_layers: int, use_ia3: bool,
                deterministic: bool, x, *args):
  """Applies num_layers layers of layer_cls, as a python loop or an nn.scan (config)."""
  if parent_cfg.scan_layers:
    scanned = nn.scan(
        layer_cls,
        variable_axes={"params": 0, IA3_COLLECTION: 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast,) * len(args),
        length=num_layers)
    x, _ = scanned(parent_cfg, use_ia3, deterministic, name="layers")(x, *args)
    return x
  for i in range(num_layers):
    x, _ = layer_cls(parent_cfg, use_ia3, deterministic, name=f"layers_{i}")(x, *args)
  return x


def _padding_bias(q_mask, k_mask):
  """[b, q], [b, k] bool -> additive float32 bias [b, 1, q, k] (0 keep, -1e10 masked)."""
  keep = jnp.logical_and(q_mask[:, None, :, None], k_mask[:, None, None, :])
  return jnp.where(keep, 0.0, _MASK_BIAS).astype(jnp.float32)


class Encoder(nn.Module):
  config: T5Config
  use_ia3: bool
  deterministic: bool

  @nn.compact
  def __call__(self, embedded, input_mask):
    """embedded [b, l, e]; input_mask [b, l] bool -> encoded [b, l, e]."""
    cfg = self.config
    length = embedded.shape[1]
    bias = (RelativePositionBias(cfg, bidirectional=True, name="relpos_bias")(length, length)
            + _padding_bias(input_mask, input_mask))                       # [b, h, l, l]
    x = _dropout(cfg, embedded, self.deterministic)
    x = _run_layers(cfg, EncoderLayer, cfg.num_encoder_layers, self.use_ia3,
                    self.deterministic, x, bias)
    x = RMSNorm(dtype=cfg.compute_dtype, name="encoder_norm")(x)
    return _dropout(cfg, x, self.deterministic)


class Decoder(nn.Module):
  config: T5Config
  use_ia3: bool
  deterministic: bool

  @nn.compact
  def __call__(self, embedded, encoded, encoder_mask, decoder_mask):
    """embedded [b, q, e]; encoded [b, k, e]; masks [b, k], [b, q] bool -> [b, q, e]."""
    cfg = self.config
    length = embedded.shape[1]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))              # [q, q]
    self_bias = (RelativePositionBias(cfg, bidirectional=False, name="relpos_bias")(
        length, length)
                 + jnp.where(causal, 0.0, _MASK_BIAS)[None, None]
                 + _padding_bias(decoder_mask, decoder_mask))              # [b, h, q, q]
    cross_bias = _padding_bias(decoder_mask, encoder_mask)                 # [b, 1, q, k]
    x = _dropout(cfg, embedded, self.deterministic)
    x = _run_layers(cfg, DecoderLayer, cfg.num_decoder_layers, self.use_ia3,
                    self.deterministic, x, self_bias, encoded, cross_bias)
    x = RMSNorm(dtype=cfg.compute_dtype, name="decoder_norm")(x)
    return _dropout(cfg, x, self.deterministic)


class Transformer(nn.Module):
  """T5.1.1 encoder-decoder; __call__ returns float32 logits [b, Ld, V]."""
  config: T5Config
  use_ia3: bool = False

  @nn.compact
  def __call__(self, encoder_input_tokens, decoder_input_tokens, *, deterministic=True,
               decoder_target_tokens=None):
    """encoder_input_tokens [b, Li] int, decoder_input_tokens [b, Ld] int (0 = pad/start).

    `deterministic=False` enables dropout and needs a "dropout" rng. `decoder_target_tokens`
    [b, Ld] (optional) masks padded decoder positions (target == 0) as T5X does.
    """
    cfg = self.config
    dt = cfg.compute_dtype
    embedding = self.param("token_embedder", _normal(1.0), (cfg.vocab_size, cfg.emb_dim),
                           jnp.float32)
    encoder_mask = encoder_input_tokens > 0
    if decoder_target_tokens is None:
      decoder_mask = jnp.ones(decoder_input_tokens.shape, dtype=bool)
    else:
      decoder_mask = decoder_target_tokens > 0

    encoded = Encoder(cfg, self.use_ia3, deterministic, name="encoder")(
        jnp.take(embedding, encoder_input_tokens, axis=0).astype(dt), encoder_mask)
    decoded = Decoder(cfg, self.use_ia3, deterministic, name="decoder")(
        jnp.take(embedding, decoder_input_tokens, axis=0).astype(dt), encoded,
        encoder_mask, decoder_mask)

    if cfg.logits_via_embedding:
      # T5 1.0: tied output layer, rescaled because the embedding has unit-variance rows.
      logits = jnp.einsum("ble,ve->blv", decoded, embedding.astype(dt),
                          preferred_element_type=cfg.accum_dtype) / math.sqrt(cfg.emb_dim)
    else:
      kernel = self.param("logits_dense", _normal(1.0 / math.sqrt(cfg.emb_dim)),
                          (cfg.emb_dim, cfg.vocab_size), jnp.float32)
      logits = _dense(self, "logits_dense", "ble,ev->blv", decoded, kernel.astype(dt),
                      preferred_element_type=cfg.accum_dtype)
    return logits


def init_variables(config: T5Config, rng: jax.Array, *, use_ia3: bool, input_length: int,
                   target_length: int) -> dict:
  """Fresh variables {"params": ..., ["ia3": ...]} (plain nested dicts of float32 arrays)."""
  model = Transformer(config, use_ia3=use_ia3)
  enc = jnp.ones((1, input_length), jnp.int32)
  dec = jnp.ones((1, target_length), jnp.int32)
  # Not jitted on purpose: on CPU, XLA takes seconds to compile the ~40 threefry draws of a
  # jitted init, while eager init compiles each random op once per shape and caches it
  # across calls (cheap re-inits in tests and for other configs of the same dims).
  return dict(model.init({"params": rng}, enc, dec, deterministic=True))


def num_parameters(tree) -> int:
  """Number of scalars in a pytree of arrays (e.g. variables["params"])."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
