"""A low-rank factorized Simfluence simulator shared across test examples (paper §7).

The paper's featurized proposal models α(c_t) = Σ_{i∈c_t} Φ(z_i)ᵀΦ(z) and β(c_t) =
Σ_{i∈c_t} Ψ(z_i)ᵀΨ(z). With learned free embeddings in place of encoders this is a low-rank
factorization of Simfluence-Linear's parameter matrices, shared across test examples:

    A = a0 1ᵀ + U_A V_Aᵀ,   B = b0 1ᵀ + U_B V_Bᵀ,
    U_A, U_B [m, r]  test factors (Φ(z), Ψ(z));   V_A, V_B [n, r]  train factors (Φ(z_i), Ψ(z_i)),
    a0, b0 [m]       optional per-test biases (`bias=True`).

Why the bias: with batch size k a typical step has α ≈ 1 − ε, i.e. every A_zi ≈ 1/k. That
large common mode is rank one but not centred; a per-test bias a0_z (β: b0_z) carries it
(each step then adds k·a0_z to α), so the r factors only model how train examples differ.
The biases are not penalised (like an intercept); they are initialised by the closed-form
"all A_i equal, all B_i equal" fit per test example (a 2×2 least squares).

Objective: Eq. 2 over the same one-step transitions (`design.Transitions`), with the L2
penalty on the factors (= 2λ times the nuclear norm of A − a0 1ᵀ at the optimum):

    O = Σ_s Σ_z μ_sz (y_sz − α_sz x_sz − β_sz)² + λ (‖U_A‖² + ‖V_A‖² + ‖U_B‖² + ‖V_B‖²)

minimised with optax Adam (cosine-decayed learning rate) on O / N_obs (same minimiser),
full-batch or on `batch_steps` random transitions per iteration (the data term rescaled by
S / batch_steps so its expectation is the full one). α_s = (Q V_A)_s U_Aᵀ + k_s a0 costs
O(S·k·r + S·m·r) per evaluation; the [m, n] matrices are never formed during training.

Feature-based variant (the §7 proposal proper): given features f(z_i) [d] of the train
examples (`encoder_features`: the frozen model's mean-pooled encoder states), the train
factors are V_A = F P_A, V_B = F P_B with learned projections P [d, r], penalised like the
factors. A train example no fit run consumed is then simulated from its own features.
Test examples keep free factors U (they are fixed across runs and always observed).

The result is materialised as `FitParams(kind="linear")`, so `simulators.evaluate` and every
downstream tool score it like any other simulator. Without features, train examples never
seen in the fit can only get the *mean train factor* (V̄_A, V̄_B): since A is linear in V,
that equals `simulators.impute_unseen` on the materialised A, B (the mean of seen columns).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from simfluence_jax.simulators import design
from simfluence_jax.yardstick import metrics
from simfluence_jax.simulators import simfluence as simulators
from simfluence_jax.traces.fit_params import FitParams


@dataclasses.dataclass(frozen=True)
class LowRankConfig:
  """Hyper-parameters of the low-rank fit.

  rank: r, the number of factors for A and for B.
  lam: λ of the factor penalty.
  steps: Adam iterations.
  learning_rate: peak Adam learning rate (cosine-decayed to 0 over `steps`).
  batch_steps: transitions per iteration; None = full batch.
  bias: per-test biases a0, b0 (module docstring).
  init_scale: std of the random factor initialisation.
  seed: PRNG seed (initialisation and minibatches).
  """
  rank: int = 4
  lam: float = 1e-3
  steps: int = 3000
  learning_rate: float = 3e-2
  batch_steps: int | None = None
  bias: bool = True
  init_scale: float = 0.1
  seed: int = 0


def train_factors(theta: dict, features=None) -> tuple[jax.Array, jax.Array]:
  """V_A, V_B [n, r]: free factors theta["va"], theta["vb"], or, for the feature-based
  model (theta holds projections "pa", "pb" [d, r]), features [n, d] @ P."""
  if "pa" in theta:
    if features is None:
      raise ValueError("a feature-based fit needs the train examples' features [n, d]")
    return features @ theta["pa"], features @ theta["pb"]
  return theta["va"], theta["vb"]


def materialize(theta: dict, features=None) -> tuple[jax.Array, jax.Array]:
  """A, B [m, n] from {"ua", "ub", "a0", "b0"} and the train factors (`train_factors`)."""
  va, vb = train_factors(theta, features)
  a = theta["ua"] @ va.T + theta["a0"][:, None]
  b = theta["ub"] @ vb.T + theta["b0"][:, None]
  return a, b


def _with_factors(theta, features):
  va, vb = train_factors(theta, features)
  return {**theta, "va": va, "vb": vb}


def _predict(theta, batches, prev):
  """One-step predictions α_s x_s + β_s: batches [S, k] (-1 pad), prev [S, m] -> [S, m]."""
  valid = (batches >= 0)[..., None]                                     # [S, k, 1]
  safe = jnp.where(batches >= 0, batches, 0)
  qva = jnp.sum(jnp.where(valid, theta["va"][safe], 0.0), axis=1)      # [S, r] = Q V_A
  qvb = jnp.sum(jnp.where(valid, theta["vb"][safe], 0.0), axis=1)
  ks = jnp.sum(valid[..., 0], axis=1, dtype=prev.dtype)[:, None]        # [S, 1] batch sizes
  alpha = qva @ theta["ua"].T + ks * theta["a0"][None, :]
  beta = qvb @ theta["ub"].T + ks * theta["b0"][None, :]
  return alpha * prev + beta


def objective(theta, batches, prev, target, mask, lam, *, scale=1.0, features=None):
  """Eq. 2 for the factorized model: scale · Σ μ (y − ŷ)² + λ Σ ‖factor‖² (unnormalised).

  The penalty covers the learned factors: ua, ub and va, vb (free) or pa, pb (projections).
  """
  resid = mask * (target - _predict(_with_factors(theta, features), batches, prev))
  penalty = sum(jnp.sum(theta[k] ** 2) for k in ("ua", "va", "ub", "vb", "pa", "pb")
                if k in theta)
  return scale * jnp.sum(resid ** 2) + lam * penalty


@functools.partial(jax.jit, static_argnames=("steps", "batch_steps", "learning_rate",
                                             "use_bias"))
def _train(theta, batches, prev, target, mask, lam, key, features, *, steps, batch_steps,
           learning_rate, use_bias):
  """Adam on O / N_obs; returns (theta, objective O / N_obs per iteration [steps])."""
  num_obs = jnp.maximum(jnp.sum(mask), 1.0)
  opt = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
  num_rows = batches.shape[0]

  def loss_fn(th, rows):
    if rows is None:
      return objective(th, batches, prev, target, mask, lam, features=features) / num_obs
    return objective(th, batches[rows], prev[rows], target[rows], mask[rows], lam,
                     scale=num_rows / rows.shape[0], features=features) / num_obs

  def step(carry, key_t):
    th, opt_state = carry
    rows = (None if batch_steps is None else
            jax.random.choice(key_t, num_rows, (batch_steps,), replace=False))
    value, grads = jax.value_and_grad(loss_fn)(th, rows)
    if not use_bias:
      grads = {**grads, "a0": jnp.zeros_like(grads["a0"]),
               "b0": jnp.zeros_like(grads["b0"])}
    updates, opt_state = opt.update(grads, opt_state, th)
    return (optax.apply_updates(th, updates), opt_state), value

  (theta, _), history = jax.lax.scan(step, (theta, opt.init(theta)),
                                     jax.random.split(key, steps))
  return theta, history


def _coarse_biases(tr) -> tuple[np.ndarray, np.ndarray]:
  """Per test example, the best fit with every A_i = a0 and every B_i = b0 (2×2 lstsq):
  y_s ≈ a0 · k_s x_s + b0 · k_s over recorded steps."""
  batches = np.asarray(tr.batches)
  ks = (batches >= 0).sum(1).astype(np.float64)[:, None]
  x, y = np.asarray(tr.prev, np.float64), np.asarray(tr.target, np.float64)
  mu = np.asarray(tr.mask, np.float64)
  kx = ks * x
  g11, g12, g22 = (mu * kx * kx).sum(0), (mu * kx * ks).sum(0), (mu * ks * ks).sum(0)
  r1, r2 = (mu * kx * y).sum(0), (mu * ks * y).sum(0)
  det = g11 * g22 - g12 * g12
  ok = det > 1e-12 * np.maximum(g11 * g22, 1e-300)
  safe = np.where(ok, det, 1.0)
  a0 = np.where(ok, (g22 * r1 - g12 * r2) / safe, 0.0)
  b0 = np.where(ok, (g11 * r2 - g12 * r1) / safe, 0.0)
  return a0, b0


def fit_lowrank(tr, config: LowRankConfig, *, train_features=None
                ) -> tuple[dict, np.ndarray]:
  """Fits the factors on Transitions `tr`; returns (theta of jax arrays, history [steps]).

  train_features: optional [n, d] features of the train positions (the §7 featurized
  simulator, Φ(z_i) = P_Aᵀ f(z_i)): the train factors are then V_A = F P_A, V_B = F P_B
  with learned projections "pa", "pb" [d, r] instead of free "va", "vb".
  """
  if config.rank < 1 or config.steps < 1 or config.lam < 0:
    raise ValueError(f"need rank >= 1, steps >= 1, lam >= 0; got {config}")
  dtype = jnp.asarray(np.zeros((), np.asarray(tr.prev[:0]).dtype)).dtype   # x64-aware
  m, n, r = tr.num_test, int(tr.num_train), config.rank
  batch_steps = config.batch_steps
  if batch_steps is not None and not 1 <= batch_steps <= tr.num_steps:
    raise ValueError(f"batch_steps must be in [1, {tr.num_steps}] (the number of "
                     f"transitions) or None, got {batch_steps}")
  if batch_steps == tr.num_steps:
    batch_steps = None
  key_init, key_train = jax.random.split(jax.random.PRNGKey(config.seed))
  ks = jax.random.split(key_init, 4)
  normal = lambda k, shape: config.init_scale * jax.random.normal(k, shape, dtype)
  a0, b0 = _coarse_biases(tr) if config.bias else (np.zeros(m), np.zeros(m))
  theta = {"ua": normal(ks[0], (m, r)), "ub": normal(ks[2], (m, r)),
           "a0": jnp.asarray(a0, dtype), "b0": jnp.asarray(b0, dtype)}
  as_dev = lambda a: jnp.asarray(np.asarray(a), dtype)
  features = None
  if train_features is None:
    theta.update(va=normal(ks[1], (n, r)), vb=normal(ks[3], (n, r)))
  else:
    features = as_dev(train_features)
    if features.ndim != 2 or features.shape[0] != n:
      raise ValueError(f"train_features must be [n={n}, d] (one row per train position), "
                       f"got {features.shape}")
    d = features.shape[1]
    theta.update(pa=normal(ks[1], (d, r)), pb=normal(ks[3], (d, r)))
  theta, history = _train(theta, jnp.asarray(np.asarray(tr.batches), jnp.int32),
                          as_dev(tr.prev), as_dev(tr.target), as_dev(tr.mask),
                          jnp.asarray(config.lam, dtype), key_train, features,
                          steps=int(config.steps), batch_steps=batch_steps,
                          learning_rate=float(config.learning_rate),
                          use_bias=bool(config.bias))
  return theta, np.asarray(history)


def fit_featurized(runs: Sequence, *, rank: int = 4, lam: float = 1e-3, steps: int = 3000,
                   seed: int = 0, val_runs: Sequence = (), learning_rate: float = 3e-2,
                   batch_steps: int | None = None, bias: bool = True,
                   train_features: Mapping[int, np.ndarray] | None = None
                   ) -> tuple[FitParams, dict]:
  """`--simulator=featurized`: the low-rank fit of `runs`, as linear FitParams.

  Train/test ids are the union of the runs' (as `simulators.fit`). `val_runs` are only
  scored (all-steps MSE of rollouts, in diagnostics["validation_mse"]), never fitted.

  train_features: optional {train id: feature vector [d]} (e.g. `encoder_features`). The
  train factors are then projections of the features, and the returned FitParams cover
  every id of `train_features` too (after the fit's own train ids): examples no fit run
  consumed are simulated from their features instead of being imputed.
  Returns (params, JSON-able diagnostics).
  """
  if not runs:
    raise ValueError("fit_featurized needs at least one fit run")
  overlap = {r.run_id for r in runs} & {r.run_id for r in val_runs}
  if overlap:
    raise ValueError(f"runs {sorted(overlap)} are both fit and validation runs")
  t0 = time.perf_counter()
  train_ids = simulators.union_ids([r.train_ids for r in runs])
  test_ids = simulators.ordered_test_ids(runs)
  tr = design.build_transitions(runs, train_ids=train_ids, test_ids=test_ids)
  config = LowRankConfig(rank=rank, lam=lam, steps=steps, learning_rate=learning_rate,
                         batch_steps=batch_steps, bias=bias, seed=seed)
  if train_features is None:
    theta, history = fit_lowrank(tr, config)
    out_ids, (a, b) = train_ids, materialize(theta)
  else:
    missing = [int(i) for i in train_ids if int(i) not in train_features]
    if missing:
      raise ValueError(f"train_features has no vector for train ids {missing[:10]} "
                       f"({len(missing)} of the fit's {train_ids.size} train ids)")
    fit_feats = np.stack([np.asarray(train_features[int(i)]) for i in train_ids])
    theta, history = fit_lowrank(tr, config, train_features=fit_feats)
    extra = np.asarray(sorted(set(int(i) for i in train_features) - set(train_ids.tolist())),
                       np.int64)
    out_ids = np.concatenate([train_ids, extra])
    all_feats = np.stack([np.asarray(train_features[int(i)]) for i in out_ids])
    a, b = materialize(theta, jnp.asarray(all_feats, theta["pa"].dtype))
  params = FitParams(A=np.asarray(a, np.float32), B=np.asarray(b, np.float32),
                     train_ids=out_ids, test_ids=test_ids, kind="linear", lam=float(lam))
  t1 = time.perf_counter()
  val = {}
  for run in val_runs:
    val[run.run_id] = metrics.all_steps_mse(simulators.simulate_run(params, run), run.losses)
  num_obs = float(np.asarray(tr.mask).sum())
  return params, {
      "simulator": "featurized",
      "kind": "linear",
      "factorization": (("A = a0 1ᵀ + U_A V_Aᵀ, B = b0 1ᵀ + U_B V_Bᵀ" if bias else
                         "A = U_A V_Aᵀ, B = U_B V_Bᵀ")
                        + ("" if train_features is None else "; V = features · P")),
      "config": dataclasses.asdict(config),
      "lam": float(lam),
      "objective_per_obs": {"first": float(history[0]), "final": float(history[-1])},
      "num_obs": num_obs,
      "validation_mse": val,
      "validation_mse_mean": float(np.mean(list(val.values()))) if val else None,
      "fit_runs": [r.run_id for r in runs],
      "val_runs": [r.run_id for r in val_runs],
      "num_train": int(train_ids.size),
      "num_test": int(test_ids.size),
      "num_transitions": int(tr.num_steps),
      "unseen_train_examples": ("mean train factor (= mean of seen A, B columns)"
                                if train_features is None else
                                "projected from train_features (params cover them)"),
      "num_featurized_only": int(params.train_ids.size - train_ids.size),
      "timings_s": {"fit": t1 - t0, "total": time.perf_counter() - t0},
  }


# ------------------------------------------------------------------ features from the model


@functools.partial(jax.jit, static_argnames=("config", "use_ia3"))
def _pooled_encoder(variables, tokens, *, config, use_ia3):
  """Mean over non-pad positions of the final encoder states: tokens [b, l] -> [b, e]."""
  from simfluence_jax.training.models import t5  # pylint: disable=g-import-not-at-top
  mask = tokens > 0
  embedded = jnp.take(variables["params"]["token_embedder"], tokens, axis=0)
  enc_vars = {"params": variables["params"]["encoder"]}
  if use_ia3:
    enc_vars[t5.IA3_COLLECTION] = variables[t5.IA3_COLLECTION]["encoder"]
  encoded = t5.Encoder(config, use_ia3, True).apply(
      enc_vars, embedded.astype(config.compute_dtype), mask).astype(jnp.float32)
  weights = mask.astype(jnp.float32)[..., None]
  return jnp.sum(encoded * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)


def encoder_features(variables: dict, config, examples: Sequence, *, input_length: int,
                     batch_size: int = 64) -> dict[int, np.ndarray]:
  """f(z) for the featurized simulator: {example id: float32 [emb_dim]}.

  The frozen model's encoder (models/t5.py, with IA3 vectors when `variables` holds them)
  reads each example's inputs (tokenized + EOS, padded to `input_length`); the final encoder
  states are averaged over non-pad positions and L2-normalised (a learned projection P then
  maps them to Φ / Ψ, so only directions matter). Pad length does not change a feature.
  """
  from simfluence_jax.training import tasks  # pylint: disable=g-import-not-at-top
  from simfluence_jax.training.models import t5  # pylint: disable=g-import-not-at-top
  ids, rows = [], []
  for ex in examples:
    ex_id = ex["id"] if isinstance(ex, Mapping) else ex.id
    text = ex["inputs"] if isinstance(ex, Mapping) else ex.inputs
    tokens = np.append(tasks.tokenize(text), np.int32(tasks.EOS_ID))
    if tokens.size > input_length:
      raise ValueError(f"example id {ex_id}: inputs are {tokens.size} tokens with EOS but "
                       f"input_length is {input_length}; raise input_length")
    rows.append(np.pad(tokens, (0, input_length - tokens.size)).astype(np.int32))
    ids.append(int(ex_id))
  use_ia3 = t5.IA3_COLLECTION in variables
  out = []
  for start in range(0, len(rows), batch_size):
    chunk = np.stack(rows[start:start + batch_size])
    if chunk.shape[0] < batch_size and len(rows) > batch_size:   # one compiled shape
      chunk = np.pad(chunk, ((0, batch_size - chunk.shape[0]), (0, 0)))
    pooled = np.asarray(_pooled_encoder(variables, jnp.asarray(chunk), config=config,
                                        use_ia3=use_ia3))
    out.append(pooled[:min(batch_size, len(rows) - start)])
  feats = np.concatenate(out) if out else np.zeros((0, config.emb_dim), np.float32)
  feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
  return {i: f.astype(np.float32) for i, f in zip(ids, feats)}


__all__ = ["LowRankConfig", "materialize", "train_factors", "objective", "fit_lowrank",
           "fit_featurized", "encoder_features"]
