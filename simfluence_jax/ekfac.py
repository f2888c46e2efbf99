"""EK-FAC curvature (George et al. 2018; Grosse et al. 2023) and damped inverse products.

Curvature G is the empirical Fisher / Gauss–Newton proxy of the training loss,
G = (1/N) Σ_n g_n g_nᵀ over per-example gradients g_n (float64 here throughout).

1. Dense layers (`fit_dense`), s = [a, 1] W with W [din+1, dout] (bias as the last row).
   Per example n with input activation a_n and output gradient δ_n = ∂L_n/∂s_n (one
   position per example), the weight gradient is exactly G_n = ā_n δ_nᵀ. K-FAC:
       A = (1/N) Σ ā_n ā_nᵀ = Q_A Λ_A Q_Aᵀ,   S = (1/N) Σ δ_n δ_nᵀ = Q_S Λ_S Q_Sᵀ,
   layer block of G ≈ A ⊗ S, eigenbasis Q_A ⊗ Q_S. EK-FAC replaces Λ_A ⊗ Λ_S by the
   per-example second moments in that basis (the eigenvalue correction):
       Λ*[j, k] = (1/N) Σ_n (Q_Aᵀ G_n Q_S)[j, k]²                       [din+1, dout]
   and the damped inverse product of V [din+1, dout] is
       (G + λI)⁻¹ V ≈ Q_A ((Q_Aᵀ V Q_S) / (Λ* + λ)) Q_Sᵀ.
   Layers are independent blocks (block-diagonal G).

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


def layer_gradients(acts: Sequence[jax.Array], deltas: Sequence[jax.Array]) -> list:
  """Per-example weight gradients G_n = ā_n δ_nᵀ per layer: [N, din+1, dout]."""
  return [jnp.einsum("ni,no->nio", a, d) for a, d in zip(acts, deltas)]


def flatten_layer_grads(grads: Sequence[jax.Array]) -> jax.Array:
  """[N, din+1, dout] per layer -> [N, P] (layer-major, row-major within a layer)."""
  return jnp.concatenate([g.reshape(g.shape[0], -1) for g in grads], axis=1)


@dataclasses.dataclass(frozen=True)
class DenseEKFAC:
  """Per layer: Q_A [din+1, din+1], Q_S [dout, dout], corrected eigenvalues [din+1, dout]."""
  qa: tuple
  qs: tuple
  eig: tuple


jax.tree_util.register_dataclass(DenseEKFAC, data_fields=["qa", "qs", "eig"], meta_fields=[])


def fit_dense(acts: Sequence[jax.Array], deltas: Sequence[jax.Array]) -> DenseEKFAC:
  """K-FAC factors, their eigenbases, and the EK-FAC eigenvalue correction."""
  qas, qss, eigs = [], [], []
  for a, d in zip(acts, deltas):
    n = a.shape[0]
    _, qa = jnp.linalg.eigh(a.T @ a / n)                        # A = (1/N) Σ ā āᵀ
    _, qs = jnp.linalg.eigh(d.T @ d / n)                        # S = (1/N) Σ δ δᵀ
    # (Q_Aᵀ ā_n δ_nᵀ Q_S)[j, k] = (Q_Aᵀ ā_n)_j (Q_Sᵀ δ_n)_k: no [N, din, dout] tensor needed.
    eigs.append(((a @ qa) ** 2).T @ ((d @ qs) ** 2) / n)         # [din+1, dout]
    qas.append(qa)
    qss.append(qs)
  return DenseEKFAC(tuple(qas), tuple(qss), tuple(eigs))


def dense_apply_spectral(state: DenseEKFAC, vecs: Sequence[jax.Array], f: Spectral) -> list:
  """Per layer V [B, din+1, dout] -> Q_A (f(Λ*) ⊙ (Q_Aᵀ V Q_S)) Q_Sᵀ."""
  out = []
  for qa, qs, eig, v in zip(state.qa, state.qs, state.eig, vecs):
    rotated = jnp.einsum("ij,bik,kl->bjl", qa, v, qs)
    out.append(jnp.einsum("ij,bjl,kl->bik", qa, rotated * f(eig), qs))
  return out


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


__all__ = ["mlp_apply", "dense_statistics", "layer_gradients", "flatten_layer_grads",
           "DenseEKFAC", "fit_dense", "dense_apply_spectral", "BlockEKFAC", "fit_blocks",
           "block_apply_spectral", "inverse", "default_damping", "exact_damped_solve"]
