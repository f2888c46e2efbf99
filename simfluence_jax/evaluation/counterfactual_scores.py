"""Every method scored on the change it predicts: edited minus base runs, observed vs simulated.

For an edited run e of base run b and test example z:

    Δ_obs(e, z) = L^e_final(z) − L^b_final(z)      (the observed final losses; always recorded)
    Δ_sim(e, z) = L̂^e_final(z) − L̂^b_final(z)     (the method's rollouts, each from its own L_0)

and Δ over all steps: the mean over steps t ≥ 1 recorded in both runs of L^e_t − L^b_t (same
for the simulation). Per edit kind and overall, over all (e, z) pairs:

  pearson, spearman    of Δ_sim vs Δ_obs (pooled);
  pearson_within       Pearson after removing, per edit and answer group (test examples with
                       the same target), the group's mean Δ from Δ_obs and from Δ_sim — what
                       a method knows beyond "which label does this edit favour";
  sign                 the share of pairs with sign(Δ_sim) = sign(Δ_obs) (Δ_obs ≠ 0);
  mean_obs, mean_sim   mean Δ, also per answer group (`by_answer`), with `sign_of_mean` ok?;
  n                    pairs.
The datamodeling score (Ilyas et al. 2022): per test example, Spearman over the half-subset
runs of predicted vs observed final loss, averaged over test examples where defined
(yardstick.metrics.across_run_score). Methods predict through `Predictor`s: a fitted
simulator's rollout (σ-rescaled with σ fitted on the fit runs for TracIn-CP-style fits: no
ground truth exists for an edit) or a no-curriculum baseline.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import numpy as np

from simfluence_jax.traces.contract import RunTrace
from simfluence_jax.yardstick import metrics
from simfluence_jax.yardstick import scoring

Predictor = Callable[[RunTrace], np.ndarray]      # run -> [T+1, m] predicted losses
SCORE_KEYS = ("pearson", "pearson_within", "spearman", "sign", "mean_obs", "mean_sim", "n")


@dataclasses.dataclass(frozen=True)
class Pairs:
  """Δ per (edit, test example), flattened: one entry per pair."""
  edit: np.ndarray        # int [N] index of the edit
  group: np.ndarray       # object [N] the test example's answer
  obs: np.ndarray         # float64 [N]
  sim: np.ndarray         # float64 [N]


def final(losses: np.ndarray) -> np.ndarray:
  """The last row of a [T+1, m] trajectory (the trace contract records it always)."""
  return np.asarray(losses, np.float64)[-1]


def all_steps_delta(edited: np.ndarray, base: np.ndarray) -> np.ndarray:
  """[m] mean over steps t ≥ 1 recorded (finite) in both of edited_t − base_t (NaN if none)."""
  t = min(edited.shape[0], base.shape[0])
  d = np.asarray(edited, np.float64)[1:t] - np.asarray(base, np.float64)[1:t]
  ok = np.isfinite(d)
  count = ok.sum(0)
  return np.where(count > 0, np.where(ok, d, 0.0).sum(0) / np.maximum(count, 1), np.nan)


def mean_delta_trajectory(edited: np.ndarray, base: np.ndarray) -> np.ndarray:
  """[min(T_e, T_b) + 1] mean over test examples of edited_t − base_t (NaN: not recorded)."""
  t = min(edited.shape[0], base.shape[0])
  d = np.asarray(edited, np.float64)[:t] - np.asarray(base, np.float64)[:t]
  ok = np.isfinite(d)
  count = ok.sum(1)
  return np.where(count > 0, np.where(ok, d, 0.0).sum(1) / np.maximum(count, 1), np.nan)


def _stack_nan(rows: Sequence[np.ndarray]) -> np.ndarray:
  """Mean over ragged rows (NaN-padded to the longest), ignoring NaN: [T_max]."""
  width = max(r.size for r in rows)
  out = np.full((len(rows), width), np.nan)
  for i, r in enumerate(rows):
    out[i, :r.size] = r
  with np.errstate(all="ignore"):
    count = np.isfinite(out).sum(0)
    return np.where(count > 0, np.nansum(out, 0) / np.maximum(count, 1), np.nan)


def _pearson(x, y) -> float:
  if x.size < 2 or np.std(x) == 0 or np.std(y) == 0:
    return float("nan")
  return float(np.corrcoef(x, y)[0, 1])


def summarize(p: Pairs) -> dict:
  """The SCORE_KEYS of a set of pairs (non-finite pairs dropped), plus `by_answer` and
  `sign_of_mean` (True when mean Δ_sim has the sign of mean Δ_obs overall and in every
  answer group)."""
  ok = np.isfinite(p.obs) & np.isfinite(p.sim)
  obs, sim, edit, group = p.obs[ok], p.sim[ok], p.edit[ok], p.group[ok]
  out = {"n": int(obs.size)}
  if not obs.size:
    return {**{k: float("nan") for k in SCORE_KEYS if k != "n"}, **out, "by_answer": {},
            "sign_of_mean": None}
  wo, ws = obs.copy(), sim.copy()
  for key in set(zip(edit.tolist(), group.tolist())):
    sel = (edit == key[0]) & (group == key[1])
    wo[sel] -= obs[sel].mean()
    ws[sel] -= sim[sel].mean()
  nz = obs != 0
  out.update(pearson=_pearson(obs, sim), pearson_within=_pearson(wo, ws),
             spearman=metrics.spearman(obs, sim),
             sign=float(np.mean(np.sign(sim[nz]) == np.sign(obs[nz]))) if nz.any()
             else float("nan"),
             mean_obs=float(obs.mean()), mean_sim=float(sim.mean()))
  by = {}
  for g in sorted(set(group.tolist())):
    sel = group == g
    by[str(g)] = {"mean_obs": float(obs[sel].mean()), "mean_sim": float(sim[sel].mean()),
                  "n": int(sel.sum())}
  out["by_answer"] = by
  means = [(out["mean_obs"], out["mean_sim"])] + [(v["mean_obs"], v["mean_sim"])
                                                   for v in by.values()]
  out["sign_of_mean"] = bool(all(np.sign(o) == np.sign(s) for o, s in means))
  return out


def score_method(predict: Predictor, edited: Sequence[RunTrace],
                 bases: Mapping[str, RunTrace], test_answers: Mapping[int, str],
                 kind_of: Callable[[RunTrace], str], raw: dict | None = None) -> dict:
  """{"overall", "kinds": {kind: summary}, "overall_all_steps", "kinds_all_steps",
  "datamodeling"} of one method (the *_all_steps ones score the mean Δ over recorded steps).

  edited: the retrained edited runs; each names its base in metadata["counterfactual"]
  ["base_run"], which must be in `bases` (a KeyError names the run otherwise).
  raw: when given, filled with the per-pair arrays behind the scores (for plots):
  "kind" [N], "obs" [N], "sim" [N] (Δ final), and "trajectories" {kind: (obs [T], sim [T])},
  the mean Δ_t over the kind's edits and test examples.
  """
  cache: dict[str, np.ndarray] = {}

  def pred(run):
    if run.run_id not in cache:
      cache[run.run_id] = np.asarray(predict(run), np.float64)
    return cache[run.run_id]

  rows: dict[str, list] = {}
  rows_all: dict[str, list] = {}
  trajs: dict[str, list] = {}
  for e_idx, run in enumerate(edited):
    base_id = run.metadata["counterfactual"]["base_run"]
    if base_id not in bases:
      raise KeyError(f"edited run {run.run_id!r}: its base run {base_id!r} is not loaded")
    base = bases[base_id]
    if list(run.test_ids) != list(base.test_ids):
      raise ValueError(f"edited run {run.run_id!r} and its base {base_id!r} record different "
                       "test examples")
    groups = np.asarray([test_answers.get(int(t), "") for t in run.test_ids], object)
    idx = np.full(groups.size, e_idx)
    d_obs = final(run.losses) - final(base.losses)
    d_sim = final(pred(run)) - final(pred(base))
    rows.setdefault(kind_of(run), []).append((idx, groups, d_obs, d_sim))
    trajs.setdefault(kind_of(run), []).append(
        (mean_delta_trajectory(run.losses, base.losses),
         mean_delta_trajectory(pred(run), pred(base))))
    rows_all.setdefault(kind_of(run), []).append(
        (idx, groups, all_steps_delta(run.losses, base.losses),
         all_steps_delta(pred(run), pred(base))))

  def pairs(parts):
    return Pairs(*(np.concatenate([p[j] for p in parts]) for j in range(4)))
  out = {"kinds": {k: summarize(pairs(v)) for k, v in sorted(rows.items())}}
  everything = [p for v in rows.values() for p in v]
  out["overall"] = summarize(pairs(everything)) if everything else summarize(
      Pairs(*(np.zeros(0),) * 4))
  every_step = [p for v in rows_all.values() for p in v]
  out["overall_all_steps"] = (summarize(pairs(every_step)) if every_step
                              else summarize(Pairs(*(np.zeros(0),) * 4)))
  out["kinds_all_steps"] = {k: summarize(pairs(v)) for k, v in sorted(rows_all.items())}
  if raw is not None:
    raw["kind"] = np.asarray([k for k, v in sorted(rows.items()) for p in v
                              for _ in range(p[2].size)])
    raw["obs"] = np.concatenate([p[2] for _, v in sorted(rows.items()) for p in v])
    raw["sim"] = np.concatenate([p[3] for _, v in sorted(rows.items()) for p in v])
    raw["trajectories"] = {k: (_stack_nan([a for a, _ in v]), _stack_nan([b for _, b in v]))
                           for k, v in trajs.items()}
  halves = [r for r in edited if kind_of(r) == "half_subset"]
  if len(halves) >= 2:
    score = metrics.across_run_score({r.run_id: pred(r) for r in halves},
                                     {r.run_id: r.losses for r in halves})
    out["datamodeling"] = score
  return out


def kind_of_run(run: RunTrace) -> str:
  cf = run.metadata.get("counterfactual", {})
  return str(cf.get("kind") or cf.get("name") or run.run_id)


def sigma_from_runs(predict: Predictor, runs: Sequence[RunTrace]) -> np.ndarray:
  """Per test example σ of the paper's §5 TracIn-CP rescaling (yardstick.scoring
  .optimal_scale), fitted on given (fit) runs instead of the ground truth. [m]."""
  return scoring.optimal_scale((predict(run), run.losses) for run in runs)
