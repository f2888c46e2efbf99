"""Per-example gradients of the trainable collection, JL projection, and their disk cache.

TracIn-CP, influence functions and Source (baselines.py) all start from per-example loss
gradients g(z; θ_c) at saved checkpoints θ_c. This module computes them as
`vmap(grad(per-example loss))` with respect to ONE variable collection:

  * "ia3"    — the IA3 vectors (few thousand scalars): kept exactly, flattened in the
               order of `jax.tree_util.tree_flatten_with_path` (sorted dict keys);
  * "params" — full fine-tuning: projected to `projection_dim` by a seeded
               Johnson–Lindenstrauss sketch R (entries i.i.d. N(0, 1/d)), so that
               E[(Rᵀg)ᵀ(Rᵀg')] = gᵀg' and Var = (|g|²|g'|² + (gᵀg')²)/d.

The sketch is never materialised as a [P, d] matrix: each leaf of the gradient pytree is
split into row blocks of at most `block_rows` scalars and block j of leaf l is multiplied by
its own Gaussian [block, d] drawn from fold_in(fold_in(PRNGKey(seed), l), j), accumulated in
a `lax.scan` (memory O(block · d)). Which scalar meets which random row depends only on
(seed, leaf order, block_rows), so the projection is the same whatever the example chunking.

Cache: <workspace>/gradients/<run_id>/checkpoint_<step>/{train,test}.npz with arrays
  grads float32 [N, D]; ids int64 [N]; collection <U; projection_seed int64;
  projection_dim int64 (-1 = exact); block_rows int64
written atomically (atomic_io.save_npz, never pickled) and reused when the ids and spec match.

Dense-kernel statistics (for EK-FAC over the T5 dense kernels, ekfac.fit_kernels): for every
kernel W tapped by models/t5.py `_dense` (attention query/key/value/out, MLP wi_0/wi_1/wo,
logits_dense; NOT the token embedding, RMSNorm scales or relative-position tables), viewed as
a matrix W [din, dout] (its leading input dims flattened row-major: query [e, h, d] ->
[e, h·d], out [h, d, e] -> [h·d, e]), per example n and token position t:
    a_nt [din]  the kernel's input (sown),   s_nt = a_ntᵀ W [dout],
    δ_nt [dout] = ∂L_n/∂s_nt  (the gradient w.r.t. a zero perturbation added to s),
so the per-example kernel gradient is exactly  ∂L_n/∂W = G_n = Σ_t a_nt δ_ntᵀ  [din, dout]
(positions of the encoder for key/value of cross-attention; padding positions included,
they have δ = 0). K-FAC factors (`kfac_factors`), normalised per EXAMPLE (not per token):
    A = (1/N) Σ_n Σ_t a_nt a_ntᵀ [din, din],   S = (1/N) Σ_n Σ_t δ_nt δ_ntᵀ [dout, dout].
(EK-FAC uses only their eigenvectors; any per-token normalisation would rescale eigenvalues
that the eigenvalue correction replaces anyway.)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import zipfile
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from simfluence_jax.traces import atomic_io

COLLECTIONS = ("ia3", "params")
# loss_fn(variables, batch, rng) -> per-example loss [b] (trainer.LossFn; rng None here).
LossFn = Callable[[Mapping[str, Any], Mapping[str, jax.Array], Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class GradientSpec:
  """Which gradient to take and how to compress it.

  collection: "ia3" (IA3 tuning) or "params" (full tuning).
  projection_dim: None = exact flattened gradient; d >= 1 = JL sketch to d dimensions.
  seed: the sketch's seed (the same seed gives the same R for every checkpoint and split,
    which TracIn-CP needs: train and test gradients must be projected by the same R).
  block_rows: scalars per random block of a leaf (memory of one block: block_rows · d).
  chunk_size: examples per vmapped gradient call (memory: chunk_size · P floats).
  """
  collection: str = "ia3"
  projection_dim: int | None = None
  seed: int = 0
  block_rows: int = 1024
  chunk_size: int = 16

  def __post_init__(self):
    if self.collection not in COLLECTIONS:
      raise ValueError(f"collection must be one of {COLLECTIONS}, got {self.collection!r}")
    if self.projection_dim is not None and int(self.projection_dim) < 1:
      raise ValueError(f"projection_dim must be None or >= 1, got {self.projection_dim}")
    if self.block_rows < 1 or self.chunk_size < 1:
      raise ValueError("block_rows and chunk_size must be >= 1")


def split_collection(variables: Mapping[str, Any], collection: str) -> tuple[dict, dict]:
  """(trainable = {collection: ...}, frozen = every other collection)."""
  if collection not in variables:
    raise ValueError(f"variables have collections {sorted(variables)}, not {collection!r}; "
                     "IA3 gradients need a model initialised with use_ia3=True")
  return ({collection: variables[collection]},
          {k: v for k, v in variables.items() if k != collection})


def leaf_slices(tree: Any) -> list[tuple[str, int, int]]:
  """[(path, start, stop)] of each leaf in the flattened (exact) gradient vector."""
  out, start = [], 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    size = int(np.prod(np.shape(leaf)))
    out.append((jax.tree_util.keystr(path), start, start + size))
    start += size
  return out


def _per_example_grad_tree(loss_fn: LossFn, trainable, frozen, batch):
  """Pytree like `trainable` with a leading [b] axis: ∇_θ loss(z_b) for every example."""
  def one(tr, example):
    single = jax.tree.map(lambda x: x[None], example)
    return loss_fn({**frozen, **tr}, single, None)[0]
  return jax.vmap(jax.grad(one), in_axes=(None, 0))(trainable, batch)


def _project_leaf(g: jax.Array, key: jax.Array, dim: int, block_rows: int) -> jax.Array:
  """g [b, p] -> g @ R_leaf [b, dim], R_leaf drawn block by block (never [p, dim] at once)."""
  b, p = g.shape
  block = min(block_rows, p)
  num_blocks = -(-p // block)
  g = jnp.pad(g, ((0, 0), (0, num_blocks * block - p)))       # zero rows meet unused R rows
  g = g.reshape(b, num_blocks, block).transpose(1, 0, 2)       # [nb, b, block]

  def body(acc, xs):
    j, gj = xs
    r = jax.random.normal(jax.random.fold_in(key, j), (block, dim), g.dtype)
    return acc + gj @ r, None

  acc, _ = jax.lax.scan(body, jnp.zeros((b, dim), g.dtype),
                        (jnp.arange(num_blocks), g))
  return acc / jnp.sqrt(jnp.asarray(dim, g.dtype))


def flatten_or_project(grad_tree, spec: GradientSpec) -> jax.Array:
  """Per-example gradient pytree (leading [b]) -> [b, P] exact, or [b, d] JL-projected."""
  leaves = jax.tree.leaves(grad_tree)
  b = leaves[0].shape[0]
  flat = [x.reshape(b, -1) for x in leaves]
  if spec.projection_dim is None:
    return jnp.concatenate(flat, axis=1)
  root = jax.random.PRNGKey(spec.seed)
  return sum(_project_leaf(x, jax.random.fold_in(root, i), int(spec.projection_dim),
                           spec.block_rows) for i, x in enumerate(flat))


@functools.partial(jax.jit, static_argnames=("loss_fn", "spec"))
def _grads_jit(loss_fn, trainable, frozen, batch, *, spec):
  return flatten_or_project(_per_example_grad_tree(loss_fn, trainable, frozen, batch), spec)


def per_example_gradients(loss_fn: LossFn, variables: Mapping[str, Any],
                          batch: Mapping[str, np.ndarray], spec: GradientSpec) -> np.ndarray:
  """∇ loss(z_b) w.r.t. `spec.collection`, flattened or projected -> numpy [b, D].

  Examples go through in chunks of `spec.chunk_size` (the last chunk is padded by repeating
  example 0 and trimmed, so every chunk has one shape and compiles once). `loss_fn` must be
  hashable and stable (e.g. one function object per model) to reuse the compilation.
  """
  trainable, frozen = split_collection(variables, spec.collection)
  batch = {k: np.asarray(v) for k, v in batch.items()}
  n = next(iter(batch.values())).shape[0]
  chunk = min(spec.chunk_size, n)
  out = []
  for start in range(0, n, chunk):
    idx = np.arange(start, start + chunk)
    idx = np.where(idx < n, idx, 0)
    part = {k: v[idx] for k, v in batch.items()}
    out.append(np.asarray(_grads_jit(loss_fn, trainable, frozen, part, spec=spec))
               [:min(chunk, n - start)])
  return np.concatenate(out, axis=0)


# ----------------------------------------------------------------------------- disk cache
def cache_path(workspace, run_id: str, step: int, split: str) -> pathlib.Path:
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  return (pathlib.Path(workspace) / "gradients" / run_id / f"checkpoint_{int(step)}"
          / f"{split}.npz")


def _spec_arrays(spec: GradientSpec) -> dict:
  return {"collection": np.str_(spec.collection),
          "projection_seed": np.int64(spec.seed),
          "projection_dim": np.int64(-1 if spec.projection_dim is None
                                     else spec.projection_dim),
          "block_rows": np.int64(spec.block_rows)}


def load_cached(path: pathlib.Path, ids: np.ndarray, spec: GradientSpec) -> np.ndarray | None:
  """The cached [N, D] gradients if `path` holds exactly these ids and this spec, else None."""
  try:
    with np.load(path, allow_pickle=False) as npz:
      want = _spec_arrays(spec)
      if any(k not in npz.files or npz[k].shape != () or npz[k] != v
             for k, v in want.items()):
        return None
      if not np.array_equal(npz["ids"], np.asarray(ids, np.int64)):
        return None
      return np.asarray(npz["grads"])
  except (FileNotFoundError, KeyError, ValueError, OSError, zipfile.BadZipFile, EOFError):
    return None


def cached_gradients(workspace, run_id: str, step: int, split: str, ids: np.ndarray,
                     spec: GradientSpec, compute: Callable[[], np.ndarray]
                     ) -> tuple[np.ndarray, bool]:
  """(grads [N, D], reused?) — the cache entry when it matches, else `compute()` saved."""
  path = cache_path(workspace, run_id, step, split)
  ids = np.asarray(ids, np.int64)
  found = load_cached(path, ids, spec)
  if found is not None:
    return found, True
  grads = np.asarray(compute(), np.float32)
  if grads.ndim != 2 or grads.shape[0] != ids.size:
    raise ValueError(f"{path}: computed gradients have shape {grads.shape}, expected "
                     f"[{ids.size}, D] (one row per id)")
  path.parent.mkdir(parents=True, exist_ok=True)
  atomic_io.save_npz(path, grads=grads, ids=ids, **_spec_arrays(spec))
  return grads, False


# ------------------------------------------------------------- dense-kernel statistics
@dataclasses.dataclass(frozen=True)
class DenseKernel:
  """One tapped kernel: its path in variables["params"] (jax keystr, as `leaf_slices`), its
  own shape, and its matrix view [din, dout]."""
  path: str
  shape: tuple
  din: int
  dout: int


def default_token_loss(logits: jax.Array, batch: Mapping[str, jax.Array]) -> jax.Array:
  """The trainer's per-example loss (mean token cross-entropy) of logits [b, t, v] -> [b]."""
  from simfluence_jax.training.models import losses  # pylint: disable=g-import-not-at-top
  return losses.per_example_loss(logits, batch["decoder_target_tokens"],
                                 batch["decoder_loss_weights"])


