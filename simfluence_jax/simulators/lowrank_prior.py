"""Empirical-Bayes shrinkage toward a low-rank prior: the `lowrank` variant (ours).

The paper fits each test example's simulator alone, shrinking A_z, B_z toward 0. But test
examples share structure: in our traces the fitted A [m, n] (rows = test examples z, columns
= train examples i) is dominated by one direction — how much a train example moves loss in
general, scaled per test example. Shrinking toward that shared structure instead of toward
0 pools evidence across the m regressions (a low-rank empirical-Bayes prior):

  pass 0 (stage 1): the validated Linear with step terms ρ_t, γ_t (variant rho_gamma)
                    gives w⁰ = (A⁰, B⁰, ρ⁰, γ⁰);
  pass p = 1..P:    Ā = rank-r SVD of A^{p-1} (over all test examples), B̄ likewise; per z

      min ‖y_z − X_z w_z‖² + λ_A ‖A_z − Ā_z‖² + λ_B ‖B_z − B̄_z‖² + λ_s (‖ρ_z‖² + ‖γ_z‖²)

each pass one batched closed-form solve of the production solver
(`ridge.solve_path_with_terms` with `prior=` and (λ_A, λ_B) pairs); P > 1 is block
coordinate descent on the joint objective over (w, rank-r prior means). The default is one
pass (PASSES): on the quickstart three passes moved held-out R² by < 0.01 at 3× the cost.
(λ_A, λ_B, λ_s) are chosen on validation runs with the other variants (simfluence.fit): λ_s
anew, since with A held near the prior the step terms carry more (stage 1 picks λ_s = 0.01
on the quickstart, stage 2 1e-6). The fit is an ordinary (A, B, ρ, γ): rollouts, removal effects
and the npz format are unchanged.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

from simfluence_jax.simulators import ridge
from simfluence_jax.simulators.terms import Solution, Terms

# (λ_A, λ_B) candidates; additive fits B alone (λ_B), multiplicative A alone (λ_A).
LAM_A_GRID = (1e-3, 0.1, 10.0, 1e3, 1e5)
LAM_B_GRID = (1e-3, 0.1, 10.0, 1e3, 1e5, 1e7)
PASSES = 1


def low_rank(matrix: np.ndarray, rank: int) -> np.ndarray:
  """The best rank-`rank` approximation (Frobenius) of matrix [m, n] in float64 (0: zeros)."""
  matrix = np.asarray(matrix, np.float64)
  if rank <= 0 or not matrix.size:
    return np.zeros_like(matrix)
  u, s, vt = np.linalg.svd(matrix, full_matrices=False)
  return (u[:, :rank] * s[:rank]) @ vt[:rank]


def lam_pairs(kind: str, lam_a_grid: Sequence[float] = LAM_A_GRID,
              lam_b_grid: Sequence[float] = LAM_B_GRID) -> list[tuple[float, float]]:
  """The (λ_A, λ_B) grid of a kind (the unused half's λ is irrelevant: set to 1)."""
  if kind == "linear":
    return [(float(a), float(b)) for a, b in itertools.product(lam_a_grid, lam_b_grid)]
  if kind == "additive":
    return [(1.0, float(b)) for b in lam_b_grid]
  return [(float(a), 1.0) for a in lam_a_grid]


def fit_passes(tr, *, kind: str, stage1: Solution, terms: Terms,
               pairs: Sequence[tuple[float, float]], rank: int = 1, passes: int = PASSES,
               chunk_size: int | None = None) -> list[Solution]:
  """The pass-`passes` solution for every (λ_A, λ_B) in `pairs` (their order).

  stage1: the fit the first prior is taken from (its A, B [m, n]); terms: the step terms
  and λ_s every pass solves with (`prior_rank` is ignored here: `rank` is used).
  """
  if passes < 1 or rank < 1:
    raise ValueError(f"need passes ≥ 1 and rank ≥ 1, got passes={passes}, rank={rank}")
  solver_terms = Terms(rho=terms.rho, gamma=terms.gamma, lam_step=terms.lam_step,
                       centred=terms.centred)
  prior = (low_rank(stage1.A, rank), low_rank(stage1.B, rank))
  # Pass 1 shares its prior across pairs: one warm-started path over all of them.
  out = ridge.solve_path_with_terms(tr, kind=kind, lams=list(pairs), terms=solver_terms,
                                    prior=prior, chunk_size=chunk_size)
  for _ in range(passes - 1):
    out = [ridge.solve_path_with_terms(
        tr, kind=kind, lams=[pair], terms=solver_terms, chunk_size=chunk_size,
        prior=(low_rank(sol.A, rank), low_rank(sol.B, rank)))[0]
        for pair, sol in zip(pairs, out)]
  return out
