r"""Exact metagradients through training as a method on a workspace's counterfactual bank.

  python -m simfluence_jax.metagradients --workspace=W [--gin_file=experiments/quickstart.gin]

Replays each base run of the bank's edited runs from the pretrained model (forward mode
through every step and the optimizer's state: prior_methods/metagradients.py) and writes
every edit's first-order prediction, L^b_t + Σ ∂L^b_t/∂w · Δw, to
W/counterfactuals/metagradient/predictions.npz (and its cost to cost.json);
`python -m simfluence_jax.counterfactuals` then scores it as the method "metagradient".
With --oracle (the default when the experiment's pipeline has `oracle_fits`), it also writes
oracle.json: the exact one-step effect of every train example at `pipeline.oracle_steps` of
the first fit run, against the fits' A_i, B_i.

The pipeline settings (`pipeline.bench_record_every`, `oracle_fits`, `oracle_steps`) come
from the gin files, as for `counterfactuals --write`; the pretrained model from
--pretrained_dir (default: %PRETRAINED_DIR of the gin files, else W/pretrained).
"""

from __future__ import annotations

import json
import pathlib

from absl import flags
import gin

from simfluence_jax.cli import gin_setup as gin_utils
from simfluence_jax.experiments import counterfactual_bank
from simfluence_jax.experiments import metagradient_bank
from simfluence_jax.experiments import pipeline
from simfluence_jax.traces import contract as traces

_WORKSPACE = flags.DEFINE_string("workspace", None, "Workspace directory.", required=True)
_RUNS = flags.DEFINE_list("runs", None, "Edited run ids (default: every run with "
                          "metadata.counterfactual.base_run).")
_PRETRAINED_DIR = flags.DEFINE_string("pretrained_dir", None, "The pretrained model the runs "
                                      "started from (default: see above).")
_ORACLE = flags.DEFINE_bool("oracle", True, "Also write oracle.json (needs the fits named by "
                            "pipeline.oracle_fits; those not fitted are skipped).")


def _pretrained_dir(workspace: pathlib.Path) -> pathlib.Path:
  if _PRETRAINED_DIR.value:
    return pathlib.Path(_PRETRAINED_DIR.value)
  try:
    configured = gin.query_parameter("%PRETRAINED_DIR")
  except ValueError:   # no gin file defines the macro
    configured = None
  return pathlib.Path(configured) if configured else workspace / "pretrained"


def main(argv):
  del argv
  gin_utils.parse_gin_flags(skip_unknown=True)
  config = gin_utils.pipeline_config()
  workspace = pathlib.Path(_WORKSPACE.value)
  pretrained = _pretrained_dir(workspace)
  cost = metagradient_bank.predict_bank(
      workspace, counterfactual_bank.edited_runs(workspace, _RUNS.value),
      pretrained_dir=pretrained, record_every=config.bench_record_every)
  summary = {"edits": cost["edits"], "seconds": cost["seconds"]}
  if _ORACLE.value:
    fits = [f for f in config.oracle_fits if (workspace / "fits" / f / "params.npz").exists()]
    run_id = pipeline.read_experiment(workspace)["split"]["fit"][0]
    steps = [t for t in config.oracle_steps
             if 1 <= t <= traces.read_run(workspace, run_id).num_steps]
    if fits and steps:
      oracle = metagradient_bank.oracle(workspace, run_id=run_id, fits=fits, steps=steps,
                                        pretrained_dir=pretrained)
      summary["oracle"] = {t: {f: round(v["pearson"], 3) for f, v in row["fits"].items()}
                           for t, row in oracle["steps"].items()}
  print(json.dumps(summary))


if __name__ == "__main__":
  gin_utils.register_pipeline_config()
  gin_utils.define_flags()
  gin_utils.run(main, "simfluence_jax.metagradients")