def _taps(model, variables, batch):
  """Sown kernel inputs of a forward pass: pytree of [b, T, din...] (shapes under eval_shape)."""
  from simfluence_jax.training.models import t5  # pylint: disable=g-import-not-at-top
  _, state = model.apply(variables, batch["encoder_input_tokens"],
                         batch["decoder_input_tokens"], mutable=[t5.DENSE_INPUTS])
  return jax.tree.map(lambda x: x[0], state[t5.DENSE_INPUTS],
                      is_leaf=lambda x: isinstance(x, tuple))


def dense_kernels(model, variables, batch) -> list[DenseKernel]:
  """The model's tapped dense kernels, in `leaf_slices` order of variables["params"]."""
  if getattr(model.config, "scan_layers", False):
    raise ValueError("dense-kernel statistics need T5Config.scan_layers=False (per-layer "
                     "kernels); this model scans its layers")
  one = {k: np.asarray(v)[:1] for k, v in batch.items()}
  shapes = jax.eval_shape(lambda: _taps(model, variables, one))
  params = variables["params"]
  out = []
  for path, x in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    kernel = functools.reduce(lambda t, k: t[k.key], path, params)
    n_in = len(x.shape) - 2                                   # x [b, T, din...]
    out.append(DenseKernel(jax.tree_util.keystr(path), tuple(kernel.shape),
                           int(np.prod(kernel.shape[:n_in])),
                           int(np.prod(kernel.shape[n_in:]))))
  order = {path: i for i, (path, _, _) in enumerate(leaf_slices(params))}
  return sorted(out, key=lambda k: order[k.path])


