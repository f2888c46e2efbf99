"""The gin configs ship with the package: a non-editable install (a built wheel, installed
into a directory of its own) finds `experiments/quickstart.gin` from any working directory."""

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_wheel_install_finds_the_bundled_gin_configs(tmp_path):
  wheels, site = tmp_path / "wheels", tmp_path / "site"
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                  "--no-build-isolation", "-w", str(wheels), str(REPO)],
                 check=True, capture_output=True, cwd=tmp_path)
  wheel, = wheels.glob("simfluence_jax-*.whl")
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                  str(site), str(wheel)], check=True, capture_output=True, cwd=tmp_path)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}
  # The installed package, not the checkout, is imported, and its configs are its own.
  where = subprocess.run(
      [sys.executable, "-c", "from simfluence_jax.cli import gin_setup as g; "
       "print(g.__file__); print(g.GIN_CONFIGS_DIR)"],
      check=True, capture_output=True, text=True, cwd=elsewhere, env=env).stdout.split()
  assert where[0].startswith(str(site)), where
  assert where[1] == str(site / "simfluence_jax" / "gin_configs"), where
  # A binary parses the experiment (and its includes) from there: it gets as far as the
  # empty workspace, whose error names the runs it lacks, not a missing gin file.
  proc = subprocess.run(
      [sys.executable, "-m", "simfluence_jax.split", "--gin_file=experiments/quickstart.gin",
       f"--gin.WORKSPACE=\"{tmp_path / 'ws'}\""],
      capture_output=True, text=True, cwd=elsewhere, env=env)
  assert proc.returncode == 2, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("simfluence_jax.split: error:"), last
  assert "gin" not in last.lower() and "not found as given" not in last, last
