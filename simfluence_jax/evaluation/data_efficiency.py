"""Data efficiency of simulators: held-out accuracy vs the number of past runs (paper §7).

`study` fits every simulator on the first N of `runs` for each N in `num_runs_list` (nested
subsets, so rows differ only by the added runs) and scores it on the same held-out runs with
`simulators.evaluate` (all-steps MSE, final-step Spearman; mean ± std over held-out runs,
ddof = 0, as the paper reports).

Train examples a held-out curriculum uses but no fit run consumed ("unseen") cannot be
simulated by per-example Simfluence-Linear (§7). Both simulators here get the same stated
fallback (`simulators.impute_unseen`, unseen="mean"):
  * linear:      A_i, B_i of an unseen i := the mean of the seen examples' A_i, B_i (per
                 test example) — "an average training example";
  * featurized:  an unseen i gets the mean train factor V̄_A, V̄_B (no encoder features in
                 this low-rank variant). Because A = a0 1ᵀ + U_A V_Aᵀ is linear in V_A,
                 U_A V̄_Aᵀ + a0 is exactly the mean of the seen columns of the materialised
                 A, so the same imputation applies to the materialised FitParams.
The two therefore differ on unseen examples only through how well they fit everything else
(test factors, biases, the seen examples) — not through any knowledge of the new example.
`unseen_examples_eval` reports this case separately, with the share of unseen slots.
A feature-based fitter (`featurized_fitter(train_features=...)`) instead simulates unseen
examples from their features (Φ(z_i) = P_Aᵀ f(z_i)); "num_imputed_train_ids" tells which
rows relied on imputation.

Rows are plain dicts, so the table serialises to JSON; `markdown_table` formats it.
"""

from __future__ import annotations

import time
from typing import Callable, Mapping, Sequence

import numpy as np

from simfluence_jax.simulators import featurized
from simfluence_jax.simulators import simfluence as simulators_lib
from simfluence_jax.traces.fit_params import FitParams

Fitter = Callable[[Sequence], FitParams]


def linear_fitter(*, lam: float = 1e-2) -> Fitter:
  """Per-example Simfluence-Linear, the paper's Eq. 2 (ridge) with a fixed λ."""
  return lambda runs: simulators_lib.fit(runs, simulator="linear_paper", lam=lam)[0]


def featurized_fitter(*, rank: int = 4, lam: float = 1e-2, steps: int = 3000,
                      seed: int = 0, train_features: Mapping | None = None) -> Fitter:
  """The low-rank factorized simulator (featurized.fit_featurized); with `train_features`
  ({train id: vector}, e.g. featurized.encoder_features) the feature-based one, whose
  params also cover examples no fit run saw (no imputation needed for them)."""
  return lambda runs: featurized.fit_featurized(runs, rank=rank, lam=lam, steps=steps,
                                                seed=seed, train_features=train_features)[0]


def default_fitters() -> dict[str, Fitter]:
  return {"linear": linear_fitter(), "featurized": featurized_fitter()}


def _resolve(simulators) -> dict[str, Fitter]:
  if simulators is None:
    return default_fitters()
  if isinstance(simulators, Mapping):
    return dict(simulators)
  known = default_fitters()
  unknown = [s for s in simulators if s not in known]
  if unknown:
    raise ValueError(f"unknown simulators {unknown}; give names from {sorted(known)} or a "
                     "mapping name -> fitter(runs) -> FitParams")
  return {s: known[s] for s in simulators}


def unseen_slots(fit_runs: Sequence, runs: Sequence) -> tuple[list[int], float]:
  """Train ids of `runs`' curricula outside every fit run's train_ids: (sorted ids, fraction
  of non-pad curriculum slots holding one). Defined by the fit runs, not by a simulator's
  params, so the column means the same for every simulator."""
  seen = {int(i) for r in fit_runs for i in np.asarray(r.train_ids).tolist()}
  ids, total, unseen = set(), 0, 0
  for run in runs:
    cur = np.asarray(run.curriculum)
    cur = cur[cur >= 0]
    mask = np.array([int(i) not in seen for i in cur.tolist()], bool)
    total += cur.size
    unseen += int(mask.sum())
    ids.update(int(i) for i in cur[mask].tolist())
  return sorted(ids), unseen / max(total, 1)


def _row(name: str, fit_runs, params: FitParams, heldout, fit_s: float) -> dict:
  scores = simulators_lib.evaluate(params, heldout, unseen="mean", fit_runs=fit_runs)
  ids, frac = unseen_slots(fit_runs, heldout)
  row = _scores_row(name, len(fit_runs), scores)
  row.update({"num_unseen_train_ids": len(ids), "unseen_slot_fraction": frac,
              "num_imputed_train_ids": len(scores["imputed_train_ids"]), "fit_s": fit_s})
  return row, scores


