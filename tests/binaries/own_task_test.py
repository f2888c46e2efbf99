"""A researcher's own seqio task, end to end: MIXTURE_OR_TASK_NAME / MIXTURE_OR_TASK_MODULE.

The test writes a module of its own (`my_module`, not countryinfo): "is the number even?"
tasks over a FunctionDataSource with a ByteVocabulary, splits train (120) / validation (12),
`my_task` with an integer `id` feature (ids 7000 + 3i, validation 7500 + 3i), `my_task_noid`
without one (ids = indices in the split), `my_task_dup` whose `id` repeats, and a mixture.
Puts it on PYTHONPATH and runs pretrain -> train (both tasks) -> fit (linear_paper, and
tracin_cp: it reads the examples back from run.json) -> evaluate through the binaries, then
checks the examples files, the curricula and metrics.json. The error cases (unknown task,
unimportable module, missing or small split, repeated id, vocabulary) run in-process, and one
through the train binary (exit 2, one line, nothing written).
"""

import json
import math
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from simfluence_jax.traces import contract as traces
from simfluence_jax.traces import fit_params
from simfluence_jax.training import tasks

REPO = pathlib.Path(__file__).resolve().parents[2]
GIN = ["--gin_file=gin_configs/experiments/quickstart.gin",
       "--gin_file=gin_configs/local_tiny.gin"]
SIZES = {"train": 120, "validation": 12}
ID_BASE = {"train": 7000, "validation": 7500}
POOL, NUM_TEST = 100, 8   # TRAIN_POOL_SIZE of tasks/country_yesno.gin; local_tiny's tests

MODULE = textwrap.dedent('''
    """A user's seqio tasks: is the number even? (written by tests/binaries/own_task_test.py)"""
    import numpy as np
    import seqio
    import tensorflow as tf

    VOCAB = seqio.ByteVocabulary(extra_ids=100)
    FEATURES = {"inputs": seqio.Feature(VOCAB, add_eos=True),
                "targets": seqio.Feature(VOCAB, add_eos=True)}
    SIZES = {"train": 120, "validation": 12}
    ID_BASE = {"train": 7000, "validation": 7500}


    def numbers(split):
      return np.random.default_rng(SIZES[split]).integers(0, 1000, SIZES[split])


    def dataset_fn(ids):
      def fn(split, shuffle_files=False, seed=None):
        n = numbers(split)
        rows = {"question": [f"is {x} even?" for x in n],
                "answer": ["yes" if x % 2 == 0 else "no" for x in n],
                "number": n.astype(np.int64)}
        if ids == "own":
          rows["id"] = ID_BASE[split] + 3 * np.arange(len(n), dtype=np.int64)
        elif ids == "dup":
          rows["id"] = np.asarray([5, 8, 8] + list(range(10, 10 + len(n) - 3)), np.int64)
        return tf.data.Dataset.from_tensor_slices(rows)
      return fn


    def to_inputs_targets(ds):   # question/answer -> inputs/targets
      return ds.map(lambda ex: {**{k: v for k, v in ex.items() if k not in ("question",
                                                                           "answer")},
                                "inputs": ex["question"], "targets": ex["answer"]})


    for name, ids in (("my_task", "own"), ("my_task_noid", None), ("my_task_dup", "dup")):
      seqio.TaskRegistry.add(
          name, source=seqio.FunctionDataSource(dataset_fn(ids), splits=tuple(SIZES)),
          preprocessors=[to_inputs_targets, seqio.preprocessors.tokenize,
                         seqio.preprocessors.append_eos_after_trim],
          output_features=FEATURES)
    seqio.MixtureRegistry.add("my_mixture", ["my_task_noid", "my_task"], default_rate=1.0)
''')


def expected(split: str, with_id: bool) -> list[dict]:
  """The task's examples, computed here independently of simfluence_jax."""
  n = np.random.default_rng(SIZES[split]).integers(0, 1000, SIZES[split])
  return [{"id": (ID_BASE[split] + 3 * i) if with_id else i, "inputs": f"is {x} even?",
           "targets": "yes" if x % 2 == 0 else "no", "number": int(x)}
          for i, x in enumerate(n.tolist())]


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("own_module")
  (root / "my_module.py").write_text(MODULE)
  (root / "broken_module.py").write_text("raise RuntimeError('boom while registering')\n")
  sys.path.insert(0, str(root))
  yield root
  sys.path.remove(str(root))


def _load(name="my_task", module="my_module", **kw):
  args = dict(train_split="train", test_split="validation")
  args.update(kw)
  return tasks.load_pools(name, module, **args)


