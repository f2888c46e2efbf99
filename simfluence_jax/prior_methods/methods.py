"""Gradient-based TDA baselines as Simfluence simulators (paper §4.2–4.3; Bae et al. 2024).

Each returns a FitParams whose B [m, n] (test × train) plugs into the additive simulator
L_t(z) = L_{t-1}(z) + Σ_{i∈c_t} B_i(z), or (Hypothetical Simfluence-Linear) A and B.
Notation: g_i = ∇_θ L(z_i; θ_c) (train), g_z = ∇_θ L(z; θ_c) (test), at checkpoint θ_c;
G [n, D], H [m, D] stack them (gradients.py: exact IA3 or JL-projected full-model).

  TracIn-CP (Eq. 11):   B_i(z) = −(1/|T_CP|) Σ_{c∈T_CP} η g_i(θ_c)ᵀ g_z(θ_c)
                        averaged over the fit runs' checkpoints. η = run.json learning_rate.
                        Adafactor/Adam steps are not η·gradient, so the scale is wrong; the
                        paper (§5) rescales each predicted trajectory by the optimal σ at
                        evaluation: `evaluate_rescaled` (uses the ground truth, flagged).
  Influence (§4.3):     B_i(z) = −g_iᵀ (Ĝ + λI)⁻¹ g_z at the final checkpoint θ_T, Ĝ the
                        EK-FAC curvature (ekfac.py) of the train examples' gradients;
                        averaged over fit runs. Two curvature forms (`curvature`):
          "blocks"      (default) each IA3 vector, or the JL-projected full gradient, is one
                        exact block (ekfac.fit_blocks);
          "ekfac_dense" full tuning only: true EK-FAC over the T5 dense kernels (attention
                        query/key/value/out, MLP wi_0/wi_1/wo, logits_dense): per kernel
                        K-FAC factors A, S from token-level inputs and output gradients of
                        the train examples (gradients.kfac_factors), their eigenbases, and
                        the eigenvalue correction from the exact (unprojected) per-example
                        kernel gradients. Embeddings, RMSNorm scales and relative-position
                        tables are left out: g_i and g_z enter only through their dense-
                        kernel coordinates (B is the influence within that subspace).
  Source (Bae et al. 2024, §3, "segment-wise stationary" approximation of unrolling):
        split the checkpoints into L consecutive segments; segment ℓ spans K_ℓ steps with
        learning rate η, curvature H̄_ℓ (EK-FAC over the gradients of all its checkpoints)
        and mean train gradients ḡ_ℓ(z_i). With damping δ added to the curvature,
          S̄_ℓ = exp(−η K_ℓ (H̄_ℓ + δI)),   r̄_ℓ(z_i) = (I − S̄_ℓ)(H̄_ℓ + δI)⁻¹ ḡ_ℓ(z_i),
          Δθ(z_i) = Σ_ℓ S̄_L ⋯ S̄_{ℓ+1} r̄_ℓ(z_i),      B_i(z) = −g_z(θ_T)ᵀ Δθ(z_i).
        (Bae et al.'s closed form for the parameter change of the unrolled, segment-wise
        stationary dynamics; we could not re-read the paper's equation number in this
        environment — the formula above is what is implemented.) One segment with
        ηK → ∞ gives (H̄ + δI)⁻¹ ḡ: influence functions (tested). With curvature="ekfac_dense",
        H̄_ℓ is the dense-kernel EK-FAC with A, S averaged over the segment's checkpoints
        and Λ* from all their per-example kernel gradients.
  Hypothetical Simfluence-Linear (Eq. 10): the linear simulator's ridge objective over the
        fit runs' checkpoint steps s, with the observed next loss replaced by the
        hypothetical one of the real batch c_{s+1} taken by batch-mean SGD:
          L̃_{s+1}(z) = L_s(z) − (η/|c|) Σ_{i∈c_{s+1}} g_i(θ_s)ᵀ g_z(θ_s).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import pathlib
import re
import time
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from simfluence_jax.simulators import design
from simfluence_jax.prior_methods import ekfac
from simfluence_jax.prior_methods import gradients
from simfluence_jax.yardstick import scoring
from simfluence_jax.simulators import ridge
from simfluence_jax.simulators import rollout as rollout_lib
from simfluence_jax.simulators import simfluence as simulators
from simfluence_jax.traces.fit_params import FitParams
from simfluence_jax.traces.contract import RunTrace, TraceError

SIMULATORS = ("tracin_cp", "tracin_cp_all", "influence", "source", "hypothetical_linear")
CURVATURES = ("blocks", "ekfac_dense")
RESCALE_NOTE = "optimal_sigma_uses_ground_truth"


@dataclasses.dataclass(frozen=True)
class BaselineOptions:
  """checkpoints: "available" (every saved checkpoint of a run), "tracin" (the trainer's
  `num_tracin_checkpoints` evenly spaced steps incl. T), "all" (every step 1..T) or explicit
  steps; a requested checkpoint that was not saved is an error. projection_dim: None = exact for IA3 tuning,
  `default_full_projection` for full tuning. damping: None = 0.1 × mean eigenvalue.
  curvature (influence, source): "blocks" or "ekfac_dense" (module docstring; full tuning
  only, gradients exact: projection_dim must be None)."""
  checkpoints: str | tuple = "available"
  num_tracin_checkpoints: int = 10
  projection_dim: int | None = None
  projection_seed: int = 0
  default_full_projection: int = 1024
  damping: float | None = None
  segments: int = 3
  lam: float | None = None
  lam_grid: tuple = simulators.DEFAULT_LAM_GRID
  chunk_size: int = 16
  curvature: str = "blocks"


# ------------------------------------------------------------------------ pure score maths
def tracin_cp_scores(per_checkpoint: Sequence[tuple[float, np.ndarray, np.ndarray]]
                     ) -> np.ndarray:
  """Eq. 11: [(η, G [n, D], H [m, D])] -> B [m, n] = −mean_c η H Gᵀ (float64)."""
  if not per_checkpoint:
    raise ValueError("TracIn-CP needs at least one checkpoint")
  total = sum(float(eta) * np.asarray(h, np.float64) @ np.asarray(g, np.float64).T
              for eta, g, h in per_checkpoint)
  return -total / len(per_checkpoint)


def _curvature(grads, bounds, factors):
  """Block EK-FAC (factors None; bounds [(start, stop)]) or dense-kernel EK-FAC (factors
  [(A, S)] per kernel; bounds [(start, stop, din, dout)]) of grads [N, D]."""
  if factors is None:
    return ekfac.fit_blocks(jnp.asarray(grads), bounds)
  return ekfac.fit_kernels([(jnp.asarray(a), jnp.asarray(s)) for a, s in factors],
                           jnp.asarray(grads), bounds)


def influence_scores(g_train: np.ndarray, g_test: np.ndarray, curvature_grads: np.ndarray,
                     *, bounds, damping: float | None, factors=None
                     ) -> tuple[np.ndarray, float]:
  """B = −H (Ĝ + δI)⁻¹ Gᵀ [m, n] with EK-FAC Ĝ from `curvature_grads` [N, D]: block form
  (factors None), or over dense kernels (factors [(A, S)], bounds [(start, stop, din, dout)];
  columns outside the kernels then contribute nothing)."""
  state = _curvature(curvature_grads, bounds, factors)
  damping = ekfac.default_damping(state) if damping is None else float(damping)
  solved = ekfac.apply_spectral(state, jnp.asarray(g_train), ekfac.inverse(damping))
  return -np.asarray(g_test, np.float64) @ np.asarray(solved, np.float64).T, damping


@dataclasses.dataclass(frozen=True)
class Segment:
  """One Source segment: η, steps spanned K, and the train gradients [C, n, D] at its
  C checkpoints (curvature and mean gradient both come from them). factors: None (block
  EK-FAC) or per-kernel K-FAC (A, S) averaged over the C checkpoints (dense-kernel EK-FAC;
  `bounds` of source_scores are then (start, stop, din, dout))."""
  eta: float
  num_steps: int
  train_grads: np.ndarray
  factors: tuple | None = None


def source_scores(segments: Sequence[Segment], g_test: np.ndarray, *, bounds,
                  damping: float | None) -> tuple[np.ndarray, float]:
  """Source (module docstring): B = −H Δθᵀ, Δθ = Σ_ℓ S̄_L⋯S̄_{ℓ+1} r̄_ℓ -> [m, n]."""
  delta, used = None, None
  for seg in segments:
    grads = jnp.asarray(seg.train_grads)                              # [C, n, D]
    state = _curvature(grads.reshape(-1, grads.shape[-1]), bounds, seg.factors)
    dmp = ekfac.default_damping(state) if damping is None else float(damping)
    used = dmp if used is None else used
    horizon = float(seg.eta) * float(seg.num_steps)
    curv = lambda eig, d=dmp: jnp.maximum(eig, 0.0) + d
    decay = lambda eig, h=horizon, c=curv: jnp.exp(-h * c(eig))
    resolvent = lambda eig, h=horizon, c=curv: -jnp.expm1(-h * c(eig)) / c(eig)
    r = ekfac.apply_spectral(state, grads.mean(axis=0), resolvent)   # [n, D]
    delta = r if delta is None else ekfac.apply_spectral(state, delta, decay) + r
  if delta is None:
    raise ValueError("Source needs at least one segment")
  return -np.asarray(g_test, np.float64) @ np.asarray(delta, np.float64).T, used


def split_segments(steps: Sequence[int], num_segments: int) -> list[list[int]]:
  """Consecutive checkpoint steps into min(L, #steps) segments of near-equal size."""
  steps = sorted(int(s) for s in steps)
  num = max(1, min(int(num_segments), len(steps)))
  return [list(part) for part in np.array_split(np.asarray(steps), num)]


# ------------------------------------------------------------------ σ-rescaled evaluation
def evaluate_rescaled(params: FitParams, runs: Sequence[RunTrace],
                      fit_runs: Sequence[RunTrace] | None = None) -> dict:
  """simulators.evaluate after the paper's §5 TracIn-CP adjustment: every predicted
  trajectory (run r, test example z) is multiplied by σ = argmin Σ_{t=1..T} (σ L̂_t − L_t)²
  = Σ L̂_t L_t / Σ L̂_t² over recorded steps. σ uses the ground truth (an unfair advantage,
  as the paper says); result["rescale"] says so and result["sigma"] lists σ per run."""
  preds, sigmas = {}, {}
  for run in runs:
    pred = simulators.simulate_run(params, run).astype(np.float64)
    sigma = scoring.optimal_scale([(pred, run.losses)])
    pred[1:] *= sigma
    preds[run.run_id] = pred.astype(np.float32)
    sigmas[run.run_id] = sigma.tolist()
  result = scoring.score(preds, runs, fit_runs)
  result["rescale"] = RESCALE_NOTE
  result["sigma"] = sigmas
  return result


# ----------------------------------------------------------------- workspace / model glue
def model_settings(metadata: dict, where: str) -> tuple:
  """(T5Config, use_ia3, input_length, target_length, task, learning_rate) from run.json."""
  from simfluence_jax.training import models  # local: the model is needed only for workspace fits
  missing = [k for k in ("task", "tuning", "learning_rate", "model_config")
             if k not in metadata]
  if missing:
    raise TraceError(f"{where}: run.json metadata lacks {missing}; gradient baselines need "
                     "runs written by simfluence_jax.train")
  cfg = metadata["model_config"]
  if isinstance(cfg, str):                       # older runs: repr of T5Config(...)
    body = re.fullmatch(r"\s*T5Config\((.*)\)\s*", cfg, re.S)
    if body is None:
      raise TraceError(f"{where}: cannot read model_config {cfg[:80]!r}")
    cfg = {k: ast.literal_eval(v) for k, v in
           re.findall(r"(\w+)=('[^']*'|\"[^\"]*\"|[^,]+)", body.group(1))}
  cfg = dict(cfg)
  lengths = [metadata.get(k, cfg.pop(k, None)) for k in ("input_length", "target_length")]
  cfg.pop("input_length", None)
  cfg.pop("target_length", None)
  if None in lengths:
    raise TraceError(f"{where}: run.json metadata lacks input_length/target_length")
  return (models.T5Config(**cfg), metadata["tuning"] == "ia3", int(lengths[0]),
          int(lengths[1]), metadata["task"], float(metadata["learning_rate"]))


@functools.lru_cache(maxsize=8)
def _loss_fn(config, use_ia3: bool):
  from simfluence_jax.training import models
  from simfluence_jax.training import trainer  # pylint: disable=g-import-not-at-top
  return trainer.t5_loss_fn(models.Transformer(config, use_ia3=use_ia3))


@functools.lru_cache(maxsize=8)
def _model(config, use_ia3: bool):
  from simfluence_jax.training import models  # pylint: disable=g-import-not-at-top
  return models.Transformer(config, use_ia3=use_ia3)


def mean_factors(per_checkpoint: Sequence[Sequence[tuple]]) -> tuple:
  """[checkpoint][kernel] (A, S) -> per kernel (mean A, mean S) over checkpoints."""
  return tuple((np.mean([c[k][0] for c in per_checkpoint], axis=0),
                np.mean([c[k][1] for c in per_checkpoint], axis=0))
               for k in range(len(per_checkpoint[0])))


def _pools(metadata: dict) -> tuple[dict, dict]:
  """({id: Example} of the train pool, of the test examples) of a run, from its run.json
  metadata (tasks.pools_from_metadata; the pools themselves are cached there)."""
  from simfluence_jax.training import tasks  # pylint: disable=g-import-not-at-top
  pools = tasks.pools_from_metadata(metadata)
  return ({e.id: e for e in pools.train}, {e.id: e for e in pools.test})


class RunGradients:
  """Per-example gradients of one fit run at its checkpoints (cached on disk)."""

  def __init__(self, workspace, run: RunTrace, *, train_ids, test_ids,
               options: BaselineOptions):
    from simfluence_jax.training import checkpoints
    from simfluence_jax.training import tasks  # pylint: disable=g-import-not-at-top
    self.workspace, self.run = pathlib.Path(workspace), run
    where = f"run {run.run_id!r}"
    config, use_ia3, li, lt, task, self.eta = model_settings(run.metadata, where)
    self.loss_fn = _loss_fn(config, use_ia3)
    self.model = _model(config, use_ia3)
    self.curvature = options.curvature
    dim = options.projection_dim
    if options.curvature == "ekfac_dense":
      if use_ia3:
        raise TraceError(f"{where}: curvature='ekfac_dense' is for full fine-tuning (tuning "
                         "'full'); this run tuned IA3 vectors — use curvature='blocks'")
      if dim is not None:
        raise ValueError(f"curvature='ekfac_dense' needs exact kernel gradients; got "
                         f"projection_dim={dim} (leave --projection_dim unset)")
    elif dim is None and not use_ia3:
      dim = options.default_full_projection
    self.spec = gradients.GradientSpec(collection="ia3" if use_ia3 else "params",
                                       projection_dim=dim, seed=options.projection_seed,
                                       chunk_size=options.chunk_size)
    self.root = self.workspace / "checkpoints" / run.run_id
    self.saved = checkpoints.all_steps(self.root)
    self.train_ids, self.test_ids = train_ids, test_ids
    train_pool, test_pool = _pools(run.metadata)
    for ids, pool, split in ((train_ids, train_pool, "train"), (test_ids, test_pool, "test")):
      unknown = [int(i) for i in ids if int(i) not in pool]
      if unknown:
        raise TraceError(f"{where}: {split} ids {unknown[:5]} are not in task {task!r}")
    encode = lambda ids, pool: tasks.encode_examples(
        [pool[int(i)] for i in ids], input_length=li, target_length=lt)
    self.batches = {"train": encode(train_ids, train_pool), "test": encode(test_ids, test_pool)}
    self._bounds = None
    self._factors = {}

  def steps(self, checkpoints_opt, num_tracin: int = 10) -> list[int]:
    from simfluence_jax.training import trainer  # pylint: disable=g-import-not-at-top
    t = self.run.num_steps
    if checkpoints_opt == "available":
      want = [s for s in self.saved if 1 <= s <= t]
    elif checkpoints_opt == "tracin":
      want = trainer.tracin_steps(t, num_tracin)
    elif checkpoints_opt == "all":
      want = list(range(1, t + 1))
    else:
      want = sorted(int(s) for s in checkpoints_opt)
    missing = sorted(set(want) - set(self.saved))
    if missing or not want:
      raise TraceError(
          f"{self.root}: run {self.run.run_id!r} needs checkpoints at steps "
          f"{missing[:8] or want} but has {self.saved[:12]}; train with checkpoint_every=1 "
          "for --checkpoints=all, or pass --checkpoints=<saved steps>")
    return want

  def at(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(train grads [n, D], test grads [m, D]) at checkpoint `step`."""
    from simfluence_jax.training import checkpoints  # pylint: disable=g-import-not-at-top
    variables = {}

    def compute(split):
      if not variables:
        variables.update(checkpoints.load_variables(self.root, step))
        if self._bounds is None and self.spec.projection_dim is None:
          self._bounds = [(a, b) for _, a, b in gradients.leaf_slices(
              {self.spec.collection: variables[self.spec.collection]})]
      return gradients.per_example_gradients(self.loss_fn, variables, self.batches[split],
                                             self.spec)
    ids = {"train": self.train_ids, "test": self.test_ids}
    out = [gradients.cached_gradients(self.workspace, self.run.run_id, step, split,
                                      ids[split], self.spec, lambda s=split: compute(s))[0]
           for split in ("train", "test")]
    return out[0], out[1]

  def kernel_factors(self, step: int) -> tuple[list, list]:
    """Dense-kernel EK-FAC inputs at checkpoint `step`: (bounds [(start, stop, din, dout)]
    in the exact "params" gradient, per-kernel K-FAC (A, S) over the train examples)."""
    if step not in self._factors:
      from simfluence_jax.training import checkpoints  # pylint: disable=g-import-not-at-top
      variables = checkpoints.load_variables(self.root, step)
      kernels, factors = gradients.kfac_factors(self.model, variables, self.batches["train"],
                                                chunk_size=self.spec.chunk_size)
      self._factors[step] = (gradients.kernel_bounds(kernels, variables["params"]), factors)
    return self._factors[step]

  def curvature_inputs(self, steps: Sequence[int], dim: int) -> tuple[list, tuple | None]:
    """(bounds, factors) for influence_scores / Segment: the block form (factors None), or
    dense-kernel EK-FAC with K-FAC factors averaged over `steps`."""
    if self.curvature != "ekfac_dense":
      return self.bounds(dim), None
    per = [self.kernel_factors(s) for s in steps]
    return per[0][0], mean_factors([f for _, f in per])

  def bounds(self, dim: int) -> list[tuple[int, int]]:
    """EK-FAC blocks: one per IA3 vector (exact gradients) or one projected block."""
    if self.spec.projection_dim is not None:
      return [(0, dim)]
    if self._bounds is None:
      from simfluence_jax.training import checkpoints  # pylint: disable=g-import-not-at-top
      variables = checkpoints.load_variables(self.root, self.saved[-1])
      self._bounds = [(a, b) for _, a, b in gradients.leaf_slices(
          {self.spec.collection: variables[self.spec.collection]})]
    return self._bounds


def _test_columns(run: RunTrace, test_ids: np.ndarray) -> np.ndarray:
  index = {int(t): j for j, t in enumerate(test_ids.tolist())}
  return np.asarray([index[int(t)] for t in run.test_ids], np.int64)


def fit(workspace, fit_runs: Sequence[RunTrace], *, simulator: str,
        val_runs: Sequence[RunTrace] = (), options: BaselineOptions = BaselineOptions()
        ) -> tuple[FitParams, dict]:
  """Fits one of SIMULATORS on the fit runs' checkpoints; returns (params, diagnostics)."""
  if simulator not in SIMULATORS:
    raise ValueError(f"unknown baseline {simulator!r}; expected one of {SIMULATORS}")
  if not fit_runs:
    raise ValueError("a baseline needs at least one fit run (its checkpoints)")
  if options.curvature not in CURVATURES:
    raise ValueError(f"unknown curvature {options.curvature!r}; expected one of {CURVATURES}")
  t0 = time.perf_counter()
  # Gradients can score any train example, so the simulator covers the task's whole train
  # pool (held-out runs may draw subsets the fit runs never saw), plus any other run id.
  task = fit_runs[0].metadata.get("task")
  pool_ids = list(_pools(fit_runs[0].metadata)[0]) if isinstance(task, str) else []
  train_ids = np.unique(np.concatenate(
      [np.asarray(pool_ids, np.int64)] + [np.asarray(r.train_ids, np.int64) for r in fit_runs]))
  test_ids = simulators.ordered_test_ids(fit_runs)
  n, m = train_ids.size, test_ids.size
  ckpt_opt = "all" if simulator == "tracin_cp_all" else options.checkpoints
  b_sum = np.zeros((m, n))
  diag = {"simulator": simulator, "fit_runs": [r.run_id for r in fit_runs],
          "num_train": int(n), "num_test": int(m), "checkpoints": {}}
  if simulator in ("influence", "source"):
    diag["curvature"] = options.curvature
  rows = []                                          # hypothetical_linear transitions
  for run in fit_runs:
    rg = RunGradients(workspace, run, train_ids=train_ids, test_ids=test_ids, options=options)
    steps = rg.steps(ckpt_opt, options.num_tracin_checkpoints)
    diag["checkpoints"][run.run_id] = steps
    diag["gradient_spec"] = dataclasses.asdict(rg.spec)
    diag["learning_rate"] = rg.eta
    if simulator in ("tracin_cp", "tracin_cp_all"):
      b_sum += tracin_cp_scores([(rg.eta, *rg.at(s)) for s in steps])
    elif simulator == "influence":
      g_tr, g_te = rg.at(steps[-1])
      bounds, factors = rg.curvature_inputs(steps[-1:], g_tr.shape[1])
      b, diag["damping"] = influence_scores(g_tr, g_te, g_tr, bounds=bounds,
                                            damping=options.damping, factors=factors)
      b_sum += b
    elif simulator == "source":
      segs, prev_end, bounds = [], 0, None
      for part in split_segments(steps, options.segments):
        grads = np.stack([rg.at(s)[0] for s in part])
        bounds, factors = rg.curvature_inputs(part, grads.shape[-1])
        segs.append(Segment(rg.eta, part[-1] - prev_end, grads, factors))
        prev_end = part[-1]
      g_te = rg.at(steps[-1])[1]
      b, diag["damping"] = source_scores(segs, g_te, bounds=bounds, damping=options.damping)
      diag.setdefault("segments", {})[run.run_id] = [
          {"steps": [int(s) for s in p], "num_steps": int(sg.num_steps)}
          for p, sg in zip(split_segments(steps, options.segments), segs)]
      b_sum += b
    else:
      rows.append(_hypothetical_rows(run, rg, steps, train_ids, test_ids))
  diag["timings_s"] = {"gradients_and_scores": time.perf_counter() - t0}
  if simulator == "hypothetical_linear":
    params, diag = _fit_hypothetical_linear(rows, train_ids, test_ids, val_runs, options,
                                            diag)
    diag["timings_s"]["total"] = time.perf_counter() - t0
    return params, diag
  diag["timings_s"]["total"] = diag["timings_s"]["gradients_and_scores"]
  b = b_sum / len(fit_runs)
  params = FitParams(A=np.zeros((m, n), np.float32), B=b.astype(np.float32),
                     train_ids=train_ids, test_ids=test_ids, kind="additive", lam=0.0)
  if simulator.startswith("tracin_cp"):
    diag["rescale"] = RESCALE_NOTE
  return params, diag


def _hypothetical_rows(run, rg: RunGradients, steps, train_ids, test_ids):
  """Eq. 10 regression rows of one run: (positions [S, k], prev [S, m], target [S, m])."""
  positions = rollout_lib.ids_to_positions(run.curriculum, train_ids)
  cols = _test_columns(run, test_ids)
  batches, prevs, targets = [], [], []
  for s in steps:
    if s >= run.num_steps:                          # the final checkpoint has no next batch
      continue
    g_tr, g_te = rg.at(s)
    pos = positions[s]                               # batch of step s+1 = curriculum row s
    live = pos[pos >= 0]
    dots = np.asarray(g_te, np.float64) @ np.asarray(g_tr[live], np.float64).T  # [m, |c|]
    prev = np.full(test_ids.size, np.nan)
    prev[cols] = run.losses[s]
    batches.append(pos)
    prevs.append(prev)
    targets.append(prev - rg.eta * dots.sum(axis=1) / live.size)
  k = max((b.size for b in batches), default=1)
  pad = lambda b: np.pad(b, (0, k - b.size), constant_values=-1)
  return ([pad(b) for b in batches], prevs, targets)


def _fit_hypothetical_linear(rows, train_ids, test_ids, val_runs, options, diag):
  batches = [b for r in rows for b in r[0]]
  if not batches:
    raise ValueError("hypothetical_linear: no checkpoint before a run's last step")
  k = max(b.size for b in batches)
  batches = np.stack([np.pad(b, (0, k - b.size), constant_values=-1) for b in batches])
  prev = np.stack([p for r in rows for p in r[1]])
  target = np.stack([t for r in rows for t in r[2]])
  mask = (np.isfinite(prev) & np.isfinite(target)).astype(np.float32)
  tr = design.Transitions(batches=batches.astype(np.int32),
                          prev=np.where(mask > 0, prev, 0).astype(np.float32),
                          target=np.where(mask > 0, target, 0).astype(np.float32),
                          mask=mask, num_train=int(train_ids.size))
  as_params = lambda a, b, lam: FitParams(
      A=np.asarray(a, np.float32), B=np.asarray(b, np.float32), train_ids=train_ids,
      test_ids=test_ids, kind="linear", lam=float(lam))
  scores = {}
  lam = options.lam
  if lam is None and not val_runs and len(options.lam_grid) == 1:
    lam = float(options.lam_grid[0])  # as simulators.fit: a one-value grid needs no validation
  if lam is not None:
    params = as_params(*ridge.solve(tr, kind="linear", lam=lam), lam)
  else:
    if not val_runs:
      raise ValueError("hypothetical_linear: give lam or validation runs to choose it")
    grid = sorted(float(x) for x in options.lam_grid)
    params, scores = simulators.select_by_validation(
        [as_params(a, b, lam) for lam, (a, b) in
         zip(grid, ridge.solve_path(tr, kind="linear", lams=grid))], val_runs)
  diag.update({"kind": "linear", "lam": params.lam, "validation_mse": scores,
               "val_runs": [r.run_id for r in val_runs],
               "num_transitions": int(batches.shape[0])})
  return params, diag


__all__ = ["SIMULATORS", "CURVATURES", "BaselineOptions", "mean_factors", "tracin_cp_scores", "influence_scores",
           "Segment", "source_scores", "split_segments", "evaluate_rescaled",
           "model_settings", "RunGradients", "fit"]
