"""featurized: the low-rank simulator recovers a planted rank-2 simulator from few runs.

Planted truth: A = U_A V_Aᵀ, B = U_B V_Bᵀ of rank 2 with N(0, σ²) one-step noise. The noise
floor is the held-out all-steps MSE of the *true* simulator. References: a numpy loop of
Eq. 2 for the objective; ridge (simulators.fit, kind linear) as the baseline.
"""

import numpy as np

from simfluence_jax.simulators import design
from simfluence_jax.simulators import featurized
from simfluence_jax.simulators import simfluence as simulators
from simfluence_jax.traces.fit_params import FitParams
from simfluence_jax.traces.contract import RunTrace

from tests import planted_traces

M, N, K, T, SIGMA = 30, 40, 4, 25, 0.01
TRAIN_IDS = np.arange(N, dtype=np.int64) * 2 + 11
TEST_IDS = np.arange(M, dtype=np.int64) + 900


def _planted(seed=0):
  return planted_traces.rank2(M, N, seed)


def _runs(a, b, *, num_runs, seed, prefix, pool=N):
  return planted_traces.linear_runs(a, b, train_ids=TRAIN_IDS, test_ids=TEST_IDS,
                                    num_runs=num_runs, steps=T, batch=K, sigma=SIGMA,
                                    seed=seed, prefix=prefix, pool=pool)


def _truth(a, b):
  return FitParams(A=a.astype(np.float32), B=b.astype(np.float32), train_ids=TRAIN_IDS,
                   test_ids=TEST_IDS, kind="linear", lam=0.0)


def test_objective_matches_numpy_eq2():
  a, b = _planted()
  runs = _runs(a, b, num_runs=2, seed=1, prefix="f")
  tr = design.build_transitions(runs, train_ids=TRAIN_IDS, test_ids=TEST_IDS)
  rng = np.random.default_rng(3)
  theta = {k: rng.standard_normal(s) * 0.1 for k, s in
           [("ua", (M, 3)), ("va", (N, 3)), ("ub", (M, 3)), ("vb", (N, 3)),
            ("a0", (M,)), ("b0", (M,))]}
  batches = np.asarray(tr.batches).copy()
  batches[::3, -1] = -1                                   # padded slots contribute nothing
  lam = 0.7
  got = featurized.objective({k: np.asarray(v, np.float32) for k, v in theta.items()},
                             batches, tr.prev, tr.target, tr.mask, lam)
  a_hat = theta["ua"] @ theta["va"].T + theta["a0"][:, None]
  b_hat = theta["ub"] @ theta["vb"].T + theta["b0"][:, None]
  want = 0.0
  for s in range(tr.num_steps):
    for z in range(M):
      if np.asarray(tr.mask)[s, z]:
        cols = [p for p in batches[s] if p >= 0]
        pred = a_hat[z, cols].sum() * tr.prev[s, z] + b_hat[z, cols].sum()
        want += (tr.target[s, z] - pred) ** 2
  want += lam * sum(np.sum(theta[k] ** 2) for k in ("ua", "va", "ub", "vb"))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_recovers_rank2_near_noise_floor_and_beats_ridge():
  a, b = _planted()
  fit_runs = _runs(a, b, num_runs=3, seed=1, prefix="f")     # S = 75 < 2n = 80
  heldout = _runs(a, b, num_runs=5, seed=2, prefix="h")
  floor = simulators.evaluate(_truth(a, b), heldout)["mse"]["mean"]
  params, diag = featurized.fit_featurized(fit_runs, rank=2, lam=1e-2, steps=3000, seed=0,
                                           val_runs=heldout[:1])
  assert params.kind == "linear" and params.A.shape == (M, N)
  feat = simulators.evaluate(params, heldout)["mse"]["mean"]
  # ridge gets its best λ chosen on the held-out runs themselves (favours the baseline)
  ridge = min(simulators.evaluate(simulators.fit(fit_runs, simulator="linear", lam=lam)[0],
                                  heldout)["mse"]["mean"] for lam in (1e-3, 1e-2, 1e-1, 1.0))
  # measured: floor 2.7e-4, featurized 5.7e-4 (the 3-run estimation error; the one-step
  # objective per observation ends at 1.02e-4 = σ²), best ridge 2.1e-2
  assert feat <= 3 * floor, (feat, floor)
  assert feat * 5 < ridge, (feat, ridge)
  # the objective per observation ends near σ² (the noise floor of one-step errors)
  assert diag["objective_per_obs"]["final"] < 1.5 * SIGMA ** 2
  # one validation run (h0) is scored, not fitted: the same order as the 5-run mean
  assert diag["validation_mse"]["h0"] < 5 * floor, diag["validation_mse"]


