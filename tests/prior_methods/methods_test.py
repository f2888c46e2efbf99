"""TracIn-CP, influence functions, Source and σ-rescaling against independent references."""

import jax

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from simfluence_jax.prior_methods import methods as baselines
from simfluence_jax.training import checkpoints
from simfluence_jax.prior_methods import gradients
from simfluence_jax.training import models
from simfluence_jax.training import tasks
from simfluence_jax.traces import contract as traces
from simfluence_jax.training import trainer
from simfluence_jax.traces.fit_params import FitParams

# Every test here compares with a float64 reference: float64 is on for the module.
pytestmark = pytest.mark.usefixtures("x64")


def _loss_fn(variables, batch, rng):
  del rng
  p, l = variables["params"], variables["ia3"]["scale"]
  h = jnp.tanh(batch["x"] @ p["w"]) * l
  return 0.5 * jnp.sum((h @ p["v"] - batch["y"]) ** 2, axis=-1)


def _variables(seed):
  rng = np.random.default_rng(seed)
  return {"params": {"w": rng.normal(size=(3, 4)), "v": rng.normal(size=(4, 2))},
          "ia3": {"scale": 1.0 + 0.3 * rng.normal(size=4)}}


def _data(n, seed):
  rng = np.random.default_rng(seed)
  return {"x": rng.normal(size=(n, 3)), "y": rng.normal(size=(n, 2))}


def _grad_one(variables, batch, i):
  one = {k: v[i:i + 1] for k, v in batch.items()}
  g = jax.grad(lambda c: _loss_fn({**variables, "ia3": c}, one, None)[0])(variables["ia3"])
  return np.asarray(g["scale"])


def test_tracin_cp_equals_hand_computed_dot_products():
  ckpts = [_variables(0), _variables(1), _variables(2)]
  train, test = _data(5, 10), _data(3, 11)
  eta = 0.05
  spec = gradients.GradientSpec(collection="ia3")
  per_ckpt = [(eta, gradients.per_example_gradients(_loss_fn, v, train, spec),
               gradients.per_example_gradients(_loss_fn, v, test, spec)) for v in ckpts]
  got = baselines.tracin_cp_scores(per_ckpt)
  want = np.zeros((3, 5))
  for v in ckpts:                                # Eq. 11, one dot product at a time
    for j in range(3):
      for i in range(5):
        want[j, i] -= eta * float(_grad_one(v, train, i) @ _grad_one(v, test, j)) / 3
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_projected_tracin_cp_within_jl_bound():
  v, train, test = _variables(3), _data(6, 12), _data(4, 13)
  exact_spec = gradients.GradientSpec(collection="params")
  dim = 4096
  proj_spec = gradients.GradientSpec(collection="params", projection_dim=dim, seed=5)
  g = lambda s, b: gradients.per_example_gradients(_loss_fn, v, b, s)
  exact = baselines.tracin_cp_scores([(1.0, g(exact_spec, train), g(exact_spec, test))])
  proj = baselines.tracin_cp_scores([(1.0, g(proj_spec, train), g(proj_spec, test))])
  eps = gradients.jl_tolerance(dim, 24, failure_prob=1e-3)
  bound = eps * np.outer(np.linalg.norm(g(exact_spec, test), axis=1),
                         np.linalg.norm(g(exact_spec, train), axis=1))
  assert np.all(np.abs(proj - exact) <= bound)


def _grads(seed, n, d, scale=None):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, d)) * (np.arange(1, d + 1) if scale is None else scale)


def test_influence_equals_exact_block_diagonal_solve():
  g_tr, g_te = _grads(0, 12, 5), _grads(1, 3, 5)
  bounds = [(0, 2), (2, 5)]
  got, damping = baselines.influence_scores(g_tr, g_te, g_tr, bounds=bounds, damping=0.4)
  fisher = g_tr.T @ g_tr / 12
  fisher[:2, 2:] = fisher[2:, :2] = 0.0
  want = -g_te @ np.linalg.solve(fisher + 0.4 * np.eye(5), g_tr.T)
  np.testing.assert_allclose(got, want, rtol=1e-10)
  assert damping == 0.4


