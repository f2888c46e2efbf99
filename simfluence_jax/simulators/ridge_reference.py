"""The dense float64 reference of the ridge problem (the tests' and benchmarks' oracle).

Solved per test example with an explicit design matrix and numpy lstsq; see `ridge` for the
objective and `terms` for what the extensions add.
"""

from __future__ import annotations

import numpy as np

from simfluence_jax.simulators.terms import PAPER, Solution, Terms, check_kind, num_fit_steps


def dense_q(batches, n: int) -> np.ndarray:
  """float64 [S, n] batch matrix Q (positions, -1 pads); an id twice in a batch counts 2,
  as in the rollout. The dense references (here, uncertainty, benchmarks) build X from it."""
  batches = np.asarray(batches)
  q = np.zeros((batches.shape[0], n))
  rows, cols = np.nonzero(batches >= 0)
  np.add.at(q, (rows, batches[rows, cols]), 1.0)
  return q


def solve_dense_reference(tr, *, kind: str, lam, terms: Terms = PAPER, prior=None):
  """Eq. 13 (with `terms`) solved per test example with an explicit float64 design matrix.

  For each z: rows s with mask 1, X = [x·Q, Q] (or Q / x·Q for the ablations), plus
  [x·E, E] for the step terms (E the one-hot of each row's step), and
  w = argmin ‖y − Xw‖² + ‖Γ w‖² via lstsq on the stacked system [X; Γ] (min-norm at λ = 0),
  Γ = √λ I on A, B (√λ (I − J/n) per half when centred) and √λ_s I on ρ, γ — with both
  step terms, on ρ_t and γ'_t = γ_t + ρ_t x̄_t (x̄_t the step's mean recorded L_{t-1}: the
  model in the step-centred basis (x − x̄_t)·E, E, as the production solver solves it).
  lam: λ, or a pair (λ_A, λ_B) (Γ = √λ_A on A, √λ_B on B). prior: (Ā, B̄) [m, n]: the
  penalty is ‖Γ (w − w̄)‖² instead (stacked right-hand side Γ w̄).
  Returns float64 (A, B) [m, n] for the paper's terms and no prior, else a Solution
  (numpy float64).
  """
  lam_a, lam_b = (float(lam[0]), float(lam[1])) if np.ndim(lam) else (float(lam),) * 2
  check_kind(kind)
  n = tr.num_train
  q = dense_q(tr.batches, n)
  prev, target = np.asarray(tr.prev, np.float64), np.asarray(tr.target, np.float64)
  mask = np.asarray(tr.mask) > 0
  m = prev.shape[1]
  num_t = num_fit_steps(tr) if terms.has_steps else 0
  e = np.zeros((q.shape[0], num_t))
  if num_t:
    e[np.arange(q.shape[0]), np.asarray(tr.steps)] = 1.0
  a_out, b_out = np.zeros((m, n)), np.zeros((m, n))
  rho_out, gamma_out = np.zeros((m, num_t)), np.zeros((m, num_t))
  halves = {"linear": ("A", "B"), "additive": ("B",), "multiplicative": ("A",)}[kind]
  shrink = np.eye(n) - (np.ones((n, n)) / n if terms.centred else 0.0)
  for z in range(m):
    rows = mask[:, z]
    qz, x, y, ez = q[rows], prev[rows, z], target[rows, z], e[rows]
    cols = [x[:, None] * qz if h == "A" else qz for h in halves]
    pens = [np.sqrt(lam_a if h == "A" else lam_b) * shrink for h in halves]
    means = [np.zeros(n) if prior is None else np.asarray(prior[0 if h == "A" else 1][z],
                                                           np.float64) for h in halves]
    xbar = np.zeros(num_t)
    if terms.rho and terms.gamma:   # ρ on the step-centred loss, γ' = γ + ρ x̄_t penalised
      count = ez.sum(0)
      xbar = np.where(count > 0, ez.T @ x / np.maximum(count, 1), 0.0)
    if terms.rho:
      cols.append((x - ez @ xbar)[:, None] * ez)
      pens.append(np.sqrt(terms.lam_step) * np.eye(num_t))
    if terms.gamma:
      cols.append(ez)
      pens.append(np.sqrt(terms.lam_step) * np.eye(num_t))
    design = np.concatenate(cols, axis=1)
    rhs = y - x if kind == "additive" else y
    penalty = np.zeros((design.shape[1], design.shape[1]))
    o = 0
    for pen in pens:
      penalty[o:o + pen.shape[0], o:o + pen.shape[0]] = pen
      o += pen.shape[0]
    stacked = np.concatenate([design, penalty])
    shift = np.zeros(design.shape[1])
    for j, (pen, mean) in enumerate(zip(pens, means)):
      shift[j * n:(j + 1) * n] = pen @ mean
    w = np.linalg.lstsq(stacked, np.concatenate([rhs, shift]), rcond=None)[0]
    o = 0
    for h in halves:
      (a_out if h == "A" else b_out)[z] = w[o:o + n]
      o += n
    if terms.rho:
      rho_out[z] = w[o:o + num_t]
      o += num_t
    if terms.gamma:
      gamma_out[z] = w[o:o + num_t] - rho_out[z] * xbar
  if terms.is_paper and prior is None:
    return a_out, b_out
  return Solution(a_out, b_out, rho_out, gamma_out)
