r"""Fits a simulator to a workspace's runs and writes fits/<name>/{params.npz,fit.json}.

  python -m simfluence_jax.fit --workspace=W --simulator=linear \
      --fit_runs=run_000,run_001 --val_runs=run_020,run_021 --name=linear
  python -m simfluence_jax.fit --workspace=W --simulator=additive --fit_runs=... --lam=0.1 --name=add
"""

from __future__ import annotations

import json

from absl import flags
import gin

from simfluence_jax.prior_methods import methods as baselines
from simfluence_jax.simulators import featurized
from simfluence_jax.traces import fit_params
from simfluence_jax.cli import gin_setup as gin_utils
from simfluence_jax.experiments import pipeline
from simfluence_jax.simulators import simfluence as simulators
from simfluence_jax.simulators import streaming

_WORKSPACE = flags.DEFINE_string("workspace", None, "Workspace directory.", required=True)
_SIMULATOR = flags.DEFINE_enum(
    "simulator", "linear",
    list(simulators.SIMULATORS) + list(baselines.SIMULATORS) + ["featurized"],
    "Which simulator to fit. linear / additive / multiplicative: the variant (paper, "
    "centred, gamma, rho_gamma, lowrank: simulators/simfluence.py VARIANTS) that validates "
    "best on --val_runs (lowrank only when λ is not fixed by --lam or a one-value grid); "
    "<kind>_<variant> fixes one, e.g. linear_paper is the paper's Eq. 2 exactly; "
    "tracin_ideal = additive_paper (paper §4.1). "
    f"{', '.join(baselines.SIMULATORS)} are the gradient baselines (prior_methods/), which "
    "read the fit runs' checkpoints.")
_CHECKPOINTS = flags.DEFINE_string(
    "checkpoints", "available", "Gradient baselines: checkpoint steps to use, comma-separated, "
    "'available' (every saved checkpoint of a run), 'tracin' (the trainer's 10 evenly spaced "
    "TracIn steps) or 'all' (every step; implied by tracin_cp_all).")
_PROJECTION_DIM = flags.DEFINE_integer(
    "projection_dim", None, "Gradient baselines: JL projection dimension (default: exact "
    "IA3 gradients; 1024 for full fine-tuning).")
_DAMPING = flags.DEFINE_float(
    "damping", None, "influence/source: damping λ of (G + λI)⁻¹ (default 0.1 × mean "
    "EK-FAC eigenvalue).")
_CURVATURE = flags.DEFINE_enum(
    "curvature", "blocks", list(baselines.CURVATURES),
    "influence/source: EK-FAC form. 'blocks': one exact block per IA3 vector or per projected "
    "full gradient; 'ekfac_dense': full tuning only, true EK-FAC over the T5 dense kernels "
    "(exact kernel gradients; leave --projection_dim unset).")
_SEGMENTS = flags.DEFINE_integer("segments", 3, "source: number of training segments L.")
_RANK = flags.DEFINE_integer("rank", 4, "featurized: rank r of A = U_A V_Aᵀ, B = U_B V_Bᵀ.")
_STEPS = flags.DEFINE_integer("steps", 3000, "featurized: optax (Adam) steps.")
_FIT_RUNS = flags.DEFINE_list("fit_runs", None, "Run ids whose transitions are fitted.")
_FROM_SPLIT = flags.DEFINE_boolean(
    "from_split", False, "Take --fit_runs/--val_runs from <workspace>/experiment.json.")
_VAL_RUNS = flags.DEFINE_list("val_runs", [], "Validation run ids for choosing λ.")
_LAM = flags.DEFINE_float("lam", None, "L2 weight λ; if unset, chosen from --lam_grid.")
_LAM_GRID = flags.DEFINE_list(
    "lam_grid", None, "λ candidates, scored by all-steps MSE of rollouts on --val_runs "
    f"(default: gin `fit_options.lam_grid`, else {list(simulators.DEFAULT_LAM_GRID)}).")
_LAM_STEP = flags.DEFINE_float(
    "lam_step", None, "Step terms' penalty λ_s; if unset, chosen from --lam_step_grid.")
_LAM_STEP_GRID = flags.DEFINE_list(
    "lam_step_grid", None, "λ_s candidates (default: gin `fit_options.lam_step_grid`, else "
    f"{list(simulators.DEFAULT_LAM_STEP_GRID)}).")
_BEYOND = flags.DEFINE_enum(
    "beyond", None, ["hold", "zero"], "Step terms past the fit runs' length (a longer "
    "curriculum): hold the last step's terms, or drop them (default: gin "
    "`fit_options.beyond`, else hold; WORKSPACE.md).")
