r"""Span-corruption pretraining of the T5 model from a seeded init; fine-tuning starts from it.

  python -m simfluence_jax.pretrain --gin_file=gin_configs/experiments/quickstart.gin \
      [--gin_file=gin_configs/local_tiny.gin] --gin.WORKSPACE=\"/tmp/ws\"

Writes <pretrained_dir>/checkpoint_<num_steps> ({"params": ...}, orbax) and
<pretrained_dir>/config.gin; pretrained_dir defaults to <workspace>/pretrained. If that
checkpoint already exists it prints "cached" and does nothing (so a shared cache directory can
serve many workspaces).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorBoard's TF import: no banner
if "XLA_FLAGS" not in os.environ:  # must precede the first jax import
  os.environ["XLA_FLAGS"] = "--xla_cpu_experimental_ynn_fusion_type="

# pylint: disable=g-import-not-at-top,wrong-import-position
import dataclasses
import json
import pathlib
import time
from typing import Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from simfluence_jax.traces import atomic_io
from simfluence_jax.training import checkpoints
from simfluence_jax.cli import gin_setup as gin_utils
from simfluence_jax.training import models
from simfluence_jax.training import tasks
from simfluence_jax.training import trainer as trainer_lib

gin_utils.register_model_config()
OTHER_BINARIES_CONFIGURABLES = ("run_experiment", "pipeline")


def make_pretrain_step(loss_fn: trainer_lib.LossFn, optimizer: optax.GradientTransformation):
  """jitted (params, opt_state, batch) -> (params, opt_state, mean example loss)."""

  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(
        lambda p: jnp.mean(loss_fn({"params": p}, batch, None)))(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


@gin.configurable
def run_pretraining(
    workspace: str = gin.REQUIRED,
    model_config: models.T5Config = gin.REQUIRED,
    *,
    num_steps: int = 1000,
    batch_size: int = 32,
    learning_rate: float = 1e-2,
    optimizer: str = "adafactor",
    input_length: int = 64,
    target_length: int = 16,
    seed: int = 0,
    pretrained_dir: str | None = None,
    prompted_fraction: float = 0.0,
) -> dict:
  """Pretrains for num_steps and saves checkpoint_<num_steps>; returns a summary dict.

  prompted_fraction: the share of each batch from T0-like multitask prompts (the answer
  formats over countryinfo facts, the fine-tuned tasks' examples held out:
  tasks.pretraining_batches); 0 = span corruption only (the old start).
  """
  start = time.time()
  out_dir = pathlib.Path(pretrained_dir or pathlib.Path(workspace) / "pretrained")
  path = checkpoints.checkpoint_path(out_dir, num_steps)
  # What the cached checkpoint was pretrained on: a cache hit must be the same recipe.
  recipe = {"num_steps": num_steps, "batch_size": batch_size, "learning_rate": learning_rate,
            "optimizer": optimizer, "seed": seed, "prompted_fraction": prompted_fraction,
            "model_config": dataclasses.asdict(model_config)}
  recipe_path = out_dir / "pretraining.json"
  if path.is_dir():
    stored = json.loads(recipe_path.read_text()) if recipe_path.exists() else None
    if stored is not None and stored != json.loads(json.dumps(recipe)):
      changed = sorted(k for k in recipe if stored.get(k) != json.loads(json.dumps(recipe))[k])
      raise ValueError(f"{path} was pretrained with other settings ({changed}: "
                       f"{ {k: stored.get(k) for k in changed} }); point PRETRAINED_DIR "
                       "elsewhere or remove it")
    return {"pretrained": str(path), "cached": True}
  gin_utils.write_config(out_dir)
  params = models.init_variables(model_config, jax.random.PRNGKey(seed), use_ia3=False,
                                 input_length=input_length,
                                 target_length=target_length)["params"]
  opt = trainer_lib.make_optimizer(optimizer, learning_rate)
  opt_state = jax.jit(opt.init)(params)
  step = make_pretrain_step(trainer_lib.t5_loss_fn(models.Transformer(model_config)), opt)
  batches = tasks.pretraining_batches(batch_size=batch_size, input_length=input_length,
                                      target_length=target_length, seed=seed,
                                      prompted_fraction=prompted_fraction)
  losses = []
  for _, batch in zip(tqdm.trange(num_steps, desc="pretrain", unit="step"), batches):
    params, opt_state, loss = step(params, opt_state, {k: jnp.asarray(v) for k, v in
                                                        batch.items()})
    losses.append(loss)
  losses = np.asarray(jax.device_get(losses), np.float32)
  if len(losses) < num_steps:
    raise ValueError(f"tasks.pretraining_batches ran out after {len(losses)} of {num_steps} "
                     "steps")
  checkpoints.save(path, {"params": params})
  atomic_io.save_json(recipe_path, recipe)
  return {"pretrained": str(path), "cached": False, "steps": num_steps,
          "first_loss": float(losses[0]), "last_loss": float(losses[-10:].mean()),
          "seconds": round(time.time() - start, 2)}


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}; use --gin_file / --gin.NAME=VALUE")
  gin_utils.parse_gin_flags(skip_unknown=OTHER_BINARIES_CONFIGURABLES)
  print(json.dumps(run_pretraining()))


if __name__ == "__main__":
  gin_utils.define_flags()
  gin_utils.run(main, "simfluence_jax.pretrain")
