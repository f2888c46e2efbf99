r"""Gradient-baseline benchmark: per-example gradient throughput and, given a workspace,
the baselines' simulation accuracy next to Simfluence-Linear.

  .venv/bin/python benchmarks/baselines_bench.py [--examples=64 --projection_dim=1024]
  .venv/bin/python benchmarks/baselines_bench.py --workspace=W --fit_runs=a,b --val_runs=c \
      --heldout_runs=d,e

Measures (tiny T5 config of gin_configs/models/tiny.gin, random init, 64/16 tokens):
  ia3_examples_per_s        exact IA3 per-example gradients (vmap(grad)), after compilation
  full_examples_per_s       full-model per-example gradients JL-projected to projection_dim
  ekfac_fit_s               block EK-FAC fit (one block per IA3 vector) on those gradients
With --workspace: for every simulator, fit seconds and held-out all-steps MSE / final-step
Spearman (TracIn-CP both raw and σ-rescaled, the latter flagged as using the ground truth).
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import numpy as np

from simfluence_jax import baselines
from simfluence_jax import ekfac
from simfluence_jax import gradients
from simfluence_jax import models
from simfluence_jax import simulators
from simfluence_jax import tasks
from simfluence_jax import trainer

TINY = models.T5Config(vocab_size=384, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                       num_encoder_layers=1, num_decoder_layers=1)


def _throughput(loss_fn, variables, batch, spec, repeats=3) -> tuple[float, np.ndarray]:
  grads = gradients.per_example_gradients(loss_fn, variables, batch, spec)   # compile
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    grads = gradients.per_example_gradients(loss_fn, variables, batch, spec)
    best = min(best, time.perf_counter() - t)
  return batch["encoder_input_tokens"].shape[0] / best, grads


def gradient_bench(num_examples: int, projection_dim: int) -> dict:
  variables = models.init_variables(TINY, jax.random.PRNGKey(0), use_ia3=True,
                                    input_length=64, target_length=16)
  loss_fn = trainer.t5_loss_fn(models.Transformer(TINY, use_ia3=True))
  pool = tasks.get_pools("country_yesno").train[:num_examples]
  batch = tasks.encode_examples(pool, input_length=64, target_length=16)
  ia3_rate, g = _throughput(loss_fn, variables, batch, gradients.GradientSpec("ia3"))
  full_rate, _ = _throughput(loss_fn, variables, batch, gradients.GradientSpec(
      "params", projection_dim=projection_dim))
  bounds = [(a, b) for _, a, b in gradients.leaf_slices({"ia3": variables["ia3"]})]
  t = time.perf_counter()
  jax.block_until_ready(ekfac.fit_blocks(jax.numpy.asarray(g), bounds).eig)
  return {"ia3_examples_per_s": ia3_rate, "full_examples_per_s": full_rate,
          "ekfac_fit_s": time.perf_counter() - t, "ia3_dim": int(g.shape[1]),
          "num_params": models.num_parameters(variables["params"]),
          "projection_dim": projection_dim}


def accuracy_bench(workspace, fit_ids, val_ids, heldout_ids) -> dict:
  read = lambda ids: simulators.read_runs(workspace, ids)
  fit_runs, val_runs, heldout = read(fit_ids), read(val_ids), read(heldout_ids)
  out = {}
  for sim in ("linear", "tracin_cp", "influence", "source", "hypothetical_linear"):
    t = time.perf_counter()
    try:       # e.g. Simfluence-Linear cannot roll out held-out ids its fit runs never saw
      if sim == "linear":
        params, _ = simulators.fit(fit_runs, simulator="linear", val_runs=val_runs)
      else:
        params, _ = baselines.fit(workspace, fit_runs, simulator=sim, val_runs=val_runs)
      out[sim] = {"fit_s": time.perf_counter() - t,
                  **_scores(simulators.evaluate(params, heldout))}
    except ValueError as e:
      out[sim] = {"error": str(e)[:200]}
      continue
    if sim == "tracin_cp":
      out["tracin_cp_rescaled"] = {**_scores(baselines.evaluate_rescaled(params, heldout)),
                                   "rescale": baselines.RESCALE_NOTE}
  return out


def _scores(result: dict) -> dict:
  return {"mse": result["mse"]["mean"], "spearman": result["spearman"]["mean"]}


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--examples", type=int, default=64)
  parser.add_argument("--projection_dim", type=int, default=1024)
  parser.add_argument("--workspace")
  parser.add_argument("--fit_runs", default="")
  parser.add_argument("--val_runs", default="")
  parser.add_argument("--heldout_runs", default="")
  args = parser.parse_args()
  result = {"gradients": gradient_bench(args.examples, args.projection_dim)}
  if args.workspace:
    split = lambda s: [x for x in s.split(",") if x]
    result["accuracy"] = accuracy_bench(args.workspace, split(args.fit_runs),
                                        split(args.val_runs), split(args.heldout_runs))
  print(json.dumps(result))


if __name__ == "__main__":
  main()
