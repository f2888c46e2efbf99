r"""Simulates a curriculum with a fitted simulator.

  python -m simfluence_jax.simulate --workspace=W --fit=linear --curriculum=C.npy \
      --initial_losses=L0.npy --output=OUT.npy

C.npy: int [T, k] train example ids (-1 pads); L0.npy: float [m] initial losses in the order
of the fit's test ids. Writes float32 [T+1, m] (row 0 = the initial losses).
"""

from __future__ import annotations

import json

from absl import flags
import numpy as np

from simfluence_jax.traces import atomic_io
from simfluence_jax.traces import fit_params
from simfluence_jax.cli import gin_setup as gin_utils
from simfluence_jax.simulators import simfluence as simulators

_WORKSPACE = flags.DEFINE_string("workspace", None, "Workspace directory.", required=True)
_FIT = flags.DEFINE_string("fit", None, "Fit name under fits/.", required=True)
_CURRICULUM = flags.DEFINE_string("curriculum", None, "int [T, k] .npy of train ids.",
                                  required=True)
_INITIAL = flags.DEFINE_string("initial_losses", None, "float [m] .npy of L_0.",
                               required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Output .npy, float32 [T+1, m].",
                              required=True)


def _load(path: str) -> np.ndarray:
  try:
    return np.load(path, allow_pickle=False)
  except FileNotFoundError:
    raise FileNotFoundError(f"{path}: no such file") from None
  except (ValueError, OSError, EOFError) as e:
    raise ValueError(f"{path}: not a readable .npy array ({e})") from None


def main(argv):
  del argv
  gin_utils.parse_gin_flags()
  params, _ = fit_params.load_fit(_WORKSPACE.value, _FIT.value)
  pred = simulators.simulate_curriculum(
      params, _load(_CURRICULUM.value), _load(_INITIAL.value),
      curriculum_name=_CURRICULUM.value, initial_losses_name=_INITIAL.value)
  atomic_io.save_npy(_OUTPUT.value, pred)
  print(json.dumps({"output": _OUTPUT.value, "steps": int(pred.shape[0] - 1),
                    "test_examples": int(pred.shape[1]),
                    "final_mean_loss": float(np.mean(pred[-1]))}))


if __name__ == "__main__":
  gin_utils.define_flags()
  gin_utils.run(main, "simfluence_jax.simulate")
