"""Fitted simulator parameters: a pytree, saved as fits/<name>/params.npz + fit.json.

  params.npz  A, B float32 [m, n]   Eq. 1 coefficients: L_t = α(c_t) L_{t-1} + β(c_t) with
                                    α = Σ_{i∈c_t} A[:, i], β = Σ_{i∈c_t} B[:, i]
              train_ids int64 [n]   column i of A/B is train example train_ids[i]
              test_ids int64 [m]    row j is test example test_ids[j]
              lam float64 []        the L2 weight λ of Eq. 2
              kind <U []            "linear" | "additive" (A = 0, α = 1) |
                                    "multiplicative" (B = 0); a numpy unicode scalar, no pickle
              rho, gamma float32 [m, T_s]   optional run-shared step terms (T_s = 0 or absent:
                                    none): L_t = (α(c_t) + ρ_t) L_{t-1} + β(c_t) + γ_t
              beyond <U []          optional, the rule for steps t > T_s of a longer
                                    curriculum: "hold" (ρ_{T_s}, γ_{T_s}) or "zero"
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
BEYOND = ("hold", "zero")
_NPZ_KEYS = ("A", "B", "train_ids", "test_ids", "lam", "kind")
_OPTIONAL_KEYS = ("rho", "gamma", "beyond")


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
  rho: np.ndarray | None = None     # float32 [m, T_s] run-shared step terms (None: none)
  gamma: np.ndarray | None = None   # float32 [m, T_s]
  beyond: str = "hold"              # steps past T_s: "hold" the last terms, or "zero"

  @property
  def num_step_terms(self) -> int:
    """T_s, the number of steps with fitted step terms (0: the paper's model)."""
    for arr in (self.rho, self.gamma):
      if arr is not None:
        return int(np.shape(arr)[1])
    return 0

  def step_terms(self) -> tuple[np.ndarray, np.ndarray]:
    """(rho, gamma) as float32 [m, T_s] arrays, zeros where one is not fitted."""
    m, t = int(np.shape(self.A)[0]), self.num_step_terms
    out = []
    for arr in (self.rho, self.gamma):
      out.append(np.zeros((m, t), np.float32) if arr is None else np.asarray(arr))
    return out[0], out[1]


def select_tests(params: FitParams, cols) -> FitParams:
  """The simulators of the test examples at positions `cols` (rows of A, B, rho, gamma)."""
  cols = np.asarray(cols, np.int64)
  pick = lambda arr: None if arr is None else np.asarray(arr)[cols]
  return dataclasses.replace(params, A=np.asarray(params.A)[cols],
                             B=np.asarray(params.B)[cols],
                             test_ids=np.asarray(params.test_ids)[cols],
                             rho=pick(params.rho), gamma=pick(params.gamma))


jax.tree_util.register_dataclass(
    FitParams, data_fields=["A", "B", "train_ids", "test_ids", "rho", "gamma"],
    meta_fields=["kind", "lam", "beyond"])


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
  steps = {}
  widths = {np.shape(getattr(params, name))[1] for name in ("rho", "gamma")
            if getattr(params, name) is not None and np.ndim(getattr(params, name)) == 2}
  for name in ("rho", "gamma"):
    arr = getattr(params, name)
    if arr is None:
      steps[name] = None
      continue
    arr = np.asarray(arr)
    if arr.dtype.kind != "f" or arr.ndim != 2 or arr.shape[0] != want[0] or len(widths) != 1:
      raise TraceError(f"{where}: {name} must be floating point [m={want[0]}, T_s] (the same "
                       f"T_s for rho and gamma), got {arr.dtype} {arr.shape}")
    with np.errstate(over="ignore"):
      arr = arr.astype(np.float32)
    bad = np.argwhere(~np.isfinite(arr))
    if bad.size:
      j, t = (int(x) for x in bad[0])
      raise TraceError(f"{where}: {name}[{j}, {t}] (test id {int(test_ids[j])}, step "
                       f"{t + 1}) is not finite in float32")
    steps[name] = arr
  if params.beyond not in BEYOND:
    raise TraceError(f"{where}: beyond must be one of {BEYOND}, got {params.beyond!r}")
  return FitParams(A=out["A"], B=out["B"], train_ids=train_ids, test_ids=test_ids,
                   kind=str(params.kind), lam=float(lam), rho=steps["rho"],
                   gamma=steps["gamma"], beyond=str(params.beyond))


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
  extra = {name: getattr(params, name) for name in ("rho", "gamma")
           if getattr(params, name) is not None}
  if extra:
    extra["beyond"] = np.str_(params.beyond)
  atomic_io.save_npz(directory / "params.npz", A=params.A, B=params.B,
                     train_ids=params.train_ids, test_ids=params.test_ids,
                     lam=np.float64(params.lam), kind=np.str_(params.kind), **extra)
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
      arrays = {k: npz[k] for k in _NPZ_KEYS + _OPTIONAL_KEYS if k in npz.files}
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
  beyond = arrays.get("beyond", np.str_("hold"))
  if beyond.dtype.kind != "U" or beyond.shape != ():
    raise TraceError(f"{npz_path}: 'beyond' must be a unicode scalar, got {beyond.dtype} "
                     f"{beyond.shape}")
  params = validate(FitParams(A=arrays["A"], B=arrays["B"], train_ids=arrays["train_ids"],
                              test_ids=arrays["test_ids"], kind=str(kind), lam=float(lam),
                              rho=arrays.get("rho"), gamma=arrays.get("gamma"),
                              beyond=str(beyond)),
                    str(npz_path))
  diagnostics = traces.load_json(json_path)
  if not isinstance(diagnostics, dict):
    raise TraceError(f"{json_path}: must hold a JSON object")
  return params, diagnostics
