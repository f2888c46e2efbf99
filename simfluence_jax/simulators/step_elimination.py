"""Exact elimination of the run-shared step terms ρ_t, γ_t from the ridge normal equations.

Each step term enters only the rows of its own step, so for fixed (A, B) its optimum is a
2 × 2 (or 1 × 1) solve per step and test example; `StepElimination` applies the resulting
projection I − P that turns H into its Schur complement (see ridge.py for the whole
solver). `inv2` / `inv1` are the guarded elementwise block inverses both modules use.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def inv2(daa, dab, dbb):
  """Guarded inverse of symmetric PSD 2×2 blocks [[daa, dab], [dab, dbb]] (elementwise).

  A singular (rank ≤ 1) block — e.g. λ = 0 and a train example seen once — gets its
  pseudo-inverse M / tr(M)²; an all-zero block gets 0.
  """
  det = daa * dbb - dab * dab
  tr = daa + dbb
  regular = det > (jnp.finfo(daa.dtype).eps * 16) * tr * tr
  safe_det = jnp.where(regular, det, 1.0)
  safe_tr2 = jnp.where(tr > 0, tr * tr, 1.0)
  iaa = jnp.where(regular, dbb / safe_det, daa / safe_tr2)
  ibb = jnp.where(regular, daa / safe_det, dbb / safe_tr2)
  iab = jnp.where(regular, -dab / safe_det, dab / safe_tr2)
  return iaa, iab, ibb


def inv1(d):
  return jnp.where(d > 0, 1.0 / jnp.where(d > 0, d, 1.0), 0.0)


class StepElimination:
  """Exact elimination of the run-shared step terms for one chunk.

  steps int32 [S] (each row's step, 0..T-1). With both terms the basis is centred per step,
  u_s = (x_s − x̄_t, 1) with x̄_t = Σ_{s∈t} μ_s x_s / Σ_{s∈t} μ_s (θ' = (ρ_t, γ'_t),
  γ_t = γ'_t − ρ_t x̄_t): the same column space, so the same projection, but M_t is then
  nearly diagonal instead of nearly singular (x varies little across runs at one step),
  which keeps float32 accurate. Per step and lane M_t = Σ_{s∈t} μ_s u_s u_sᵀ + λ_s I (kept as
  its guarded inverse); `project(v)` = v − U θ(v), θ(v)_t = M_t⁻¹ Σ_{s∈t} μ_s u_s v_s.
  """

  def __init__(self, steps, num_steps, x, mu, terms, lam_step, equal_runs):
    self.steps, self.t, self.terms = steps, num_steps, terms
    self.mu = mu
    if equal_runs:
      # Every run has T steps and rows are run-major (design.build_transitions), so the
      # per-step sums are a dense reduction over the runs axis and θ[steps] a broadcast —
      # no scatter / gather.
      runs = x.shape[0] // num_steps
      seg = lambda v: v.reshape(runs, num_steps, -1).sum(0)                   # [S,L]->[T,L]
      self.spread = lambda th: jnp.broadcast_to(
          th[None], (runs,) + th.shape).reshape(runs * num_steps, -1)        # [T,L]->[S,L]
    else:
      seg = lambda v: jax.ops.segment_sum(v, steps, num_segments=num_steps)   # [S,L]->[T,L]
      self.spread = lambda th: th[steps]
    self.seg = seg
    lam = jnp.asarray(lam_step, x.dtype)
    if terms.rho and terms.gamma:
      count = seg(mu)
      self.xbar = seg(mu * x) / jnp.where(count > 0, count, 1.0)           # [T, L]
      self.x = xc = jnp.where(mu > 0, x - self.spread(self.xbar), 0.0)
      self.inv = inv2(seg(mu * xc * xc) + lam, seg(mu * xc), count + lam)
    else:
      self.x = x
      self.inv = (inv1(seg(mu * x * x if terms.rho else mu) + lam),)

  def theta(self, v):
    """θ(v): tuple of [T, L] (ρ then γ', the fitted ones) for a [S, L] array v."""
    mv = self.mu * v
    if self.terms.rho and self.terms.gamma:
      cx, c1 = self.seg(mv * self.x), self.seg(mv)
      iaa, iab, ibb = self.inv
      return (iaa * cx + iab * c1, iab * cx + ibb * c1)
    c = self.seg(mv * self.x if self.terms.rho else mv)
    return (self.inv[0] * c,)

  def fitted(self, theta):
    """U θ: [S, L]."""
    out, i = 0.0, 0
    if self.terms.rho:
      out = out + self.x * self.spread(theta[0])
      i = 1
    if self.terms.gamma:
      out = out + self.spread(theta[i])
    return out

  def project(self, v):
    return v - self.fitted(self.theta(v))

  def uncentre(self, theta):
    """(ρ, γ) in the model's own basis (γ_t = γ'_t − ρ_t x̄_t with both terms)."""
    if self.terms.rho and self.terms.gamma:
      return (theta[0], theta[1] - theta[0] * self.xbar)
    return theta
