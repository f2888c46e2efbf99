"""`python -m simfluence_jax`: lists the binaries, each run as `python -m simfluence_jax.<name>`."""

import sys

BINARIES = {
    "pretrain": "pretrain a model on the task's text (cached in the workspace)",
    "train": "train many runs together under jax.vmap, writing their traces",
    "import_traces": "import traces from any framework (CSV / JSONL / Parquet)",
    "split": "split an experiment's runs into fit / validation / held-out",
    "fit": "fit a simulator (Simfluence or a prior method) to the fit runs",
    "evaluate": "score a fit on held-out runs (metrics.json)",
    "simulate": "simulate a curriculum with a fit",
    "study": "the data-efficiency study (simulators vs number of past runs)",
    "counterfactuals": "score every method on retrained edited runs (scores.json)",
    "metagradients": "exact metagradients' predictions of the bank's edits (and the oracle)",
    "merge_workspaces": "merge workspaces trained as separate jobs",
    "report": "write the experiment's HTML / markdown report",
}


def main() -> int:
  print("simfluence_jax binaries (python -m simfluence_jax.<name> --help):")
  for name, what in BINARIES.items():
    print(f"  {name:<17} {what}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
