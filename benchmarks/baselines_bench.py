r"""Cost of every simulator relative to Simfluence-Linear on one workspace, plus gradient
throughput.

  .venv/bin/python benchmarks/baselines_bench.py                    # builds a tiny workspace
  .venv/bin/python benchmarks/baselines_bench.py --workspace=workspaces/quickstart
  .venv/bin/python benchmarks/baselines_bench.py --workspace=W --methods=linear,tracin_cp

Fit cost: each method is fitted in its OWN child process on the workspace's split
(experiment.json: fit runs, validation runs for λ), so peak memory is that method's alone:
  fit_s          wall seconds of the fit call (reading traces excluded), gradient cache COLD:
                 the child works on a view of the workspace (runs/, checkpoints/, examples/
                 symlinked) with an empty gradients/ directory, so the gradient baselines pay
                 for their per-example gradients, as a user's first query does;
  warm_fit_s     the same fit again in the same process (gradients now cached on disk,
                 jit caches warm): what a user pays when re-querying;
  peak_rss_mb    the child's peak resident memory (ru_maxrss);
  fit_rss_mb     peak minus the resident memory after imports and reading the traces, i.e.
                 what the fit itself added;
  *_vs_linear    each figure divided by Simfluence-Linear's from the same run.
Gradient throughput (tiny T5 config, random init, 64/16 tokens): exact IA3 per-example
gradients/s and JL-projected full-model gradients/s, and the block EK-FAC fit time.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

METHODS = ("linear", "linear_paper", "additive", "multiplicative", "featurized", "tracin_cp",
           "influence", "source", "hypothetical_linear")
_LINKED = ("runs", "checkpoints", "examples", "pretrained", "experiment.json", "config.gin")


def _rss_mb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def _fit_once(method: str, workspace: pathlib.Path, fit_runs, val_runs, lam_grid):
  # pylint: disable=g-import-not-at-top
  from simfluence_jax.prior_methods import methods as baselines
  from simfluence_jax.simulators import featurized
  from simfluence_jax.simulators import simfluence as simulators
  if method in baselines.SIMULATORS:
    return baselines.fit(workspace, fit_runs, simulator=method, val_runs=val_runs,
                         options=baselines.BaselineOptions(lam_grid=tuple(lam_grid)))
  if method == "featurized":
    return featurized.fit_featurized(fit_runs, rank=4, lam=1e-3, steps=3000,
                                     val_runs=val_runs)
  return simulators.fit(fit_runs, simulator=method, lam_grid=lam_grid, val_runs=val_runs)


def child(method: str, workspace: pathlib.Path) -> dict:
  """Runs in its own process: one method's cold and warm fit on `workspace`."""
  import jax  # pylint: disable=g-import-not-at-top
  from simfluence_jax.experiments import pipeline
  from simfluence_jax.simulators import simfluence as simulators  # pylint: disable=g-import-not-at-top
  experiment = pipeline.read_experiment(workspace)
  split = experiment["split"]
  lam_grid = experiment.get("config", {}).get("lam_grid") or simulators.DEFAULT_LAM_GRID
  fit_runs = simulators.read_runs(workspace, split["fit"])
  val_runs = simulators.read_runs(workspace, split["val"])
  base_rss = _rss_mb()
  shutil.rmtree(workspace / "gradients", ignore_errors=True)
  t = time.perf_counter()
  params, _ = _fit_once(method, workspace, fit_runs, val_runs, lam_grid)
  jax.block_until_ready(params.B)
  cold = time.perf_counter() - t
  t = time.perf_counter()
  params, _ = _fit_once(method, workspace, fit_runs, val_runs, lam_grid)
  warm = time.perf_counter() - t
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return {"fit_s": round(cold, 3), "warm_fit_s": round(warm, 3),
          "peak_rss_mb": round(peak, 1), "fit_rss_mb": round(peak - base_rss, 1),
          "m": int(params.B.shape[0]), "n": int(params.B.shape[1])}


def _view(workspace: pathlib.Path, into: pathlib.Path) -> pathlib.Path:
  """A workspace whose traces and checkpoints are the original's, with its own caches."""
  into.mkdir(parents=True)
  for name in _LINKED:
    if (workspace / name).exists():
      (into / name).symlink_to((workspace / name).resolve())
  return into


