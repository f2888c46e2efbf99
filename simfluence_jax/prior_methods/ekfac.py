"""EK-FAC curvature (George et al. 2018; Grosse et al. 2023) and damped inverse products.

Curvature G is the empirical Fisher / Gauss–Newton proxy of the training loss,
G = (1/N) Σ_n g_n g_nᵀ over per-example gradients g_n (float64 here throughout).

1. Dense layers (`fit_dense`, `fit_kfac`), s = a W with W [din, dout] (for the tiny MLP
   a = ā = [h, 1], bias as the last row of W [din+1, dout]). Per example n, at its token
   positions t = 1..T, with inputs a_nt [din] and output gradients δ_nt = ∂L_n/∂s_nt [dout]
   (T = 1 for the MLP: acts [N, din], deltas [N, dout]; T5 kernels: acts [N, T, din],
   deltas [N, T, dout], gradients.dense_kernel_statistics), the weight gradient is exactly
       G_n = Σ_t a_nt δ_ntᵀ                                             [din, dout].
   K-FAC factors, normalised per example (sum over tokens, mean over examples):
       A = (1/N) Σ_n Σ_t a_nt a_ntᵀ = Q_A Λ_A Q_Aᵀ,   S = (1/N) Σ_n Σ_t δ_nt δ_ntᵀ = Q_S Λ_S Q_Sᵀ,
   layer block of G ≈ A ⊗ S, eigenbasis Q_A ⊗ Q_S (any rescaling of A or S, e.g. by 1/T,
   leaves the basis and hence EK-FAC unchanged). EK-FAC replaces Λ_A ⊗ Λ_S by the
   per-example second moments in that basis (the eigenvalue correction):
       Λ*[j, k] = (1/N) Σ_n (Q_Aᵀ G_n Q_S)[j, k]²                       [din, dout]
   and the damped inverse product of V [din, dout] is
       (G + λI)⁻¹ V ≈ Q_A ((Q_Aᵀ V Q_S) / (Λ* + λ)) Q_Sᵀ.
   Layers are independent blocks (block-diagonal G).

   Flat form (`fit_kernels`, `kernel_apply_spectral`): the per-example gradients of the
   whole model flattened to [N, P] (gradients.py, exact), each kernel a column range
   [start, stop) that is W [din, dout] row-major. Columns outside every kernel (T5:
   embeddings, RMSNorm scales, relative-position tables) are NOT modelled: the operator
   returns 0 there, i.e. influence is computed in the dense-kernel subspace only (the
   exact reference is the damped solve restricted to those columns).

   EK-FAC is EXACT (equals the damped solve with the exact G) when G is block-diagonal
   across layers and each layer block is diagonal in Q_A ⊗ Q_S; e.g. (tests/ekfac_test.py)
   a single dense layer without bias whose examples have mutually orthogonal inputs a_n
   with distinct norms and mutually orthogonal output gradients δ_n with distinct norms
   (then every ā_n ⊗ δ_n is an eigenvector of A ⊗ S and of G), or a single example.

2. Gradient blocks (`fit_blocks`), for models whose layers are not wired here: the T5 IA3
   vectors (each a diagonal "layer" h = l ⊙ a) and JL-projected full-model gradients. A
   diagonal layer has no Kronecker structure to factor (its Fisher is E[(a⊙δ)(a⊙δ)ᵀ]), so
   each block's eigenbasis is that of its own empirical Fisher, computed from the per-example
   gradients; the eigenvalue correction then returns that block's exact eigenvalues, i.e.
   this is the block-diagonal (per IA3 vector / per projected block) exact damped solve.

`apply_spectral(state, V, f)` computes Q f(Λ*) Qᵀ V for any elementwise f; the damped
inverse is f(λ) = 1/(λ + damping), Source's segment operators (baselines.py) use other f.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Spectral = Callable[[jax.Array], jax.Array]


# --------------------------------------------------------------------------- dense layers
def mlp_apply(layers: Sequence[dict], x: jax.Array, perturb: Sequence | None = None):
  """A tanh MLP: s_l = [h_{l-1}, 1] W_l (+ perturb_l), h_l = tanh(s_l), last layer linear.

  layers: [{"w": [din, dout], "b": [dout]}]. Returns (output [b, dout_L], inputs h_{l-1}).
  `perturb` (zeros) lets ∂L/∂s_l be read off as the gradient w.r.t. the perturbation.
  """
  h, inputs = x, []
  for i, layer in enumerate(layers):
    inputs.append(h)
    s = h @ layer["w"] + layer["b"]
    if perturb is not None:
      s = s + perturb[i]
    h = s if i == len(layers) - 1 else jnp.tanh(s)
  return h, inputs


def dense_statistics(layers: Sequence[dict], loss: Callable, x: jax.Array, y: jax.Array
                     ) -> tuple[list[jax.Array], list[jax.Array]]:
  """Per-example augmented inputs ā_l [N, din+1] and output gradients δ_l [N, dout].

  loss(output [dout], target) -> scalar, per example.
  """
  def one(xn, yn):
    def f(perturb):
      out, inputs = mlp_apply(layers, xn[None], [p[None] for p in perturb])
      return loss(out[0], yn), inputs
    zeros = [jnp.zeros(l["b"].shape, x.dtype) for l in layers]
    deltas, inputs = jax.grad(f, has_aux=True)(zeros)
    acts = [jnp.concatenate([a[0], jnp.ones((1,), x.dtype)]) for a in inputs]
    return acts, deltas
  return jax.vmap(one)(x, y)


def _tokens(x: jax.Array) -> jax.Array:
  """[N, d] (one position per example) -> [N, 1, d]; [N, T, d] unchanged."""
  if x.ndim not in (2, 3):
    raise ValueError(f"expected [N, d] or [N, T, d] activations/gradients, got {x.shape}")
  return x[:, None] if x.ndim == 2 else x


def layer_gradients(acts: Sequence[jax.Array], deltas: Sequence[jax.Array]) -> list:
  """Per-example weight gradients G_n = Σ_t a_nt δ_ntᵀ per layer: [N, din, dout]."""
  return [jnp.einsum("nti,nto->nio", _tokens(a), _tokens(d)) for a, d in zip(acts, deltas)]


def kfac_factors(acts: Sequence[jax.Array], deltas: Sequence[jax.Array]) -> list:
  """Per layer (A [din, din], S [dout, dout]) = ((1/N) Σ_n Σ_t a aᵀ, (1/N) Σ_n Σ_t δ δᵀ)."""
  out = []
  for a, d in zip(acts, deltas):
    a, d = _tokens(a), _tokens(d)
    out.append((jnp.einsum("nti,ntj->ij", a, a) / a.shape[0],
                jnp.einsum("nti,ntj->ij", d, d) / d.shape[0]))
  return out


def flatten_layer_grads(grads: Sequence[jax.Array]) -> jax.Array:
  """[N, din+1, dout] per layer -> [N, P] (layer-major, row-major within a layer)."""
  return jnp.concatenate([g.reshape(g.shape[0], -1) for g in grads], axis=1)


@dataclasses.dataclass(frozen=True)
class DenseEKFAC:
  """Per layer: Q_A [din, din], Q_S [dout, dout], corrected eigenvalues Λ* [din, dout]."""
  qa: tuple
  qs: tuple
  eig: tuple


jax.tree_util.register_dataclass(DenseEKFAC, data_fields=["qa", "qs", "eig"], meta_fields=[])


def _check_finite(x, what: str):
  if not bool(jnp.all(jnp.isfinite(x))):
    raise ValueError(f"EK-FAC: {what} has non-finite entries (NaN/inf gradients or "
                     "activations at this checkpoint?)")


def fit_kfac(factors: Sequence[tuple], grads: Sequence[jax.Array]) -> DenseEKFAC:
  """EK-FAC from K-FAC factors [(A, S)] and per-example layer gradients [N, din, dout]:
  Q_A, Q_S = eigenvectors of A, S; Λ* = mean_n (Q_Aᵀ G_n Q_S)²."""
  qas, qss, eigs = [], [], []
  for i, ((fa, fs), g) in enumerate(zip(factors, grads)):
    if g.shape[1:] != (fa.shape[0], fs.shape[0]):
      raise ValueError(f"layer {i}: gradients {g.shape} do not match factors A {fa.shape}, "
                       f"S {fs.shape} (expected [N, din, dout])")
    _check_finite(fa, f"layer {i} factor A")
    _check_finite(fs, f"layer {i} factor S")
    _, qa = jnp.linalg.eigh(fa)
    _, qs = jnp.linalg.eigh(fs)
    eigs.append(jnp.mean(jnp.einsum("ij,nik,kl->njl", qa, g, qs) ** 2, axis=0))
    qas.append(qa)
    qss.append(qs)
  return DenseEKFAC(tuple(qas), tuple(qss), tuple(eigs))


def fit_dense(acts: Sequence[jax.Array], deltas: Sequence[jax.Array]) -> DenseEKFAC:
  """K-FAC factors, their eigenbases, and the EK-FAC eigenvalue correction from per-example
  statistics acts [N, din] / [N, T, din], deltas [N, dout] / [N, T, dout] per layer."""
  qas, qss, eigs = [], [], []
  for a, d in zip(acts, deltas):
    if a.ndim == 3:                                  # several tokens: G_n is not rank one
      state = fit_kfac(kfac_factors([a], [d]), layer_gradients([a], [d]))
      qa, qs, eig = state.qa[0], state.qs[0], state.eig[0]
    else:
      n = a.shape[0]
      _, qa = jnp.linalg.eigh(a.T @ a / n)                      # A = (1/N) Σ ā āᵀ
      _, qs = jnp.linalg.eigh(d.T @ d / n)                      # S = (1/N) Σ δ δᵀ
      # (Q_Aᵀ ā_n δ_nᵀ Q_S)[j, k] = (Q_Aᵀ ā_n)_j (Q_Sᵀ δ_n)_k: no [N, din, dout] tensor.
      eig = ((a @ qa) ** 2).T @ ((d @ qs) ** 2) / n             # [din, dout]
    qas.append(qa)
    qss.append(qs)
    eigs.append(eig)
  return DenseEKFAC(tuple(qas), tuple(qss), tuple(eigs))


def dense_apply_spectral(state: DenseEKFAC, vecs: Sequence[jax.Array], f: Spectral) -> list:
  """Per layer V [B, din, dout] -> Q_A (f(Λ*) ⊙ (Q_Aᵀ V Q_S)) Q_Sᵀ."""
  out = []
  for qa, qs, eig, v in zip(state.qa, state.qs, state.eig, vecs):
    rotated = jnp.einsum("ij,bik,kl->bjl", qa, v, qs)
    out.append(jnp.einsum("ij,bjl,kl->bik", qa, rotated * f(eig), qs))
  return out


@dataclasses.dataclass(frozen=True)
class KernelEKFAC:
  """EK-FAC over kernels laid out in a flat [P] parameter vector: per kernel the layer state
  in `dense`, and static bounds ((start, stop, din, dout), ...) with stop − start = din·dout."""
  dense: DenseEKFAC
  bounds: tuple
  size: int

  @property
  def eig(self):
    return self.dense.eig


jax.tree_util.register_dataclass(KernelEKFAC, data_fields=["dense"],
                                 meta_fields=["bounds", "size"])


def _check_kernel_bounds(bounds, size: int) -> tuple:
  bounds = tuple(tuple(int(x) for x in b) for b in bounds)
  prev = 0
  for start, stop, din, dout in bounds:
    if start < prev or stop > size or stop - start != din * dout:
      raise ValueError(f"kernel bounds {bounds} must be sorted, disjoint ranges inside "
                       f"[0, {size}) of length din·dout")
    prev = stop
  return bounds


def split_kernels(vecs: jax.Array, bounds) -> list:
  """vecs [B, P] -> per kernel [B, din, dout] (its columns, row-major)."""
  return [vecs[:, a:b].reshape(vecs.shape[0], din, dout) for a, b, din, dout in bounds]


def fit_kernels(factors: Sequence[tuple], grads: jax.Array, bounds) -> KernelEKFAC:
  """EK-FAC over the kernels `bounds` [(start, stop, din, dout)] of flat per-example
  gradients grads [N, P], with K-FAC factors [(A [din, din], S [dout, dout])] per kernel."""
  bounds = _check_kernel_bounds(bounds, grads.shape[1])
  if len(factors) != len(bounds):
    raise ValueError(f"{len(factors)} K-FAC factor pairs for {len(bounds)} kernels")
  _check_finite(grads, "per-example gradients")
  return KernelEKFAC(fit_kfac(factors, split_kernels(grads, bounds)), bounds,
                     int(grads.shape[1]))


def kernel_apply_spectral(state: KernelEKFAC, vecs: jax.Array, f: Spectral) -> jax.Array:
  """vecs [B, P] -> per kernel Q_A (f(Λ*) ⊙ (Q_Aᵀ V Q_S)) Q_Sᵀ; 0 outside the kernels."""
  if vecs.shape[1] != state.size:
    raise ValueError(f"vectors have {vecs.shape[1]} columns, the EK-FAC state {state.size}")
  out = dense_apply_spectral(state.dense, split_kernels(vecs, state.bounds), f)
  parts, prev = [], 0
  for (start, stop, _, _), o in zip(state.bounds, out):
    parts += [jnp.zeros((vecs.shape[0], start - prev), vecs.dtype), o.reshape(o.shape[0], -1)]
    prev = stop
  parts.append(jnp.zeros((vecs.shape[0], state.size - prev), vecs.dtype))
  return jnp.concatenate(parts, axis=1)


# ------------------------------------------------------------------------ gradient blocks
@dataclasses.dataclass(frozen=True)
class BlockEKFAC:
  """Per block [start, stop): eigenbasis Q [p, p] and (corrected) eigenvalues [p]."""
  q: tuple
  eig: tuple
  bounds: tuple  # static: ((start, stop), ...)


jax.tree_util.register_dataclass(BlockEKFAC, data_fields=["q", "eig"], meta_fields=["bounds"])


def fit_blocks(grads: jax.Array, bounds: Sequence[tuple[int, int]]) -> BlockEKFAC:
  """grads [N, P]: per block the eigenbasis of (1/N) Σ g gᵀ and corrected eigenvalues."""
  bounds = tuple((int(a), int(b)) for a, b in bounds)
  if not bounds or bounds[0][0] != 0 or bounds[-1][1] != grads.shape[1] or any(
      b0[1] != b1[0] for b0, b1 in zip(bounds, bounds[1:])):
    raise ValueError(f"block bounds {bounds} must tile [0, {grads.shape[1]}) in order")
  n = grads.shape[0]
  qs, eigs = [], []
  for start, stop in bounds:
    g = grads[:, start:stop]
    _, q = jnp.linalg.eigh(g.T @ g / n)
    qs.append(q)
    eigs.append(jnp.mean((g @ q) ** 2, axis=0))    # eigenvalue correction (= eigenvalues)
  return BlockEKFAC(tuple(qs), tuple(eigs), bounds)


def block_apply_spectral(state: BlockEKFAC, vecs: jax.Array, f: Spectral) -> jax.Array:
  """vecs [B, P] -> per block Q f(Λ) Qᵀ v."""
  parts = []
  for q, eig, (start, stop) in zip(state.q, state.eig, state.bounds):
    parts.append(((vecs[:, start:stop] @ q) * f(eig)) @ q.T)
  return jnp.concatenate(parts, axis=1)


def apply_spectral(state, vecs: jax.Array, f: Spectral) -> jax.Array:
  """Flat vecs [B, P] -> Q f(Λ*) Qᵀ v for a BlockEKFAC or a KernelEKFAC state."""
  if isinstance(state, KernelEKFAC):
    return kernel_apply_spectral(state, vecs, f)
  return block_apply_spectral(state, vecs, f)


def inverse(damping: float) -> Spectral:
  """f(λ) = 1/(λ + damping): the damped inverse (G + damping·I)⁻¹."""
  if not damping > 0:
    raise ValueError(f"damping must be > 0, got {damping}")
  return lambda eig: 1.0 / (jnp.maximum(eig, 0.0) + damping)


def default_damping(state, scale: float = 0.1) -> float:
  """`scale` × the mean corrected eigenvalue (kronfluence-style heuristic), floored at 1e-12."""
  eigs = jnp.concatenate([jnp.ravel(e) for e in state.eig])
  return float(max(scale * float(jnp.mean(jnp.maximum(eigs, 0.0))), 1e-12))


def exact_damped_solve(grads: np.ndarray, vecs: np.ndarray, damping: float) -> np.ndarray:
  """Reference: (G + λI)⁻¹ vᵀ with G = (1/N) gradsᵀ grads, dense float64 numpy -> [B, P]."""
  g = np.asarray(grads, np.float64)
  hess = g.T @ g / g.shape[0] + damping * np.eye(g.shape[1])
  return np.linalg.solve(hess, np.asarray(vecs, np.float64).T).T


__all__ = ["mlp_apply", "dense_statistics", "layer_gradients", "kfac_factors",
           "flatten_layer_grads", "DenseEKFAC", "fit_kfac", "fit_dense",
           "dense_apply_spectral", "KernelEKFAC", "split_kernels", "fit_kernels",
           "kernel_apply_spectral", "BlockEKFAC", "fit_blocks", "block_apply_spectral",
           "apply_spectral", "inverse", "default_damping", "exact_damped_solve"]
