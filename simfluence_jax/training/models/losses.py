"""Per-example token cross-entropy for the T5 model, and the decoder-input shift.

Shapes: b batch, t target positions, v vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def per_example_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array, *,
                     z_loss: float = 0.0, eps: float = 1e-8) -> jax.Array:
  """Mean weighted token cross-entropy of each example -> float32 [b].

  loss_b = sum_t w_bt * CE_bt / max(sum_t w_bt, eps), with
  CE_bt = -log_softmax(logits_bt)[targets_bt] + z_loss * logsumexp(logits_bt)^2
  (the z-loss term is T5X's auxiliary log-partition penalty; 0 by default). All in float32,
  or float64 when the logits are float64 (exact reference tests, e.g. metagradients against
  finite differences). An example whose weights are all zero has loss 0.

  Args:
    logits: [b, t, v] any float dtype.
    targets: [b, t] int token ids.
    weights: [b, t] loss weights (seqio `decoder_loss_weights`; 0 on padding).
    z_loss: coefficient of the log(Z)^2 penalty.
    eps: floor on the weight sum.
  """
  if logits.shape[:-1] != targets.shape or targets.shape != weights.shape:
    raise ValueError(
        f"per_example_loss: logits {logits.shape} must be [b, t, v] with targets and weights "
        f"[b, t]; got targets {targets.shape}, weights {weights.shape}")
  dtype = jnp.promote_types(logits.dtype, jnp.float32)   # float32, or float64 kept
  logits = logits.astype(dtype)
  log_probs = jax.nn.log_softmax(logits, axis=-1)                        # [b, t, v]
  token_ce = -jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32),
                                  axis=-1)[..., 0]                       # [b, t]
  if z_loss:
    token_ce = token_ce + z_loss * jnp.square(jax.nn.logsumexp(logits, axis=-1))
  weights = weights.astype(dtype)
  return jnp.sum(weights * token_ce, axis=-1) / jnp.maximum(jnp.sum(weights, axis=-1), eps)


def shift_right(targets: jax.Array) -> jax.Array:
  """Decoder inputs for teacher forcing: [b, t] -> [b, t], 0 (start) then targets[:, :-1].

  Padding (0) stays 0. No packing/segment handling (examples are never packed here).
  """
  targets = jnp.asarray(targets)
  start = jnp.zeros(targets.shape[:-1] + (1,), targets.dtype)
  return jnp.concatenate([start, targets[..., :-1]], axis=-1)
