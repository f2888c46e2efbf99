r"""Data-efficiency study: held-out accuracy vs number of past runs, Linear vs featurized.

  python -m simfluence_jax.study --workspace=W [--num_runs=2,5,10,20]

Fits each simulator on the first N fit runs of <workspace>/experiment.json (for each N) and
scores it on the held-out runs (held-out curricula may hold train examples a small fit never
saw: the table counts them, and they are imputed as data_efficiency explains). Writes
<workspace>/study/data_efficiency.{json,md}; the report shows the table.
"""

from __future__ import annotations

import json
import pathlib

from absl import flags

from simfluence_jax.traces import atomic_io
from simfluence_jax.evaluation import data_efficiency
from simfluence_jax.cli import gin_setup as gin_utils
from simfluence_jax.experiments import pipeline
from simfluence_jax.simulators import simfluence as simulators

_WORKSPACE = flags.DEFINE_string("workspace", None, "Workspace directory.", required=True)
_NUM_RUNS = flags.DEFINE_list("num_runs", ["2", "5", "10", "20"], "Numbers of past runs.")


def main(argv):
  del argv
  ws = pathlib.Path(_WORKSPACE.value)
  split = pipeline.read_experiment(ws)["split"]
  fit_runs = simulators.read_runs(ws, split["fit"])
  heldout = simulators.read_runs(ws, split["heldout"])
  counts = [int(n) for n in _NUM_RUNS.value if int(n) <= len(fit_runs)]
  rows = data_efficiency.study(fit_runs, heldout, num_runs_list=counts,
                               simulators=("linear", "featurized"))
  table = data_efficiency.markdown_table(rows)
  atomic_io.save_json(ws / "study" / "data_efficiency.json", {"rows": rows})
  atomic_io.write_text(ws / "study" / "data_efficiency.md", table + "\n")
  print(table)
  print(json.dumps({"rows": len(rows)}))


if __name__ == "__main__":
  gin_utils.define_flags()
  gin_utils.run(main, "simfluence_jax.study")
