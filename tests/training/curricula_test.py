"""Tests for curricula.py: the paper's sampling protocol and explicit curriculum files."""

import json
import pathlib

import gin
import numpy as np
import pytest

from simfluence_jax.cli import gin_setup
from simfluence_jax.training import curricula

POOL = np.arange(1000, 1100, dtype=np.int64)   # ids, not positions
GIN_DIR = gin_setup.GIN_CONFIGS_DIR


def _epochs(c, subset_size):
  flat = c.batches.reshape(-1)
  return [flat[i:i + subset_size] for i in range(0, len(flat), subset_size)]


def test_few_shot_protocol_each_epoch_is_a_permutation_of_the_drawn_subset():
  runs = curricula.sample_curricula(POOL, num_runs=3, subset_size=64, epochs=4.0, batch_size=4,
                                    seed=0)
  assert [c.run_id for c in runs] == ["run_000", "run_001", "run_002"]
  for c in runs:
    assert c.batches.shape == (64, 4) and c.batches.dtype == np.int32
    assert c.train_ids.dtype == np.int64 and len(c.train_ids) == 64
    assert set(c.train_ids) <= set(POOL)
    np.testing.assert_array_equal(np.unique(c.batches), c.train_ids)  # exactly its subset
    epochs = _epochs(c, 64)
    assert len(epochs) == 4
    for e in epochs:
      np.testing.assert_array_equal(np.sort(e), c.train_ids)
    assert not all(np.array_equal(epochs[0], e) for e in epochs[1:])  # reshuffled
  # different runs draw different subsets
  assert not np.array_equal(runs[0].train_ids, runs[1].train_ids)


def test_many_shot_fractional_epochs_and_padding():
  pool = np.arange(20000, 21536, dtype=np.int64)
  (c,) = curricula.sample_curricula(pool, num_runs=1, subset_size=1024, epochs=1.5,
                                    batch_size=4, seed=7)
  assert c.batches.shape == (384, 4)
  flat = c.batches.reshape(-1)
  np.testing.assert_array_equal(np.sort(flat[:1024]), c.train_ids)
  half = flat[1024:]
  assert len(half) == 512 and len(np.unique(half)) == 512 and set(half) <= set(c.train_ids)
  # short final batch: 10 examples, 1.5 epochs -> 15 seen, batch 4 -> 4 steps, last has 1 pad
  (s,) = curricula.sample_curricula(POOL, num_runs=1, subset_size=10, epochs=1.5,
                                    batch_size=4, seed=1)
  assert s.batches.shape == (4, 4)
  np.testing.assert_array_equal(s.batches[-1, 3:], [-1])
  assert (s.batches[:-1] >= 0).all() and (s.batches[-1, :3] >= 0).all()
  assert curricula.num_steps(subset_size=10, epochs=1.5, batch_size=4) == 4


def test_seeded_and_prefix_stable():
  a = curricula.sample_curricula(POOL, num_runs=2, subset_size=64, epochs=4.0, batch_size=4,
                                 seed=3)
  b = curricula.sample_curricula(POOL, num_runs=5, subset_size=64, epochs=4.0, batch_size=4,
                                 seed=3)
  for x, y in zip(a, b):   # adding runs does not change earlier runs
    np.testing.assert_array_equal(x.batches, y.batches)
  c = curricula.sample_curricula(POOL, num_runs=2, subset_size=64, epochs=4.0, batch_size=4,
                                 seed=4, run_prefix="val")
  assert c[0].run_id == "val_000"
  assert not np.array_equal(a[0].batches, c[0].batches)


def test_invalid_arguments():
  with pytest.raises(ValueError, match="subset_size"):
    curricula.sample_curricula(POOL, num_runs=1, subset_size=101, epochs=1, batch_size=4,
                               seed=0)
  with pytest.raises(ValueError, match="duplicate"):
    curricula.sample_curricula([1, 1], num_runs=1, subset_size=1, epochs=1, batch_size=1,
                               seed=0)


def test_save_and_load_round_trip(tmp_path):
  (c,) = curricula.sample_curricula(POOL, num_runs=1, subset_size=10, epochs=1.5,
                                    batch_size=4, seed=1)
  for name in ("c.npy", "c.json"):
    path = curricula.save_curriculum(tmp_path / name, c.batches)
    got = curricula.load_curriculum(path)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, c.batches)
  (tmp_path / "ragged.json").write_text(json.dumps([[1, 2], [3]]))
  with pytest.raises(ValueError, match="ragged.json.*pad short"):
    curricula.load_curriculum(tmp_path / "ragged.json")
  (tmp_path / "bad.json").write_text(json.dumps([[1, -2]]))
  with pytest.raises(ValueError, match="step 0"):
    curricula.load_curriculum(tmp_path / "bad.json")
  with pytest.raises(ValueError, match=".txt"):
    curricula.load_curriculum(tmp_path / "c.txt")


@pytest.mark.parametrize("name,steps", [("few_shot", 64), ("many_shot", 384)])
def test_run_gin_files_bind_the_protocol(name, steps):
  gin.clear_config()
  gin.parse_config_file(str(GIN_DIR / "runs" / f"{name}.gin"))
  q = lambda m: gin.query_parameter(f"%{m}")
  assert curricula.num_steps(subset_size=q("SUBSET_SIZE"), epochs=q("EPOCHS"),
                             batch_size=q("BATCH_SIZE")) == steps
  assert isinstance(q("NUM_RUNS"), int) and isinstance(q("CURRICULUM_SEED"), int)
  gin.clear_config()