_STREAMING = flags.DEFINE_enum(
    "streaming", None, ["auto", "normal", "pcg"],
    "linear/additive/multiplicative: fit chunk by chunk of test examples with the runs read "
    "lazily (streaming.py; memory independent of the number of runs and test examples): "
    "'normal' = normal equations accumulated run by run, Cholesky sharded over devices; "
    "'pcg' = the chunk's transitions solved by PCG; 'auto' picks. Unset = in memory.")
_NAME = flags.DEFINE_string("name", None, "Fit name: writes fits/<name>/.", required=True)


@gin.configurable
def fit_options(*, lam_grid=simulators.DEFAULT_LAM_GRID,
                lam_step_grid=simulators.DEFAULT_LAM_STEP_GRID, beyond="hold",
                chunk_size=None):
  """Everything else about a fit, set with --gin_file / --gin.fit_options.NAME=VALUE."""
  return {"lam_grid": tuple(lam_grid), "lam_step_grid": tuple(lam_step_grid),
          "beyond": beyond, "chunk_size": chunk_size}


def main(argv):
  del argv
  gin_utils.parse_gin_flags()
  options = fit_options()
  fit_ids, val_ids = _FIT_RUNS.value, _VAL_RUNS.value
  if _FROM_SPLIT.value:
    split = pipeline.read_experiment(_WORKSPACE.value)["split"]
    fit_ids, val_ids = split["fit"], split["val"]
  if not fit_ids:
    raise ValueError("no fit runs: give --fit_runs=run_a,run_b,... or --from_split")
  try:
    grid = [float(x) for x in (_LAM_GRID.value or options["lam_grid"])]
  except ValueError:
    raise ValueError(f"--lam_grid must be numbers, got {_LAM_GRID.value}") from None
  try:
    step_grid = [float(x) for x in (_LAM_STEP_GRID.value or options["lam_step_grid"])]
  except ValueError:
    raise ValueError(f"--lam_step_grid must be numbers, got {_LAM_STEP_GRID.value}") from None
  if _STREAMING.value is not None:
    if _SIMULATOR.value not in simulators.SIMULATORS:
      raise ValueError(f"--streaming fits Simfluence simulators {simulators.KINDS}, not "
                       f"{_SIMULATOR.value!r}")
    params, diagnostics = streaming.fit_streaming(
        _WORKSPACE.value, fit_ids, simulator=_SIMULATOR.value, lam=_LAM.value,
        lam_grid=grid, val_run_ids=val_ids, solver=_STREAMING.value,
        chunk_size=options["chunk_size"])
    _write(params, diagnostics)
    return
  fit_runs = simulators.read_runs(_WORKSPACE.value, fit_ids)
  val_runs = simulators.read_runs(_WORKSPACE.value, val_ids)
  if _SIMULATOR.value in baselines.SIMULATORS:
    ckpts = _CHECKPOINTS.value
    if ckpts not in ("available", "tracin", "all"):
      ckpts = tuple(int(s) for s in ckpts.split(","))
    params, diagnostics = baselines.fit(
        _WORKSPACE.value, fit_runs, simulator=_SIMULATOR.value, val_runs=val_runs,
        options=baselines.BaselineOptions(
            checkpoints=ckpts, projection_dim=_PROJECTION_DIM.value, damping=_DAMPING.value,
            segments=_SEGMENTS.value, lam=_LAM.value, lam_grid=tuple(grid),
            curvature=_CURVATURE.value))
  elif _SIMULATOR.value == "featurized":
    params, diagnostics = featurized.fit_featurized(
        fit_runs, rank=_RANK.value, lam=1e-3 if _LAM.value is None else _LAM.value,
        steps=_STEPS.value, val_runs=val_runs)
  else:
    params, diagnostics = simulators.fit(
        fit_runs, simulator=_SIMULATOR.value, lam=_LAM.value, lam_grid=grid,
        val_runs=val_runs, chunk_size=options["chunk_size"], lam_step=_LAM_STEP.value,
        lam_step_grid=step_grid, beyond=_BEYOND.value or options["beyond"])
  _write(params, diagnostics)


def _write(params, diagnostics):
  path = fit_params.save_fit(_WORKSPACE.value, _NAME.value, params, diagnostics)
  print(json.dumps({"fit": _NAME.value, "path": str(path), "kind": params.kind,
                    "variant": diagnostics.get("variant"),
                    "lam": params.lam, "m": int(params.A.shape[0]),
                    "n": int(params.A.shape[1]),
                    "seconds": diagnostics["timings_s"]["total"]}))


if __name__ == "__main__":
  gin_utils.define_flags()
  gin_utils.run(main, "simfluence_jax.fit")
