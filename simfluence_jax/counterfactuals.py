r"""Scores every method on the change it predicts, on retrained edited runs of a workspace.

  python -m simfluence_jax.counterfactuals --workspace=W [--runs=explicit_a,explicit_b] \
      [--fits=linear,tracin_cp] [--output=W/counterfactuals/scores.json]

An edited run is any run whose run.json has metadata {"counterfactual": {"base_run": B,
"kind": K, ...}} with B a run of the workspace (the pipeline's bank writes these; bring your
own edits the same way: `import_traces` or `train` with curriculum files carrying that
metadata). Every evaluated fit of the experiment and the no-curriculum baselines predict
each edited run and its base from their own L_0; the simulated vs observed Δ = edited − base
(final loss, and over all steps) is summarised per kind and overall (Pearson, within answer
groups, Spearman, sign, mean Δ; datamodeling score on "half_subset" runs) — see
evaluation/counterfactual_scores.py and WORKSPACE.md for scores.json.

  python -m simfluence_jax.counterfactuals --workspace=W --write=bench|removal_test \
      --gin_file=experiments/quickstart.gin
writes the bank's curriculum files instead (the experiment's `pipeline.*` settings), for a
train job with --gin.run_experiment.curriculum_dir (launch/xm_launch.py plans it this way).
"""

from __future__ import annotations

import json

from absl import flags

from simfluence_jax.cli import gin_setup as gin_utils
from simfluence_jax.experiments import counterfactual_bank

_WORKSPACE = flags.DEFINE_string("workspace", None, "Workspace directory.", required=True)
_RUNS = flags.DEFINE_list("runs", None, "Edited run ids (default: every run with "
                          "metadata.counterfactual.base_run).")
_FITS = flags.DEFINE_list("fits", None, "Fits to score (default: every evaluated fit of "
                          "experiment.json).")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write scores.json (default: "
                              "<workspace>/counterfactuals/scores.json).")
_WRITE = flags.DEFINE_enum("write", None, ["bench", "removal_test"],
                           "Write the bench's (after split) or the removal test's (after "
                           "fit) curriculum files from the gin pipeline settings; no scoring.")


def _write(kind: str) -> None:
  config = gin_utils.pipeline_config()
  if kind == "bench":
    files = counterfactual_bank.make_bench(_WORKSPACE.value, config.bench_spec())
  else:
    methods = config.removal_methods()
    files = counterfactual_bank.make_removal_test(
        _WORKSPACE.value, methods=methods, num_targets=config.removal_test_targets,
        k=config.removal_test_k, seed=config.bench_seed) if methods else []
  print(json.dumps({"write": kind, "files": len(files)}))


def main(argv):
  del argv
  gin_utils.parse_gin_flags(skip_unknown=True)
  if _WRITE.value:
    _write(_WRITE.value)
    return
  result = counterfactual_bank.score_workspace(
      _WORKSPACE.value, run_ids=_RUNS.value, fit_names=_FITS.value, write=_OUTPUT.value is None)
  if _OUTPUT.value is not None:
    from simfluence_jax.traces import atomic_io  # pylint: disable=g-import-not-at-top
    atomic_io.save_json(_OUTPUT.value, result)
  summary = {name: {k: m.get("overall", {}).get(k) for k in ("pearson", "pearson_within",
                                                             "sign", "n")}
             for name, m in result["methods"].items()}
  print(json.dumps({"runs": result["runs"], "methods": summary}))


if __name__ == "__main__":
  gin_utils.register_pipeline_config()
  gin_utils.define_flags()
  gin_utils.run(main, "simfluence_jax.counterfactuals")
