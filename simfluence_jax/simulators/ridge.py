"""Closed-form ridge solvers of Simfluence's objective (paper Eq. 2/3, Appendix A.1), and of
its extension with run-shared step terms and centred shrinkage.

For each test example z independently (all m at once), with Q the S × n batch matrix
(Q[s, i] = multiplicity of train position i in batch s, shared by every z) and, per z, the
recorded x_s = L_{t-1}(z), y_s = L_t(z), mask μ_s ∈ {0, 1}:

    O(A, B) = Σ_s μ_s (y_s − (QA)_s x_s − (QB)_s)² + λ (‖A‖² + ‖B‖²)                (Eq. 2)

i.e. ridge regression with design X = [diag(x) Q, Q] (Eq. 13). Its normal equations are

    [ Qᵀ D_xx Q + λI   Qᵀ D_x Q      ] [A]   [ Qᵀ (μ x y) ]
    [ Qᵀ D_x Q         Qᵀ D_1 Q + λI ] [B] = [ Qᵀ (μ y)   ],   D_w = diag(μ·w) over steps,

kind "additive" (α ≡ 1, TracIn-Ideal): (Qᵀ D_1 Q + λI) B = Qᵀ(μ (y − x)), A = 0;
kind "multiplicative" (β ≡ 0):        (Qᵀ D_xx Q + λI) A = Qᵀ(μ x y),   B = 0.

**Extensions (`Terms`, ours).**
  * Step terms: L_t = α(c_t) L_{t-1} + β(c_t) + ρ_t L_{t-1} + γ_t, with ρ_t(z), γ_t(z)
    shared by every run at step t (what every curriculum does at step t, whatever its
    batch: the answer format being learned, the step-size schedule). With E the S × T
    one-hot of each transition's step, the design gains the columns [diag(x) E, E] (or
    either one), penalised by λ_s ‖ρ‖² + λ_s ‖γ‖².
  * Centred shrinkage: A_i = ā + δA_i, B_i = b̄ + δB_i with ā, b̄ free and only δ penalised.
    Minimising over ā gives the penalty λ ‖(I − J/n) A‖² (J = 11ᵀ; likewise for B): strong
    regularisation tends to one shared dynamic, not to A = B = 0.

`solve_dense_reference` (ridge_reference.py) builds X per z explicitly in float64 numpy.

`solve` / `solve_path` (the paper's problem) and `solve_path_with_terms` are the production
solvers — batched preconditioned conjugate gradients (PCG) over test examples ("lanes"):
  * Matrix-free: Q w is k row-gathers per step and Qᵀ v k row-scatter-adds (one per batch
    slot), so a matvec costs O(S·k) per lane instead of O(n²); arrays are [rows, lanes].
  * Step terms are eliminated exactly, step by step: each enters only the rows of its own
    step, so for fixed (A, B) the optimal θ_t = (ρ_t, γ_t) is the 2 × 2 solve
    θ_t = M_t⁻¹ Σ_{s∈t} μ_s u_s r_s, u_s = (x_s, 1), M_t = Σ_{s∈t} μ_s u_s u_sᵀ + λ_s I,
    r = y − X w. PCG then runs on the Schur complement H' = Xᵀ D (I − P) X with the
    projection P v = U θ(v) (two segment sums over steps per matvec), and θ is recovered
    from the final residual.
  * Centred shrinkage changes only the penalty's matvec (λ (w − mean(w))).
  * Preconditioner: the exact inverse of each train example's 2 × 2 diagonal block
    [[Σ μx²q², Σ μxq²], [Σ μxq², Σ μq²]] + λI of the paper's H — exact when the batch size is
    1 (Eq. 4 decouples per example). The preconditioned spectrum is then Marchenko-Pastur-
    like, ≈ [(1 − √(2n/S))², (1 + √(2n/S))²], plus two outliers ≈ k (the common modes).
  * Coarse space V = [1_A, 1_B] (see `_System`): CG starts from the best fit with all
    A_i equal and all B_i equal (a 2 × 2 solve per lane), and every iteration is deflated
    (each preconditioned residual z is corrected to z − V E⁻¹ ((H V)ᵀ z − Vᵀ r), E = Vᵀ H V,
    the robust "A-DEF2" form: Tang, Nabben, Vuik & Erlangga 2009), so the search stays
    H-orthogonal to V. With step terms V is a near-null space of the Schur complement (ρ_t
    and γ_t absorb the common modes, H' V ≈ λ V); without deflation its component comes
    back through the preconditioner and CG stalls on it for ~15 iterations. With centring
    those modes carry no penalty, so CG starts from 0 and is not deflated.
  * Speed (benchmarks/fit_bench.py): ~10 iterations few-shot for the paper's problem, ~20
    with step terms (per-step sums are a reshape-and-sum when runs have equal length).
  * Stopping: each lane stops updating (α_cg = 0) once ‖r‖ ≤ tol·‖rhs‖ for its own residual,
    so a lane's result does not depend on which other lanes share its chunk or window.
  * Layout: lanes run in chunks of `chunk_size` inside one jitted `fori_loop`, so a chunk's
    working set stays in cache and memory is O(S · chunk) beyond the inputs for any m;
    equal column windows run on concurrent threads (XLA:CPU runs one loop on one core).
  * A λ path warm-starts each λ (largest first) from the previous solution of that chunk.
float32 is within ~1e-4 of float64 relative to max |parameter| (tol 1e-6); float64 ~1e-9.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from simfluence_jax.simulators.ridge_reference import solve_dense_reference
from simfluence_jax.simulators.step_elimination import StepElimination, inv1, inv2
from simfluence_jax.simulators.terms import KINDS, PAPER, Solution, Terms, num_fit_steps
from simfluence_jax.simulators.terms import check_kind as _check_kind


def _slot_data(batches: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
  """Flattened slot positions (pads -> n, a dump row) and per-slot multiplicities.

  idx int32 [S·k]; mult float [S, k] = how often batches[s, j] occurs in row s, so that a
  scatter of mult·w over slots yields the diagonal Σ_s Q[s, i]² w_s of Qᵀ diag(w) Q.
  """
  b = np.asarray(batches, np.int64)
  mult = (b[:, :, None] == b[:, None, :]).sum(-1).astype(np.float64)
  mult = np.where(b >= 0, mult, 0.0)
  return np.where(b >= 0, b, n).astype(np.int32).reshape(-1), mult


class _Ops:
  """Matrix-free products with Q for one chunk. Arrays are [rows, lanes].

  k separate row-gathers / scatter-adds (one per batch slot) — each a [S, lanes] array that
  XLA fuses into the following sum — measured 3-10× faster on CPU than one gather of
  [S·k, lanes] rows. Pads point at row n, a dump row kept at zero.
  """

  def __init__(self, cols, num_train):
    self.cols, self.n = cols, num_train  # cols: k int32 [S] arrays, pads -> n

  def q(self, w):  # [n+1, L] -> [S, L]
    out = w.at[self.cols[0]].get(mode="promise_in_bounds")
    for c in self.cols[1:]:
      out = out + w.at[c].get(mode="promise_in_bounds")
    return out

  def qt(self, v, mult=None):  # [S, L] -> [n+1, L], dump row zeroed.
    out = jnp.zeros((self.n + 1, v.shape[1]), v.dtype)
    for j, c in enumerate(self.cols):
      out = out.at[c].add(v if mult is None else v * mult[:, j:j + 1],
                          mode="promise_in_bounds")
    return out.at[self.n].set(0)


class _System:
  """One chunk's normal equations H w = rhs, matrix-free (W, rhs: [n+1, P·L]).

  P = 2 for "linear" (A lanes, then B lanes), else 1. x, y, μ are [S, L]; ks [S, 1] is the
  batch size Σ_i Q[s, i] of each step. With step terms H is the Schur complement after
  eliminating θ (`step_elimination.StepElimination`); with centring the penalty is λ (I − J/n).

  Coarse space (all but centred): V = [1_A, 1_B] restricted to the train examples a lane
  observes (every A_i equal, every B_i equal). Since Q V = k_s on recorded steps, H V needs
  only the scatter of μ k_s [x², x, 1] (= k · the diagonal weights when every batch has k
  distinct examples), E = Vᵀ H V is a lane sum, and the Galerkin start w0 = V E⁻¹ Vᵀ rhs
  removes the large common component of A (α ≈ 1 ⇒ A_i ≈ 1/k). The right-hand side, H V
  and the preconditioner diagonals come from one scatter. With step terms H V is two exact
  matvecs instead.
  """

  def __init__(self, ops, mult, ks, x, y, mu, kind, has_dups, uniform, terms, steps,
               num_steps, lam_step, equal_runs=False):
    self.ops, self.kind, self.n, self.terms = ops, kind, ops.n, terms
    self.mu = mu = jnp.where(mu > 0, 1.0, 0.0).astype(x.dtype)
    self.x = x = jnp.where(mu > 0, x, 0)
    y = jnp.where(mu > 0, y, 0)
    self.lanes = l = x.shape[1]
    self.parts = 2 if kind == "linear" else 1
    self.coarse_start = not terms.centred
    self.exact_hv = terms.has_steps   # H V by two matvecs: the scatter shortcut is for Eq. 2
    self.target = y - x if kind == "additive" else y       # what X w (+ U θ) fits
    self.st = (StepElimination(steps, num_steps, x, mu, terms, lam_step, equal_runs)
               if terms.has_steps else None)
    ty = self.st.project(self.target) if self.st is not None else self.target
    mx = mu * x
    if kind == "linear":
      sides, diags = [mx * ty, mu * ty], [mx * x, mx, mu]
    elif kind == "additive":
      sides, diags = [mu * ty], [mu]
    else:
      sides, diags = [mx * ty], [mx * x]
    nd = len(diags)
    # uniform (static): no duplicates and every step holds k examples -> H V = k · diag.
    coarse = ([] if (uniform or not self.coarse_start or self.exact_hv)
              else [ks * d for d in diags])
    if has_dups:   # the diagonal needs Σ_s Q[s, i]² w_s: its own multiplicity-weighted scatter
      side = ops.qt(jnp.concatenate(sides + coarse, axis=1))
      diag = ops.qt(jnp.concatenate(diags, axis=1), mult)
    else:
      side = ops.qt(jnp.concatenate(sides + coarse + diags, axis=1))
      side, diag = side[:, :(len(sides) + len(coarse)) * l], side[:, -nd * l:]
    p = self.parts * l
    self.rhs = side[:, :p]
    self.diag = tuple(diag[:, j * l:(j + 1) * l] for j in range(nd))
    # Only rows of examples this lane observes (a zero Qᵀ D_1 Q diagonal stays at 0, so a
    # λ = 0 solve keeps unidentified-by-absence parameters at 0, like the min-norm fit).
    seen = (self.diag[-1] > 0).astype(x.dtype)             # [n+1, L]; dump row: 0
    zero = jnp.zeros_like(seen)
    self.v = ((jnp.concatenate([seen, zero], axis=1), jnp.concatenate([zero, seen], axis=1))
              if kind == "linear" else (seen,))
    if not self.coarse_start:
      return
    if self.exact_hv:
      # On every recorded step the lane observes all k_s examples of the batch, so
      # Q 1_seen = k_s there: X V is (k x, k) without the gathers (other rows are masked).
      xv = (self.x * ks, jnp.broadcast_to(ks, x.shape)) if kind == "linear" else (
          (jnp.broadcast_to(ks, x.shape),) if kind == "additive" else (self.x * ks,))
      self.hv0 = tuple(self.apply(v, jnp.zeros(2, x.dtype), xw) for v, xw in zip(self.v, xv))
      return
    hv = (tuple(side[:, p + j * l:p + (j + 1) * l] for j in range(nd)) if not uniform
          else tuple(ks[0, 0] * d for d in self.diag))
    # H V without λ, as [n+1, P·L] per coarse vector: linear 1_A -> (Σμkx², Σμkx),
    # 1_B -> (Σμkx, Σμk); additive/multiplicative: the one column.
    if kind == "linear":
      self.hv0 = (jnp.concatenate([hv[0], hv[1]], axis=1),
                  jnp.concatenate([hv[1], hv[2]], axis=1))
    else:
      self.hv0 = (hv[0],)

  def lam_row(self, lam):
    """λ = (λ_A, λ_B) [2] as a factor of [n+1, P·L] arrays: λ_A on the A lanes, λ_B on the
    B lanes (additive fits B alone, multiplicative A alone)."""
    if self.kind == "linear":
      return jnp.repeat(lam, self.lanes)[None, :]
    return lam[1] if self.kind == "additive" else lam[0]

  def coarse(self, lam):
    """(H V, apply E⁻¹ to per-lane coefficient tuples) for this λ."""
    hv = tuple(h + self.lam_row(lam) * v for h, v in zip(self.hv0, self.v))
    e = [[_lane_sum(hi * vj, self.parts) for vj in self.v] for hi in hv]
    if self.parts == 1:
      inv = inv1(e[0][0])
      return hv, lambda c: (inv * c[0],)
    iaa, iab, ibb = inv2(e[0][0], e[0][1], e[1][1])
    return hv, lambda c: (iaa * c[0] + iab * c[1], iab * c[0] + ibb * c[1])

  def deflation(self, lam):
    """(z, r) ↦ z − V E⁻¹ ((H V)ᵀ z − Vᵀ r) for `_pcg` (identity without a coarse space)."""
    if not self.coarse_start:
      return lambda z, r: z
    hv, solve_e = self.coarse(lam)

    def apply(z, r):
      return z - self.expand(solve_e(tuple(_lane_sum(h * z - v * r, self.parts)
                                           for h, v in zip(hv, self.v))))
    return apply

  def expand(self, coef):
    """V · coef: [n+1, P·L] from per-lane coefficients."""
    out = 0.0
    for v, c in zip(self.v, coef):
      out = out + v * jnp.tile(c, self.parts)[None, :]
    return out

  def start(self, lam):
    """(w0, rhs − H w0): the Galerkin coarse start (paper's terms), else w0 = 0."""
    if not self.coarse_start:
      return jnp.zeros_like(self.rhs), self.rhs
    hv, solve_e = self.coarse(lam)
    coef = solve_e(tuple(_lane_sum(v * self.rhs, self.parts) for v in self.v))
    w0 = self.expand(coef)
    r0 = self.rhs
    for h, c in zip(hv, coef):
      r0 = r0 - h * jnp.tile(c, self.parts)[None, :]
    return w0, r0

  def warm(self, w, lam):
    """(w, rhs − H w) from the previous λ's solution (plus the coarse correction, paper)."""
    r = self.rhs - self.apply(w, lam)
    if not self.coarse_start:
      return w, r
    hv, solve_e = self.coarse(lam)
    coef = solve_e(tuple(_lane_sum(v * r, self.parts) for v in self.v))
    for h, c in zip(hv, coef):
      r = r - h * jnp.tile(c, self.parts)[None, :]
    return w + self.expand(coef), r

  def predict(self, w):
    """X w: [S, L] (the curriculum part of the fitted one-step change)."""
    g = self.ops.q(w)
    l = self.lanes
    if self.kind == "linear":
      return self.x * g[:, :l] + g[:, l:]
    return g if self.kind == "additive" else self.x * g

  def penalty(self, w):
    """w, or (I − J/n) w per lane when centred (dump row n stays 0)."""
    if not self.terms.centred:
      return w
    mean = jnp.sum(w[:self.n], axis=0, keepdims=True) / self.n
    return (w - mean).at[self.n].set(0)

  def apply(self, w, lam, xw=None):
    """(H + λ penalty) w; xw = X w when already known (the coarse vectors: Q V = k_s)."""
    v = self.predict(w) if xw is None else xw
    if self.st is not None:
      v = self.st.project(v)
    ub = self.mu * v                                    # D (I − P) X w, every step and lane
    if self.kind == "linear":
      out = self.ops.qt(jnp.concatenate([self.x * ub, ub], axis=1))
    elif self.kind == "additive":
      out = self.ops.qt(ub)
    else:
      out = self.ops.qt(self.x * ub)
    return out + self.lam_row(lam) * self.penalty(w)

  def step_terms(self, w):
    """θ at the solution: tuple of [T, L] (the fitted ones of ρ, γ)."""
    return self.st.uncentre(self.st.theta(self.target - self.predict(w)))

  def preconditioner(self, lam):
    """Exact inverse of each train example's 2×2 (1×1) diagonal block of the paper's
    H + λI (an approximation of H' with step terms or centring: the exact blocks of the
    Schur complement were tried and cost more to form than the iterations they saved)."""
    if self.parts == 1:
      inv = inv1(self.diag[0] + self.lam_row(lam))
      return lambda r: inv * r
    iaa, iab, ibb = inv2(self.diag[0] + lam[0], self.diag[1], self.diag[2] + lam[1])
    l = self.lanes

    def apply(r):
      ra, rb = r[:, :l], r[:, l:]
      return jnp.concatenate([iaa * ra + iab * rb, iab * ra + ibb * rb], axis=1)
    return apply


def _lane_sum(v, parts):
  return jnp.sum(v, axis=0).reshape(parts, -1).sum(axis=0)


def _pcg(apply_h, precond, rhs, w, r, lam, tol, max_iters, parts, deflate=lambda z, r: z):
  """Batched PCG from (w, r = rhs − H w); lane l stops (step 0) once ‖r_l‖ ≤ tol·‖rhs_l‖.

  deflate(z, r) ↦ z − V E⁻¹ ((H V)ᵀ z − Vᵀ r) keeps every search direction H-orthogonal to
  the coarse space V (deflated PCG, A-DEF2 form: the Vᵀ r term undoes rounding drift; in
  exact arithmetic Vᵀ r = 0 throughout, from `start` / `warm`)."""
  rep = lambda a: jnp.tile(a, parts)[None, :]
  thresh = (tol * tol) * _lane_sum(rhs * rhs, parts)
  zv = deflate(precond(r), r)
  rz = _lane_sum(r * zv, parts)

  def cond(state):
    return (state[0] < max_iters) & jnp.any(state[-1])

  def body(state):
    it, w, r, p, rz, active = state
    hp = apply_h(p, lam)
    php = _lane_sum(p * hp, parts)
    ok = active & (php > 0)
    alpha = jnp.where(ok, rz / jnp.where(ok, php, 1.0), 0.0)
    w = w + rep(alpha) * p
    r = r - rep(alpha) * hp
    zv = deflate(precond(r), r)
    rz_new = _lane_sum(r * zv, parts)
    beta = jnp.where(ok & (rz > 0), rz_new / jnp.where(rz > 0, rz, 1.0), 0.0)
    p = zv + rep(beta) * p
    active = ok & (_lane_sum(r * r, parts) > thresh)
    return it + 1, w, r, p, jnp.where(ok, rz_new, rz), active

  active = (_lane_sum(r * r, parts) > thresh) & (rz > 0)
  return lax.while_loop(cond, body, (jnp.int32(0), w, r, zv, rz, active))[1]


@functools.partial(jax.jit,
                   static_argnames=("kind", "num_train", "chunk", "width", "max_iters",
                                    "has_dups", "uniform", "terms", "num_steps",
                                    "equal_runs"))
def _solve_path_jit(cols, mult, ks, steps, prev, target, mask, lams, lam_step, tol, col0, *,
                    kind, num_train, chunk, width, max_iters, has_dups, uniform, terms,
                    num_steps, equal_runs):
  """(W [L, P, width, n], Θ [L, p, width, T]) for test columns col0 .. col0+width-1 and
  every λ in `lams`, solved in the given order: the first from the start, each later one
  warm-started from the previous λ's solution (P = 2 for linear: A then B; else the one
  fitted half; p = the number of fitted step terms, T = num_steps). `terms` is static
  structure only (its lam_step is ignored: the traced `lam_step` is used, so a λ_s grid
  compiles once)."""
  s, m = prev.shape[0], width
  ops = _Ops(cols, num_train)
  parts = 2 if kind == "linear" else 1
  num_theta = int(terms.rho) + int(terms.gamma)
  num_lams = lams.shape[0]
  dtype = prev.dtype

  def one_chunk(c, out):
    out_w, out_t = out
    start = jnp.minimum(c * chunk, m - chunk).astype(jnp.int32)  # last chunk overlaps
    zero = jnp.int32(0)
    sl = lambda a: lax.dynamic_slice(a, (zero, (col0 + start).astype(jnp.int32)), (s, chunk))
    sys_ = _System(ops, mult, ks, sl(prev), sl(target), sl(mask), kind, has_dups, uniform,
                   terms, steps, num_steps, lam_step, equal_runs)

    def pcg(w, r, lam):
      return _pcg(sys_.apply, sys_.preconditioner(lam), sys_.rhs, w, r, lam, tol,
                  max_iters, parts, sys_.deflation(lam))

    def thetas(w):
      if not num_theta:
        return jnp.zeros((0, num_steps, chunk), dtype)
      return jnp.stack(sys_.step_terms(w))            # [p, T, chunk]

    w = pcg(*sys_.start(lams[0]), lams[0])

    def per_lam(w, lam):
      w = pcg(*sys_.warm(w, lam), lam)
      return w, (w[:num_train], thetas(w))

    _, (ws, ts) = lax.scan(per_lam, w, lams[1:])   # [L-1, n, P·chunk], [L-1, p, T, chunk]
    ws = jnp.concatenate([w[None, :num_train], ws])
    ts = jnp.concatenate([thetas(w)[None], ts])
    ws = ws.reshape(num_lams, num_train, parts, chunk).transpose(0, 2, 3, 1)
    ts = ts.transpose(0, 1, 3, 2)                   # [L, p, chunk, T]
    return (lax.dynamic_update_slice(out_w, ws, (zero, zero, start, zero)),
            lax.dynamic_update_slice(out_t, ts, (zero, zero, start, zero)))

  out = (jnp.zeros((num_lams, parts, m, num_train), dtype),
         jnp.zeros((num_lams, num_theta, m, num_steps), dtype))
  return lax.fori_loop(0, -(-m // chunk), one_chunk, out)


@functools.partial(jax.jit, static_argnames=("kind",))
def _prior_fit_jit(batches, prev, a0, b0, *, kind):
  # [S, k] positions (-1 pads) -> X w̄ [S, m] = x·Σ_j Ā[:, b_sj] + Σ_j B̄[:, b_sj].
  valid = (batches >= 0)[..., None]
  pos = jnp.maximum(batches, 0)
  qa = jnp.where(valid, a0.T[pos], 0).sum(1) if kind != "additive" else 0.0
  qb = jnp.where(valid, b0.T[pos], 0).sum(1) if kind != "multiplicative" else 0.0
  return prev * qa + qb


def _prior_fit(batches, prev, prior, kind):
  """X w̄: the prior means' fitted one-step values [S, m], in column blocks of ≤ 1,024."""
  out = [_prior_fit_jit(jnp.asarray(batches), prev[:, c:c + 1024], prior[0][c:c + 1024],
                        prior[1][c:c + 1024], kind=kind)
         for c in range(0, prev.shape[1], 1024)]
  return jnp.concatenate(out, axis=1) if len(out) > 1 else out[0]


def _on_device(a, dtype) -> jax.Array:
  """[S, m] data as a device array without the slow unaligned host copy.

  jax.device_put aliases a 64-byte-aligned numpy array of the right dtype on CPU (what
  design.build_transitions produces); anything else is first copied into such a buffer
  (a plain memcpy, ~5× faster than device_put's own copy). Aliased inputs must not be
  mutated while a solve is in flight (Transitions are immutable by contract).
  """
  if isinstance(a, jax.Array):
    return a.astype(dtype)
  a = np.asarray(a)
  if a.dtype != dtype or a.ctypes.data % 64 or not a.flags.c_contiguous:
    from simfluence_jax.simulators import design  # pylint: disable=g-import-not-at-top
    a = design.aligned_array(a, dtype)
  return jax.device_put(a)


def _default_chunk(m: int, s: int, itemsize: int) -> int:
  # Cache-sized chunks: the [S, 2·chunk] gather/scatter operands are kept near 1 MiB.
  # Measured (benchmarks/fit_bench.py --chunk_size, median of 5, float32, quiet machine) on
  # a 2-core Intel Xeon (2 MiB L2 per core):
  #   S = 1,280 (few-shot, m = 10,000): chunk 64/128 -> 0.23–0.26/0.29–0.31 s (paper's
  #     terms), 0.56–0.60/0.69–0.71 s (ρ, γ)
  #   S = 7,680 (many-shot, m = 1,000): chunk 16/32 -> 0.46–0.48/0.45–0.47 s (a tie)
  # (an earlier 2-core AMD EPYC with 1 MiB L2 favoured 2 MiB operands: 128 few-shot).
  # Power of two, 8..256; float64 halves it.
  lanes = max(1, (1 << 20) // max(1, s * 2 * itemsize))
  chunk = 1 << (lanes.bit_length() - 1)
  return max(1, min(m, 256, max(8, chunk)))


def _default_threads(m: int, chunk: int) -> int:
  return max(1, min(os.cpu_count() or 1, 4, -(-m // chunk)))


def solve_path_with_terms(tr, *, kind: str, lams: Sequence, terms: Terms = PAPER,
                          chunk_size: int | None = None, tol: float | None = None,
                          max_iters: int | None = None, num_threads: int | None = None,
                          prior: tuple | None = None) -> list[Solution]:
  """Solves Eq. 2 with `terms` for every λ in `lams`; returns [Solution] in their order.

  lams: each a λ ≥ 0 (on A and B alike) or a pair (λ_A, λ_B) — the penalty
    λ_A ‖A − Ā‖² + λ_B ‖B − B̄‖² (additive uses λ_B, multiplicative λ_A).
  prior: (Ā, B̄) [m, n], the means A and B are shrunk toward (default 0). Solved as the
    same problem in δ = w − w̄ with the target y − X w̄ (X w̄ = x·QĀ + QB̄ per row and test
    example), then w = w̄ + δ; with centring the penalty is on (I − J/n)(w − w̄).
  λs are solved from largest to smallest inside each chunk, each PCG warm-started from the
  previous solution while the chunk's data is still in cache — cheaper than len(lams)
  independent solves. Other arguments are as for `solve`. Step terms need `tr.steps`.
  """
  _check_kind(kind)
  pairs = [(float(v[0]), float(v[1])) if np.ndim(v) else (float(v), float(v)) for v in lams]
  if not pairs or min(min(p) for p in pairs) < 0:
    raise ValueError(f"lams must be non-empty and non-negative, got {list(lams)}")
  lams = pairs
  if terms.has_steps and not terms.lam_step > 0:
    raise ValueError(f"step terms need lam_step > 0 (the first step's losses are shared by "
                     f"every run, so ρ_1 and γ_1 are not separable); got {terms.lam_step}")
  dtype = jnp.asarray(np.zeros((), np.asarray(tr.prev[:0]).dtype)).dtype  # x64-aware
  prev, target, mask = (_on_device(a, dtype) for a in (tr.prev, tr.target, tr.mask))
  s, m = prev.shape
  n = int(tr.num_train)
  if prior is not None:
    prior = tuple(jnp.asarray(np.asarray(p), dtype) for p in prior)
    if any(p.shape != (m, n) for p in prior):
      raise ValueError(f"prior (Ā, B̄) must be two [m={m}, n={n}] arrays, got "
                       f"{[tuple(p.shape) for p in prior]}")
    target = target - _prior_fit(np.asarray(tr.batches), prev, prior, kind)
  num_steps = num_fit_steps(tr) if terms.has_steps else 0
  num_theta = int(terms.rho) + int(terms.gamma)
  if m == 0 or s == 0 or n == 0:
    z, zt = jnp.zeros((m, n), dtype), jnp.zeros((m, num_steps), dtype)
    return [Solution(z, z, zt, zt) for _ in lams]
  if tol is None:
    tol = 1e-10 if dtype == jnp.float64 else 1e-6
  if max_iters is None:
    max_iters = 2 * n + 20 if kind == "linear" else n + 20
  chunk = _default_chunk(m, s, dtype.itemsize) if chunk_size is None else int(chunk_size)
  if chunk < 1:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}")
  chunk = min(chunk, m)
  idx, mult = _slot_data(np.asarray(tr.batches), n)
  k = mult.shape[1]
  ks = (idx.reshape(s, k) < n).sum(1, keepdims=True)  # [S, 1] examples per step
  cols = tuple(jnp.asarray(np.ascontiguousarray(idx.reshape(s, k)[:, j])) for j in range(k))
  steps = (jnp.asarray(np.asarray(tr.steps, np.int32)) if terms.has_steps
           else jnp.zeros((s,), jnp.int32))
  order = sorted(range(len(lams)), key=lambda i: (-lams[i][0], -lams[i][1]))
  # Column windows of equal width (the last one overlaps; overlapping lanes give identical
  # results), solved concurrently: XLA:CPU runs one such loop on one core, and jax
  # releases the GIL while it runs.
  threads = _default_threads(m, chunk) if num_threads is None else max(1, int(num_threads))
  width = min(m, chunk * -(-(-(-m // chunk)) // threads))
  starts = list(range(0, m - width, width)) + [m - width]
  call = functools.partial(
      _solve_path_jit, cols, jnp.asarray(mult, dtype), jnp.asarray(ks, dtype), steps, prev,
      target, mask, jnp.asarray([lams[i] for i in order], dtype),
      jnp.asarray(terms.lam_step, dtype), jnp.asarray(tol, dtype),
      kind=kind, num_train=n, chunk=chunk, width=width, max_iters=int(max_iters),
      has_dups=bool((mult > 1).any()),
      uniform=bool((mult <= 1).all() and (ks == ks.flat[0]).all()) if s else False,
      terms=dataclasses.replace(terms, lam_step=0.0, prior_rank=0), num_steps=num_steps,
      equal_runs=bool(terms.has_steps and s % max(num_steps, 1) == 0 and np.array_equal(
          np.asarray(tr.steps), np.tile(np.arange(num_steps), s // max(num_steps, 1)))))
  if len(starts) == 1:
    parts = [call(np.int32(0))]
  else:
    x64 = dtype == jnp.float64   # jax.enable_x64 is thread-local: carry it over

    def work(c0):
      with jax.enable_x64(x64):
        return jax.block_until_ready(call(np.int32(c0)))
    with concurrent.futures.ThreadPoolExecutor(len(starts)) as pool:
      parts = list(pool.map(work, starts))
  keep = [min(width, (starts[i + 1] if i + 1 < len(starts) else m) - c0)
          for i, c0 in enumerate(starts)]

  def stitch(arrays):
    return jnp.concatenate([p[:, :, width - kk:] if i == len(arrays) - 1 else p[:, :, :kk]
                            for i, (p, kk) in enumerate(zip(arrays, keep))], axis=2)
  w = stitch([p[0] for p in parts])
  theta = stitch([p[1] for p in parts])          # [L, p, m, T]
  zeros = jnp.zeros((len(lams), m, n), dtype)
  zeros_t = jnp.zeros((len(lams), m, num_steps), dtype)
  a, b = {"linear": (w[:, 0], w[:, -1]), "additive": (zeros, w[:, 0]),
          "multiplicative": (w[:, 0], zeros)}[kind]
  if prior is not None:   # w = w̄ + δ on the fitted halves
    a = a + prior[0][None] if kind != "additive" else a
    b = b + prior[1][None] if kind != "multiplicative" else b
  rho = theta[:, 0] if terms.rho else zeros_t
  gamma = theta[:, num_theta - 1] if terms.gamma else zeros_t
  result: list = [None] * len(lams)
  for j, i in enumerate(order):
    result[i] = Solution(a[j], b[j], rho[j], gamma[j])
  return result


def solve_path(tr, *, kind: str, lams: Sequence[float], chunk_size: int | None = None,
               tol: float | None = None, max_iters: int | None = None,
               num_threads: int | None = None) -> list[tuple[jax.Array, jax.Array]]:
  """The paper's Eq. 2 for every λ in `lams`; returns [(A, B)] in the order of `lams`."""
  return [(sol.A, sol.B) for sol in solve_path_with_terms(
      tr, kind=kind, lams=lams, chunk_size=chunk_size, tol=tol, max_iters=max_iters,
      num_threads=num_threads)]


def solve(tr, *, kind: str, lam: float, chunk_size: int | None = None,
          tol: float | None = None, max_iters: int | None = None,
          num_threads: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Production solver of Eq. 2: A, B [m, n] (zeros for the disabled half of the ablations).

  Args:
    tr: design.Transitions. Its float dtype (float32, or float64 under jax x64) is the
      compute dtype.
    kind: "linear" | "additive" | "multiplicative".
    lam: λ ≥ 0 (λ = 0 gives the min-norm-like CG solution on unidentified parameters).
    chunk_size: test examples per chunk (bounds memory; results do not depend on it).
      None = a cache-sized chunk (`_default_chunk`).
    tol: per test example relative residual ‖r‖/‖rhs‖ at which PCG stops
      (default 1e-6 in float32, 1e-10 in float64).
    max_iters: PCG iteration cap (default 2n + 20 for linear, n + 20 otherwise).
    num_threads: concurrent column windows (default: CPU cores, at most 4, one per chunk).
  """
  (a, b), = solve_path(tr, kind=kind, lams=[lam], chunk_size=chunk_size, tol=tol,
                       max_iters=max_iters, num_threads=num_threads)
  return a, b


__all__ = ["KINDS", "Terms", "PAPER", "Solution", "solve", "solve_path",
           "solve_path_with_terms", "solve_dense_reference", "num_fit_steps"]