def test_source_single_stationary_segment_equals_influence():
  """One segment whose checkpoints are all the final one, ηK → ∞ (here ηK = 1e4 with
  eigenvalues + damping >= 0.3, so exp(−ηK(λ+δ)) < 1e-1000): exactly influence functions."""
  g_tr, g_te = _grads(2, 10, 4), _grads(3, 2, 4)
  bounds = [(0, 1), (1, 4)]
  seg = baselines.Segment(eta=1.0, num_steps=10_000, train_grads=np.stack([g_tr, g_tr]))
  got, _ = baselines.source_scores([seg], g_te, bounds=bounds, damping=0.3)
  want, _ = baselines.influence_scores(g_tr, g_te, g_tr, bounds=bounds, damping=0.3)
  np.testing.assert_allclose(got, want, rtol=1e-10)


def test_source_short_horizon_is_first_order():
  """ηK → 0: (I − e^{−ηK(H+δ)})(H+δ)⁻¹ ḡ = ηK ḡ + O((ηK)²): a TracIn-like dot product."""
  g_tr, g_te = _grads(4, 6, 3), _grads(5, 2, 3)
  seg = baselines.Segment(eta=1e-6, num_steps=2, train_grads=g_tr[None])
  got, _ = baselines.source_scores([seg], g_te, bounds=[(0, 3)], damping=0.1)
  want = -2e-6 * g_te @ g_tr.T                   # ηK(λ_max + δ) ≈ 1e-4: error ≲ 1e-4 relative
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-4 * np.abs(want).max())


def test_source_two_segments_match_dense_matrix_exponentials():
  d = 4
  grads = [np.stack([_grads(10 + c, 8, d) for c in range(2)]),
           np.stack([_grads(20 + c, 8, d) for c in range(3)])]
  g_te = _grads(30, 3, d)
  segs = [baselines.Segment(0.01, 5, grads[0]), baselines.Segment(0.02, 7, grads[1])]
  got, _ = baselines.source_scores(segs, g_te, bounds=[(0, d)], damping=0.2)
  delta = np.zeros((8, d))
  for seg in segs:                                # Δ ← S̄_ℓ Δ + r̄_ℓ, dense scipy reference
    flat = seg.train_grads.reshape(-1, d)
    hess = flat.T @ flat / flat.shape[0] + 0.2 * np.eye(d)
    s_bar = scipy.linalg.expm(-seg.eta * seg.num_steps * hess)
    r = ((np.eye(d) - s_bar) @ np.linalg.solve(hess, seg.train_grads.mean(0).T)).T
    delta = delta @ s_bar.T + r
  np.testing.assert_allclose(got, -g_te @ delta.T, rtol=1e-9)


def test_split_segments():
  assert baselines.split_segments([8, 2, 4, 6, 10], 2) == [[2, 4, 6], [8, 10]]
  assert baselines.split_segments([3], 4) == [[3]]


def _run(run_id, curriculum, losses, train_ids, test_ids, metadata=None):
  return traces.RunTrace(run_id=run_id, train_ids=np.asarray(train_ids, np.int64),
                         test_ids=np.asarray(test_ids, np.int64), batch_size=2,
                         curriculum=np.asarray(curriculum, np.int32),
                         losses=np.asarray(losses, np.float32), metadata=metadata or {})


def test_evaluate_rescaled_recovers_planted_sigma():
  params = FitParams(A=np.zeros((2, 3), np.float32),
                     B=np.array([[-0.1, -0.2, 0.05], [0.1, -0.3, -0.1]], np.float32),
                     train_ids=np.array([4, 5, 6]), test_ids=np.array([0, 1]),
                     kind="additive", lam=0.0)
  cur = np.array([[4, 5], [6, -1], [5, 6]])
  l0 = np.array([2.0, 3.0], np.float32)
  pred = np.asarray(baselines.simulators.simulate_curriculum(params, cur, l0), np.float64)
  true = pred.copy()
  true[1:] *= np.array([1.7, 0.6])                 # per test example σ
  run = _run("r", cur, true, [4, 5, 6], [0, 1])
  out = baselines.evaluate_rescaled(params, [run])
  np.testing.assert_allclose(out["sigma"]["r"], [1.7, 0.6], rtol=1e-5)
  assert out["mse"]["mean"] < 1e-10 and out["rescale"] == baselines.RESCALE_NOTE


# ------------------------------------------------------- end to end on a tiny T5 workspace
_CFG = models.T5Config(vocab_size=384, emb_dim=16, num_heads=2, head_dim=4, mlp_dim=16,
                       num_encoder_layers=1, num_decoder_layers=1)


