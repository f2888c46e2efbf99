r"""Imports training traces from any framework, given in the long format, into a workspace.

  python -m simfluence_jax.import_traces --workspace=W --input=traces.csv \
      [--format=csv|jsonl|parquet] [--overwrite]

The long format is documented in WORKSPACE.md and `simfluence_jax.traces.importers`.
"""

from __future__ import annotations

import json

from absl import flags

from simfluence_jax.cli import errors
from simfluence_jax.traces import importers

_WORKSPACE = flags.DEFINE_string("workspace", None, "Workspace directory.", required=True)
_INPUT = flags.DEFINE_string("input", None, "Long-format trace file.", required=True)
_FORMAT = flags.DEFINE_enum("format", None, list(importers.FORMATS),
                            "Input format; default from the file extension.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace existing runs that differ.")


def main(argv):
  del argv
  run_ids = importers.import_long_format(_INPUT.value, _WORKSPACE.value, _FORMAT.value,
                                         overwrite=_OVERWRITE.value)
  print(json.dumps({"workspace": _WORKSPACE.value, "runs": run_ids}))


if __name__ == "__main__":
  errors.run(main, "simfluence_jax.import_traces")
