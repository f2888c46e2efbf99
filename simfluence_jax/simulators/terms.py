"""The model's terms beyond the paper's A, B, and a solution of the ridge problem.

`Terms` says which extra terms a fit has (run-shared step terms ρ_t, γ_t; centred
shrinkage); `Solution` is one λ's (A, B, rho, gamma). Shared by the production solver
(`ridge`) and its dense float64 reference (`ridge_reference`).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import numpy as np

KINDS = ("linear", "additive", "multiplicative")


def check_kind(kind: str) -> str:
  if kind not in KINDS:
    raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
  return kind


@dataclasses.dataclass(frozen=True)
class Terms:
  """The terms of the fitted model beyond the paper's A, B (all off = the paper's Eq. 2).

  rho, gamma: fit run-shared step terms ρ_t (times L_{t-1}) and γ_t, one per step t of the
    fit runs and test example, penalised by lam_step (absolute, like λ).
  centred: shrink A and B toward their mean over the train examples instead of toward 0.
  prior_rank: r > 0 shrinks A and B toward a rank-r approximation (over test examples) of
    a first fit instead, with separate λ_A, λ_B (empirical Bayes, `lowrank_prior`). The
    solver itself takes the prior means as data (`prior=`) and ignores this field.
  """
  rho: bool = False
  gamma: bool = False
  lam_step: float = 1e-4
  centred: bool = False
  prior_rank: int = 0

  @property
  def has_steps(self) -> bool:
    return self.rho or self.gamma

  @property
  def is_paper(self) -> bool:
    return not (self.has_steps or self.centred or self.prior_rank)


PAPER = Terms()


class Solution(NamedTuple):
  """One λ's solution: A, B [m, n]; rho, gamma [m, T] (T = 0 when not fitted)."""
  A: jax.Array
  B: jax.Array
  rho: jax.Array
  gamma: jax.Array


def num_fit_steps(tr) -> int:
  """T: the number of step terms per test example (the longest fit run's length)."""
  steps = getattr(tr, "steps", None)
  if steps is None:
    raise ValueError("step terms need Transitions.steps (the step index of each row); "
                     "build the Transitions with design.build_transitions")
  steps = np.asarray(steps)
  return int(steps.max()) + 1 if steps.size else 0
