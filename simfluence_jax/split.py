r"""Writes <workspace>/experiment.json: the paper's split of runs into fit / val / held-out.

  python -m simfluence_jax.split --gin_file=experiments/quickstart.gin --gin.WORKSPACE=\"W\"

Split sizes and the simulators to fit come from the experiment's `pipeline.*` bindings.
"""

from __future__ import annotations

import json

import gin

from simfluence_jax.cli import gin_setup as gin_utils
from simfluence_jax.experiments import pipeline


def main(argv):
  del argv
  gin_utils.parse_gin_flags(skip_unknown=True)
  config = gin_utils.pipeline_config()
  experiment = pipeline.write_split(gin.query_parameter("%WORKSPACE"), config)
  print(json.dumps({k: len(v) for k, v in experiment["split"].items()}))


if __name__ == "__main__":
  gin_utils.register_pipeline_config()
  gin_utils.define_flags()
  gin_utils.run(main, "simfluence_jax.split")
