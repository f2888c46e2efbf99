"""Orbax checkpoints: per-run model variables, the resumable group state, pretrained models.

Layout under <workspace>/checkpoints/:
  <run_id>/checkpoint_<step>/        run's full model variables {"params": ..., ["ia3": ...]}
                                     (every `checkpoint_every` steps and at the TracIn steps)
  _group_<name>/checkpoint_<step>/   {"state": TrainState fields, "losses": [R,T+1,m],
                                      "train_losses": [R,T]}: what a restart resumes from
  _group_<name>/group.json           the group's run ids and shapes, checked on resume
and <workspace>/pretrained/checkpoint_<step>/ holds a pretrained {"params": ...}.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
`checkpoint_<step>` directory that exists is complete; `latest_step` ignores anything else.

Multi-process (distributed.py): a group checkpoint is saved by all processes together (each
writes the shards of its own runs, into one checkpoint on a shared filesystem); a per-run
checkpoint is saved by the one process that holds the run (`save(..., local=True)`).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
from typing import Any, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from simfluence_jax.traces import atomic_io
from simfluence_jax.training import distributed
from simfluence_jax.traces import faults
from simfluence_jax.training import models
from simfluence_jax.training import trainer as trainer_lib

_STEP_DIR = re.compile(r"^checkpoint_(\d+)$")
PathLike = str | os.PathLike


def checkpoint_path(root: PathLike, step: int) -> pathlib.Path:
  return pathlib.Path(root) / f"checkpoint_{int(step)}"


def all_steps(root: PathLike) -> list[int]:
  """Steps of the complete checkpoints under `root`, ascending."""
  root = pathlib.Path(root)
  if not root.is_dir():
    return []
  return sorted(int(m.group(1)) for p in root.iterdir()
                if p.is_dir() and (m := _STEP_DIR.match(p.name)))


def latest_step(root: PathLike) -> int | None:
  steps = all_steps(root)
  return steps[-1] if steps else None


def _as_saveable(tree: Any) -> Any:
  # orbax wants arrays, not numpy scalars.
  return jax.tree.map(lambda x: x if isinstance(x, jax.Array) else np.asarray(x), tree)


def save(path: PathLike, tree: Any, *, local: bool = False) -> None:
  """Saves a pytree of arrays to `path` (overwriting) and waits until it is on disk.

  local: this process alone saves host values (e.g. one run's variables) — no barrier with the
  other processes. Otherwise every process calls `save` with the same (global) tree.
  """
  checkpointer = _checkpointer(local)
  checkpointer.save(pathlib.Path(path).absolute(), _as_saveable(tree), force=True)
  faults.maybe_kill("checkpoint")
  checkpointer.wait_until_finished()
  checkpointer.close()


def _checkpointer(local: bool) -> ocp.StandardCheckpointer:
  if not local or jax.process_count() == 1:
    return ocp.StandardCheckpointer()
  me = jax.process_index()
  return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
      primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"process_{me}"))


def restore(path: PathLike, target: Any = None) -> Any:
  """Restores a pytree; with `target` (arrays or ShapeDtypeStructs, with shardings) its
  structure, dtypes and placement; without, host numpy arrays in nested dicts."""
  path = pathlib.Path(path).absolute()
  if not path.is_dir():
    raise FileNotFoundError(f"no checkpoint at {path}")
  if target is None:
    # As host numpy, whatever devices saved it (a saved single-device sharding cannot be
    # restored by a process that does not hold that device).
    with ocp.PyTreeCheckpointer() as checkpointer:
      tree = checkpointer.metadata(path).item_metadata
      return checkpointer.restore(path, restore_args=jax.tree.map(
          lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))
  checkpointer = ocp.StandardCheckpointer()
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _as_saveable(target))
  tree = checkpointer.restore(path, target)
  checkpointer.close()
  return tree


def load_variables(root: PathLike, step: int | None = None) -> dict:
  """A model's variables from <root>/checkpoint_<step> (latest when step is None), as numpy."""
  step = latest_step(root) if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint_<step> directory under {root}")
  return jax.tree.map(np.asarray, restore(checkpoint_path(root, step)))


def save_run_checkpoints(checkpoints_dir: PathLike, run_ids: Sequence[str],
                         state: trainer_lib.TrainState, *, step: int | None = None) -> None:
  """Writes <checkpoints_dir>/<run_id>/checkpoint_<step> for every run of the group (those of
  this process: pass None for a run another process holds)."""
  step = int(state.step) if step is None else step
  for r, run_id in enumerate(run_ids):
    if run_id is not None:
      save(checkpoint_path(pathlib.Path(checkpoints_dir) / run_id, step),
           state.run_variables(r), local=True)


def group_dir(checkpoints_dir: PathLike, name: str) -> pathlib.Path:
  return pathlib.Path(checkpoints_dir) / f"_group_{name}"


def _state_tree(state: trainer_lib.TrainState, progress: trainer_lib.Progress) -> dict:
  losses, train_losses = progress.losses, progress.train_losses
  if not state.rng.is_fully_addressable:
    # Each process knows only its runs' losses: save them as arrays sharded like the runs,
    # so each process writes (and restores) its own rows.
    losses = distributed.global_array(losses, state.rng.sharding)
    train_losses = distributed.global_array(train_losses, state.rng.sharding)
  return {"state": {"step": state.step, "trainable": state.trainable,
                    "opt_state": state.opt_state, "frozen": state.frozen, "rng": state.rng},
          "losses": losses, "train_losses": train_losses}


def check_group(checkpoints_dir: PathLike, name: str, description: dict) -> None:
  """Records what group `name` is (run ids, shapes); refuses to resume a different one."""
  path = group_dir(checkpoints_dir, name) / "group.json"
  if path.exists():
    found = json.loads(path.read_text())
    if found != description:
      raise ValueError(
          f"{path} describes a different experiment than this one "
          f"(found {found}, expected {description}); use a fresh workspace or delete "
          f"{path.parent}")
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  atomic_io.save_json(path, description, sort_keys=True)


def save_group(checkpoints_dir: PathLike, name: str, state: trainer_lib.TrainState,
               progress: trainer_lib.Progress, *, keep: int = 2) -> pathlib.Path:
  """Saves the resumable group state at state.step; keeps the `keep` latest."""
  root = group_dir(checkpoints_dir, name)
  path = checkpoint_path(root, int(state.step))
  save(path, _state_tree(state, progress))
  for old in all_steps(root)[:-keep]:
    shutil.rmtree(checkpoint_path(root, old), ignore_errors=True)
  return path


def restore_group(checkpoints_dir: PathLike, name: str, state: trainer_lib.TrainState,
                  progress: trainer_lib.Progress
                  ) -> tuple[trainer_lib.TrainState, trainer_lib.Progress] | None:
  """The latest saved group state shaped (and placed) like `state`, or None if none saved."""
  root = group_dir(checkpoints_dir, name)
  step = latest_step(root)
  if step is None:
    return None
  tree = restore(checkpoint_path(root, step), _state_tree(state, progress))
  restored = trainer_lib.TrainState(**tree["state"])
  return restored, trainer_lib.Progress(distributed.host_array(tree["losses"]),
                                        distributed.host_array(tree["train_losses"]))


def load_pretrained(pretrained_dir: PathLike, config: models.T5Config, *, tuning: str,
                    seed: int, input_length: int, target_length: int) -> dict:
  """Pretrained {"params"} (+ fresh IA3 ones when tuning == "ia3"), checked against config."""
  pretrained_dir = pathlib.Path(pretrained_dir)
  if latest_step(pretrained_dir) is None:
    raise FileNotFoundError(
        f"no pretrained checkpoint under {pretrained_dir}; run `python -m "
        f"simfluence_jax.pretrain` with the same --gin_file/--gin flags first")
  expected = jax.eval_shape(lambda: models.init_variables(
      config, jax.random.PRNGKey(seed), use_ia3=tuning == "ia3", input_length=input_length,
      target_length=target_length))
  params = load_variables(pretrained_dir)["params"]
  shapes = lambda t: jax.tree.map(lambda x: tuple(x.shape), t)
  if shapes(params) != shapes(expected["params"]):
    raise ValueError(f"pretrained checkpoint under {pretrained_dir} does not fit model_config "
                     f"{config} (pretrained with another model size?)")
  variables = {"params": params}
  if tuning == "ia3":
    variables["ia3"] = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), expected["ia3"])
  return variables