@pytest.fixture(scope="module")
def t5_workspace(tmp_path_factory):
  """2 IA3 runs with checkpoints at steps 2 and 4 (perturbed IA3 vectors), hand-built."""
  ws = tmp_path_factory.mktemp("ws")
  pools = tasks.get_pools("country_yesno")
  train_ids = [e.id for e in pools.train[:6]]
  test_ids = [e.id for e in pools.test[:3]]
  variables = models.init_variables(_CFG, jax.random.PRNGKey(0), use_ia3=True,
                                    input_length=64, target_length=16)
  meta = {"task": "country_yesno", "tuning": "ia3", "optimizer": "adafactor",
          "learning_rate": 0.01, "seed": 0, "model_config": dataclasses.asdict(_CFG),
          "input_length": 64, "target_length": 16}
  rng = np.random.default_rng(0)
  for r in range(2):
    cur = rng.choice(train_ids, size=(4, 2))
    losses = 2.0 + rng.normal(size=(5, 3)) * 0.1
    traces.write_run(ws, _run(f"run_{r}", cur, losses, train_ids, test_ids, meta))
    for step in (2, 4):
      ia3 = jax.tree.map(lambda x: np.asarray(x) + 0.1 * rng.normal(size=x.shape)
                         .astype(np.float32), variables["ia3"])
      checkpoints.save(checkpoints.checkpoint_path(ws / "checkpoints" / f"run_{r}", step),
                       {"params": variables["params"], "ia3": ia3})
  return ws


def test_tracin_cp_end_to_end_on_t5_matches_loop_and_reuses_cache(t5_workspace, monkeypatch):
  ws = t5_workspace
  runs = [traces.read_run(ws, f"run_{r}") for r in range(2)]
  params, diag = baselines.fit(ws, runs, simulator="tracin_cp")
  assert params.kind == "additive" and diag["rescale"] == baselines.RESCALE_NOTE
  assert diag["checkpoints"] == {"run_0": [2, 4], "run_1": [2, 4]}
  pools = tasks.get_pools("country_yesno")
  train = {e.id: e for e in pools.train}
  test = {e.id: e for e in pools.test}
  loss_fn = trainer.t5_loss_fn(models.Transformer(_CFG, use_ia3=True))

  def grad(variables, example):                   # independent: one example, jax.grad
    batch = tasks.encode_examples([example], input_length=64, target_length=16)
    g = jax.grad(lambda c: loss_fn({**variables, "ia3": c}, batch, None)[0])(
        variables["ia3"])
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]).astype(np.float64)

  cols = [int(np.flatnonzero(params.train_ids == i)[0]) for i in (pools.train[0].id,
                                                                  pools.train[3].id)]
  for j, test_id in enumerate(params.test_ids[:2]):
    for col in cols:
      want = 0.0
      for r in range(2):
        for step in (2, 4):
          v = checkpoints.load_variables(ws / "checkpoints" / f"run_{r}", step)
          want -= 0.01 * grad(v, train[int(params.train_ids[col])]) @ grad(
              v, test[int(test_id)]) / 2
      want /= 2                                   # mean over the two fit runs
      np.testing.assert_allclose(params.B[j, col], want, rtol=2e-4, atol=1e-9)
  assert (ws / "gradients" / "run_1" / "checkpoint_4" / "train.npz").is_file()

  def fail(*args, **kwargs):
    raise AssertionError("gradients recomputed instead of read from the cache")
  monkeypatch.setattr(gradients, "per_example_gradients", fail)
  again, _ = baselines.fit(ws, runs, simulator="tracin_cp")
  np.testing.assert_array_equal(again.B, params.B)
  infl, diag = baselines.fit(ws, runs, simulator="influence")     # cached step-4 gradients
  src, _ = baselines.fit(ws, runs, simulator="source",
                         options=baselines.BaselineOptions(segments=2))
  assert np.all(np.isfinite(infl.B)) and np.all(np.isfinite(src.B)) and diag["damping"] > 0
  with pytest.raises(traces.TraceError, match="checkpoint_every=1"):
    baselines.fit(ws, runs, simulator="tracin_cp_all")


