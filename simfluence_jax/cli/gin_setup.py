"""T5X-style gin flag handling for the binaries (gin is parsed only in `__main__`).

  python -m simfluence_jax.train \
      --gin_file=gin_configs/experiments/quickstart.gin --gin_file=gin_configs/local_tiny.gin \
      --gin.WORKSPACE=\"/tmp/ws\" --gin.run_experiment.learning_rate=3e-4

`--gin.NAME=VALUE` is shorthand for `--gin_bindings='NAME = VALUE'`. Gin files (and their
`include`s) are looked up as given, then in each --gin_search_paths entry, then relative to the
package directory and to the bundled gin_configs/ (the checkout's top-level `gin_configs/`,
shipped inside the package when installed), so `gin_configs/experiments/quickstart.gin` and
`experiments/quickstart.gin` both work from any working directory.
"""

from __future__ import annotations

import importlib.util  # noqa: F401  gin 0.5.0 needs it loaded to resolve files on a search path
import contextlib
import os
import pathlib
import sys
from typing import Callable, Sequence

import logging as py_logging

from absl import app
from absl import flags
from absl import logging
import gin

from simfluence_jax.traces import atomic_io
from simfluence_jax.cli import errors as cli

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent.parent


def _gin_configs_dir() -> pathlib.Path:
  """The bundled configs: `simfluence_jax/gin_configs/` in an installed wheel (setup.py maps
  the checkout's top-level `gin_configs/` there), else `<checkout>/gin_configs/`."""
  for candidate in (PACKAGE_DIR / "gin_configs", PACKAGE_DIR.parent / "gin_configs"):
    if (candidate / "experiments").is_dir():
      return candidate
  raise FileNotFoundError(f"simfluence_jax's gin_configs/ is neither under {PACKAGE_DIR} "
                          f"(installed) nor under {PACKAGE_DIR.parent} (checkout): a broken "
                          "install; reinstall the package")


GIN_CONFIGS_DIR = _gin_configs_dir()
CONFIG_FILENAME = "config.gin"


def define_flags() -> None:
  """Defines --gin_file, --gin_bindings and --gin_search_paths (call once, in a binary)."""
  flags.DEFINE_multi_string("gin_file", [], "Gin file to parse; repeatable, later wins.")
  flags.DEFINE_multi_string("gin_bindings", [], "Gin binding 'NAME = VALUE'; repeatable. "
                            "--gin.NAME=VALUE is the same.")
  flags.DEFINE_list("gin_search_paths", [], "Extra directories to look up gin files in.")


def register_model_config() -> None:
  """Registers models.T5Config as the gin configurable `model_config` (bound by
  gin_configs/models/*.gin); idempotent, since one process may import both binaries."""
  from simfluence_jax.training import models  # pylint: disable=g-import-not-at-top
  try:
    gin.external_configurable(models.T5Config, "model_config")
  except ValueError as e:  # already registered
    if "already exists" not in str(e):
      raise


def register_pipeline_config() -> None:
  """Registers pipeline.PipelineConfig as the gin configurable `pipeline` (bound by the
  experiment files' `pipeline.*` lines); call before parsing; idempotent."""
  from simfluence_jax.experiments import pipeline  # pylint: disable=g-import-not-at-top
  try:
    gin.external_configurable(pipeline.PipelineConfig, "pipeline")
  except ValueError as e:  # already registered
    if "already exists" not in str(e):
      raise


def pipeline_config():
  """The parsed `pipeline.*` bindings as a pipeline.PipelineConfig (launchers only; call
  register_pipeline_config before parsing)."""
  return gin.get_configurable("pipeline")()


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
  """Turns each `--gin.NAME=VALUE` into `--gin_bindings=NAME = VALUE`."""
  out = []
  for arg in argv:
    if arg.startswith("--gin.") and "=" in arg:
      name, value = arg[len("--gin."):].split("=", 1)
      out.append(f"--gin_bindings={name} = {value}")
    elif arg.startswith("--gin."):
      raise app.UsageError(f"{arg} needs a value: --gin.NAME=VALUE")
    else:
      out.append(arg)
  return out


def search_paths(extra: Sequence[str] = ()) -> list[str]:
  # gin_configs first: `include 'models/x.gin'` lines then resolve without failed lookups.
  return [*extra, str(GIN_CONFIGS_DIR), os.getcwd(), str(GIN_CONFIGS_DIR.parent)]


def resolve_gin_file(name: str, paths: Sequence[str]) -> str:
  """The first existing file among `name` and `name` under each of `paths`."""
  candidates = [pathlib.Path(name)] + [pathlib.Path(p) / name for p in paths]
  for candidate in candidates:
    if candidate.is_file():
      return str(candidate.resolve())
  raise FileNotFoundError(
      f"gin file {name!r} not found as given nor under any of {list(paths)}; "
      f"the bundled configs are under {GIN_CONFIGS_DIR}")


def parse_gin(gin_files: Sequence[str], gin_bindings: Sequence[str] = (),
              gin_search_paths: Sequence[str] = (),
              skip_unknown: Sequence[str] | bool = ()) -> None:
  """Parses files then bindings (so bindings override files), with the search path set.

  skip_unknown: configurables bound in shared experiment files that this binary doesn't
  define (e.g. train.py skips `run_pretraining.*`), or True to skip all unknown ones.
  """
  paths = search_paths(gin_search_paths)
  for path in paths:  # gin tries locations in the order added (after the cwd)
    gin.add_config_file_search_path(path)
  files = [resolve_gin_file(f, paths) for f in gin_files]
  skip = skip_unknown if isinstance(skip_unknown, bool) else list(skip_unknown)
  # Parse from inside gin_configs/: gin tries an `include` relative to the working directory
  # before the search path and logs an error line for each miss; the files are absolute.
  with contextlib.chdir(GIN_CONFIGS_DIR):
    gin.parse_config_files_and_bindings(files, list(gin_bindings), skip_unknown=skip,
                                        finalize_config=True)


def parse_gin_flags(skip_unknown: Sequence[str] | bool = ()) -> None:
  """parse_gin from the flags defined by `define_flags`."""
  parse_gin(flags.FLAGS.gin_file, flags.FLAGS.gin_bindings, flags.FLAGS.gin_search_paths,
            skip_unknown=skip_unknown)


def write_config(workspace: str | os.PathLike) -> pathlib.Path:
  """Writes gin's operative config to <workspace>/config.gin atomically (temp + rename).

  Call from inside the configurable top-level function so its own bindings are operative.
  """
  path = pathlib.Path(workspace) / CONFIG_FILENAME
  path.parent.mkdir(parents=True, exist_ok=True)
  return atomic_io.write_text(path, gin.operative_config_str())


class _QuietOrbax(py_logging.Filter):
  """Drops orbax's INFO chatter (several lines per checkpoint); its warnings still show."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname


def run(main: Callable[[list[str]], None], prog: str) -> None:
  """cli.run with `--gin.NAME=VALUE` rewriting; logs at WARNING unless --verbosity is given."""
  logging.get_absl_handler().addFilter(_QuietOrbax())
  flags.FLAGS.set_default("verbosity", -1)  # absl's WARNING; --verbosity=0 shows INFO
  py_logging.getLogger("jax._src.xla_bridge").setLevel(py_logging.WARNING)  # "no TPU" notes

  def parse_flags(argv):
    try:
      return flags.FLAGS(rewrite_gin_args(argv))
    except (flags.Error, app.UsageError) as e:
      print(f"{prog}: error: {e}", file=sys.stderr)
      sys.exit(2)

  cli.run(main, prog, flags_parser=parse_flags)
