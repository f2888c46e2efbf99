r"""Scores a fitted simulator on held-out runs and writes metrics.json.

  python -m simfluence_jax.evaluate --workspace=W --fit=linear --runs=run_022,run_023 \
      --output=W/fits/linear/metrics.json

Each run is rolled out from its own observed L_0 along its own curriculum and compared with
its observed losses: all-steps MSE and final-step Spearman (paper §2.2), mean ± std
(ddof=0) over runs, per-run values kept; the across-run score, and curriculum R² against the
mean trajectory of the fit's own fit runs (fit.json), whose scores and those of the other
no-curriculum baseline are written beside the method's under "baselines".
"""

from __future__ import annotations

import json

from absl import flags

from simfluence_jax.traces import atomic_io
from simfluence_jax.prior_methods import methods as baselines
from simfluence_jax.traces import fit_params
from simfluence_jax.cli import gin_setup as gin_utils
from simfluence_jax.experiments import pipeline
from simfluence_jax.simulators import simfluence as simulators

_WORKSPACE = flags.DEFINE_string("workspace", None, "Workspace directory.", required=True)
_FIT = flags.DEFINE_string("fit", None, "Fit name under fits/.", required=True)
_RUNS = flags.DEFINE_list("runs", None, "Held-out run ids.")
_FROM_SPLIT = flags.DEFINE_boolean(
    "from_split", False, "Take --runs from the held-out runs in <workspace>/experiment.json.")
_UNSEEN = flags.DEFINE_enum(
    "unseen", "error", ["error", "mean"],
    "A held-out run's train example the fit never saw: an error, or the mean parameters of "
    "the seen ones (listed in metrics.json as imputed_train_ids).")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write metrics.json "
                              "(default: fits/<fit>/metrics.json).")


def main(argv):
  del argv
  gin_utils.parse_gin_flags()
  params, diagnostics = fit_params.load_fit(_WORKSPACE.value, _FIT.value)
  run_ids = _RUNS.value
  if _FROM_SPLIT.value:
    run_ids = pipeline.read_experiment(_WORKSPACE.value)["split"]["heldout"]
  if not run_ids:
    raise ValueError("no runs to score: give --runs=run_x,... or --from_split")
  runs = simulators.read_runs(_WORKSPACE.value, run_ids)
  # The no-curriculum baselines are the mean trajectory of the fit's own fit runs.
  fit_runs = simulators.read_runs(_WORKSPACE.value, diagnostics.get("fit_runs") or [])
  if diagnostics.get("rescale"):  # TracIn-CP: the paper's optimal σ (uses ground truth)
    result = baselines.evaluate_rescaled(params, runs, fit_runs)
  else:
    result = simulators.evaluate(params, runs, unseen=_UNSEEN.value, fit_runs=fit_runs)
  result = {"fit": _FIT.value, "kind": params.kind, "lam": params.lam, **result}
  output = _OUTPUT.value or f"{_WORKSPACE.value}/fits/{_FIT.value}/metrics.json"
  atomic_io.save_json(output, result)
  print(json.dumps({k: result[k] for k in ("fit", "mse", "spearman", "curriculum_r2",
                                           "across_run") if k in result}))


if __name__ == "__main__":
  gin_utils.define_flags()
  gin_utils.run(main, "simfluence_jax.evaluate")