@functools.partial(jax.jit, static_argnames=("model", "loss"))
def _statistics_jit(model, variables, batch, *, loss):
  from simfluence_jax.training.models import t5  # pylint: disable=g-import-not-at-top

  def one(example):
    single = jax.tree.map(lambda x: x[None], example)
    taps = jax.eval_shape(lambda: _taps(model, variables, single))
    params = variables["params"]

    def zeros(path, x):                                   # s [1, T, dout...] per kernel
      kernel = functools.reduce(lambda t, k: t[k.key], path, params)
      return jnp.zeros(x.shape[:2] + kernel.shape[len(x.shape) - 2:], x.dtype)

    def f(perturb):
      logits, state = model.apply({**variables, t5.DENSE_PERTURBATIONS: perturb},
                                  single["encoder_input_tokens"],
                                  single["decoder_input_tokens"], mutable=[t5.DENSE_INPUTS])
      inputs = jax.tree.map(lambda x: x[0], state[t5.DENSE_INPUTS],
                            is_leaf=lambda x: isinstance(x, tuple))
      return loss(logits, single)[0], inputs

    perturb = jax.tree_util.tree_map_with_path(zeros, taps)
    deltas, inputs = jax.grad(f, has_aux=True)(perturb)
    flat = lambda tree: {jax.tree_util.keystr(p): x.reshape(x.shape[1], -1)
                         for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    return flat(inputs), flat(deltas)

  return jax.vmap(one)(batch)


def dense_kernel_statistics(model, variables: Mapping[str, Any],
                            batch: Mapping[str, np.ndarray], *,
                            loss: Callable = default_token_loss) -> dict:
  """{kernel path: (a [b, T, din], δ [b, T, dout])} per example (module docstring).

  model: a models.t5.Transformer (scan_layers=False); loss(logits [b, t, v], batch) -> [b]
  (hashable; default the trainer's mean token cross-entropy). One jitted vmapped pass.
  """
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  acts, deltas = _statistics_jit(model, variables, batch, loss=loss)
  return {path: (acts[path], deltas[path]) for path in acts}


def kfac_factors(model, variables: Mapping[str, Any], batch: Mapping[str, np.ndarray], *,
                 loss: Callable = default_token_loss, chunk_size: int = 16
                 ) -> tuple[list[DenseKernel], list[tuple[np.ndarray, np.ndarray]]]:
  """(kernels, [(A [din, din], S [dout, dout])]) over the batch, float64 numpy.

  A = (1/N) Σ_n Σ_t a aᵀ, S = (1/N) Σ_n Σ_t δ δᵀ, accumulated in chunks of `chunk_size`
  examples (the last chunk padded with copies of example 0 that get weight 0).
  """
  batch = {k: np.asarray(v) for k, v in batch.items()}
  kernels = dense_kernels(model, variables, batch)
  n = next(iter(batch.values())).shape[0]
  chunk = min(chunk_size, n)
  sums = {k.path: [np.zeros((k.din, k.din)), np.zeros((k.dout, k.dout))] for k in kernels}
  for start in range(0, n, chunk):
    idx = np.arange(start, start + chunk)
    live = (idx < n).astype(np.float64)
    stats = dense_kernel_statistics(model, variables,
                                    {k: v[np.where(idx < n, idx, 0)] for k, v in batch.items()},
                                    loss=loss)
    for path, (a, d) in stats.items():
      a, d = np.asarray(a, np.float64), np.asarray(d, np.float64)
      sums[path][0] += np.einsum("n,nti,ntj->ij", live, a, a)
      sums[path][1] += np.einsum("n,nti,ntj->ij", live, d, d)
  return kernels, [(sums[k.path][0] / n, sums[k.path][1] / n) for k in kernels]


def kernel_bounds(kernels, params) -> list[tuple[int, int, int, int]]:
  """[(start, stop, din, dout)] of each kernel in the flattened exact "params" gradient
  (the layout of `flatten_or_project` with projection_dim=None over {"params": params})."""
  slices = {path.removeprefix("['params']"): (a, b)
            for path, a, b in leaf_slices({"params": params})}
  return [(*slices[k.path], k.din, k.dout) for k in kernels]


def jl_tolerance(dim: int, num_pairs: int, failure_prob: float = 1e-3) -> float:
  """ε with P(|x̂ᵀŷ − xᵀy| > ε |x||y| for any of num_pairs pairs) <= failure_prob.

  The JL inner-product bound for Gaussian sketches: |x̂ᵀŷ − xᵀy| <= ε|x||y| with
  probability >= 1 − 4 exp(−d ε²/8) per pair (from the norm bound on x ± y); union bound.
  """
  return math.sqrt(8.0 * math.log(4.0 * num_pairs / failure_prob) / dim)


__all__ = ["GradientSpec", "COLLECTIONS", "split_collection", "leaf_slices",
           "flatten_or_project", "per_example_gradients", "cache_path", "load_cached",
           "cached_gradients", "jl_tolerance", "DenseKernel", "default_token_loss",
           "dense_kernels", "dense_kernel_statistics", "kfac_factors", "kernel_bounds"]
