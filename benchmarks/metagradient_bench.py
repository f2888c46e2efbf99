r"""Cost of exact metagradients relative to one training run, in time and peak memory.

  .venv/bin/python benchmarks/metagradient_bench.py                 # IA3 and full tuning
  .venv/bin/python benchmarks/metagradient_bench.py --tunings=ia3 --edits=16

The quickstart's shape: the CPU default T5 (models/cpu_default.gin, random init), one run of
T = 64 steps × k = 4 examples of the country_yesno pool, m = 100 test examples, Adafactor.
Each measurement runs in its OWN child process (so its peak memory is its own), compiles
once, then is timed on a second call:
  replay_s       one training run replayed (the differentiated function's primal: 64 steps,
                 test losses recorded every 8 steps) — the unit of every ratio below;
  trainer_s      the same run by the production Trainer (train_group, one run, recording
                 every 8 steps), for comparison;
  jvp_s_per_edit forward mode along `--edits` masked-removal directions at once (vmapped;
                 the bank's way), divided by the number of edits;
  jacobian_s     reverse mode: dL_T(z)/dw for every z, step and slot (m backward passes,
                 8 at a time, steps rematerialised);
  *_peak_mb      the child's peak resident memory (ru_maxrss) minus its resident memory
                 after set-up (model, data), i.e. what the computation itself added;
  *_vs_replay    each time divided by replay_s from the same run.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

from benchmarks.baselines_bench import _rss_mb  # pylint: disable=g-bad-import-order,wrong-import-position

T, K, M, EVERY = 64, 4, 100, 8
OPS = ("replay", "trainer", "jvp", "jacobian")


def _child(op: str, tuning: str, edits: int) -> dict:
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  import numpy as np
  from simfluence_jax.prior_methods import metagradients as mg
  from simfluence_jax.training import models
  from simfluence_jax.training import tasks
  from simfluence_jax.training import trainer as trainer_lib
  config = models.T5Config(vocab_size=384, emb_dim=64, num_heads=4, head_dim=16, mlp_dim=256,
                           num_encoder_layers=2, num_decoder_layers=2)
  use_ia3 = tuning == "ia3"
  variables = models.init_variables(config, jax.random.PRNGKey(0), use_ia3=use_ia3,
                                    input_length=64, target_length=16)
  pools = tasks.get_pools("country_yesno")
  encode = lambda exs: jax.tree.map(jnp.asarray, tasks.encode_examples(
      exs, input_length=64, target_length=16))
  pool, test = encode(pools.train), encode(pools.test[:M])
  loss_fn = trainer_lib.t5_loss_fn(models.Transformer(config, use_ia3=use_ia3))
  optimizer = trainer_lib.make_optimizer("adafactor", 3e-2 if use_ia3 else 1e-3)
  rng = np.random.default_rng(0)
  positions = np.stack([rng.permutation(len(pools.train))[:K] for _ in range(T)]).astype(np.int32)
  weights, live = np.ones((T, K), np.float32), np.ones(T, bool)
  trainable, frozen = trainer_lib.split_variables(variables, tuning)
  grads = mg.Metagradients(loss_fn, optimizer)
  args = (trainable, frozen, pool, test, jnp.asarray(positions))
  deltas = np.zeros((edits, T, K), np.float32)
  for e in range(edits):       # masked removals of 8 random slots each
    deltas[e].ravel()[rng.choice(T * K, 8, replace=False)] = -1.0

  def run():
    if op == "replay":
      return grads.replay(*args, weights, live, record_every=EVERY)
    if op == "jvp":
      return grads.directional(*args, weights, live, deltas, record_every=EVERY)
    if op == "jacobian":
      return grads.final_grads(*args, weights, live, chunk=8)
    trainer = trainer_lib.Trainer(loss_fn, optimizer)
    state = trainer_lib.init_state(variables, num_runs=1, tuning=tuning,
                                   optimizer=trainer.optimizer, seed=0)
    progress = trainer_lib.Progress.empty(1, T, M)
    return trainer_lib.train_group(trainer, state, progress, positions=positions[None],
                                   pool=pool, test_batch=test,
                                   record_steps=range(EVERY, T + 1, EVERY))[1].losses
  base_mb = _rss_mb()
  jax.block_until_ready(run())                     # compile (and a first run)
  start = time.perf_counter()
  jax.block_until_ready(run())
  seconds = time.perf_counter() - start
  peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return {"seconds": seconds, "peak_mb": peak_mb - base_mb}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tunings", default="ia3,full")
  parser.add_argument("--edits", type=int, default=16)
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  a = parser.parse_args()
  if a.child:
    op, tuning = a.child.split(":")
    print(json.dumps(_child(op, tuning, a.edits)))
    return
  result = {"shape": {"steps": T, "batch": K, "test": M, "record_every": EVERY,
                      "edits": a.edits, "optimizer": "adafactor"}}
  for tuning in a.tunings.split(","):
    row = {}
    for op in OPS:
      proc = subprocess.run([sys.executable, __file__, f"--child={op}:{tuning}",
                             f"--edits={a.edits}"], capture_output=True, text=True,
                            check=False)
      if proc.returncode:
        raise SystemExit(f"{op}:{tuning} failed:\n{proc.stderr[-2000:]}")
      row[op] = json.loads(proc.stdout.strip().splitlines()[-1])
      print(f"{tuning} {op}: {row[op]['seconds']:.2f} s, +{row[op]['peak_mb']:.0f} MB",
            flush=True)
    unit = row["replay"]["seconds"]
    result[tuning] = {
        "replay_s": round(unit, 3), "trainer_s": round(row["trainer"]["seconds"], 3),
        "jvp_s_per_edit": round(row["jvp"]["seconds"] / a.edits, 3),
        "jacobian_s": round(row["jacobian"]["seconds"], 2),
        "trainer_vs_replay": round(row["trainer"]["seconds"] / unit, 2),
        "jvp_per_edit_vs_replay": round(row["jvp"]["seconds"] / a.edits / unit, 2),
        "jacobian_vs_replay": round(row["jacobian"]["seconds"] / unit, 1),
        **{f"{op}_peak_mb": round(row[op]["peak_mb"], 1) for op in OPS}}
  print(json.dumps(result))


if __name__ == "__main__":
  main()
