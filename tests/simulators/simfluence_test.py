"""simulators.fit / evaluate, and the fit / simulate / evaluate binaries on a hand-made workspace.

References are independent of the library: a workspace written with numpy + json alone, a
dense float64 ridge solve written here, python-loop rollouts, scipy.stats.spearmanr.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from simfluence_jax.traces import fit_params
from simfluence_jax.simulators import simfluence as simulators

N_POOL = 12
TRAIN_IDS = np.arange(N_POOL, dtype=np.int64) * 7 + 100  # ids are not positions
TEST_IDS = np.array([5, 900, 31], dtype=np.int64)
K = 2


def _planted(seed=0):
  rng = np.random.default_rng(seed)
  a = rng.uniform(0.40, 0.52, size=(TEST_IDS.size, N_POOL))  # α ≈ 0.9 per step (k=2)
  b = rng.uniform(-0.05, 0.05, size=(TEST_IDS.size, N_POOL))
  return a, b


def _loop_rollout(a, b, kind, positions, l0):
  out = [np.asarray(l0, np.float64)]
  for row in positions:
    scale = len(row) / sum(1 for p in row if p >= 0)      # short batch: k × its mean
    alpha = np.ones(a.shape[0]) if kind == "additive" else scale * sum(
        a[:, p] for p in row if p >= 0)
    beta = np.zeros(a.shape[0]) if kind == "multiplicative" else scale * sum(
        b[:, p] for p in row if p >= 0)
    out.append(alpha * out[-1] + beta)
  return np.stack(out)


def _write_workspace(root: pathlib.Path, num_runs=8, steps=18, noise=0.0, seed=0):
  """A workspace written by hand in the contract's format (numpy + json only)."""
  a, b = _planted(seed)
  rng = np.random.default_rng(seed + 1)
  for r in range(num_runs):
    run_dir = root / "runs" / f"r{r:02d}"
    run_dir.mkdir(parents=True)
    pos = np.stack([rng.choice(N_POOL, size=K, replace=False) for _ in range(steps)])
    l0 = rng.uniform(2.0, 4.0, size=TEST_IDS.size)
    losses = _loop_rollout(a, b, "linear", pos, l0)
    losses[1:] += noise * rng.standard_normal(losses[1:].shape)
    np.save(run_dir / "curriculum.npy", TRAIN_IDS[pos].astype(np.int32))
    np.save(run_dir / "losses.npy", losses.astype(np.float32))
    (run_dir / "run.json").write_text(json.dumps({
        "schema": 1, "run_id": f"r{r:02d}", "train_ids": TRAIN_IDS.tolist(),
        "test_ids": TEST_IDS.tolist(), "batch_size": K, "num_steps": steps,
        "seed": r}))
  return a, b


def _dense_ridge(runs, kind, lam):
  """Eq. 13 solved per test example with an explicit design matrix, float64."""
  a_out = np.zeros((TEST_IDS.size, N_POOL))
  b_out = np.zeros((TEST_IDS.size, N_POOL))
  pos_of = {int(t): i for i, t in enumerate(TRAIN_IDS)}
  for j in range(TEST_IDS.size):
    rows, ys = [], []
    for run in runs:
      losses = np.asarray(run.losses, np.float64)
      for t, batch in enumerate(np.asarray(run.curriculum), start=1):
        q = np.zeros(N_POOL)
        for i in batch:
          if i >= 0:
            q[pos_of[int(i)]] += 1
        x, y = losses[t - 1, j], losses[t, j]
        if kind == "linear":
          rows.append(np.concatenate([x * q, q])); ys.append(y)
        elif kind == "additive":
          rows.append(q); ys.append(y - x)
        else:
          rows.append(x * q); ys.append(y)
    x_mat, y_vec = np.array(rows), np.array(ys)
    w = np.linalg.solve(x_mat.T @ x_mat + lam * np.eye(x_mat.shape[1]), x_mat.T @ y_vec)
    if kind == "linear":
      a_out[j], b_out[j] = w[:N_POOL], w[N_POOL:]
    elif kind == "additive":
      b_out[j] = w
    else:
      a_out[j] = w
  return a_out, b_out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
  root = tmp_path_factory.mktemp("ws")
  planted = _write_workspace(root, noise=0.02)
  return root, planted


