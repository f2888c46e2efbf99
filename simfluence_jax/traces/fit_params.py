"""Fitted simulator parameters: a pytree, saved as fits/<name>/params.npz + fit.json.

  params.npz  A, B float32 [m, n]   Eq. 1 coefficients: L_t = α(c_t) L_{t-1} + β(c_t) with
                                    α = Σ_{i∈c_t} A[:, i], β = Σ_{i∈c_t} B[:, i]
              train_ids int64 [n]   column i of A/B is train example train_ids[i]
              test_ids int64 [m]    row j is test example test_ids[j]
              lam float64 []        the L2 weight λ of Eq. 2
              kind <U []            "linear" | "additive" (A = 0, α = 1) |
                                    "multiplicative" (B = 0); a numpy unicode scalar, no pickle
  fit.json    the fit's diagnostics, as given to save_fit (written last: a fit directory
              without fit.json is incomplete and load_fit refuses it)
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import pathlib
import zipfile

import jax
import numpy as np

from simfluence_jax.traces import atomic_io
from simfluence_jax.traces import contract as traces
from simfluence_jax.traces.contract import TraceError

KINDS = ("linear", "additive", "multiplicative")
_NPZ_KEYS = ("A", "B", "train_ids", "test_ids", "lam", "kind")


@dataclasses.dataclass(frozen=True, eq=False)
class FitParams:
  """One simulator per test example (rows); arrays are pytree leaves, kind/lam aux data.

  No checks at construction (jax rebuilds this class around tracers); `validate` checks.
  """
  A: np.ndarray          # float32 [m, n]   (zeros for additive)
  B: np.ndarray          # float32 [m, n]   (zeros for multiplicative)
  train_ids: np.ndarray  # int64 [n]
  test_ids: np.ndarray   # int64 [m]
  kind: str              # "linear" | "additive" | "multiplicative"
  lam: float


jax.tree_util.register_dataclass(
    FitParams, data_fields=["A", "B", "train_ids", "test_ids"], meta_fields=["kind", "lam"])


def validate(params: FitParams, where: str) -> FitParams:
  """Checks shapes, dtypes, finiteness, kind and λ; returns canonical numpy dtypes."""
  if params.kind not in KINDS:
    raise TraceError(f"{where}: kind {params.kind!r} is not one of {KINDS}")
  lam = params.lam
  if isinstance(lam, (bool, np.bool_)) or not isinstance(lam, (int, float, np.number)) or (
      not math.isfinite(float(lam)) or float(lam) < 0):
    raise TraceError(f"{where}: lam must be a finite number >= 0, got {lam!r}")
  train_ids = traces.check_ids(np.asarray(params.train_ids), "train_ids", where)
  test_ids = traces.check_ids(np.asarray(params.test_ids), "test_ids", where)
  want = (test_ids.size, train_ids.size)
  out = {}
  for name in ("A", "B"):
    arr = np.asarray(getattr(params, name))
    if arr.dtype.kind != "f":
      raise TraceError(f"{where}: {name} must be floating point, got dtype {arr.dtype}")
    if arr.shape != want:
      raise TraceError(f"{where}: {name} must have shape [m={want[0]}, n={want[1]}] "
                       f"(len(test_ids), len(train_ids)), got {arr.shape}")
    with np.errstate(over="ignore"):
      arr = arr.astype(np.float32)
    bad = ~np.isfinite(arr)
    if np.any(bad):
      j, i = (int(x[0]) for x in np.nonzero(bad))
      raise TraceError(f"{where}: {name}[{j}, {i}] (test id {int(test_ids[j])}, train id "
                       f"{int(train_ids[i])}) is {float(np.asarray(getattr(params, name))[j, i])}"
                       "; parameters must be finite in float32")
    out[name] = arr
  zero = {"additive": "A", "multiplicative": "B"}.get(params.kind)
  if zero and np.any(out[zero] != 0):
    raise TraceError(f"{where}: a {params.kind} simulator has {zero} = 0 by definition, "
                     f"but {zero} has {int(np.count_nonzero(out[zero]))} non-zero entries")
  return FitParams(A=out["A"], B=out["B"], train_ids=train_ids, test_ids=test_ids,
                   kind=str(params.kind), lam=float(lam))


def fit_dir(workspace, name: str) -> pathlib.Path:
  root = pathlib.Path(workspace) / "fits"
  return root / traces.check_name(name, "fit name", str(root))


def save_fit(workspace, name: str, params: FitParams, diagnostics: dict) -> pathlib.Path:
  """Writes fits/<name>/params.npz then fit.json (last); returns the fit directory.

  An existing fit of that name is replaced: its fit.json is removed first, so a crash
  leaves an incomplete fit rather than new parameters beside old diagnostics.
  """
  directory = fit_dir(workspace, name)
  params = validate(params, f"{directory} (being written)")
  if not isinstance(diagnostics, dict):
    raise TraceError(f"{directory}: diagnostics must be a dict, got "
                     f"{type(diagnostics).__name__}")
  try:
    text = atomic_io.dumps_json(diagnostics)
  except (TypeError, ValueError) as e:
    raise TraceError(f"{directory}: diagnostics are not JSON-serializable ({e})") from None
  with contextlib.suppress(FileNotFoundError):
    os.unlink(directory / "fit.json")
  atomic_io.save_npz(directory / "params.npz", A=params.A, B=params.B,
                     train_ids=params.train_ids, test_ids=params.test_ids,
                     lam=np.float64(params.lam), kind=np.str_(params.kind))
  atomic_io.write_text(directory / "fit.json", text)
  return directory


def load_fit(workspace, name: str) -> tuple[FitParams, dict]:
  """Reads and validates fits/<name>; any problem is a TraceError naming the file."""
  directory = fit_dir(workspace, name)
  npz_path, json_path = directory / "params.npz", directory / "fit.json"
  if not json_path.is_file():
    state = ("incomplete (no fit.json; its writer stopped before finishing)"
             if directory.is_dir() else "not found")
    raise TraceError(f"{json_path}: fit {name!r} is {state}")
  try:
    with np.load(npz_path, allow_pickle=False) as npz:
      missing = [k for k in _NPZ_KEYS if k not in npz.files]
      if missing:
        raise TraceError(f"{npz_path}: missing arrays {missing}")
      arrays = {k: npz[k] for k in _NPZ_KEYS}
  except FileNotFoundError:
    raise TraceError(f"{npz_path}: missing file (fit {name!r})") from None
  except TraceError:
    raise
  except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, SyntaxError,
          MemoryError) as e:
    raise TraceError(f"{npz_path}: not a readable .npz ({type(e).__name__}: {e})") from None
  kind, lam = arrays["kind"], arrays["lam"]
  if kind.dtype.kind != "U" or kind.shape != ():
    raise TraceError(f"{npz_path}: 'kind' must be a unicode scalar, got {kind.dtype} "
                     f"{kind.shape}")
  if lam.dtype.kind != "f" or lam.shape != ():
    raise TraceError(f"{npz_path}: 'lam' must be a float scalar, got {lam.dtype} {lam.shape}")
  params = validate(FitParams(A=arrays["A"], B=arrays["B"], train_ids=arrays["train_ids"],
                              test_ids=arrays["test_ids"], kind=str(kind), lam=float(lam)),
                    str(npz_path))
  diagnostics = traces.load_json(json_path)
  if not isinstance(diagnostics, dict):
    raise TraceError(f"{json_path}: must hold a JSON object")
  return params, diagnostics