def test_hypothetical_linear_rows_use_hypothetical_targets(t5_workspace):
  ws = t5_workspace
  run = traces.read_run(ws, "run_0")
  opts = baselines.BaselineOptions(lam=0.1)
  params, diag = baselines.fit(ws, [run], simulator="hypothetical_linear", options=opts)
  assert params.kind == "linear" and diag["num_transitions"] == 1   # step 2 (4 = T is last)
  rg = baselines.RunGradients(ws, run, train_ids=params.train_ids, test_ids=params.test_ids,
                              options=opts)
  g_tr, g_te = rg.at(2)
  batch = baselines.rollout_lib.ids_to_positions(run.curriculum, params.train_ids)[2]
  rows = baselines._hypothetical_rows(run, rg, [2, 4], params.train_ids, params.test_ids)
  want = run.losses[2] - 0.01 * np.mean(g_te @ g_tr[batch].T, axis=1)
  np.testing.assert_allclose(rows[2][0], want, rtol=1e-5)
  np.testing.assert_array_equal(rows[0][0], batch)


def test_model_settings_from_dict_and_from_older_repr():
  meta = {"task": "country_yesno", "tuning": "ia3", "learning_rate": 0.01,
          "model_config": dataclasses.asdict(_CFG), "input_length": 64, "target_length": 16}
  want = (_CFG, True, 64, 16, "country_yesno", 0.01)
  assert baselines.model_settings(meta, "run x") == want
  assert baselines.model_settings({**meta, "model_config": str(_CFG)}, "run x") == want
  with pytest.raises(traces.TraceError, match="model_config"):
    baselines.model_settings({"task": "t", "tuning": "ia3", "learning_rate": 1.0}, "run x")


def test_tracin_checkpoint_selection(t5_workspace):
  run = traces.read_run(t5_workspace, "run_0")
  rg = baselines.RunGradients(t5_workspace, run, train_ids=run.train_ids,
                              test_ids=run.test_ids, options=baselines.BaselineOptions())
  assert rg.steps("tracin", 2) == [2, 4] and rg.steps("available") == [2, 4]
  assert rg.steps((4,)) == [4]
  with pytest.raises(traces.TraceError, match=r"\[1, 3\]"):
    rg.steps("all")


# ------------------------------------------------------ dense-kernel EK-FAC (full tuning)
def _kernel_problem(seed):
  """Flat gradients [N, 1 + 12 + 1 + 6] with two 'kernels' (3×4 and 2×3) between unmodelled
  columns, from synthetic multi-token statistics; returns (grads, bounds, factors)."""
  rng = np.random.default_rng(seed)
  acts = [rng.normal(size=(9, 4, 3)), rng.normal(size=(9, 2, 2))]
  deltas = [rng.normal(size=(9, 4, 4)), rng.normal(size=(9, 2, 3))]
  layer = [np.einsum("nti,nto->nio", a, d).reshape(9, -1) for a, d in zip(acts, deltas)]
  grads = np.concatenate([rng.normal(size=(9, 1)), layer[0], rng.normal(size=(9, 1)),
                          layer[1]], axis=1)
  factors = [(np.einsum("nti,ntj->ij", a, a) / 9, np.einsum("nti,ntj->ij", d, d) / 9)
             for a, d in zip(acts, deltas)]
  return grads, [(1, 13, 3, 4), (14, 20, 2, 3)], factors


def test_influence_with_dense_factors_equals_kronecker_reference():
  """B = −H (Ĝ + δI)⁻¹ Gᵀ with Ĝ per kernel = (Q_A ⊗ Q_S) diag(Λ*) (Q_A ⊗ Q_S)ᵀ, built as a
  dense numpy matrix from numpy eigenvectors; unmodelled columns contribute nothing."""
  g_tr, bounds, factors = _kernel_problem(0)
  g_te = np.random.default_rng(1).normal(size=(3, g_tr.shape[1]))
  got, damping = baselines.influence_scores(g_tr, g_te, g_tr, bounds=bounds, damping=0.2,
                                            factors=factors)
  want = np.zeros_like(got)
  for (a, b, din, dout), (fa, fs) in zip(bounds, factors):
    basis = np.kron(np.linalg.eigh(fa)[1], np.linalg.eigh(fs)[1])
    eig = np.mean((g_tr[:, a:b] @ basis) ** 2, axis=0)
    inv = basis @ np.diag(1.0 / (eig + 0.2)) @ basis.T
    want -= g_te[:, a:b] @ inv @ g_tr[:, a:b].T
  np.testing.assert_allclose(got, want, rtol=1e-10)
  assert damping == 0.2


