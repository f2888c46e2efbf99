"""The counterfactual bank in a workspace, on a planted Simfluence-Linear world: the bench's
edits "retrained" by the planted dynamics, a fit of the true model predicts their Δ almost
exactly while ignoring the curriculum predicts none of it; scores.json and deltas.npz
round-trip; the removal test removes each method's own top proponents."""

import json

import numpy as np
import pytest

from simfluence_jax.evaluation import attribution
from simfluence_jax.evaluation import bench
from simfluence_jax.experiments import counterfactual_bank as bank
from simfluence_jax.experiments import pipeline
from simfluence_jax.simulators import rollout
from simfluence_jax.simulators import simfluence as simulators
from simfluence_jax.traces import atomic_io
from simfluence_jax.traces import contract as traces
from simfluence_jax.traces import fit_params

N, M, K, STEPS = 12, 6, 2, 30
TRAIN_IDS = np.arange(N, dtype=np.int64) + 300
TEST_IDS = np.arange(M, dtype=np.int64) + 7000


def _truth(seed=0):
  rng = np.random.default_rng(seed)
  a = rng.uniform(0.46, 0.5, (M, N))
  a[0, 3] = 0.3                           # train id 303 cuts test example 7000's loss hard
  b = rng.uniform(-0.01, 0.01, (M, N))
  return a, b


def _simulate(a, b, curriculum, l0):
  pos = rollout.ids_to_positions(curriculum, TRAIN_IDS)
  return np.asarray(rollout.rollout(a, b, kind="linear", batches=pos,
                                    initial_losses=np.asarray(l0, np.float32)), np.float32)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
  root = tmp_path_factory.mktemp("bank")
  a, b = _truth()
  rng = np.random.default_rng(1)
  for r in range(8):
    cur = TRAIN_IDS[np.stack([rng.choice(N, K, replace=False) for _ in range(STEPS)])]
    traces.write_run(root, traces.RunTrace(
        run_id=f"run_{r:03d}", train_ids=TRAIN_IDS, test_ids=TEST_IDS, batch_size=K,
        curriculum=cur.astype(np.int32),
        losses=_simulate(a, b, cur, rng.uniform(2, 3, M)), metadata={}))
  traces.write_examples(root, "train", [{"id": int(i), "inputs": f"q{i}",
                                         "targets": "yes" if i % 2 else "no"}
                                        for i in TRAIN_IDS])
  traces.write_examples(root, "test", [{"id": int(i), "inputs": f"t{i}",
                                        "targets": "yes" if i % 3 else "no"}
                                       for i in TEST_IDS])
  config = pipeline.PipelineConfig(num_fit=5, num_val=1, simulators=("linear_paper",))
  split = pipeline.write_split(root, config)["split"]
  fit_runs = simulators.read_runs(root, split["fit"])
  params, diag = simulators.fit(fit_runs, simulator="linear_paper", lam=1e-6)
  fit_params.save_fit(root, "linear_paper", params, diag)
  atomic_io.save_json(root / "fits" / "linear_paper" / "metrics.json", simulators.evaluate(
      params, simulators.read_runs(root, split["heldout"]), fit_runs=fit_runs))
  spec = bench.BenchSpec(num_base_runs=2, removal_sizes=(2, 4), num_half_subsets=4,
                         repeat_times=3, record_every=5)
  files = bank.make_bench(root, spec)
  files += bank.make_removal_test(root, methods=["linear_paper"], num_targets=2, k=2)
  for f in files:       # "retrain" every edit with the planted dynamics (all steps recorded)
    doc = json.loads(f.read_text())
    meta = doc["metadata"]["counterfactual"]
    base = traces.read_run(root, meta["base_run"])
    cur = np.asarray(doc["batches"], np.int32)
    traces.write_run(root, traces.RunTrace(
        run_id=bench.run_id(f.stem), train_ids=TRAIN_IDS, test_ids=TEST_IDS,
        batch_size=K, curriculum=cur, losses=_simulate(a, b, cur, base.losses[0]),
        metadata=doc["metadata"]))
  return root, spec, files


def test_the_true_model_predicts_every_edit_and_ignoring_the_curriculum_none(workspace):
  root, spec, _ = workspace
  scores = bank.score_workspace(root)
  true = scores["methods"]["linear_paper"]
  assert true["overall"]["pearson"] > 0.99 and true["overall"]["sign"] > 0.95
  for kind, s in true["kinds"].items():
    if np.isfinite(s["pearson"]):
      assert s["pearson"] > 0.95, kind
  assert true["datamodeling"]["mean"] > 0.9
  # the mean trajectory changes a prediction only through the run's length: no masked or
  # reordered edit changes it
  mean = scores["methods"]["mean_trajectory"]["kinds"]
  for kind in ("remove_random/masked", "reverse", "half_subset"):
    assert mean[kind]["mean_sim"] == 0.0 and np.isnan(mean[kind]["pearson"])
  assert scores["bench"]["spec"]["record_every"] == spec.record_every
  assert {r["method"] for r in scores["removal_test"]} == {"linear_paper"}


def test_scores_and_deltas_round_trip(workspace):
  root, _, _ = workspace
  scores = bank.score_workspace(root)
  stored = json.loads((root / "counterfactuals" / "scores.json").read_text())
  assert stored == json.loads(json.dumps(scores))
  with np.load(root / "counterfactuals" / "deltas.npz", allow_pickle=False) as z:
    obs, sim = z["obs"], z["sim__linear_paper"]
    assert obs.shape == sim.shape == (scores["methods"]["linear_paper"]["overall"]["n"],)
    assert np.corrcoef(obs, sim)[0, 1] == pytest.approx(
        scores["methods"]["linear_paper"]["overall"]["pearson"], abs=1e-9)


def test_removal_test_removes_each_methods_own_top_proponents(workspace):
  root, _, files = workspace
  manifest = json.loads((root / "counterfactuals" / "removal_test" /
                         "manifest.json").read_text())
  params, _ = fit_params.load_fit(root, "linear_paper")
  base = traces.read_run(root, manifest[0]["base_run"])
  effects = np.asarray(attribution.removal_effects(
      params.A, params.B, kind="linear",
      batches=rollout.ids_to_positions(base.curriculum, params.train_ids),
      initial_losses=base.losses[0]))
  for entry in manifest:
    col = list(base.test_ids).index(entry["target_id"])
    top = np.argsort(-effects[col])[:2]
    assert entry["removed_ids"] == sorted(int(params.train_ids[i]) for i in top)
    assert entry["predicted_rise"] == pytest.approx(float(effects[col, top].sum()), rel=1e-5)
    run = traces.read_run(root, bench.run_id(entry["name"]))
    assert not np.isin(run.curriculum, entry["removed_ids"]).any()
    assert run.curriculum.shape == base.curriculum.shape         # masked


def test_scoring_names_runs_that_are_not_edits(workspace):
  root, _, _ = workspace
  with pytest.raises(ValueError, match="run 'run_000' has no metadata.counterfactual"):
    bank.score_workspace(root, run_ids=["run_000"], write=False)
