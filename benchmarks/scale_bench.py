r"""Scale benchmark: fit time and peak memory as test examples m and train examples n grow,
the streaming fit of 100,000 few-shot test examples, and 8 simulated devices vs 1.

  .venv/bin/python benchmarks/scale_bench.py            # the full table (~5-10 min, 2 cores)
  .venv/bin/python benchmarks/scale_bench.py --quick    # m ≤ 10,000 only

Synthetic workspaces (written to disk by a generator process, like real traces): 20 fit runs
of batch size 4 drawing from n train examples; a few-shot run is 64 steps (S = 1,280), a
many-shot one (n = 1,536) 384 steps (S = 7,680); losses are a decaying curve plus noise.
Each fit runs in its OWN process, so `peak_rss_mb` (ru_maxrss) is that fit's alone:
  in_memory         simulators.fit (all transitions built as [S, m] arrays, batched PCG);
  streaming         streaming.fit_streaming, solver "auto" (chunks of ~32 MB, runs
                    memory-mapped; chunked PCG at these sizes);
  streaming_normal  the same with normal equations accumulated run by run, Cholesky
                    sharded over the devices (n = 100 rows only).
λ is fixed (0.1) so each row is one solve. "devices" reruns one streaming fit with
XLA_FLAGS=--xla_force_host_platform_device_count=8 vs =1 (same 2 cores: the ratio shows
what sharding costs or gains here, not on real accelerators). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]

_GENERATE = textwrap.dedent("""
    import sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from simfluence_jax.traces import contract as traces
    ws, m, n, runs, steps = sys.argv[2], *map(int, sys.argv[3:7])
    rng = np.random.default_rng(0)
    train_ids, test_ids = np.arange(n, dtype=np.int64), np.arange(m, dtype=np.int64)
    decay = 2.0 * 0.99 ** np.arange(steps + 1)[:, None]
    for r in range(runs):
      losses = (decay + 0.01 * rng.standard_normal((steps + 1, m), np.float32)).astype(
          np.float32)
      cur = np.stack([rng.choice(n, 4, replace=False) for _ in range(steps)]).astype(np.int32)
      traces.write_run(ws, traces.RunTrace(f"run_{r}", train_ids, test_ids, 4, cur, losses))
""")

_FIT = textwrap.dedent("""
    import json, resource, sys, time
    sys.path.insert(0, sys.argv[1])
    import jax
    from simfluence_jax.simulators import simfluence as simulators
    from simfluence_jax.simulators import streaming
    ws, mode, runs = sys.argv[2], sys.argv[3], int(sys.argv[4])
    ids = [f"run_{r}" for r in range(runs)]
    t = time.perf_counter()
    if mode == "in_memory":
      params, _ = simulators.fit(simulators.read_runs(ws, ids), simulator="linear", lam=0.1)
      solver = "pcg"
    else:
      params, diag = streaming.fit_streaming(
          ws, ids, simulator="linear", lam=0.1,
          solver="normal" if mode == "streaming_normal" else "auto")
      solver = diag["streaming"]["solver"]
    seconds = time.perf_counter() - t
    print(json.dumps({"m": params.A.shape[0], "seconds": round(seconds, 2), "solver": solver,
                      "devices": len(jax.devices()),
                      "peak_rss_mb": round(resource.getrusage(
                          resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
""")


def _run(code: str, *args, devices: int = 1) -> str:
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  out = subprocess.run([sys.executable, "-c", code, str(ROOT), *map(str, args)],
                       capture_output=True, text=True, env=env, check=False)
  if out.returncode != 0:
    raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr else "failed")
  lines = out.stdout.strip().splitlines()
  return lines[-1] if lines else ""


def workspace(tmp: pathlib.Path, m: int, n: int) -> tuple[pathlib.Path, int]:
  steps = 64 if n <= 400 else 384
  ws = tmp / f"m{m}_n{n}"
  if not ws.exists():
    _run(_GENERATE, ws, m, n, 20, steps)
  return ws, 20


def fit(ws: pathlib.Path, mode: str, runs: int, devices: int = 1) -> dict:
  try:
    return json.loads(_run(_FIT, ws, mode, runs, devices=devices))
  except RuntimeError as e:
    return {"error": str(e)[:200]}


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--quick", action="store_true", help="m ≤ 10,000 only")
  args = parser.parse_args()
  grid_m = (1_000, 10_000) if args.quick else (1_000, 10_000, 100_000)
  grid_n = (100, 400, 1536)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    for m, n in [(m, 100) for m in grid_m] + [(1_000, n) for n in grid_n[1:]]:
      ws, runs = workspace(tmp, m, n)
      modes = ("in_memory", "streaming") + (("streaming_normal",) if n == 100 else ())
      for mode in modes:
        row = {"m": m, "n": n, "mode": mode, **fit(ws, mode, runs)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    ws, runs = workspace(tmp, 10_000, 100)
    one = fit(ws, "streaming_normal", runs, devices=1)
    eight = fit(ws, "streaming_normal", runs, devices=8)
  print("\n|      m |     n | mode             | solver | seconds | peak RSS MB |")
  print("|-------:|------:|------------------|--------|--------:|------------:|")
  for r in rows:
    print(f"| {r['m']:>6} | {r['n']:>5} | {r['mode']:<16} | {r.get('solver', '-'):<6} | "
          f"{r.get('seconds', float('nan')):>7} | {r.get('peak_rss_mb', float('nan')):>11} |")
  big = max((r for r in rows if r["m"] == 100_000 and r["mode"].startswith("streaming")),
            key=lambda r: r.get("peak_rss_mb", float("inf")), default={})
  summary = {
      "rows": rows,
      "streaming_100k_peak_rss_mb": big.get("peak_rss_mb"),
      "streaming_100k_within_2gb": (big.get("peak_rss_mb", float("inf")) <= 2048
                                    if big else None),
      "devices_8_vs_1": {"seconds_1": one.get("seconds"), "seconds_8": eight.get("seconds"),
                         "speedup": (round(one["seconds"] / eight["seconds"], 2)
                                     if "seconds" in one and "seconds" in eight else None)},
  }
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
