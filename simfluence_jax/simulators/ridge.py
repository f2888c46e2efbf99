"""Closed-form ridge solvers of Simfluence's objective (paper Eq. 2/3, Appendix A.1).

For each test example z independently (all m at once), with Q the S × n batch matrix
(Q[s, i] = multiplicity of train position i in batch s, shared by every z) and, per z, the
recorded x_s = L_{t-1}(z), y_s = L_t(z), mask μ_s ∈ {0, 1}:

    O(A, B) = Σ_s μ_s (y_s − (QA)_s x_s − (QB)_s)² + λ (‖A‖² + ‖B‖²)                (Eq. 2)

i.e. ridge regression with design X = [diag(x) Q, Q] (Eq. 13). Its normal equations are

    [ Qᵀ D_xx Q + λI   Qᵀ D_x Q      ] [A]   [ Qᵀ (μ x y) ]
    [ Qᵀ D_x Q         Qᵀ D_1 Q + λI ] [B] = [ Qᵀ (μ y)   ],   D_w = diag(μ·w) over steps,

kind "additive" (α ≡ 1, TracIn-Ideal): (Qᵀ D_1 Q + λI) B = Qᵀ(μ (y − x)), A = 0;
kind "multiplicative" (β ≡ 0):        (Qᵀ D_xx Q + λI) A = Qᵀ(μ x y),   B = 0.

`solve_dense_reference` builds X per z explicitly in float64 numpy (the tests' oracle).

`solve` / `solve_path` are the production solvers — batched preconditioned conjugate
gradients (PCG) over test examples ("lanes"):
  * Matrix-free: Q w is k row-gathers per step and Qᵀ v k row-scatter-adds (one per batch
    slot), so a matvec costs O(S·k) per lane instead of O(n²); arrays are [rows, lanes].
  * Preconditioner: the exact inverse of each train example's 2 × 2 diagonal block
    [[Σ μx²q², Σ μxq²], [Σ μxq², Σ μq²]] + λI — exact when the batch size is 1 (Eq. 4
    decouples per example). The preconditioned spectrum is then Marchenko-Pastur-like,
    ≈ [(1 − √(2n/S))², (1 + √(2n/S))²] from the random batch coupling, plus two outliers ≈ k
    (the common A and B modes): ~11 iterations few-shot, ~20 many-shot at tol 1e-6.
  * Coarse space V = [1_A, 1_B] (see `_System`): CG starts from the best fit with all A_i
    equal and all B_i equal (a 2 × 2 solve per lane). Deflating every search direction
    against V (Saad et al. 2000) saved 19% CPU few-shot on planted traces but diverged on
    random losses (tests/ridge_test.py), so it is switched off (`deflate_steps=False`).
  * Stopping: each lane stops updating (α_cg = 0) once ‖r‖ ≤ tol·‖rhs‖ for its own residual,
    so a lane's result does not depend on which other lanes share its chunk or window.
  * Layout: lanes run in chunks of `chunk_size` inside one jitted `fori_loop`, so a chunk's
    working set stays in cache and memory is O(S · chunk) beyond the inputs for any m;
    equal column windows run on concurrent threads (XLA:CPU runs one loop on one core).
  * A λ path warm-starts each λ (largest first) from the previous solution of that chunk.
float32 results are within ~1e-4 of the float64 solution relative to max |parameter|
(tol 1e-6); float64 (jax x64) within ~1e-9 (tol 1e-10).
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

KINDS = ("linear", "additive", "multiplicative")


def _check_kind(kind: str) -> str:
  if kind not in KINDS:
    raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
  return kind


def _dense_q(batches: np.ndarray, n: int) -> np.ndarray:
  """float64 [S, n] batch matrix with multiplicities (an id twice in a batch gives 2)."""
  q = np.zeros((batches.shape[0], n))
  for s, row in enumerate(np.asarray(batches)):
    for i in row:
      if i >= 0:
        q[s, i] += 1.0
  return q


def solve_dense_reference(tr, *, kind: str, lam: float) -> tuple[np.ndarray, np.ndarray]:
  """Eq. 13 solved per test example with an explicit float64 design matrix.

  For each z: rows s with mask 1, X = [x·Q, Q] (or Q / x·Q for the ablations), and
  w = argmin ‖y − Xw‖² + λ‖w‖² via lstsq on the stacked system [X; √λ I] (min-norm at λ=0).
  Returns float64 A, B [m, n].
  """
  _check_kind(kind)
  n = tr.num_train
  q = _dense_q(np.asarray(tr.batches), n)
  prev, target = np.asarray(tr.prev, np.float64), np.asarray(tr.target, np.float64)
  mask = np.asarray(tr.mask) > 0
  m = prev.shape[1]
  a_out, b_out = np.zeros((m, n)), np.zeros((m, n))
  for z in range(m):
    rows = mask[:, z]
    qz, x, y = q[rows], prev[rows, z], target[rows, z]
    if kind == "linear":
      design, rhs = np.concatenate([x[:, None] * qz, qz], axis=1), y
    elif kind == "additive":
      design, rhs = qz, y - x
    else:
      design, rhs = x[:, None] * qz, y
    p = design.shape[1]
    stacked = np.concatenate([design, np.sqrt(lam) * np.eye(p)])
    w = np.linalg.lstsq(stacked, np.concatenate([rhs, np.zeros(p)]), rcond=None)[0]
    if kind == "linear":
      a_out[z], b_out[z] = w[:n], w[n:]
    elif kind == "additive":
      b_out[z] = w
    else:
      a_out[z] = w
  return a_out, b_out


# ----------------------------------------------------------------------------- production


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


def _inv2(daa, dab, dbb):
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


def _inv1(d):
  return jnp.where(d > 0, 1.0 / jnp.where(d > 0, d, 1.0), 0.0)


class _System:
  """One chunk's normal equations H w = rhs, matrix-free (W, rhs: [n+1, P·L]).

  P = 2 for "linear" (A lanes, then B lanes), else 1. x, y, μ are [S, L]; ks [S, 1] is the
  batch size Σ_i Q[s, i] of each step.

  Coarse space (deflation): V = [1_A, 1_B] restricted to the train examples a lane observes
  (every A_i equal, every B_i equal). Since Q V = k_s on recorded steps, H V needs only the
  scatter of μ k_s [x², x, 1] (= k · the diagonal weights when every batch has k distinct
  examples), E = Vᵀ H V is a lane sum, and the Galerkin start w0 = V E⁻¹ Vᵀ rhs removes the
  large common component of A (α ≈ 1 ⇒ A_i ≈ 1/k). Deflating V in every CG step (Saad et
  al. 2000) also removes the two outlying eigenvalues ≈ k of the block-preconditioned H.
  The right-hand side, H V and the preconditioner diagonals come from one scatter.
  """

  def __init__(self, ops, mult, ks, x, y, mu, kind, has_dups, uniform):
    self.ops, self.kind, self.n = ops, kind, ops.n
    self.mu = mu = jnp.where(mu > 0, 1.0, 0.0).astype(x.dtype)
    self.x = x = jnp.where(mu > 0, x, 0)
    y = jnp.where(mu > 0, y, 0)
    self.lanes = l = x.shape[1]
    self.parts = 2 if kind == "linear" else 1
    mx = mu * x
    if kind == "linear":
      sides, diags = [mx * y, mu * y], [mx * x, mx, mu]
    elif kind == "additive":
      sides, diags = [mu * (y - x)], [mu]
      self.wt = mu
    else:
      sides, diags = [mx * y], [mx * x]
      self.wt = mx * x
    nd = len(diags)
    # uniform (static): no duplicates and every step holds k examples -> H V = k · diag.
    coarse = [] if uniform else [ks * d for d in diags]
    if has_dups:   # the diagonal needs Σ_s Q[s, i]² w_s: its own multiplicity-weighted scatter
      side = ops.qt(jnp.concatenate(sides + coarse, axis=1))
      diag = ops.qt(jnp.concatenate(diags, axis=1), mult)
    else:
      side = ops.qt(jnp.concatenate(sides + coarse + diags, axis=1))
      side, diag = side[:, :(len(sides) + len(coarse)) * l], side[:, -nd * l:]
    p = self.parts * l
    self.rhs = side[:, :p]
    self.diag = tuple(diag[:, j * l:(j + 1) * l] for j in range(nd))
    hv = (tuple(side[:, p + j * l:p + (j + 1) * l] for j in range(nd)) if not uniform
          else tuple(ks[0, 0] * d for d in self.diag))
    # H V without λ, as [n+1, P·L] per coarse vector: linear 1_A -> (Σμkx², Σμkx),
    # 1_B -> (Σμkx, Σμk); additive/multiplicative: the one column.
    if kind == "linear":
      self.hv0 = (jnp.concatenate([hv[0], hv[1]], axis=1),
                  jnp.concatenate([hv[1], hv[2]], axis=1))
    else:
      self.hv0 = (hv[0],)
    # Only rows of examples this lane observes (a zero Qᵀ D_1 Q diagonal stays at 0, so a
    # λ = 0 solve keeps unidentified-by-absence parameters at 0, like the min-norm fit).
    seen = (self.diag[-1] > 0).astype(x.dtype)             # [n+1, L]; dump row: 0
    zero = jnp.zeros_like(seen)
    self.v = ((jnp.concatenate([seen, zero], axis=1), jnp.concatenate([zero, seen], axis=1))
              if kind == "linear" else (seen,))

  def coarse(self, lam):
    """(H V, apply E⁻¹ to per-lane coefficient tuples) for this λ."""
    hv = tuple(h + lam * v for h, v in zip(self.hv0, self.v))
    e = [[_lane_sum(hi * vj, self.parts) for vj in self.v] for hi in hv]
    if self.parts == 1:
      inv = _inv1(e[0][0])
      return hv, lambda c: (inv * c[0],)
    iaa, iab, ibb = _inv2(e[0][0], e[0][1], e[1][1])
    return hv, lambda c: (iaa * c[0] + iab * c[1], iab * c[0] + ibb * c[1])

  def expand(self, coef):
    """V · coef: [n+1, P·L] from per-lane coefficients."""
    out = 0.0
    for v, c in zip(self.v, coef):
      out = out + v * jnp.tile(c, self.parts)[None, :]
    return out

  def start(self, lam):
    """Galerkin start w0 = V E⁻¹ Vᵀ rhs and its residual rhs − H w0 (which is ⊥ V)."""
    hv, solve_e = self.coarse(lam)
    coef = solve_e(tuple(_lane_sum(v * self.rhs, self.parts) for v in self.v))
    w0 = self.expand(coef)
    r0 = self.rhs
    for h, c in zip(hv, coef):
      r0 = r0 - h * jnp.tile(c, self.parts)[None, :]
    return w0, r0

  def deflation(self, lam):
    """z -> (I − V E⁻¹ (HV)ᵀ) z, keeping search directions H-orthogonal to V."""
    hv, solve_e = self.coarse(lam)
    return lambda z: z - self.expand(solve_e(tuple(_lane_sum(h * z, self.parts)
                                                    for h in hv)))

  def apply(self, w, lam):
    g = self.ops.q(w)
    if self.kind == "linear":
      l = self.lanes
      ub = self.mu * (self.x * g[:, :l] + g[:, l:])   # μ ⊙ X w, every step and lane
      out = self.ops.qt(jnp.concatenate([self.x * ub, ub], axis=1))
    else:
      out = self.ops.qt(self.wt * g)
    return out + lam * w

  def preconditioner(self, lam):
    """Exact inverse of each train example's 2×2 (1×1) diagonal block of H + λI."""
    if self.parts == 1:
      inv = _inv1(self.diag[0] + lam)
      return lambda r: inv * r
    iaa, iab, ibb = _inv2(self.diag[0] + lam, self.diag[1], self.diag[2] + lam)
    l = self.lanes

    def apply(r):
      ra, rb = r[:, :l], r[:, l:]
      return jnp.concatenate([iaa * ra + iab * rb, iab * ra + ibb * rb], axis=1)
    return apply