# ------------------------------------------------------------------ the library, in-process
def test_own_task_pools_ids_texts_and_tokens(module_dir):
  del module_dir
  pools = _load(pool_size=POOL, num_test_examples=NUM_TEST, subset_size=8)
  noid = _load("my_task_noid", pool_size=POOL, num_test_examples=NUM_TEST)
  for got, with_id in ((pools, True), (noid, False)):
    want_train, want_test = expected("train", with_id)[:POOL], expected("validation",
                                                                        with_id)[:NUM_TEST]
    assert [(e.id, e.inputs, e.targets) for e in got.train] == [
        (w["id"], w["inputs"], w["targets"]) for w in want_train]
    assert [(e.id, e.inputs, e.targets) for e in got.test] == [
        (w["id"], w["inputs"], w["targets"]) for w in want_test]
    # Other features are kept as JSON meta; the tokens are the task's (bytes + 3, EOS 1).
    assert got.train[4].meta == {"task": got.name, "number": want_train[4]["number"]}
    assert got.train[4].input_tokens == tuple(
        b + 3 for b in want_train[4]["inputs"].encode()) + (1,)
  assert pools.vocab_size == 359 and pools.module == "my_module"
  # A mixture: its tasks' splits concatenated in name order; a task without `id` -> indices.
  mix = _load("my_mixture")
  assert [e.inputs for e in mix.train] == [w["inputs"] for w in expected("train", True)] * 2
  assert [e.id for e in mix.train] == list(range(2 * SIZES["train"]))
  assert [e.meta["task"] for e in mix.train[119:121]] == ["my_task", "my_task_noid"]


@pytest.mark.parametrize("kwargs,message", [
    (dict(name="my_tsak"), r"unknown seqio task or mixture 'my_tsak' \(MIXTURE_OR_TASK_NAME\) "
     r"after importing MIXTURE_OR_TASK_MODULE='my_module'; the most similar of the \d+ "
     r"registered: \['my_task'"),
    (dict(module="no_such_module"), r"MIXTURE_OR_TASK_MODULE 'no_such_module' cannot be "
     r"imported \(ModuleNotFoundError: No module named 'no_such_module'\)"),
    (dict(module="broken_module"), r"MIXTURE_OR_TASK_MODULE 'broken_module' cannot be "
     r"imported \(RuntimeError: boom while registering\)"),
    (dict(test_split="test"), r"task 'my_task' has no split 'test' \(its test split: "
     r"run_experiment.test_split\); its splits: \['train', 'validation'\]"),
    (dict(num_test_examples=50), r"task 'my_task': test split 'validation' has 12 examples; "
     r"the run protocol needs 50 \(num_test_examples=50 test examples\)"),
    (dict(subset_size=200), r"task 'my_task': train split 'train' has 120 examples; the run "
     r"protocol needs 200 \(subset_size=200 train examples per run\)"),
    (dict(pool_size=4, subset_size=8), r"pool_size=4 is smaller than subset_size=8"),
    (dict(name="my_task_dup"), r"task 'my_task_dup' split 'train': id 8 repeats \(examples 1 "
     r"and 2 of the split\)"),
], ids=["unknown_task", "module_missing", "module_raises", "missing_split", "small_test_split",
        "small_train_split", "pool_below_subset", "repeated_id"])
def test_own_task_errors_name_what_is_wrong(module_dir, kwargs, message):
  del module_dir
  with pytest.raises(ValueError, match=message) as error:
    _load(**kwargs)
  assert "\n" not in str(error.value)


def test_vocabulary_and_length_checks(module_dir):
  del module_dir
  pools = _load()
  with pytest.raises(ValueError, match=r"task 'my_task': its output features' vocabulary has "
                                       r"359 ids but model_config.vocab_size is 300"):
    tasks.check_vocabulary(pools, 300)
  tasks.check_vocabulary(pools, 384)
  first = expected("train", True)[0]
  with pytest.raises(ValueError, match=rf"example id 7000: inputs is "
                                       rf"{len(first['inputs']) + 1} tokens \(as the task "
                                       r"encodes it\) but input_length is 8"):
    tasks.encode_examples(pools.train, input_length=8, target_length=16)


def test_readme_task_module_fits_the_quickstart_protocol(tmp_path, monkeypatch):
  # README "On your own seqio task": its my_tasks.py, under the quickstart's sizes and lengths.
  text = (REPO / "README.md").read_text(encoding="utf-8")
  match = re.search(r"^### On your own seqio task\n.*?^```python\n(.*?)^```$", text,
                    re.S | re.M)
  assert match, "README.md: no python block under '### On your own seqio task'"
  (tmp_path / "my_tasks.py").write_text(match.group(1))
  monkeypatch.syspath_prepend(str(tmp_path))
  pools = tasks.load_pools("even_odd", "my_tasks", train_split="train",
                           test_split="validation", pool_size=100, num_test_examples=100,
                           subset_size=64)
  assert [e.id for e in pools.train] == list(range(100))
  assert [e.id for e in pools.test] == list(range(100_000, 100_100))
  assert {e.targets for e in pools.train} == {"yes", "no"}
  assert all(e.targets == ("yes" if int(e.inputs.split()[1]) % 2 == 0 else "no")
             for e in pools.train + pools.test)
  tasks.encode_examples(pools.train + pools.test, input_length=64, target_length=16)


