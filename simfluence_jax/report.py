r"""Writes the experiment report: a self-contained HTML page and a markdown summary.

  python -m simfluence_jax.report --workspace=W [--output_dir=W/report]

The report's inputs and sections are documented in `simfluence_jax.evaluation.reports`.
"""

from __future__ import annotations

import json

from absl import flags

from simfluence_jax.cli import errors
from simfluence_jax.evaluation import reports

_WORKSPACE = flags.DEFINE_string("workspace", None, "Workspace directory.", required=True)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None,
                                  "Output directory (default: <workspace>/report).")


def main(argv):
  del argv
  print(json.dumps(reports.write_report(_WORKSPACE.value, _OUTPUT_DIR.value)))


if __name__ == "__main__":
  errors.run(main, "simfluence_jax.report")
