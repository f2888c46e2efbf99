"""fit_params: pytree behaviour, exact save/load round trip, and named validation errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simfluence_jax.traces import fit_params
from simfluence_jax.traces.fit_params import FitParams
from simfluence_jax.traces.contract import TraceError


def _params(kind="linear", **changes):
  a = np.array([[0.5, 0.25, 0.0], [0.1, 0.2, 0.3]], np.float32)
  b = np.array([[-0.5, 1.0, 2.0], [0.0, -1.0, 0.125]], np.float32)
  base = dict(A=a if kind != "additive" else np.zeros_like(a),
              B=b if kind != "multiplicative" else np.zeros_like(b),
              train_ids=np.array([100, 7, 42], np.int64), test_ids=np.array([5, 900], np.int64),
              kind=kind, lam=0.01)
  base.update(changes)
  return FitParams(**base)


def test_is_a_pytree_with_arrays_as_leaves_and_kind_lam_as_aux():
  p = _params()
  leaves, treedef = jax.tree_util.tree_flatten(p)
  assert len(leaves) == 4
  np.testing.assert_array_equal(leaves[0], p.A)
  doubled = jax.tree.map(lambda x: x * 2, p)
  assert doubled.kind == "linear" and doubled.lam == 0.01
  np.testing.assert_array_equal(doubled.B, p.B * 2)
  np.testing.assert_array_equal(doubled.train_ids, [200, 14, 84])

  @jax.jit
  def alpha_of_first_two(params):  # Eq. 1's α for the batch {train_ids[0], train_ids[1]}
    return params.A[:, 0] + params.A[:, 1] if params.kind == "linear" else params.A[:, 0]

  np.testing.assert_allclose(alpha_of_first_two(p), [0.75, 0.3], rtol=1e-6)
  again = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x) for x in leaves])
  assert again.kind == "linear" and again.lam == 0.01


@pytest.mark.parametrize("kind", fit_params.KINDS)
def test_save_load_round_trip_is_exact(tmp_path, kind):
  p = _params(kind, A=_params(kind).A.astype(np.float64))  # float64 in memory -> float32 file
  diag = {"lam": 0.01, "validation_mse": {"0.01": 0.5, "1.0": float("nan")},
          "unidentified": {"5": [100]}, "n": np.int64(3)}
  d = fit_params.save_fit(tmp_path, "lin", p, diag)
  assert d == tmp_path / "fits" / "lin"
  got, got_diag = fit_params.load_fit(tmp_path, "lin")
  assert got.kind == kind and got.lam == 0.01 and isinstance(got.lam, float)
  for name, dtype in [("A", np.float32), ("B", np.float32), ("train_ids", np.int64),
                      ("test_ids", np.int64)]:
    assert getattr(got, name).dtype == dtype
    np.testing.assert_array_equal(getattr(got, name), getattr(_params(kind), name))
  assert got_diag["n"] == 3 and got_diag["unidentified"] == {"5": [100]}
  assert np.isnan(got_diag["validation_mse"]["1.0"])
  with np.load(d / "params.npz", allow_pickle=False) as npz:  # no pickle needed to read it
    assert str(npz["kind"]) == kind and npz["kind"].dtype.kind == "U"
    assert sorted(npz.files) == ["A", "B", "kind", "lam", "test_ids", "train_ids"]


@pytest.mark.parametrize("changes, match", [
    (dict(kind="quadratic"), r"kind 'quadratic' is not one of"),
    (dict(lam=-1.0), r"lam must be a finite number >= 0, got -1.0"),
    (dict(lam=float("nan")), r"lam must be a finite number"),
    (dict(A=np.zeros((2, 2), np.float32)), r"A must have shape \[m=2, n=3\].*got \(2, 2\)"),
    (dict(B=np.ones((3, 3), np.float32)), r"B must have shape \[m=2, n=3\]"),
    (dict(A=np.array([[0.5, 0.25, 0.0], [0.1, np.nan, 0.3]], np.float32)),
     r"A\[1, 1\] \(test id 900, train id 7\) is nan"),
    (dict(B=np.full((2, 3), 1e300)), r"B\[0, 0\] \(test id 5, train id 100\) is 1e\+300"),
    (dict(A=np.zeros((2, 3), np.int32)), r"A must be floating point"),
    (dict(train_ids=np.array([1, 2, 1])), r"train_ids has duplicate id 1"),
    (dict(test_ids=np.array([-5, 900])), r"test_ids has negative id -5"),
])
def test_bad_params_are_refused_on_save(tmp_path, changes, match):
  with pytest.raises(TraceError, match=match):
    fit_params.save_fit(tmp_path, "bad", _params(**changes), {})
  assert not (tmp_path / "fits" / "bad" / "fit.json").exists()


def test_additive_and_multiplicative_must_zero_their_unused_matrix(tmp_path):
  with pytest.raises(TraceError, match=r"additive simulator has A = 0 by definition.*6 non"):
    fit_params.save_fit(tmp_path, "x", _params("additive", A=_params().A + 1), {})
  with pytest.raises(TraceError, match=r"multiplicative simulator has B = 0"):
    fit_params.save_fit(tmp_path, "x", _params("multiplicative", B=_params().B), {})


def test_load_errors_name_the_file(tmp_path):
  with pytest.raises(TraceError, match=r"fits/none/fit\.json: fit 'none' is not found"):
    fit_params.load_fit(tmp_path, "none")
  d = fit_params.save_fit(tmp_path, "f", _params(), {"lam": 0.01})
  npz = d / "params.npz"
  raw = npz.read_bytes()
  npz.write_bytes(raw[: len(raw) // 2])
  with pytest.raises(TraceError, match=rf"{npz}: not a readable \.npz"):
    fit_params.load_fit(tmp_path, "f")
  np.savez(npz, A=np.zeros((2, 3), np.float32))
  with pytest.raises(TraceError, match=r"params\.npz: missing arrays \['B', 'train_ids'"):
    fit_params.load_fit(tmp_path, "f")
  p = _params()
  np.savez(npz, A=p.A, B=p.B, train_ids=p.train_ids, test_ids=p.test_ids, lam=0.1,
           kind=np.str_("bogus"))
  with pytest.raises(TraceError, match=rf"{npz}: kind 'bogus' is not one of"):
    fit_params.load_fit(tmp_path, "f")
  np.savez(npz, A=p.A, B=p.B, train_ids=p.train_ids, test_ids=p.test_ids, lam=0.1,
           kind=np.array(["linear"], dtype=object))  # a pickled array: refused, not unpickled
  with pytest.raises(TraceError, match=rf"{npz}: not a readable .*allow_pickle=False"):
    fit_params.load_fit(tmp_path, "f")
  (d / "fit.json").write_text("[1, 2]")
  fit_params.save_fit(tmp_path, "f", p, {"ok": True})
  (d / "fit.json").write_text("[1, 2]")
  with pytest.raises(TraceError, match=r"fit\.json: must hold a JSON object"):
    fit_params.load_fit(tmp_path, "f")
  (d / "fit.json").unlink()
  with pytest.raises(TraceError, match=r"fit 'f' is incomplete"):
    fit_params.load_fit(tmp_path, "f")
  with pytest.raises(TraceError, match=r"fit name '\.\.' is not a valid name"):
    fit_params.load_fit(tmp_path, "..")


def test_resave_replaces_and_diagnostics_must_be_json(tmp_path):
  fit_params.save_fit(tmp_path, "f", _params(), {"v": 1})
  fit_params.save_fit(tmp_path, "f", _params(lam=2.0), {"v": 2})
  got, diag = fit_params.load_fit(tmp_path, "f")
  assert got.lam == 2.0 and diag == {"v": 2}
  with pytest.raises(TraceError, match=r"diagnostics are not JSON-serializable"):
    fit_params.save_fit(tmp_path, "f", _params(lam=3.0), {"v": {1}})
  got, diag = fit_params.load_fit(tmp_path, "f")  # the failed save changed nothing
  assert got.lam == 2.0 and json.loads(json.dumps(diag)) == {"v": 2}