def test_minibatch_and_seed_agree_with_full_batch_and_no_recompile():
  a, b = _planted()
  fit_runs = _runs(a, b, num_runs=3, seed=1, prefix="f")
  tr = design.build_transitions(fit_runs, train_ids=TRAIN_IDS, test_ids=TEST_IDS)
  cfg = featurized.LowRankConfig(rank=2, lam=1e-2, steps=3000, learning_rate=3e-2)
  full, _ = featurized.fit_lowrank(tr, cfg)
  size = featurized._train._cache_size()  # pylint: disable=protected-access
  other_seed, _ = featurized.fit_lowrank(tr, featurized.LowRankConfig(
      rank=2, lam=1e-2, steps=3000, learning_rate=3e-2, seed=5))
  assert featurized._train._cache_size() == size  # pylint: disable=protected-access
  mini, _ = featurized.fit_lowrank(tr, featurized.LowRankConfig(
      rank=2, lam=1e-2, steps=3000, learning_rate=3e-2, batch_steps=25))
  # factors are identified only up to rotation: compare the materialised A, B
  # (measured max deviation / max |A|: seed 5.6e-4, minibatch 4.4e-3; B: 1.2e-3, 9.0e-3)
  a_full, b_full = (np.asarray(x) for x in featurized.materialize(full))
  for other in (other_seed, mini):
    a_o, b_o = (np.asarray(x) for x in featurized.materialize(other))
    np.testing.assert_allclose(a_o, a_full, atol=0.01 * np.abs(a_full).max())
    np.testing.assert_allclose(b_o, b_full, atol=0.03 * np.abs(b_full).max())
  # and close to the planted truth (measured 6.0e-2 of max |A|; 3 runs, σ = 0.01)
  np.testing.assert_allclose(a_full, a, atol=0.1 * np.abs(a).max())


# ------------------------------------------------------------------ features (paper §7)

D = 6


def _planted_featurized(seed=0):
  """A = U_A (F P_A)ᵀ, B = U_B (F P_B)ᵀ: train factors are linear in features F [N, D]."""
  rng = np.random.default_rng(seed)
  feats = np.concatenate([np.ones((N, 1)), rng.standard_normal((N, D - 1))], 1)
  ua = np.stack([1 + 0.05 * rng.standard_normal(M), rng.standard_normal(M)], 1)
  ub = np.stack([1 + 0.2 * rng.standard_normal(M), rng.standard_normal(M)], 1)
  pa = np.zeros((D, 2))           # keeps every α(c) = Σ_{i∈c} A_zi < 1: a stable process
  pa[0, 0], pa[1:, 0], pa[1:, 1] = 0.2, 0.003 * rng.standard_normal(D - 1), \
      0.008 * rng.standard_normal(D - 1)
  pb = np.zeros((D, 2))
  pb[0, 0], pb[1:, 0], pb[1:, 1] = 0.02, 0.003 * rng.standard_normal(D - 1), \
      0.006 * rng.standard_normal(D - 1)
  return ua @ (feats @ pa).T, ub @ (feats @ pb).T, feats


def _restrict(runs, pool):
  """Runs that drew only from the first `pool` positions, with train_ids saying so."""
  return [RunTrace(run_id=r.run_id, train_ids=TRAIN_IDS[:pool], test_ids=r.test_ids,
                   batch_size=r.batch_size, curriculum=r.curriculum, losses=r.losses,
                   metadata={}) for r in runs]