def test_source_single_stationary_segment_equals_influence_with_dense_factors():
  g_tr, bounds, factors = _kernel_problem(2)
  g_te = np.random.default_rng(3).normal(size=(2, g_tr.shape[1]))
  seg = baselines.Segment(1.0, 10_000, np.stack([g_tr, g_tr]),
                          baselines.mean_factors([factors, factors]))
  got, _ = baselines.source_scores([seg], g_te, bounds=bounds, damping=0.3)
  want, _ = baselines.influence_scores(g_tr, g_te, g_tr, bounds=bounds, damping=0.3,
                                       factors=factors)
  np.testing.assert_allclose(got, want, rtol=1e-10)


@pytest.fixture(scope="module")
def t5_full_workspace(tmp_path_factory):
  """1 full-tuning run with checkpoints at steps 2 and 4 (perturbed params), hand-built."""
  ws = tmp_path_factory.mktemp("ws_full")
  pools = tasks.get_pools("country_yesno")
  train_ids = [e.id for e in pools.train[:6]]
  test_ids = [e.id for e in pools.test[:3]]
  variables = models.init_variables(_CFG, jax.random.PRNGKey(1), use_ia3=False,
                                    input_length=64, target_length=16)
  meta = {"task": "country_yesno", "tuning": "full", "optimizer": "adafactor",
          "learning_rate": 0.01, "seed": 0, "model_config": dataclasses.asdict(_CFG),
          "input_length": 64, "target_length": 16}
  rng = np.random.default_rng(1)
  traces.write_run(ws, _run("run_0", rng.choice(train_ids, size=(4, 2)),
                            2.0 + rng.normal(size=(5, 3)) * 0.1, train_ids, test_ids, meta))
  for step in (2, 4):
    params = jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.normal(size=x.shape)
                          .astype(np.float32), variables["params"])
    checkpoints.save(checkpoints.checkpoint_path(ws / "checkpoints" / "run_0", step),
                     {"params": params})
  return ws


def test_influence_ekfac_dense_end_to_end_on_full_tuning(t5_full_workspace, t5_workspace):
  """curvature="ekfac_dense": exact "params" gradients (cached), K-FAC factors of the 19 T5
  dense kernels over the train pool at T; B equals influence_scores on those pieces, and
  zeroing every non-kernel gradient column (embeddings, norms, position tables) changes
  nothing. Source runs with per-segment factors. IA3 runs / projections are errors."""
  ws = t5_full_workspace
  runs = [traces.read_run(ws, "run_0")]
  opts = baselines.BaselineOptions(curvature="ekfac_dense")
  params, diag = baselines.fit(ws, runs, simulator="influence", options=opts)
  assert diag["curvature"] == "ekfac_dense" and diag["gradient_spec"]["projection_dim"] is None
  rg = baselines.RunGradients(ws, runs[0], train_ids=params.train_ids,
                              test_ids=params.test_ids, options=opts)
  g_tr, g_te = rg.at(4)                                     # from the cache
  bounds, factors = rg.kernel_factors(4)
  assert len(bounds) == 19
  keep = np.zeros(g_tr.shape[1], bool)
  for a, b, _, _ in bounds:
    keep[a:b] = True
  assert 0 < keep.sum() < keep.size
  want, _ = baselines.influence_scores(np.where(keep, g_tr, 0.0), np.where(keep, g_te, 0.0),
                                       np.where(keep, g_tr, 0.0), bounds=bounds,
                                       damping=diag["damping"], factors=factors)
  np.testing.assert_allclose(params.B, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
  src, sdiag = baselines.fit(ws, runs, simulator="source",
                             options=dataclasses.replace(opts, segments=2))
  assert np.all(np.isfinite(src.B)) and sdiag["curvature"] == "ekfac_dense"
  with pytest.raises(ValueError, match="exact kernel gradients"):
    baselines.fit(ws, runs, simulator="influence",
                  options=dataclasses.replace(opts, projection_dim=64))
  with pytest.raises(traces.TraceError, match="full fine-tuning"):
    baselines.fit(t5_workspace, [traces.read_run(t5_workspace, "run_0")],
                  simulator="influence", options=opts)
  with pytest.raises(ValueError, match="unknown curvature"):
    baselines.fit(ws, runs, simulator="influence",
                  options=dataclasses.replace(opts, curvature="kfac"))
