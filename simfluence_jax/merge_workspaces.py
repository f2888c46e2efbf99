r"""Merges the runs of shard workspaces (one per training job) into one workspace.

  python -m simfluence_jax.merge_workspaces --workspace=W --sources=W/shards/0,W/shards/1
"""

from __future__ import annotations

import json

from absl import flags

from simfluence_jax.cli import gin_setup as gin_utils
from simfluence_jax.experiments import pipeline

_WORKSPACE = flags.DEFINE_string("workspace", None, "Destination workspace.", required=True)
_SOURCES = flags.DEFINE_list("sources", None, "Shard workspaces to merge.", required=True)


def main(argv):
  del argv
  merged = pipeline.merge_workspaces(_WORKSPACE.value, _SOURCES.value)
  print(json.dumps({"workspace": _WORKSPACE.value, "runs": len(merged)}))


if __name__ == "__main__":
  gin_utils.define_flags()
  gin_utils.run(main, "simfluence_jax.merge_workspaces")
