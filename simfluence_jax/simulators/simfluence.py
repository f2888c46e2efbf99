"""Fitting Simfluence simulators from recorded runs (paper §3.2, Eq. 2).

`fit` turns the fit runs' traces into regression data (`design.build_transitions`),
solves the ridge problem of Eq. 2 for every test example at once (`ridge`), and — when no λ
is given — picks λ from a grid by the all-steps MSE of *rollouts* on validation runs (the
paper's protocol: 20 fit runs, 2 validation runs, 10 held out).

`simulate_run` and `evaluate` are the yardstick every simulator is judged by: roll the
simulator out on a run's curriculum from the run's own observed initial losses L_0 and
compare with the observed trajectory.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Mapping, Sequence

import jax
import numpy as np

from simfluence_jax.simulators import design
from simfluence_jax.simulators import lowrank_prior
from simfluence_jax.yardstick import metrics
from simfluence_jax.yardstick import scoring
from simfluence_jax.simulators import ridge
from simfluence_jax.simulators import rollout as rollout_lib
from simfluence_jax.traces import fit_params
from simfluence_jax.traces.fit_params import FitParams
from simfluence_jax.traces.contract import RunTrace, TraceError

KINDS = ("linear", "additive", "multiplicative")
# The fitted terms beyond A, B (ridge.Terms; lam_step is set per candidate).
VARIANTS = {
    "paper": ridge.PAPER,                                # the paper's Eq. 2 exactly
    "centred": ridge.Terms(centred=True),                # shrink toward the mean example
    "gamma": ridge.Terms(gamma=True),                    # + run-shared γ_t
    "rho_gamma": ridge.Terms(rho=True, gamma=True),      # + run-shared ρ_t L_{t-1} + γ_t
    # rho_gamma, shrunk toward a rank-1 prior across test examples (lowrank_prior.py)
    "lowrank": ridge.Terms(rho=True, gamma=True, prior_rank=1),
}
# The stage-1 fit a prior_rank variant starts from (its best-validated candidate).
LOWRANK_BASE = "rho_gamma"
# Paper §4.1: TracIn-Ideal is Simfluence-Additive (the paper's terms).
ALIASES = {"tracin_ideal": "additive_paper"}
# Wide enough that validation does not pick an edge on our experiments (fit.json says when
# it does); λ_step: the step terms' own penalty.
DEFAULT_LAM_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)
DEFAULT_LAM_STEP_GRID = (1e-6, 1e-4, 1e-2, 1.0)
SIMULATORS = tuple(KINDS) + tuple(f"{k}_{v}" for k in KINDS for v in VARIANTS) + tuple(ALIASES)


def parse_simulator(simulator: str) -> tuple[str, str | None]:
  """(kind, variant) of a simulator name; variant None = chosen on validation runs.

  "linear" / "additive" / "multiplicative": the variant (VARIANTS) that validates best;
  "<kind>_<variant>", e.g. "linear_paper" (the paper's exact model) or "linear_rho_gamma";
  aliases: "tracin_ideal" = "additive_paper".
  """
  name = ALIASES.get(simulator, simulator)
  if name in KINDS:
    return name, None
  for kind in KINDS:
    if name.startswith(kind + "_") and name[len(kind) + 1:] in VARIANTS:
      return kind, name[len(kind) + 1:]
  raise ValueError(f"unknown simulator {simulator!r}; expected one of {list(SIMULATORS)}")


def canonical_kind(simulator: str) -> str:
  """The kind (one of KINDS) of a simulator name (see parse_simulator)."""
  return parse_simulator(simulator)[0]


def union_ids(arrays: Sequence[np.ndarray]) -> np.ndarray:
  return np.unique(np.concatenate([np.asarray(a, np.int64) for a in arrays]))


def ordered_test_ids(runs: Sequence[RunTrace]) -> np.ndarray:
  """Test ids in first-seen order across runs (normally all runs share one order)."""
  seen: dict[int, None] = {}
  for run in runs:
    for i in np.asarray(run.test_ids, np.int64).tolist():
      seen.setdefault(i, None)
  return np.asarray(list(seen), np.int64)


def impute_unseen(params: FitParams, curriculum: np.ndarray) -> tuple[FitParams, list[int]]:
  """Extends `params` with train ids of `curriculum` that the fit never saw.

  The paper's simulators cannot simulate an example they never saw (§7). Where a user asks
  for it anyway (`unseen="mean"`), each unseen example gets, per test example, the mean of
  the fitted A_i and B_i over the seen examples: "an average training example". Returns the
  extended params and the imputed ids (report them).
  """
  ids = np.unique(np.asarray(curriculum)[np.asarray(curriculum) >= 0]).astype(np.int64)
  unseen = np.setdiff1d(ids, params.train_ids)
  if unseen.size == 0:
    return params, []
  a, b = np.asarray(params.A), np.asarray(params.B)
  fill = lambda x: np.concatenate([x, np.repeat(x.mean(1, keepdims=True), unseen.size, 1)], 1)
  extended = dataclasses.replace(
      params, A=fill(a).astype(a.dtype), B=fill(b).astype(b.dtype),
      train_ids=np.concatenate([params.train_ids, unseen]))
  return extended, unseen.tolist()


def simulate_run(params: FitParams, run: RunTrace, *, unseen: str = "error") -> np.ndarray:
  """Rolls `params` out on `run`'s curriculum from its observed L_0.

  unseen: "error" (a train id the fit never saw is an error naming it) or "mean" (see
  `impute_unseen`).

  Returns float32 [T+1, m_run], columns in the order of `run.test_ids` (row 0 = L_0).
  Raises TraceError naming the run and example when a test id is unknown to the fit or its
  initial loss was not recorded, and when the curriculum holds an id the fit never saw.
  """
  if unseen == "mean":
    params, _ = impute_unseen(params, run.curriculum)
  elif unseen != "error":
    raise ValueError(f"unseen must be 'error' or 'mean', got {unseen!r}")
  cols = columns_of(params, run)
  sub = fit_params.select_tests(params, cols)
  try:
    return simulate_curriculum(sub, run.curriculum,
                               np.asarray(run.losses[0], np.float32),
                               curriculum_name=f"run {run.run_id!r} curriculum",
                               initial_losses_name=f"run {run.run_id!r} step 0 losses")
  except ValueError as e:
    raise TraceError(str(e)) from None


def simulate_curriculum(params: FitParams, curriculum: np.ndarray,
                        initial_losses: np.ndarray, *, curriculum_name: str = "curriculum",
                        initial_losses_name: str = "initial_losses") -> np.ndarray:
  """Validates a curriculum of train ids and initial losses against a fit; rolls it out.

  Args:
    curriculum: int [T, k] train example ids, -1 pads.
    initial_losses: float [m] L_0, in the order of `params.test_ids`.
    curriculum_name, initial_losses_name: how errors name the inputs (e.g. file paths).

  Returns:
    float32 [T+1, m], row 0 = `initial_losses`.
  """
  curriculum = np.asarray(curriculum)
  if curriculum.ndim != 2 or not np.issubdtype(curriculum.dtype, np.integer):
    raise ValueError(f"{curriculum_name}: expected an integer [T, k] array of train ids, "
                     f"got {curriculum.dtype} {curriculum.shape}")
  initial = np.asarray(initial_losses)
  m = params.test_ids.shape[0]
  if initial.shape != (m,) or not np.issubdtype(initial.dtype, np.floating):
    raise ValueError(f"{initial_losses_name}: expected float [{m}] initial losses (one per "
                     f"test example of the fit), got {initial.dtype} {initial.shape}")
  bad = np.flatnonzero(~np.isfinite(initial))
  if bad.size:
    raise ValueError(f"{initial_losses_name}: initial loss of test example "
                     f"{int(params.test_ids[bad[0]])} (index {int(bad[0])}) is not finite")
  try:
    positions = rollout_lib.ids_to_positions(curriculum, params.train_ids)
  except ValueError as e:
    raise ValueError(f"{curriculum_name}: {e}") from None
  rho, gamma = params.step_terms()
  pred = rollout_lib.rollout(np.asarray(params.A), np.asarray(params.B), kind=params.kind,
                             batches=positions, initial_losses=initial.astype(np.float32),
                             rho=rho, gamma=gamma, beyond=params.beyond)
  return np.asarray(pred, np.float32)


def columns_of(params: FitParams, run: RunTrace) -> np.ndarray:
  index = {int(t): j for j, t in enumerate(np.asarray(params.test_ids).tolist())}
  cols = []
  for t in np.asarray(run.test_ids).tolist():
    if int(t) not in index:
      raise TraceError(
          f"run {run.run_id!r}: test example {int(t)} has no fitted simulator "
          f"(the fit covers {len(index)} test examples)")
    cols.append(index[int(t)])
  return np.asarray(cols, np.int64)


def evaluate(params: FitParams, runs: Sequence[RunTrace], *, unseen: str = "error",
             fit_runs: Sequence[RunTrace] | None = None) -> dict:
  """Scores `params` on held-out runs (yardstick.scoring): all-steps MSE and final-step
  Spearman (§2.2), the across-run score and — given the fit runs — curriculum R² and the
  no-curriculum baselines' scores under "baselines".

  Returns the metrics.json layout (see yardstick.metrics.score_runs), numpy's default
  ddof=0, plus "imputed_train_ids" (train ids absent from the fit, when unseen="mean").
  """
  if not runs:
    raise ValueError("evaluate needs at least one run")
  preds = {run.run_id: simulate_run(params, run, unseen=unseen) for run in runs}
  imputed = sorted({i for run in runs for i in impute_unseen(params, run.curriculum)[1]})
  return {**scoring.score(preds, runs, fit_runs), "unseen": unseen,
          "imputed_train_ids": imputed}


def _validation_mse(params: FitParams, val_runs: Sequence[RunTrace]) -> float:
  return float(np.mean([
      metrics.all_steps_mse(simulate_run(params, run), run.losses) for run in val_runs]))


def fit(fit_runs: Sequence[RunTrace], *, simulator: str, lam: float | None = None,
        lam_grid: Sequence[float] = DEFAULT_LAM_GRID,
        val_runs: Sequence[RunTrace] = (), chunk_size: int | None = None,
        lam_step: float | None = None,
        lam_step_grid: Sequence[float] = DEFAULT_LAM_STEP_GRID,
        beyond: str = "hold") -> tuple[FitParams, dict]:
  """Fits one simulator per test example by Eq. 2 (with the variant's terms) over all
  recorded transitions of the fit runs.

  Args:
    fit_runs: the runs whose transitions form the regression data.
    simulator: a name of SIMULATORS (see parse_simulator). A bare kind ("linear") tries
      every variant of VARIANTS and keeps the one with the lowest validation MSE; without
      validation runs it is the paper's variant. A fixed λ (lam, or a one-value lam_grid)
      leaves the `lowrank` variant out of that choice: its stage 2 validates its own
      (λ_A, λ_B) grid (lowrank_prior.LAM_A_GRID × LAM_B_GRID) and λ_s anew, with the prior
      taken from the best `rho_gamma` candidate of each λ_s.
    lam: the L2 weight λ. When None, λ is chosen from `lam_grid` by the mean all-steps MSE
      of rollouts on `val_runs` (which must then be non-empty).
    val_runs: validation runs for choosing λ, λ_step and the variant (never regression data).
    chunk_size: test examples per solver chunk (memory bound); None = solver default.
    lam_step, lam_step_grid: the step terms' penalty, given or chosen like λ.
    beyond: the step terms' rule past the fit runs' length ("hold" or "zero").

  Returns:
    (params, diagnostics) where diagnostics is JSON-able and lands in fit.json.
  """
  kind, variant = parse_simulator(simulator)
  if not fit_runs:
    raise ValueError("fit needs at least one fit run")
  if lam is None and not val_runs:
    if len(lam_grid) != 1:
      raise ValueError("either give lam, a one-value lam_grid, or validation runs to choose "
                       "λ from lam_grid")
    lam = float(lam_grid[0])
  overlap = {r.run_id for r in fit_runs} & {r.run_id for r in val_runs}
  if overlap:
    raise ValueError(f"runs {sorted(overlap)} are both fit and validation runs")
  if variant is None:
    # A fixed λ (lam, or a one-value lam_grid) fixes the penalty: the choice is then among
    # the λ-grid variants (a prior_rank variant has its own (λ_A, λ_B) grid: ask by name).
    fixed = lam is not None or len(lam_grid) == 1
    variants = ([v for v in VARIANTS if not (fixed and VARIANTS[v].prior_rank)]
                if val_runs else ["paper"])
    chosen_by = ("validation all-steps MSE over " + ", ".join(variants) if val_runs
                 else "no validation runs: the paper's terms")
  else:
    variants, chosen_by = [variant], "given"
  lams = [float(lam)] if lam is not None else sorted(float(x) for x in lam_grid)
  if not lams or min(lams) < 0:
    raise ValueError(f"lam_grid must be non-empty and non-negative, got {lam_grid}")
  step_lams = ([float(lam_step)] if lam_step is not None
               else sorted(float(x) for x in lam_step_grid))
  if (not val_runs and len(step_lams) != 1
      and any(VARIANTS[v].has_steps for v in variants)):
    raise ValueError("a variant with step terms needs lam_step, a one-value lam_step_grid, "
                     "or validation runs to choose λ_s from lam_step_grid")
  eb_variants = [v for v in variants if VARIANTS[v].prior_rank]
  if eb_variants and not val_runs:
    raise ValueError(f"variant {eb_variants[0]!r} chooses (λ_A, λ_B) and its stage-1 fit on "
                     "validation runs: give val_runs")
  # Stage-1 variants solved on the grid (a prior_rank variant also needs its base's).
  grid_variants = [v for v in variants if not VARIANTS[v].prior_rank]
  base_only = bool(eb_variants) and LOWRANK_BASE not in grid_variants
  if base_only:
    grid_variants.append(LOWRANK_BASE)
  t_start = time.perf_counter()
  train_ids = union_ids([r.train_ids for r in fit_runs])
  test_ids = ordered_test_ids(fit_runs)
  tr = design.build_transitions(fit_runs, train_ids=train_ids, test_ids=test_ids)
  t_built = time.perf_counter()

  def as_params(sol, lam_value, terms):
    return FitParams(A=np.asarray(sol.A, np.float32), B=np.asarray(sol.B, np.float32),
                     train_ids=train_ids, test_ids=test_ids, kind=kind,
                     lam=float(lam_value),
                     rho=np.asarray(sol.rho, np.float32) if terms.rho else None,
                     gamma=np.asarray(sol.gamma, np.float32) if terms.gamma else None,
                     beyond=beyond)

  candidates = []          # (variant, terms, params, λ_B of a linear lowrank fit or None)
  solve_s = 0.0
  for name in grid_variants:
    template = VARIANTS[name]
    for ls in (step_lams if template.has_steps else [None]):
      terms = (dataclasses.replace(template, lam_step=ls) if ls is not None else template)
      t0 = time.perf_counter()
      path = ridge.solve_path_with_terms(tr, kind=kind, lams=lams, terms=terms,
                                         chunk_size=chunk_size)
      jax.block_until_ready(path)
      solve_s += time.perf_counter() - t0
      candidates += [(name, terms, as_params(sol, lam_value, terms), None)
                     for lam_value, sol in zip(lams, path)]
  stage1 = None
  for name in eb_variants:   # stage 2: toward a low-rank prior (lowrank_prior.py)
    stage1 = {"variant": LOWRANK_BASE, "passes": lowrank_prior.PASSES,
              "rank": VARIANTS[name].prior_rank, "lam_by_lam_step": {}}
    pairs = lowrank_prior.lam_pairs(kind)
    for ls in step_lams:   # the prior from the best-validated base fit of the same λ_s
      base = [c[2] for c in candidates if c[0] == LOWRANK_BASE and c[1].lam_step == ls]
      chosen, _ = select_by_validation(base, val_runs)
      stage1["lam_by_lam_step"][repr(ls)] = chosen.lam
      rho, gamma = chosen.step_terms()
      terms = dataclasses.replace(VARIANTS[name], lam_step=ls)
      t0 = time.perf_counter()
      sols = lowrank_prior.fit_passes(
          tr, kind=kind, stage1=ridge.Solution(chosen.A, chosen.B, rho, gamma), terms=terms,
          pairs=pairs, rank=terms.prior_rank, chunk_size=chunk_size)
      jax.block_until_ready(sols)
      solve_s += time.perf_counter() - t0
      for pair, sol in zip(pairs, sols):
        candidates.append((name, terms,    # params.lam holds λ_A (additive: λ_B)
                           as_params(sol, pair[0] if kind != "additive" else pair[1], terms),
                           pair[1] if kind == "linear" else None))
  if base_only:
    candidates = [c for c in candidates if c[0] != LOWRANK_BASE]
  t_solved = time.perf_counter()
  val_scores: dict[str, float] = {}
  best = 0
  if val_runs:
    keys = [candidate_key(name, c.lam, terms, b) for name, terms, c, b in candidates]
    chosen, val_scores = select_by_validation([c[2] for c in candidates], val_runs, keys)
    best = next(i for i, c in enumerate(candidates) if c[2] is chosen)
  name, terms, params, chosen_lam_b = candidates[best]
  t_done = time.perf_counter()

  edges = {}
  if terms.prior_rank:   # (λ_A, λ_B) from lowrank_prior's grids
    if len(step_lams) > 1:
      edges["lam_step"] = _edge(terms.lam_step, step_lams)
    if kind != "additive":
      edges["lam_a"] = _edge(params.lam, lowrank_prior.LAM_A_GRID)
    if kind != "multiplicative":
      edges["lam_b"] = _edge(chosen_lam_b if kind == "linear" else params.lam,
                             lowrank_prior.LAM_B_GRID)
  else:
    if len(lams) > 1:
      edges["lam"] = _edge(params.lam, lams)
    if terms.has_steps and len(step_lams) > 1:
      edges["lam_step"] = _edge(terms.lam_step, step_lams)
  if val_scores:   # is the validation MSE still moving at the edge, or flat (< 0.1%)?
    key_b = chosen_lam_b                       # None but for a linear lowrank fit
    here = val_scores[candidate_key(name, params.lam, terms, key_b)]
    grids = {"lam": lams, "lam_step": step_lams, "lam_a": lowrank_prior.LAM_A_GRID,
             "lam_b": lowrank_prior.LAM_B_GRID}
    for key, edge in list(edges.items()):
      if edge:
        grid = sorted(grids[key])
        neighbour = grid[1] if edge == "smallest" else grid[-2]
        lam_n, other, b_n = params.lam, terms, key_b
        if key == "lam_step":
          other = dataclasses.replace(terms, lam_step=neighbour)
        elif key == "lam_b" and kind == "linear":
          b_n = neighbour
        else:                       # λ, λ_A, or the one λ of a one-half lowrank fit
          lam_n = neighbour
        there = val_scores.get(candidate_key(name, lam_n, other, b_n))
        flat = there is not None and abs(there - here) <= 1e-3 * abs(here)
        edges[key] = f"{edge} (validation MSE {'flat' if flat else 'still falling'} there)"
  diagnostics = {
      "simulator": simulator,
      "kind": kind,
      "variant": name,
      "variant_chosen_by": chosen_by,
      "terms": {"rho": terms.rho, "gamma": terms.gamma, "centred": terms.centred,
                "lam_step": terms.lam_step if terms.has_steps else None,
                "beyond": beyond if terms.has_steps else None,
                "prior_rank": terms.prior_rank},
      "lam": params.lam,
      **({"lam_b": chosen_lam_b, "stage1": stage1,
          "lam_a_grid": list(lowrank_prior.LAM_A_GRID),
          "lam_b_grid": list(lowrank_prior.LAM_B_GRID)} if terms.prior_rank else {}),
      "lam_chosen_by": "given" if lam is not None else "validation all-steps MSE",
      "lam_grid": lams,
      "lam_step_grid": step_lams if terms.has_steps else None,
      "grid_edge": {k: v for k, v in edges.items() if v},
      "validation_mse": val_scores,
      "fit_runs": [r.run_id for r in fit_runs],
      "val_runs": [r.run_id for r in val_runs],
      "num_train": int(train_ids.size),
      "num_test": int(test_ids.size),
      "num_transitions": int(tr.batches.shape[0]),
      "num_step_terms": params.num_step_terms,
      "identifiability": _identifiability_by_id(tr, train_ids, test_ids),
      "timings_s": {
          "build": t_built - t_start,
          "solve": solve_s,
          "select": t_done - t_solved,
          "total": t_done - t_start,
      },
  }
  return params, diagnostics


def candidate_key(variant: str, lam: float, terms, lam_b: float | None = None) -> str:
  key = f"{variant} lam={lam!r}" + (f" lam_b={lam_b!r}" if lam_b is not None else "")
  return key + (f" lam_step={terms.lam_step!r}" if terms.has_steps else "")


def _edge(value: float, grid: Sequence[float]) -> str | None:
  """"smallest" / "largest" when `value` is that end of a grid of ≥ 2 values, else None."""
  if value == min(grid):
    return "smallest"
  if value == max(grid):
    return "largest"
  return None


def select_by_validation(candidates: Sequence[FitParams], val_runs: Sequence[RunTrace],
                         keys: Sequence[str] | None = None
                         ) -> tuple[FitParams, dict[str, float]]:
  """The candidate with the lowest mean all-steps MSE of rollouts on `val_runs`.

  keys: one name per candidate for the returned scores (default repr(λ): one candidate per
  λ). Returns (best, {key: validation MSE}); non-finite scores never win, and the first of
  equal scores wins.
  """
  keys = [repr(c.lam) for c in candidates] if keys is None else list(keys)
  scores = {key: _validation_mse(c, val_runs) for key, c in zip(keys, candidates)}
  finite = [i for i, key in enumerate(keys) if np.isfinite(scores[key])]
  if not finite:
    raise ValueError(f"every candidate ({len(candidates)}: {keys}) gave a non-finite "
                     "validation MSE")
  return candidates[min(finite, key=lambda i: scores[keys[i]])], scores


def _identifiability_by_id(tr, train_ids: np.ndarray, test_ids: np.ndarray) -> dict:
  """design.identifiability's report, with positions translated back to ids."""
  raw = design.identifiability(tr)
  out: dict = {"note": (
      "Appendix A.2: with λ=0 a train example needs ≥ 2 recorded steps and a test "
      "example a non-constant loss; with λ>0 such parameters are set by the prior alone")}
  unident = raw.get("unidentified", {})
  out["unidentified"] = {
      str(int(test_ids[int(col)])): [int(train_ids[int(p)]) for p in positions]
      for col, positions in unident.items()}
  out["constant_loss"] = [int(test_ids[int(c)]) for c in raw.get("constant_loss", [])]
  for key, value in raw.items():
    if key not in ("unidentified", "constant_loss"):
      out[key] = value
  return out


def read_runs(workspace, run_ids: Sequence[str]) -> list[RunTrace]:
  """Reads the named runs; an empty or duplicated name is an error naming it."""
  from simfluence_jax.traces import contract as traces  # local: keeps this module's import surface small
  seen = set()
  out = []
  for run_id in run_ids:
    if not run_id or run_id in seen:
      raise ValueError(f"run list has an empty or repeated run id: {run_id!r}")
    seen.add(run_id)
    out.append(traces.read_run(workspace, run_id))
  return out


def split_runs(run_ids: Sequence[str], *, num_fit: int, num_val: int, seed: int
               ) -> Mapping[str, list[str]]:
  """The paper's random split of runs into fit / validation / held-out (§5)."""
  ids = sorted(run_ids)
  if num_fit + num_val >= len(ids):
    raise ValueError(
        f"cannot split {len(ids)} runs into {num_fit} fit + {num_val} validation + "
        "at least one held-out run")
  order = np.random.default_rng(seed).permutation(len(ids))
  shuffled = [ids[i] for i in order]
  return {"fit": sorted(shuffled[:num_fit]),
          "val": sorted(shuffled[num_fit:num_fit + num_val]),
          "heldout": sorted(shuffled[num_fit + num_val:])}


__all__ = ["KINDS", "VARIANTS", "ALIASES", "SIMULATORS", "DEFAULT_LAM_GRID",
           "DEFAULT_LAM_STEP_GRID", "parse_simulator", "canonical_kind", "fit", "evaluate",
           "simulate_run", "read_runs", "split_runs"]