def _lane_sum(v, parts):
  return jnp.sum(v, axis=0).reshape(parts, -1).sum(axis=0)


def _pcg(apply_h, precond, deflate, rhs, w, r, lam, tol, max_iters, parts):
  """Batched deflated PCG from (w, r = rhs − H w); lane l stops (step 0) once
  ‖r_l‖ ≤ tol·‖rhs_l‖. Search directions are deflate(M⁻¹ r) + β p."""
  rep = lambda a: jnp.tile(a, parts)[None, :]
  thresh = (tol * tol) * _lane_sum(rhs * rhs, parts)
  zv = precond(r)
  rz = _lane_sum(r * zv, parts)
  p0 = deflate(zv)

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
    zv = precond(r)
    rz_new = _lane_sum(r * zv, parts)
    beta = jnp.where(ok & (rz > 0), rz_new / jnp.where(rz > 0, rz, 1.0), 0.0)
    p = deflate(zv) + rep(beta) * p
    active = ok & (_lane_sum(r * r, parts) > thresh)
    return it + 1, w, r, p, jnp.where(ok, rz_new, rz), active

  active = (_lane_sum(r * r, parts) > thresh) & (rz > 0)
  return lax.while_loop(cond, body, (jnp.int32(0), w, r, p0, rz, active))[1]


