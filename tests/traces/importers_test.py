"""import_traces: hand-written long-format files become the hand-built RunTraces; every bad
record is named by file and line/row; the binary runs end to end."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from simfluence_jax.traces import importers as import_traces
from simfluence_jax.traces import contract as traces
from simfluence_jax.traces.contract import RunTrace, TraceError

CSV = """\
kind,run_id,step,train_id,test_id,loss
loss,a,0,,900,3.5
batch,a,1,17,,
batch,a,1,4,,
loss,a,1,,900,3.0
loss,a,1,,5,2.0
batch,a,2,8,,
loss,a,2,,5,1.25
batch,b,1,4,,
loss,b,1,,5,0.5
"""

# The same traces built by hand: k = most examples at one step; -1 pads; train_ids = ids
# consumed (ascending); test_ids ascending; missing (step, test_id) -> NaN.
WANT_A = RunTrace(run_id="a", train_ids=np.array([4, 8, 17], np.int64),
                  test_ids=np.array([5, 900], np.int64), batch_size=2,
                  curriculum=np.array([[17, 4], [8, -1]], np.int32),
                  losses=np.array([[np.nan, 3.5], [2.0, 3.0], [1.25, np.nan]], np.float32),
                  metadata={"imported_from": "t.csv", "import_format": "csv"})
WANT_B = RunTrace(run_id="b", train_ids=np.array([4], np.int64),
                  test_ids=np.array([5], np.int64), batch_size=1,
                  curriculum=np.array([[4]], np.int32),
                  losses=np.array([[np.nan], [0.5]], np.float32),
                  metadata={"imported_from": "t.csv", "import_format": "csv"})


def _rows():
  lines = CSV.splitlines()
  head = lines[0].split(",")
  out = []
  for line in lines[1:]:
    rec = {}
    for key, value in zip(head, line.split(",")):
      if value:
        rec[key] = value if key in ("kind", "run_id") else (
            float(value) if key == "loss" else int(value))
    out.append(rec)
  return out


def test_csv_import_equals_hand_built_traces(tmp_path):
  (tmp_path / "t.csv").write_text(CSV)
  ws = tmp_path / "ws"
  assert import_traces.import_long_format(tmp_path / "t.csv", ws) == ["a", "b"]
  assert traces.read_run(ws, "a") == WANT_A
  assert traces.read_run(ws, "b") == WANT_B
  assert not (ws / ".lock").exists()
  # Importing the same file again changes nothing and is not an error.
  assert import_traces.import_long_format(tmp_path / "t.csv", ws) == ["a", "b"]


def test_pandas_style_floats_for_ids_are_accepted_when_integral(tmp_path):
  # pandas writes an int column with gaps as floats ("17.0") and its gaps as NaN.
  text = CSV.replace("batch,a,1,17,,", "batch,a,1.0,17.0,,").replace(
      "loss,a,1,,900,3.0", "loss,a,1,nan,900.0,3.0")
  (tmp_path / "t.csv").write_text(text)
  assert import_traces.build_runs(tmp_path / "t.csv") == [WANT_A, WANT_B]


def test_jsonl_and_parquet_give_the_same_traces(tmp_path):
  rows = _rows()
  (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
  full = [{c: r.get(c) for c in import_traces.COLUMNS} for r in rows]
  pq.write_table(pa.Table.from_pylist(full), tmp_path / "t.parquet")
  for name, fmt in [("t.jsonl", "jsonl"), ("t.parquet", "parquet")]:
    got = import_traces.build_runs(tmp_path / name)
    meta = {"imported_from": name, "import_format": fmt}
    assert got == [RunTrace(**{**WANT_A.__dict__, "metadata": meta}),
                   RunTrace(**{**WANT_B.__dict__, "metadata": meta})]


@pytest.mark.parametrize("edit, match", [
    (("loss,a,1,,5,2.0", "loss,a,1,,5,abc"), r"t\.csv:line 6: loss 'abc' is not a number"),
    (("loss,a,1,,5,2.0", "loss,a,1,,5,inf"), r"t\.csv:line 6: loss is inf"),
    (("loss,a,1,,5,2.0", "loss,a,1,,5,nan"), r"t\.csv:line 6: loss is nan"),
    (("batch,a,2,8,,", "batch,a,0,8,,"), r"t\.csv:line 7: batch record at step 0"),
    (("batch,a,2,8,,", "batch,a,-2,8,,"), r"t\.csv:line 7: step -2 is below 0"),
    (("batch,a,2,8,,", "batch,a,2.5,8,,"), r"t\.csv:line 7: step '2\.5' is not an integer"),
    (("batch,a,2,8,,", "batch,a,2,-8,,"), r"line 7: train_id -8 is below 0"),
    (("batch,a,2,8,,", "batch,a,2,8,,1.0"), r"line 7: a batch record must leave 'loss' empty"),
    (("batch,a,2,8,,", "batch,a,2,,,"), r"line 7: a batch record needs 'train_id'"),
    (("batch,a,2,8,,", "batch,a,3,8,,"), r"run 'a' has no batch records for step 2"),
    (("batch,a,2,8,,", "step,a,2,8,,"), r"line 7: kind 'step' must be 'batch' or 'loss'"),
    (("batch,a,2,8,,", "batch,a/x,2,8,,"), r"line 7: run_id 'a/x' is not a valid name"),
    (("batch,a,2,8,,", "batch,a,2,8,"), r"line 7: the number of fields differs"),
    (("loss,a,2,,5,1.25", "loss,a,1,,5,1.25"),
     r"line 8: duplicate loss for run 'a', step 1, test_id 5 \(first at .*t\.csv:line 6\)"),
    (("loss,a,2,,5,1.25", "loss,a,3,,5,1.25"),
     r"line 8: loss at step 3 is after run 'a''s last batch step 2"),
    (("batch,b,1,4,,", "loss,b,0,,5,0.5"), r"run 'b' has no batch records \(an empty run\)"),
    (("loss,b,1,,5,0.5", "batch,b,2,4,,"), r"run 'b' has no loss records"),
    (("kind,run_id", "kind,epoch,run_id"), r"t\.csv: unknown columns \['epoch'\]"),
])
def test_bad_records_are_named(tmp_path, edit, match):
  old, new = edit
  assert old in CSV
  (tmp_path / "t.csv").write_text(CSV.replace(old, new, 1))
  with pytest.raises(TraceError, match=match):
    import_traces.import_long_format(tmp_path / "t.csv", tmp_path / "ws")
  assert not (tmp_path / "ws" / "runs").exists()  # nothing written


def test_format_and_file_errors(tmp_path):
  with pytest.raises(TraceError, match=r"t\.txt: cannot tell the format"):
    import_traces.build_runs(tmp_path / "t.txt")
  with pytest.raises(TraceError, match=r"nope\.csv: missing file"):
    import_traces.build_runs(tmp_path / "nope.csv")
  (tmp_path / "t.jsonl").write_text('{"kind": "batch"}\n[1]\n')
  with pytest.raises(TraceError, match=r"t\.jsonl:line 1: a batch record needs 'run_id'"):
    import_traces.build_runs(tmp_path / "t.jsonl")
  (tmp_path / "t.jsonl").write_text('\n{"kind": "batch", "run_id": "a", "step": 1,'
                                    ' "train_id": true}\n')
  with pytest.raises(TraceError, match=r"t\.jsonl:line 2: train_id True is not an integer"):
    import_traces.build_runs(tmp_path / "t.jsonl")
  (tmp_path / "t.parquet").write_bytes(b"PAR1 not really")
  with pytest.raises(TraceError, match=r"t\.parquet: not a readable parquet file"):
    import_traces.build_runs(tmp_path / "t.parquet")
  (tmp_path / "e.csv").write_text("kind,run_id,step,train_id,test_id,loss\n")
  with pytest.raises(TraceError, match=r"e\.csv: no records"):
    import_traces.build_runs(tmp_path / "e.csv")


def test_conflicting_existing_run_writes_nothing_unless_overwrite(tmp_path):
  (tmp_path / "t.csv").write_text(CSV)
  ws = tmp_path / "ws"
  traces.write_run(ws, RunTrace(**{**WANT_B.__dict__, "metadata": {"mine": 1}}))
  with pytest.raises(TraceError, match=r"run 'b' already exists .*nothing was written"):
    import_traces.import_long_format(tmp_path / "t.csv", ws)
  assert traces.list_runs(ws) == ["b"]  # run a was not written either
  assert import_traces.import_long_format(tmp_path / "t.csv", ws, overwrite=True) == ["a",
                                                                                     "b"]
  assert traces.read_run(ws, "b") == WANT_B


def test_binary_end_to_end(tmp_path):
  (tmp_path / "t.csv").write_text(CSV)
  ws = tmp_path / "ws"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "simfluence_jax.import_traces", f"--workspace={ws}",
         f"--input={tmp_path / 't.csv'}"]
  res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
  assert res.returncode == 0, res.stderr
  assert json.loads(res.stdout) == {"workspace": str(ws), "runs": ["a", "b"]}
  assert traces.read_run(ws, "a") == WANT_A
  (tmp_path / "t.csv").write_text(CSV.replace("3.0", "x"))
  res = subprocess.run(cmd + ["--format=csv"], capture_output=True, text=True, env=env,
                       timeout=120)
  assert res.returncode == 2
  assert "TraceError:" in res.stderr and "t.csv:line 5: loss 'x' is not a number" in res.stderr


def _quote_all(text: str, eol: str = "\n") -> str:
  return "".join(",".join(f'"{v}"' for v in line.split(",")) + eol
                 for line in text.splitlines())


def _pandas_index(text: str, name: str, eol: str = "\n") -> str:
  """What DataFrame.to_csv writes with its default index=True (a RangeIndex column)."""
  lines = text.splitlines()
  return "".join([f"{name},{lines[0]}{eol}"] +
                 [f"{i},{line}{eol}" for i, line in enumerate(lines[1:])])


# (dialect, bytes of the same traces as CSV) — as spreadsheet programs and pandas write them.
DIALECTS = [
    ("excel_csv_utf8_windows", b"\xef\xbb\xbf" + CSV.replace("\n", "\r\n").encode()),
    ("crlf", CSV.replace("\n", "\r\n").encode()),
    ("cr_only", CSV.replace("\n", "\r").encode()),
    ("quoted_fields", _quote_all(CSV).encode()),
    ("quoted_crlf_bom", b"\xef\xbb\xbf" + _quote_all(CSV, "\r\n").encode()),
    ("trailing_empty_lines", (CSV + "\n\n").encode()),
    ("trailing_empty_line_crlf", (CSV + "\n").replace("\n", "\r\n").encode()),
    ("spreadsheet_empty_rows", (CSV + ",,,,,\n,,,,,\n").encode()),
    ("no_final_newline", CSV.rstrip("\n").encode()),
    ("pandas_index_no_header", _pandas_index(CSV, "").encode()),
    ("pandas_index_unnamed_0", _pandas_index(CSV, "Unnamed: 0").encode()),
    ("pandas_windows", _pandas_index(CSV, "", "\r\n").encode()),
    ("pandas_twice", _pandas_index(_pandas_index(CSV, "Unnamed: 0"), "Unnamed: 0.1").encode()),
    ("spaces_after_commas", CSV.replace(",", ", ").encode()),
]


@pytest.mark.parametrize("data", [d for _, d in DIALECTS], ids=[n for n, _ in DIALECTS])
def test_csv_dialects_give_the_hand_built_traces(tmp_path, data):
  (tmp_path / "t.csv").write_bytes(data)
  assert import_traces.build_runs(tmp_path / "t.csv") == [WANT_A, WANT_B]


@pytest.mark.parametrize("data", [
    b"\xef\xbb\xbf" + CSV.replace("loss,a,1,,5,2.0", "loss,a,1,,5,abc").replace(
        "\n", "\r\n").encode(),
    _pandas_index(CSV.replace("loss,a,1,,5,2.0", "loss,a,1,,5,abc"), "", "\r\n").encode(),
    _quote_all(CSV.replace("loss,a,1,,5,2.0", "loss,a,1,,5,abc"), "\r\n").encode(),
], ids=["bom_crlf", "pandas_windows", "quoted_crlf"])
def test_dialect_errors_name_the_file_line(tmp_path, data):
  (tmp_path / "t.csv").write_bytes(data)
  with pytest.raises(TraceError, match=r"t\.csv:line 6: loss 'abc' is not a number"):
    import_traces.build_runs(tmp_path / "t.csv")


@pytest.mark.parametrize("data, match", [
    (CSV.replace(",", ";").encode(), r"t\.csv: fields are separated by semicolons, not "
     r"commas .*save it as comma-separated CSV"),
    (CSV.replace(",", "\t").encode(), r"t\.csv: fields are separated by tabs"),
    (CSV.encode("utf-16"), r"t\.csv: UTF-16 text .*not UTF-8; save it as UTF-8"),
    (CSV.replace("batch,b", "batch,b\xe9").encode("cp1252"),
     r"t\.csv: not UTF-8 text; save it as UTF-8"),
])
def test_unreadable_dialects_say_how_to_save_the_file(tmp_path, data, match):
  (tmp_path / "t.csv").write_bytes(data)
  with pytest.raises(TraceError, match=match):
    import_traces.import_long_format(tmp_path / "t.csv", tmp_path / "ws")
  assert not (tmp_path / "ws" / "runs").exists()


def test_jsonl_with_bom_and_crlf(tmp_path):
  text = "\r\n".join(json.dumps(r) for r in _rows()) + "\r\n"
  (tmp_path / "t.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode())
  meta = {"imported_from": "t.jsonl", "import_format": "jsonl"}
  assert import_traces.build_runs(tmp_path / "t.jsonl") == [
      RunTrace(**{**WANT_A.__dict__, "metadata": meta}),
      RunTrace(**{**WANT_B.__dict__, "metadata": meta})]
