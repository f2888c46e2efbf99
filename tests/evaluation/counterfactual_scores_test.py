"""Counterfactual scores against hand computations: Δ, within-group Pearson, sign, the
all-steps Δ over recorded steps, the datamodeling score, and σ from fit runs."""

import numpy as np
import pytest

from simfluence_jax.evaluation import counterfactual_scores as cs
from simfluence_jax.traces.contract import RunTrace


def test_summary_by_hand():
  # Two edits × two test examples, groups "a" (first) and "b" (second) in each edit.
  p = cs.Pairs(edit=np.array([0, 0, 1, 1]), group=np.array(["a", "b", "a", "b"], object),
               obs=np.array([1.0, -1.0, 2.0, 0.0]), sim=np.array([2.0, 0.0, 3.0, 2.0]))
  s = cs.summarize(p)
  assert s["n"] == 4
  assert s["pearson"] == pytest.approx(np.corrcoef(p.obs, p.sim)[0, 1], abs=1e-12)
  # within: each (edit, group) holds one pair, so every centred value is 0 -> undefined
  assert np.isnan(s["pearson_within"])
  # signs: (+,+) (-,0) (+,+) (obs 0: left out) -> 2 of 3
  assert s["sign"] == pytest.approx(2 / 3)
  assert s["mean_obs"] == pytest.approx(0.5) and s["mean_sim"] == pytest.approx(1.75)
  assert s["by_answer"]["a"] == {"mean_obs": 1.5, "mean_sim": 2.5, "n": 2}
  assert s["by_answer"]["b"] == {"mean_obs": -0.5, "mean_sim": 1.0, "n": 2}
  assert s["sign_of_mean"] is False          # group b: observed < 0, simulated > 0


def test_within_group_pearson_removes_each_groups_mean_per_edit():
  # One edit, group a = {z0, z1}, group b = {z2, z3}: the simulation gets the group effect
  # wrong (b ≫ a) but the order inside each group right.
  obs = np.array([0.1, 0.3, 1.0, 1.4])
  sim = np.array([5.0, 7.0, -3.0, 1.0])
  p = cs.Pairs(edit=np.zeros(4, int), group=np.array(["a", "a", "b", "b"], object),
               obs=obs, sim=sim)
  s = cs.summarize(p)
  wo = np.array([-0.1, 0.1, -0.2, 0.2])      # obs minus its group mean, by hand
  ws = np.array([-1.0, 1.0, -2.0, 2.0])
  assert s["pearson_within"] == pytest.approx(np.corrcoef(wo, ws)[0, 1], abs=1e-12)
  assert s["pearson_within"] == pytest.approx(1.0)
  assert s["pearson"] < 0                   # pooled, the wrong group effect dominates


def test_all_steps_delta_uses_steps_recorded_in_both():
  e = np.array([[1.0, 9.0], [2.0, np.nan], [3.0, 5.0]])
  b = np.array([[1.0, 9.0], [1.0, 1.0], [1.0, 2.0], [0.0, 0.0]])   # longer base run
  np.testing.assert_allclose(cs.all_steps_delta(e, b), [(1.0 + 2.0) / 2, 3.0])
  np.testing.assert_allclose(cs.mean_delta_trajectory(e, b), [0.0, 1.0, 2.5])


def _run(run_id, losses, base=None, kind="k"):
  losses = np.asarray(losses, np.float32)
  meta = {"counterfactual": {"base_run": base, "kind": kind}} if base else {}
  return RunTrace(run_id=run_id, train_ids=np.arange(2, dtype=np.int64),
                  test_ids=np.arange(losses.shape[1], dtype=np.int64), batch_size=1,
                  curriculum=np.zeros((losses.shape[0] - 1, 1), np.int32), losses=losses,
                  metadata=meta)


def test_score_method_on_runs_by_hand():
  base = _run("b", [[3, 3, 3], [2, 2, 2]])
  e1 = _run("e1", [[3, 3, 3], [2.5, 1.0, 2.0]], "b", "remove")
  e2 = _run("e2", [[3, 3, 3], [2.0, 3.0, 1.0]], "b", "reverse")
  answers = {0: "x", 1: "x", 2: "y"}
  # the exact predictor: perfect scores
  exact = cs.score_method(lambda r: r.losses, [e1, e2], {"b": base}, answers, cs.kind_of_run)
  assert exact["overall"]["pearson"] == pytest.approx(1.0)
  assert exact["overall"]["sign"] == pytest.approx(1.0)
  assert exact["kinds"]["remove"]["mean_obs"] == pytest.approx((0.5 - 1.0 + 0.0) / 3)
  assert exact["overall"]["sign_of_mean"] is True
  # a predictor of twice every loss: Δ_sim = 2 Δ_obs exactly, pair by pair
  raw = {}
  twice = cs.score_method(lambda r: 2 * r.losses, [e1, e2], {"b": base}, answers,
                          cs.kind_of_run, raw=raw)
  assert twice["overall"]["pearson"] == pytest.approx(1.0)
  assert twice["overall"]["mean_sim"] == pytest.approx(2 * exact["overall"]["mean_obs"])
  want_obs = {"remove": e1.losses[-1] - base.losses[-1],
              "reverse": e2.losses[-1] - base.losses[-1]}
  np.testing.assert_allclose(raw["obs"], np.r_[want_obs["remove"], want_obs["reverse"]],
                             atol=1e-6)                       # kinds in sorted order
  np.testing.assert_allclose(raw["sim"], 2 * raw["obs"], atol=1e-6)
  assert raw["kind"].tolist() == ["remove"] * 3 + ["reverse"] * 3
  # over all steps (one step here): the same Δ, per kind too
  assert twice["kinds_all_steps"]["remove"]["pearson"] == pytest.approx(1.0)
  assert exact["kinds_all_steps"]["reverse"]["mean_obs"] == pytest.approx(
      float(np.mean(e2.losses[1] - base.losses[1])))
  with pytest.raises(KeyError, match="base run 'b' is not loaded"):
    cs.score_method(lambda r: r.losses, [e1], {}, answers, cs.kind_of_run)


def test_datamodeling_score_and_sigma_from_fit_runs():
  base = _run("b", [[1, 1], [1, 1]])
  halves = [_run(f"h{i}", [[1, 1], [1 + i, 2 - i]], "b", "half_subset") for i in range(3)]
  got = cs.score_method(lambda r: r.losses, halves, {"b": base}, {}, cs.kind_of_run)
  assert got["datamodeling"]["mean"] == pytest.approx(1.0)
  assert got["datamodeling"]["n_defined"] == 2
  flipped = cs.score_method(lambda r: -r.losses, halves, {"b": base}, {}, cs.kind_of_run)
  assert flipped["datamodeling"]["mean"] == pytest.approx(-1.0)
  # σ = Σ L̂ L / Σ L̂² over steps ≥ 1 of the given runs, per test example
  run = _run("f", [[9, 9], [2, 4], [1, np.nan]])
  pred = lambda r: np.array([[9, 9], [1, 2], [1, 2]], np.float64)
  np.testing.assert_allclose(cs.sigma_from_runs(pred, [run]), [(2 + 1) / 2, 4 * 2 / 4])