def test_features_simulate_unseen_train_examples(tmp_path):
  a, b, feats = _planted_featurized()
  fit_runs = _runs(a, b, num_runs=4, seed=1, prefix="f", pool=28)  # 12 unseen
  heldout = _runs(a, b, num_runs=4, seed=2, prefix="h", pool=N)
  floor = simulators.evaluate(_truth(a, b), heldout)["mse"]["mean"]
  by_id = {int(i): f for i, f in zip(TRAIN_IDS, feats)}
  params, diag = featurized.fit_featurized(fit_runs, rank=2, lam=1e-2, seed=0,
                                           train_features=by_id)
  assert diag["num_featurized_only"] == N - 28
  assert sorted(params.train_ids.tolist()) == sorted(TRAIN_IDS.tolist())
  with_features = simulators.evaluate(params, heldout)["mse"]["mean"]   # nothing imputed
  lowrank, _ = featurized.fit_featurized(fit_runs, rank=2, lam=1e-2, seed=0)
  imputed = simulators.evaluate(lowrank, heldout, unseen="mean")
  assert len(imputed["imputed_train_ids"]) == N - 28
  # the unseen columns are predicted from features: close to the truth, unlike the mean
  cols = np.asarray([int(np.flatnonzero(params.train_ids == i)[0]) for i in TRAIN_IDS[28:]])
  # measured: floor 2.9e-4, features 3.3e-4, low-rank + mean factor 2.9e-3 (ridge + mean
  # 4.1e-3); max |A error| on unseen columns 0.0045 (features) vs 0.033 (mean)
  err_feat = np.abs(params.A[:, cols] - a[:, 28:]).max()
  err_mean = np.abs(lowrank.A.mean(1, keepdims=True) - a[:, 28:]).max()
  assert err_feat * 3 < err_mean, (err_feat, err_mean)
  assert with_features <= 3 * floor, (with_features, floor)
  assert with_features * 3 < imputed["mse"]["mean"], (with_features, imputed["mse"])
  # the fit is an ordinary linear fit for the workspace: save / load / evaluate round trip
  from simfluence_jax.traces import fit_params
  fit_params.save_fit(tmp_path, "feat", params, diag)
  loaded, loaded_diag = fit_params.load_fit(tmp_path, "feat")
  np.testing.assert_array_equal(loaded.A, params.A)
  assert loaded_diag["simulator"] == "featurized"
  assert simulators.evaluate(loaded, heldout)["mse"]["mean"] == with_features


def test_encoder_features_match_full_model_encoder():
  import jax
  from simfluence_jax.training.models import t5
  cfg = t5.T5Config(vocab_size=384, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                    num_encoder_layers=1, num_decoder_layers=1)
  # the real variable tree (eval_shape of init, no compile), filled with random values
  shapes = jax.eval_shape(lambda: t5.init_variables(cfg, jax.random.PRNGKey(0),
                                                    use_ia3=False, input_length=24,
                                                    target_length=4))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(
      lambda x: (0.3 * rng.standard_normal(x.shape)).astype(np.float32), shapes)
  examples = [{"id": 7, "inputs": "Is Paris in France?", "targets": "yes"},
              {"id": 3, "inputs": "Capital of Peru", "targets": "Lima"},
              {"id": 11, "inputs": "x", "targets": "y"}]
  got = featurized.encoder_features(variables, cfg, examples, input_length=24, batch_size=2)
  longer = featurized.encoder_features(variables, cfg, examples, input_length=40)
  assert sorted(got) == [3, 7, 11]
  from simfluence_jax.training import tasks
  # reference: the full model's encoder output (captured intermediate), one padded batch,
  # mean over non-pad positions in numpy
  rows = [np.append(tasks.tokenize(ex["inputs"]), tasks.EOS_ID) for ex in examples]
  tokens = np.zeros((len(rows), 24), np.int32)
  for j, r in enumerate(rows):
    tokens[j, :r.size] = r
  full_model = jax.jit(lambda v, enc, dec: t5.Transformer(cfg).apply(
      v, enc, dec, capture_intermediates=True, mutable=["intermediates"]))
  _, state = full_model(variables, tokens, np.zeros((3, 2), np.int32))
  enc = np.asarray(state["intermediates"]["encoder"]["__call__"][0], np.float64)  # [b, l, e]
  for j, ex in enumerate(examples):
    pooled = enc[j, :rows[j].size].mean(0)
    want = pooled / np.linalg.norm(pooled)
    np.testing.assert_allclose(got[ex["id"]], want, atol=2e-5)
    np.testing.assert_allclose(longer[ex["id"]], want, atol=2e-5)   # pad-length invariant
  assert np.abs(got[7] - got[3]).max() > 1e-2


def test_float64_fit_agrees_with_float32():
  import jax
  a, b = _planted()
  tr = design.build_transitions(_runs(a, b, num_runs=3, seed=1, prefix="f"),
                                train_ids=TRAIN_IDS, test_ids=TEST_IDS)
  cfg = featurized.LowRankConfig(rank=2, lam=1e-2)
  a32 = np.asarray(featurized.materialize(featurized.fit_lowrank(tr, cfg)[0])[0])
  with jax.enable_x64(True):
    tr64 = design.Transitions(batches=tr.batches, prev=np.asarray(tr.prev, np.float64),
                              target=np.asarray(tr.target, np.float64),
                              mask=np.asarray(tr.mask, np.float64), num_train=N)
    theta, history = featurized.fit_lowrank(tr64, cfg)
    a64 = np.asarray(featurized.materialize(theta)[0])
  assert a64.dtype == np.float64 and history.dtype == np.float64
  # same optimum of a non-convex objective from different-precision inits; measured 7.4e-4
  np.testing.assert_allclose(a32, a64, atol=5e-3 * np.abs(a64).max())