# ------------------------------------------------------------------ the binaries, end to end
def _env(module_dir) -> dict:
  return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
          "XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type= "
                       "--xla_force_host_platform_device_count=2",
          "JAX_COMPILATION_CACHE_DIR": str(module_dir / "jax_cache"),
          "PYTHONPATH": os.pathsep.join([str(module_dir), str(REPO),
                                         os.environ.get("PYTHONPATH", "")])}


def _binary(module_dir, cwd, binary, *args, check=True):
  proc = subprocess.run([sys.executable, "-m", f"simfluence_jax.{binary}", *args], cwd=cwd,
                        env=_env(module_dir), capture_output=True, text=True, timeout=180)
  if check:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _gin(workspace, pretrained, task) -> list[str]:
  return [*GIN, f'--gin.WORKSPACE="{workspace}"', f'--gin.PRETRAINED_DIR="{pretrained}"',
          f'--gin.MIXTURE_OR_TASK_NAME="{task}"', '--gin.MIXTURE_OR_TASK_MODULE="my_module"']


@pytest.mark.slow
def test_own_task_through_pretrain_train_fit_evaluate(module_dir, tmp_path):
  pretrained = tmp_path / "pretrained"
  ws = {task: tmp_path / task for task in ("my_task", "my_task_noid")}
  _binary(module_dir, REPO, "pretrain", *_gin(ws["my_task"], pretrained, "my_task"))
  for task, workspace in ws.items():
    _binary(module_dir, tmp_path, "train", *_gin(workspace, pretrained, task))
  for task, workspace in ws.items():
    with_id = task == "my_task"
    want_train = {w["id"]: w for w in expected("train", with_id)[:POOL]}
    want_test = {w["id"]: w for w in expected("validation", with_id)[:NUM_TEST]}
    # The examples files hold the task's examples, with its ids (or split indices).
    for split, want in (("train", want_train), ("test", want_test)):
      got = traces.read_examples(workspace, split)
      assert got == {i: {**w, "task": task} for i, w in want.items()}, (task, split)
    # Every run's curriculum uses those ids; its metadata gets the same examples back.
    for run_id in traces.list_runs(workspace):
      run = traces.read_run(workspace, run_id)
      used = set(run.curriculum[run.curriculum >= 0].tolist())
      assert used and used <= set(run.train_ids.tolist()) <= set(want_train)
      assert run.test_ids.tolist() == list(want_test)
      assert np.isfinite(run.losses).all()
      assert {k: run.metadata[k] for k in ("task", "task_module", "train_split", "test_split",
                                           "pool_size", "num_test_examples")} == {
          "task": task, "task_module": "my_module", "train_split": "train",
          "test_split": "validation", "pool_size": POOL, "num_test_examples": NUM_TEST}
  workspace = ws["my_task"]
  _binary(module_dir, REPO, "fit", f"--workspace={workspace}", "--simulator=linear_paper",
          "--fit_runs=run_000", "--lam=0.1", "--name=linear")
  _binary(module_dir, REPO, "evaluate", f"--workspace={workspace}", "--fit=linear",
          "--runs=run_001", "--unseen=mean")   # run_001 draws ids run_000 never saw
  metrics = json.loads((workspace / "fits" / "linear" / "metrics.json").read_text())
  scores = [metrics["mse"]["mean"], metrics["spearman"]["mean"], metrics["curriculum_r2"],
            metrics["per_run"][0]["mse"], metrics["baselines"]["mean_trajectory"]["mse"]["mean"]]
  assert all(math.isfinite(v) for v in scores) and metrics["mse"]["mean"] > 0, metrics
  assert metrics["per_run"][0]["run_id"] == "run_001"
  # (the across-run score needs two held-out runs: with one it is NaN, n_defined 0)
  pool_ids = [w["id"] for w in expected("train", True)[:POOL]]
  assert set(metrics["imputed_train_ids"]) <= set(pool_ids) - set(
      traces.read_run(workspace, "run_000").train_ids.tolist())
  # TracIn-CP reads the run's examples back from run.json (task, module, splits, sizes) in
  # its own process: its simulator covers exactly the task's pool and test examples.
  _binary(module_dir, REPO, "fit", f"--workspace={workspace}", "--simulator=tracin_cp",
          "--fit_runs=run_000", "--name=tracin")
  params, _ = fit_params.load_fit(workspace, "tracin")
  assert params.train_ids.tolist() == sorted(pool_ids)
  assert params.test_ids.tolist() == [w["id"] for w in expected("validation", True)[:NUM_TEST]]
  assert np.isfinite(params.B).all() and np.abs(params.B).sum() > 0


@pytest.mark.slow
def test_train_binary_refuses_an_unknown_task_in_one_line(module_dir, tmp_path):
  workspace = tmp_path / "ws"
  proc = _binary(module_dir, tmp_path, "train", *_gin(workspace, tmp_path / "pre", "my_tsak"),
                 check=False)
  assert proc.returncode == 2, proc.stderr[-2000:]
  last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
  assert last.startswith("simfluence_jax.train: error: ValueError: unknown seqio task or "
                         "mixture 'my_tsak'") and "['my_task'" in last, last
  assert not workspace.exists()   # nothing written