@functools.partial(jax.jit,
                   static_argnames=("kind", "num_train", "chunk", "width", "max_iters",
                                    "has_dups", "uniform", "deflate_steps"))
def _solve_path_jit(cols, mult, ks, prev, target, mask, lams, tol, col0, *, kind,
                    num_train, chunk, width, max_iters, has_dups, uniform,
                    deflate_steps):
  """W [L, P, width, n] for test columns col0 .. col0+width-1 and every λ in `lams`, solved
  in the given order: the first from the coarse start, each later one warm-started from the
  previous λ's solution (P = 2 for linear: A then B; else the one fitted half)."""
  s, m = prev.shape[0], width
  ops = _Ops(cols, num_train)
  parts = 2 if kind == "linear" else 1
  num_lams = lams.shape[0]
  dtype = prev.dtype

  def one_chunk(c, out):
    start = jnp.minimum(c * chunk, m - chunk).astype(jnp.int32)  # last chunk overlaps
    zero = jnp.int32(0)
    sl = lambda a: lax.dynamic_slice(a, (zero, (col0 + start).astype(jnp.int32)), (s, chunk))
    sys_ = _System(ops, mult, ks, sl(prev), sl(target), sl(mask), kind, has_dups, uniform)

    def pcg(w, r, lam):
      deflate = sys_.deflation(lam) if deflate_steps else (lambda z: z)
      return _pcg(sys_.apply, sys_.preconditioner(lam), deflate, sys_.rhs, w, r, lam, tol,
                  max_iters, parts)

    w = pcg(*sys_.start(lams[0]), lams[0])

    def per_lam(w, lam):
      # Warm start from the previous λ's solution plus the coarse correction that makes
      # its residual ⊥ V (as deflated CG requires).
      hv, solve_e = sys_.coarse(lam)
      r = sys_.rhs - sys_.apply(w, lam)
      coef = solve_e(tuple(_lane_sum(v * r, parts) for v in sys_.v))
      for h, c in zip(hv, coef):
        r = r - h * jnp.tile(c, parts)[None, :]
      w = pcg(w + sys_.expand(coef), r, lam)
      return w, w[:num_train]

    _, ws = lax.scan(per_lam, w, lams[1:])   # [L-1, n, P·chunk]
    ws = jnp.concatenate([w[None, :num_train], ws])
    ws = ws.reshape(num_lams, num_train, parts, chunk).transpose(0, 2, 3, 1)
    return lax.dynamic_update_slice(out, ws, (zero, zero, start, zero))

  out = jnp.zeros((num_lams, parts, m, num_train), dtype)
  return lax.fori_loop(0, -(-m // chunk), one_chunk, out)


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
  # Cache-sized chunks: the [S, 2·chunk] gather/scatter operands are kept near 2 MiB.
  # Measured on a 2-core AMD EPYC (1 MiB L2 per core), float32, quiet machine:
  #   S = 1,280 (few-shot, m = 10,000): chunk 16/64/128/256 -> 0.32/0.27/0.22/0.40 s
  #   S = 7,680 (many-shot, m = 1,000): chunk 32/128 -> 0.33/0.55 s
  # i.e. 128 and 32 lanes, which this rule picks (power of two, 8..256). float64 halves it.
  lanes = max(1, (2 << 20) // max(1, s * 2 * itemsize))
  chunk = 1 << (lanes.bit_length() - 1)
  return max(1, min(m, 256, max(8, chunk)))


def _default_threads(m: int, chunk: int) -> int:
  return max(1, min(os.cpu_count() or 1, 4, -(-m // chunk)))


def solve_path(tr, *, kind: str, lams: Sequence[float], chunk_size: int | None = None,
               tol: float | None = None, max_iters: int | None = None,
               num_threads: int | None = None) -> list[tuple[jax.Array, jax.Array]]:
  """Solves Eq. 2 for every λ in `lams`; returns [(A, B)] in the order of `lams`.

  λs are solved from largest to smallest inside each chunk, each PCG warm-started from the
  previous solution while the chunk's data is still in cache — cheaper than len(lams)
  independent `solve` calls. Arguments are as for `solve`.
  """
  _check_kind(kind)
  lams = [float(v) for v in lams]
  if not lams or min(lams) < 0:
    raise ValueError(f"lams must be non-empty and non-negative, got {lams}")
  dtype = jnp.asarray(np.zeros((), np.asarray(tr.prev[:0]).dtype)).dtype  # x64-aware
  prev, target, mask = (_on_device(a, dtype) for a in (tr.prev, tr.target, tr.mask))
  s, m = prev.shape
  n = int(tr.num_train)
  if m == 0 or s == 0 or n == 0:
    z = jnp.zeros((m, n), dtype)
    return [(z, z) for _ in lams]
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
  order = sorted(range(len(lams)), key=lambda i: -lams[i])
  # Column windows of equal width (the last one overlaps; overlapping lanes give identical
  # results), solved concurrently: XLA:CPU runs one such loop on one core, and jax
  # releases the GIL while it runs.
  threads = _default_threads(m, chunk) if num_threads is None else max(1, int(num_threads))
  width = min(m, chunk * -(-(-(-m // chunk)) // threads))
  starts = list(range(0, m - width, width)) + [m - width]
  call = functools.partial(
      _solve_path_jit, cols, jnp.asarray(mult, dtype), jnp.asarray(ks, dtype), prev,
      target, mask, jnp.asarray([lams[i] for i in order], dtype), jnp.asarray(tol, dtype),
      kind=kind, num_train=n, chunk=chunk, width=width, max_iters=int(max_iters),
      has_dups=bool((mult > 1).any()),
      uniform=bool((mult <= 1).all() and (ks == ks.flat[0]).all()) if s else False,
      # Deflating every step costs O(n) per lane and removes the outliers ≈ k; it paid off
      # (−19% CPU) at S = 12.8 n (few-shot) and cost +15% at S = 5 n (many-shot, where
      # the bulk's upper edge (1 + √(2n/S))² ≈ 2.7 is already close to k).
      # Deflation is OFF: on random (non-decaying) losses deflated PCG diverged (errors of
      # 1e2 relative at n = 50, S ≥ 8n, and at n = 2; found by the property test in
      # tests/bad_input_test.py) while plain PCG from the same coarse start converges.
      deflate_steps=False)
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
  w = jnp.concatenate([p[:, :, width - kk:] if i == len(parts) - 1 else p[:, :, :kk]
                       for i, (p, kk) in enumerate(zip(parts, keep))], axis=2)
  zeros = jnp.zeros((len(lams), m, n), dtype)
  a, b = {"linear": (w[:, 0], w[:, -1]), "additive": (zeros, w[:, 0]),
          "multiplicative": (w[:, 0], zeros)}[kind]
  result: list = [None] * len(lams)
  for j, i in enumerate(order):
    result[i] = (a[j], b[j])
  return result


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
      None = 32 lanes in float32, 16 in float64.
    tol: per test example relative residual ‖r‖/‖rhs‖ at which PCG stops
      (default 1e-6 in float32, 1e-10 in float64).
    max_iters: PCG iteration cap (default 2n + 20 for linear, n + 20 otherwise).
    num_threads: concurrent column windows (default: CPU cores, at most 4, one per chunk).
  """
  (a, b), = solve_path(tr, kind=kind, lams=[lam], chunk_size=chunk_size, tol=tol,
                       max_iters=max_iters, num_threads=num_threads)
  return a, b


__all__ = ["KINDS", "solve", "solve_path", "solve_dense_reference"]
