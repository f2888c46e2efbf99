"""The built-in countryinfo tasks as ordinary seqio tasks, registered when imported.

  MIXTURE_OR_TASK_MODULE = "simfluence_jax.training.country_tasks"
  MIXTURE_OR_TASK_NAME = "country_yesno" | "country_freetext" | "country_manyshot"

Each task has the splits "train" (the pool) and "validation" (the test examples), from the
offline makers in `task_data` (no downloads). A row holds `id` (int64: ID_BASES + position,
so ids are stable and disjoint between tasks and splits), `inputs` and `targets` (text,
tokenized by seqio.ByteVocabulary(extra_ids=100) + EOS) and the example's meta fields
(country, relation, ... as strings or string lists). Nothing reads them but through
`tasks.load_pools`, the path every seqio task takes.
"""

from __future__ import annotations

import numpy as np
import seqio
import tensorflow as tf

from simfluence_jax.training import task_data
from simfluence_jax.training import tasks
from simfluence_jax.training.task_data import ID_BASES  # re-exported for tests
from simfluence_jax.training.task_data import POOL_SIZES
from simfluence_jax.training.task_data import TASK_NAMES

__all__ = ["TASK_NAMES", "ID_BASES", "POOL_SIZES", "SPLITS", "register"]

SPLITS = ("train", "validation")   # the maker's train pool, its test examples


def _dataset_fn(task_name: str):
  def dataset_fn(split: str, shuffle_files: bool = False, seed: int | None = None):
    del shuffle_files, seed  # in-memory, fixed order
    pools = task_data.country_pools(task_name)
    examples = {"train": pools.train, "validation": pools.test}[split]
    keys = [k for k in examples[0].meta if k != "task"]   # load_pools adds the task's name
    if any(list(e.meta) != list(examples[0].meta) for e in examples):
      raise ValueError(f"{task_name} {split}: examples with different meta fields")
    return tf.data.Dataset.from_tensor_slices({
        "id": np.asarray([e.id for e in examples], np.int64),
        "inputs": [e.inputs for e in examples],
        "targets": [e.targets for e in examples],
        **{k: [e.meta[k] for e in examples] for k in keys}})
  return dataset_fn


def register() -> tuple[str, ...]:
  """Registers one seqio.Task per name of TASK_NAMES (skips names already registered)."""
  vocab = seqio.ByteVocabulary(extra_ids=tasks.EXTRA_IDS)
  features = {"inputs": seqio.Feature(vocabulary=vocab, add_eos=True),
              "targets": seqio.Feature(vocabulary=vocab, add_eos=True)}
  for name in TASK_NAMES:
    if name in seqio.TaskRegistry.names():
      continue
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(_dataset_fn(name), splits=SPLITS),
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
        output_features=features)
  return TASK_NAMES


register()