@pytest.mark.parametrize("kind", ["linear", "additive", "multiplicative"])
def test_fit_matches_dense_float64_ridge(workspace, kind):
  root, _ = workspace
  runs = simulators.read_runs(root, ["r00", "r01", "r02", "r03", "r04"])
  params, diag = simulators.fit(runs, simulator=kind, lam=0.3)
  want_a, want_b = _dense_ridge(runs, kind, 0.3)
  np.testing.assert_array_equal(params.train_ids, TRAIN_IDS)
  np.testing.assert_array_equal(params.test_ids, TEST_IDS)
  # float32 production solve vs float64 dense reference: relative to the largest parameter.
  scale = max(np.abs(want_a).max(), np.abs(want_b).max())
  np.testing.assert_allclose(params.A, want_a, atol=2e-4 * scale)
  np.testing.assert_allclose(params.B, want_b, atol=2e-4 * scale)
  assert diag["num_transitions"] == 5 * 18
  assert diag["kind"] == kind


def test_lambda_is_chosen_by_validation_rollout_mse(workspace):
  root, _ = workspace
  fit_runs = simulators.read_runs(root, ["r00", "r01", "r02", "r03"])
  val_runs = simulators.read_runs(root, ["r04", "r05"])
  grid = (1e-3, 1.0, 30.0)
  params, diag = simulators.fit(fit_runs, simulator="linear_paper", lam_grid=grid,
                                val_runs=val_runs)
  want = {}
  for lam in grid:
    a, b = _dense_ridge(fit_runs, "linear", lam)
    errs = []
    for run in val_runs:
      pos = np.searchsorted(TRAIN_IDS, run.curriculum)
      pred = _loop_rollout(a, b, "linear", pos, run.losses[0])
      errs.append(np.mean((pred[1:] - run.losses[1:]) ** 2))
    want[lam] = np.mean(errs)
  best = min(want, key=want.get)
  assert params.lam == best
  for lam in grid:
    assert diag["validation_mse"][f"paper lam={lam!r}"] == pytest.approx(want[lam], rel=1e-3)


def test_tracin_ideal_alias_is_additive(workspace):
  root, _ = workspace
  runs = simulators.read_runs(root, ["r00", "r01"])
  p1, _ = simulators.fit(runs, simulator="tracin_ideal", lam=0.1)
  p2, _ = simulators.fit(runs, simulator="additive", lam=0.1)
  assert p1.kind == "additive"
  np.testing.assert_array_equal(p1.B, p2.B)
  np.testing.assert_array_equal(p1.A, np.zeros_like(p1.A))


def test_evaluate_matches_independent_metrics(workspace):
  root, _ = workspace
  params, _ = simulators.fit(simulators.read_runs(root, ["r00", "r01", "r02", "r03"]),
                             simulator="linear", lam=0.1)
  held = simulators.read_runs(root, ["r06", "r07"])
  result = simulators.evaluate(params, held)
  mses, rhos = [], []
  for run in held:
    pos = np.searchsorted(TRAIN_IDS, run.curriculum)
    pred = _loop_rollout(np.asarray(params.A, np.float64), np.asarray(params.B, np.float64),
                         "linear", pos, run.losses[0])
    mses.append(np.mean((pred[1:] - run.losses[1:]) ** 2))
    rhos.append(stats.spearmanr(pred[-1], run.losses[-1]).statistic)
  assert result["mse"]["mean"] == pytest.approx(np.mean(mses), rel=1e-4)
  assert result["mse"]["std"] == pytest.approx(np.std(mses), rel=1e-3, abs=1e-9)
  assert result["spearman"]["mean"] == pytest.approx(np.mean(rhos), abs=1e-6)
  assert [r["run_id"] for r in result["per_run"]] == ["r06", "r07"]


def test_noise_free_planted_simulator_is_recovered(tmp_path):
  a, b = _write_workspace(tmp_path, num_runs=6, steps=30, noise=0.0, seed=3)
  runs = simulators.read_runs(tmp_path, [f"r{r:02d}" for r in range(6)])
  params, _ = simulators.fit(runs, simulator="linear", lam=1e-7)
  np.testing.assert_allclose(params.A, a, atol=2e-3)
  np.testing.assert_allclose(params.B, b, atol=5e-3)


def test_simulate_unknown_id_names_it(workspace):
  root, _ = workspace
  params, _ = simulators.fit(simulators.read_runs(root, ["r00"]), simulator="additive",
                             lam=1.0)
  curriculum = np.array([[TRAIN_IDS[0], 4242]], np.int32)
  with pytest.raises(ValueError, match=r"my\.npy.*4242"):
    simulators.simulate_curriculum(params, curriculum, np.ones(3, np.float32),
                                   curriculum_name="my.npy")


def _run_binary(module, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", f"simfluence_jax.{module}", *args],
                        capture_output=True, text=True, env=env, timeout=300)


