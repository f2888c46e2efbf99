"""End-to-end tests of the pretrain and train binaries (subprocesses, tiny config).

One pretrained tiny model is shared; the train binary runs uninterrupted once, then once more
SIGKILLed after its first resume checkpoint and restarted: the traces must be bit-identical.
The binaries run from a scratch directory (not the repo root) to check gin file resolution.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from simfluence_jax.training import checkpoints
from simfluence_jax.training import models
from simfluence_jax.training import tasks
from simfluence_jax.traces import contract as traces
from simfluence_jax.training import trainer as trainer_lib

pytestmark = pytest.mark.slow

# The same XLA flags for every process, so uninterrupted and resumed runs compile alike.
REPO = pathlib.Path(__file__).resolve().parents[2]
ENV = {**os.environ, "XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type= "
                                  "--xla_force_host_platform_device_count=2",
       "TF_CPP_MIN_LOG_LEVEL": "3",
       "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
GIN = ["--gin_file=gin_configs/experiments/quickstart.gin",
       "--gin_file=gin_configs/local_tiny.gin"]
TRAIN_FLAGS = ["--gin.run_experiment.epochs=4.0", "--gin.run_experiment.checkpoint_every=2"]


def _command(binary, workspace, pretrained, *extra):
  return [sys.executable, "-m", f"simfluence_jax.{binary}", *GIN,
          f'--gin.WORKSPACE="{workspace}"', f'--gin.PRETRAINED_DIR="{pretrained}"', *extra]


def _run(binary, workspace, pretrained, cwd, *extra):
  proc = subprocess.run(_command(binary, workspace, pretrained, *extra), cwd=cwd, env=ENV,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  # JAX's persistent cache: the 3 train processes compile the same step once (~10 s).
  ENV["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  root = tmp_path_factory.mktemp("pre")
  summary = _run("pretrain", root / "ws", root / "pretrained", root)
  return root / "pretrained", summary


@pytest.fixture(scope="module")
def trained(tmp_path_factory, pretrained):
  root = tmp_path_factory.mktemp("train")
  summary = _run("train", root / "ws", pretrained[0], root, *TRAIN_FLAGS)
  return root / "ws", summary


def test_pretrain_writes_checkpoint_and_is_cached(pretrained):
  path, summary = pretrained
  assert not summary["cached"] and summary["steps"] == 2
  assert np.isfinite(summary["first_loss"]) and summary["first_loss"] > 0
  assert checkpoints.all_steps(path) == [2]
  assert "run_pretraining.num_steps = 2" in (path / "config.gin").read_text()
  variables = checkpoints.load_variables(path)
  assert set(variables) == {"params"}
  recipe = json.loads((path / "pretraining.json").read_text())
  assert recipe["num_steps"] == 2 and recipe["prompted_fraction"] == 0.5   # the T0-like start
  # A cached checkpoint of another recipe is refused, not silently reused.
  proc = subprocess.run(_command("pretrain", path.parent / "ws", path,
                                 "--gin.run_pretraining.prompted_fraction=0.0"),
                        cwd=path.parent, env=ENV, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and "prompted_fraction" in proc.stderr, proc.stderr[-2000:]


def test_train_writes_readable_traces_examples_config_and_checkpoints(trained):
  ws, summary = trained
  assert summary["runs"] == 2 and summary["test"] == 8
  run_ids = traces.list_runs(ws)
  assert len(run_ids) == 2
  num_steps = summary["steps"]
  for run_id in run_ids:
    trace = traces.read_run(ws, run_id)
    assert trace.losses.shape == (trace.num_steps + 1, 8)
    assert np.all(np.isfinite(trace.losses[0])) and np.all(np.isfinite(trace.losses))
    assert not np.array_equal(trace.losses[0], trace.losses[-1])  # it trained
    assert set(np.unique(trace.curriculum[trace.curriculum >= 0])) <= set(trace.train_ids)
    steps = checkpoints.all_steps(ws / "checkpoints" / run_id)
    assert trace.num_steps in steps and 2 in steps
  assert num_steps == max(traces.read_run(ws, r).num_steps for r in run_ids)
  assert len(traces.read_examples(ws, "test")) == 8
  # run.json says where the examples came from; they come back from it, equal to the files.
  meta = traces.read_run(ws, run_ids[0]).metadata
  assert {k: meta[k] for k in ("task", "task_module", "train_split", "test_split",
                               "pool_size", "num_test_examples")} == {
      "task": "country_yesno", "task_module": "simfluence_jax.training.country_tasks",
      "train_split": "train", "test_split": "validation", "pool_size": 100,
      "num_test_examples": 8}
  pools = tasks.pools_from_metadata(meta)
  for split, examples in (("train", pools.train), ("test", pools.test)):
    assert {i: (e["inputs"], e["targets"]) for i, e in traces.read_examples(ws, split).items()
            } == {e.id: (e.inputs, e.targets) for e in examples}
  config = (ws / "config.gin").read_text()
  assert "NUM_RUNS = 2" in config and "model_config.emb_dim = 32" in config


def test_recorded_loss_equals_recomputation_from_checkpoint(trained):
  ws, _ = trained
  run_id = traces.list_runs(ws)[1]
  trace = traces.read_run(ws, run_id)
  step = 2
  variables = checkpoints.load_variables(ws / "checkpoints" / run_id, step)
  config = models.T5Config(vocab_size=384, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                           num_encoder_layers=1, num_decoder_layers=1)  # models/tiny.gin
  examples = traces.read_examples(ws, "test")   # as written by the binary
  j = 3
  batch = tasks.encode_examples([examples[int(trace.test_ids[j])]], input_length=64,
                                target_length=16)   # tasks/country_yesno.gin
  use_ia3 = trace.metadata["tuning"] == "ia3"   # the quickstart tunes IA3 vectors
  assert ("ia3" in variables) == use_ia3
  loss = trainer_lib.t5_loss_fn(models.Transformer(config, use_ia3=use_ia3))(
      variables, jax.tree.map(jax.numpy.asarray, batch), None)
  np.testing.assert_allclose(trace.losses[step, j], float(loss[0]), rtol=1e-5, atol=1e-6)


def test_killed_and_restarted_training_gives_identical_traces(tmp_path, pretrained, trained):
  reference, _ = trained
  ws = tmp_path / "ws"
  group = ws / "checkpoints" / "_group_all"
  proc = subprocess.Popen(_command("train", ws, pretrained[0], *TRAIN_FLAGS), cwd=tmp_path,
                          env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 100
  while checkpoints.latest_step(group) is None and proc.poll() is None:
    assert time.time() < deadline, "no group checkpoint appeared"
    time.sleep(0.002)
  os.kill(proc.pid, signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL, "training finished before it could be killed"
  assert not (ws / "runs").exists() or not traces.list_runs(ws)
  _run("train", ws, pretrained[0], tmp_path, *TRAIN_FLAGS)
  assert traces.list_runs(ws) == traces.list_runs(reference)
  for run_id in traces.list_runs(ws):
    a, b = traces.read_run(ws, run_id), traces.read_run(reference, run_id)
    np.testing.assert_array_equal(a.losses, b.losses)
    np.testing.assert_array_equal(a.curriculum, b.curriculum)


def test_gin_args_rewrite_and_file_resolution(tmp_path, monkeypatch):
  from simfluence_jax.cli import gin_setup as gin_utils
  assert gin_utils.rewrite_gin_args(
      ["prog", '--gin.WORKSPACE="/w"', "--gin_file=a.gin", "--gin.f.x=[1, 2]"]) == [
          "prog", '--gin_bindings=WORKSPACE = "/w"', "--gin_file=a.gin",
          "--gin_bindings=f.x = [1, 2]"]
  monkeypatch.chdir(tmp_path)  # not the repo root
  paths = gin_utils.search_paths()
  for name in ("gin_configs/experiments/quickstart.gin", "experiments/quickstart.gin",
               "local_tiny.gin"):
    assert gin_utils.resolve_gin_file(name, paths).startswith(str(gin_utils.GIN_CONFIGS_DIR))
  with pytest.raises(FileNotFoundError, match="bundled configs are under"):
    gin_utils.resolve_gin_file("experiments/nope.gin", paths)


def test_explicit_curriculum_files_become_runs_padded_to_the_group(tmp_path):
  from simfluence_jax import train
  path = tmp_path / "remove_x.json"
  path.write_text(json.dumps([[12, 10], [11, -1], [10, 10]]))
  (run,) = train.explicit_curricula([str(path)], np.arange(10, 20))
  assert run.run_id == "explicit_remove_x"
  np.testing.assert_array_equal(run.train_ids, [10, 11, 12])
  positions = train.to_positions([run], {i: i - 10 for i in range(10, 20)}, num_steps=5)
  np.testing.assert_array_equal(positions[0], [[2, 0], [1, -1], [0, 0], [-1, -1], [-1, -1]])
  path.write_text(json.dumps([[99, 10]]))
  with pytest.raises(ValueError, match=r"ids \[99\] are not in the task's train pool"):
    train.explicit_curricula([str(path)], np.arange(10, 20))


def test_curriculum_dir_explicit_only_and_sparse_recording(tmp_path, pretrained, trained):
  # The counterfactual bank's training mode: only the curricula of a directory, test losses
  # recorded every 3rd step and at each run's last; the recorded values are those of the
  # same runs recorded at every step.
  ws, _ = trained
  base = traces.read_run(ws, "run_000")
  cur = np.asarray(base.curriculum)
  removed = int(cur[0, 0])
  edits = {"rev": cur[::-1], "masked": np.where(cur == removed, -1, cur)}
  edits["masked"] = np.stack([np.r_[row[row >= 0], row[row < 0]] for row in edits["masked"]])
  cdir = tmp_path / "curricula"
  cdir.mkdir()
  for name, batches in edits.items():
    (cdir / f"{name}.json").write_text(json.dumps({
        "batches": batches.tolist(),
        "metadata": {"counterfactual": {"base_run": "run_000", "kind": name}}}))
  (cdir / "manifest.json").write_text("[]")                    # not a curriculum
  common = [f'--gin.run_experiment.curriculum_dir="{cdir}"',
            "--gin.run_experiment.explicit_only=True", *TRAIN_FLAGS]
  sparse, full = tmp_path / "sparse", tmp_path / "full"
  _run("train", sparse, pretrained[0], tmp_path, *common, "--gin.run_experiment.record_every=3")
  _run("train", full, pretrained[0], tmp_path, *common)
  assert traces.list_runs(sparse) == ["explicit_masked", "explicit_rev"]
  for run_id in ("explicit_masked", "explicit_rev"):
    s, f = traces.read_run(sparse, run_id), traces.read_run(full, run_id)
    steps = s.losses.shape[0] - 1
    recorded = [t for t in range(steps + 1) if np.isfinite(s.losses[t]).all()]
    assert recorded == sorted({0, steps, *range(3, steps + 1, 3)}), recorded
    assert np.isnan(s.losses[[t for t in range(steps + 1) if t not in recorded]]).all()
    np.testing.assert_allclose(s.losses[recorded], f.losses[recorded], rtol=0, atol=1e-5)
    assert s.metadata["record_every"] == 3 and "record_every" not in f.metadata
    assert s.metadata["counterfactual"]["base_run"] == "run_000"



def test_metagradients_binary_replays_the_run_and_predicts_a_masked_removal(tmp_path,
                                                                             pretrained,
                                                                             trained):
  # The workspace glue of exact metagradients (exactness itself: tests/prior_methods/
  # metagradients_test.py): the replay from the pretrained model reproduces the recorded
  # run, the prediction of a masked removal (one train id, all its slots) tracks the
  # retrained run, and reverse mode (removal_effects) agrees with forward mode.
  ws = tmp_path / "ws"
  shutil.copytree(trained[0], ws)
  base = traces.read_run(ws, "run_000")
  cur = np.asarray(base.curriculum)
  removed = int(cur[0, 0])
  masked = np.stack([np.r_[r[r >= 0], r[r < 0]] for r in np.where(cur == removed, -1, cur)])
  files = []
  for name, batches in {"masked": masked, "rev": cur[::-1]}.items():
    files.append(tmp_path / f"{name}.json")
    files[-1].write_text(json.dumps({"batches": batches.tolist(), "metadata": {
        "counterfactual": {"base_run": "run_000", "kind": name}}}))
  _run("train", ws, pretrained[0], tmp_path, *TRAIN_FLAGS, "--gin.run_experiment.explicit_only=True",
       f"--gin.run_experiment.curriculum_files={json.dumps([str(f) for f in files])}")
  proc = subprocess.run([sys.executable, "-m", "simfluence_jax.metagradients", f"--workspace={ws}",
                         f"--pretrained_dir={pretrained[0]}", "--oracle=False"],
                        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  cost = json.loads((ws / "counterfactuals/metagradient/cost.json").read_text())
  assert cost["edits"] == 2 and cost["bases"]["run_000"]["forms"]["aligned"] == 1
  assert cost["bases"]["run_000"]["replay_error"] <= 1e-5      # measured 0.0
  with np.load(ws / "counterfactuals/metagradient/predictions.npz") as z:
    pred = {k: z[k] for k in z.files}
  obs = traces.read_run(ws, "explicit_masked").losses[-1] - base.losses[-1]
  sim = pred["explicit_masked"][-1] - base.losses[-1]
  assert np.abs(obs).max() > 1e-2
  assert np.corrcoef(obs, sim)[0, 1] > 0.95                    # measured 0.9997
  np.testing.assert_array_equal(np.sign(sim), np.sign(obs))
  from simfluence_jax.experiments import metagradient_bank  # pylint: disable=g-import-not-at-top
  ids, effects = metagradient_bank.removal_effects(ws, base, np.arange(base.test_ids.size),
                                                   pretrained_dir=pretrained[0])
  # float32 through 16 Adafactor steps: the two modes round differently, by up to 14% of an
  # effect here (Adafactor divides by the root of tiny second moments); in float64 they
  # agree to 1e-10 (metagradients_test.py). Same direction and signs, measured r = 0.9995.
  reverse = effects[:, list(ids).index(removed)]
  assert np.corrcoef(reverse, sim)[0, 1] > 0.99
  np.testing.assert_array_equal(np.sign(reverse), np.sign(sim))
  np.testing.assert_allclose(reverse, sim, rtol=0, atol=0.25 * np.abs(sim).max())