def _scores_row(name: str, num_runs: int, scores: dict) -> dict:
  return {"num_runs": int(num_runs), "simulator": name,
          "mse_mean": scores["mse"]["mean"], "mse_std": scores["mse"]["std"],
          "curriculum_r2": scores.get("curriculum_r2"),
          "spearman_mean": scores["spearman"]["mean"],
          "spearman_std": scores["spearman"]["std"]}


def study(runs: Sequence, heldout: Sequence, *,
          num_runs_list: Sequence[int] = (2, 5, 10, 20),
          simulators: Sequence[str] | Mapping[str, Fitter] | None = None) -> list[dict]:
  """Held-out MSE and Spearman (mean ± std over `heldout`) vs number of fit runs.

  Args:
    runs: candidate fit runs, in the order they are added (the first N form the fit set).
    heldout: runs to score on (never fitted).
    num_runs_list: the N values; each must be in [1, len(runs)].
    simulators: names from {"linear", "featurized"} (default fitters) or a mapping
      name -> fitter(runs) -> FitParams.

  Returns:
    rows [{"num_runs", "simulator", "mse_mean", "mse_std", "curriculum_r2",
    "spearman_mean", "spearman_std", "num_unseen_train_ids", "unseen_slot_fraction",
    "num_imputed_train_ids", "fit_s"}], ordered by num_runs, then simulator in the given
    order, then the no-curriculum baseline "mean_trajectory" of the same N runs (its
    unseen / fit fields None).
  """
  if not heldout:
    raise ValueError("study needs at least one held-out run")
  overlap = {r.run_id for r in runs} & {r.run_id for r in heldout}
  if overlap:
    raise ValueError(f"runs {sorted(overlap)} are both candidate fit and held-out runs")
  bad = [n for n in num_runs_list if not 1 <= int(n) <= len(runs)]
  if bad:
    raise ValueError(f"num_runs_list values {bad} are outside [1, {len(runs)}] (the number "
                     "of candidate fit runs)")
  fitters = _resolve(simulators)
  rows = []
  for n in num_runs_list:
    scores = None
    for name, fitter in fitters.items():
      t0 = time.perf_counter()
      fit_runs = list(runs[:int(n)])
      params = fitter(fit_runs)
      row, scores = _row(name, fit_runs, params, heldout, time.perf_counter() - t0)
      rows.append(row)
    # The no-curriculum baseline of the same N fit runs, scored by the same code.
    rows.append({**_scores_row("mean_trajectory", n, scores["baselines"]["mean_trajectory"]),
                 "num_unseen_train_ids": None, "unseen_slot_fraction": None,
                 "num_imputed_train_ids": None, "fit_s": None})
  return rows


def unseen_examples_eval(fit_runs: Sequence, heldout: Sequence, *,
                         simulators: Sequence[str] | Mapping[str, Fitter] | None = None
                         ) -> list[dict]:
  """Scores simulators on held-out runs that use train examples absent from `fit_runs`.

  Every simulator imputes unseen examples as stated in the module docstring (mean of seen
  parameters = mean train factor). Rows as in `study` (num_runs = len(fit_runs)).
  """
  fitters = _resolve(simulators)
  rows = []
  for name, fitter in fitters.items():
    t0 = time.perf_counter()
    params = fitter(list(fit_runs))
    rows.append(_row(name, list(fit_runs), params, heldout, time.perf_counter() - t0)[0])
  return rows


def _pm(mean: float, std: float, digits: int) -> str:
  return f"{mean:.{digits}g} ± {std:.{digits}g}"


def markdown_table(rows: Sequence[dict], *, digits: int = 3) -> str:
  """A markdown table of `study` / `unseen_examples_eval` rows, one line per row."""
  lines = ["| past runs | simulator | held-out MSE | final-step Spearman | unseen slots |",
           "|---:|---|---|---|---:|"]
  for r in rows:
    lines.append(f"| {r['num_runs']} | {r['simulator']} | "
                 f"{_pm(r['mse_mean'], r['mse_std'], digits)} | "
                 f"{_pm(r['spearman_mean'], r['spearman_std'], digits)} | "
                 + ("– |" if r["unseen_slot_fraction"] is None
                    else f"{100 * r['unseen_slot_fraction']:.1f}% |"))
  return "\n".join(lines) + "\n"


__all__ = ["study", "unseen_examples_eval", "markdown_table", "linear_fitter",
           "featurized_fitter", "default_fitters", "unseen_slots"]