def test_binaries_end_to_end_and_bad_inputs(workspace, tmp_path):
  root, _ = workspace
  ws = f"--workspace={root}"
  res = _run_binary("fit", ws, "--simulator=linear", "--fit_runs=r00,r01,r02,r03",
                    "--val_runs=r04,r05", "--lam_grid=0.01,1", "--name=lin")
  assert res.returncode == 0, res.stderr
  params, diag = fit_params.load_fit(root, "lin")
  assert diag["lam"] in (0.01, 1.0) and params.kind == "linear"
  # Everything else comes through gin: here the λ grid, as a T5X-style --gin.NAME=VALUE.
  res = _run_binary("fit", ws, "--simulator=additive", "--fit_runs=r00,r01",
                    "--val_runs=r04", "--gin.fit_options.lam_grid=[0.5]", "--name=add_gin")
  assert res.returncode == 0, res.stderr
  assert fit_params.load_fit(root, "add_gin")[1]["lam"] == 0.5
  with np.load(root / "fits" / "lin" / "params.npz", allow_pickle=False) as npz:
    assert npz["A"].dtype == np.float32 and npz["A"].shape == (3, N_POOL)
    np.testing.assert_array_equal(npz["train_ids"], TRAIN_IDS)

  # simulate: output equals a python-loop rollout of the saved parameters.
  cur = TRAIN_IDS[np.array([[0, 1], [2, 3], [4, -1]]) % N_POOL].astype(np.int32)
  cur[2, 1] = -1
  np.save(tmp_path / "c.npy", cur)
  l0 = np.array([3.0, 2.5, 1.0], np.float32)
  np.save(tmp_path / "l0.npy", l0)
  out = tmp_path / "out.npy"
  res = _run_binary("simulate", ws, "--fit=lin", f"--curriculum={tmp_path}/c.npy",
                    f"--initial_losses={tmp_path}/l0.npy", f"--output={out}")
  assert res.returncode == 0, res.stderr
  want = _loop_rollout(np.asarray(params.A, np.float64), np.asarray(params.B, np.float64),
                       "linear", np.array([[0, 1], [2, 3], [4, -1]]), l0)
  got = np.load(out)
  assert got.dtype == np.float32 and got.shape == (4, 3)
  np.testing.assert_allclose(got, want, rtol=1e-5)

  # evaluate: metrics.json equals the library's evaluate on the same fit.
  res = _run_binary("evaluate", ws, "--fit=lin", "--runs=r06,r07",
                    f"--output={tmp_path}/m.json")
  assert res.returncode == 0, res.stderr
  written = json.loads((tmp_path / "m.json").read_text())
  lib = simulators.evaluate(params, simulators.read_runs(root, ["r06", "r07"]))
  assert written["mse"]["mean"] == pytest.approx(lib["mse"]["mean"], rel=1e-6)
  assert written["spearman"] == pytest.approx(lib["spearman"])

  # Bad inputs: exit status 2, one line naming the thing at fault, nothing overwritten.
  bad_cur = cur.copy(); bad_cur[1, 0] = 4242
  np.save(tmp_path / "bad_c.npy", bad_cur)
  np.save(tmp_path / "nan_l0.npy", np.array([1.0, np.nan, 2.0], np.float32))
  np.save(tmp_path / "short_l0.npy", np.array([1.0, 2.0], np.float32))
  before = out.read_bytes()
  cases = [
      (["simulate", ws, "--fit=lin", f"--curriculum={tmp_path}/bad_c.npy",
        f"--initial_losses={tmp_path}/l0.npy", f"--output={out}"], r"bad_c\.npy.*4242"),
      (["simulate", ws, "--fit=lin", f"--curriculum={tmp_path}/c.npy",
        f"--initial_losses={tmp_path}/nan_l0.npy", f"--output={out}"], r"nan_l0\.npy.*900"),
      (["simulate", ws, "--fit=lin", f"--curriculum={tmp_path}/c.npy",
        f"--initial_losses={tmp_path}/short_l0.npy", f"--output={out}"],
       r"short_l0\.npy.*\[3\]"),
      (["evaluate", ws, "--fit=lin", "--runs=r06,r99"], r"r99"),
      (["fit", ws, "--fit_runs=r00,nope", "--lam=1", "--name=x"], r"nope"),
  ]
  for args, pattern in cases:
    res = _run_binary(*args)
    assert res.returncode == 2, (args, res.stderr)
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"simfluence_jax.{args[0]}: error:"), res.stderr
    assert __import__("re").search(pattern, last), (pattern, last)
  assert out.read_bytes() == before
  assert not (root / "fits" / "x").exists()