def cost_bench(workspace: pathlib.Path, methods) -> dict:
  out = {}
  with tempfile.TemporaryDirectory() as tmp:
    for method in methods:
      view = _view(workspace, pathlib.Path(tmp) / method)
      proc = subprocess.run(
          [sys.executable, __file__, f"--_child={method}", f"--workspace={view}"],
          capture_output=True, text=True, check=False)
      lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
      if proc.returncode != 0 or not lines:
        out[method] = {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
      else:
        out[method] = json.loads(lines[-1])
      print(f"{method:>20}: {out[method]}", flush=True)
  base = out.get("linear", {})
  for result in out.values():
    for key in ("fit_s", "warm_fit_s", "peak_rss_mb", "fit_rss_mb"):
      if key in result and base.get(key):
        result[f"{key}_vs_linear"] = round(result[key] / max(base[key], 1e-9), 2)
  return out


def gradient_bench(num_examples: int, projection_dim: int) -> dict:
  # pylint: disable=g-import-not-at-top
  import jax
  from simfluence_jax.prior_methods import ekfac
  from simfluence_jax.prior_methods import gradients
  from simfluence_jax.training import models
  from simfluence_jax.training import tasks
  from simfluence_jax.training import trainer
  tiny = models.T5Config(vocab_size=384, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                         num_encoder_layers=1, num_decoder_layers=1)
  variables = models.init_variables(tiny, jax.random.PRNGKey(0), use_ia3=True,
                                    input_length=64, target_length=16)
  loss_fn = trainer.t5_loss_fn(models.Transformer(tiny, use_ia3=True))
  pool = tasks.get_pools("country_yesno").train[:num_examples]
  batch = tasks.encode_examples(pool, input_length=64, target_length=16)

  def throughput(spec, repeats=3):
    grads = gradients.per_example_gradients(loss_fn, variables, batch, spec)   # compile
    best = float("inf")
    for _ in range(repeats):
      t = time.perf_counter()
      grads = gradients.per_example_gradients(loss_fn, variables, batch, spec)
      best = min(best, time.perf_counter() - t)
    return num_examples / best, grads

  ia3_rate, g = throughput(gradients.GradientSpec("ia3"))
  full_rate, _ = throughput(gradients.GradientSpec("params", projection_dim=projection_dim))
  bounds = [(a, b) for _, a, b in gradients.leaf_slices({"ia3": variables["ia3"]})]
  t = time.perf_counter()
  jax.block_until_ready(ekfac.fit_blocks(jax.numpy.asarray(g), bounds).eig)
  return {"ia3_examples_per_s": round(ia3_rate, 1), "full_examples_per_s": round(full_rate, 1),
          "ekfac_fit_s": round(time.perf_counter() - t, 4), "ia3_dim": int(g.shape[1]),
          "num_params": models.num_parameters(variables["params"]),
          "projection_dim": projection_dim}


def tiny_workspace(into: pathlib.Path) -> pathlib.Path:
  """The quickstart experiment shrunk by local_tiny.gin, trained and split (about a minute)."""
  subprocess.run([sys.executable, str(ROOT / "launch" / "local.py"),
                  "--gin_file=experiments/quickstart.gin", "--gin_file=local_tiny.gin",
                  "--stop_after=split", f"--gin.WORKSPACE=\"{into}\""],
                 check=True, capture_output=True)
  return into


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--workspace", help="a workspace with a split (default: tiny, built)")
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--examples", type=int, default=64)
  parser.add_argument("--projection_dim", type=int, default=1024)
  parser.add_argument("--_child", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args._child:                                     # pylint: disable=protected-access
    print(json.dumps(child(args._child, pathlib.Path(args.workspace))))  # pylint: disable=protected-access
    return
  methods = [m for m in args.methods.split(",") if m]
  if "linear" not in methods:
    methods.insert(0, "linear")                       # the baseline of every ratio
  with tempfile.TemporaryDirectory() as tmp:
    workspace = (pathlib.Path(args.workspace) if args.workspace
                 else tiny_workspace(pathlib.Path(tmp) / "tiny"))
    costs = cost_bench(workspace, methods)
  result = {"workspace": args.workspace or "tiny (local_tiny.gin)",
            "gradients": gradient_bench(args.examples, args.projection_dim), "fit": costs}
  print(json.dumps(result))


if __name__ == "__main__":
  main()
