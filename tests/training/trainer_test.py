"""Tests of the vmapped multi-run trainer and its checkpoints, on a tiny stand-in model.

The stand-in (mean of token embeddings -> vocab logits, optional IA3 scale) has the same
variable collections and batch keys as models.t5, so every trainer path is exercised in
well under a second; tests of the real T5 path are in tests/binaries/train_test.py.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simfluence_jax.training import checkpoints
from simfluence_jax.training import trainer as trainer_lib

V, D, L = 11, 8, 3


class _BagModel(nn.Module):
  use_ia3: bool = False

  @nn.compact
  def __call__(self, tokens, deterministic=True):
    h = nn.Embed(V, D)(tokens).mean(axis=1)                       # [b, D]
    if self.use_ia3:
      h = h * self.variable("ia3", "scale", jnp.ones, (D,)).value
    h = nn.Dropout(0.5)(h, deterministic=deterministic)
    return nn.Dense(V)(jnp.tanh(h))                               # [b, V]


def _loss_fn(model):
  def loss_fn(variables, batch, rng):
    kwargs = {} if rng is None else {"rngs": {"dropout": rng}}
    logits = model.apply(variables, batch["encoder_input_tokens"],
                         deterministic=rng is None, **kwargs)       # [b, V]
    logp = jax.nn.log_softmax(logits)
    tok = jnp.take_along_axis(logp[:, None, :], batch["decoder_target_tokens"][..., None],
                              axis=-1)[..., 0]                      # [b, L]
    w = batch["decoder_loss_weights"]
    return -(tok * w).sum(-1) / jnp.maximum(w.sum(-1), 1.0)
  return loss_fn


def _examples(n, seed):
  rng = np.random.default_rng(seed)
  return {
      "encoder_input_tokens": jnp.asarray(rng.integers(1, V, (n, L)), jnp.int32),
      "decoder_input_tokens": jnp.asarray(rng.integers(1, V, (n, L)), jnp.int32),
      "decoder_target_tokens": jnp.asarray(rng.integers(1, V, (n, L)), jnp.int32),
      # first target token always weighted, the rest at random
      "decoder_loss_weights": jnp.asarray(
          np.c_[np.ones((n, 1)), rng.integers(0, 2, (n, L - 1))], jnp.float32),
  }


POOL, TEST = _examples(10, 0), _examples(5, 1)


@functools.lru_cache(maxsize=None)   # one Trainer (so one compile) per configuration
def _setup(*, tuning="full", optimizer="adam", use_ia3=False, dropout=False, mesh=None,
           record_chunk=1):
  model = _BagModel(use_ia3=use_ia3)
  variables = model.init(jax.random.PRNGKey(0), POOL["encoder_input_tokens"][:2])
  trainer = trainer_lib.Trainer(_loss_fn(model), trainer_lib.make_optimizer(optimizer, 0.05),
                                dropout=dropout, mesh=mesh, record_chunk=record_chunk)
  return model, variables, trainer


def _train(positions, *, tuning="full", optimizer="adam", use_ia3=False, dropout=False,
           mesh=None, seed=0, record_chunk=1):
  _, variables, trainer = _setup(tuning=tuning, optimizer=optimizer, use_ia3=use_ia3,
                                 dropout=dropout, mesh=mesh, record_chunk=record_chunk)
  positions = np.asarray(positions, np.int32)
  state = trainer_lib.init_state(variables, num_runs=positions.shape[0], tuning=tuning,
                                 optimizer=trainer.optimizer, seed=seed)
  state = trainer_lib.place(state, mesh)
  progress = trainer_lib.Progress.empty(positions.shape[0], positions.shape[1], 5)
  return trainer_lib.train_group(trainer, state, progress, positions=positions, pool=POOL,
                                 test_batch=TEST, mesh=mesh)


CURRICULA = np.array([
    [[0, 1], [2, 3], [4, 5], [6, -1], [7, 8]],
    [[9, 8], [7, 6], [5, 4], [3, 2], [1, 0]],
    [[3, 3], [1, -1], [2, 5], [-1, -1], [-1, -1]],   # T = 3, then padding to the group's T = 5
], np.int32)


def test_vmapped_runs_match_runs_trained_alone():
  # Run 2 is shorter (T=3) and padded with no-op steps in the group.
  _, together = _train(CURRICULA)
  for r in range(3):
    t_r = 3 if r == 2 else 5
    _, alone = _train(CURRICULA[r:r + 1, :t_r])
    np.testing.assert_allclose(together.losses[r, :t_r + 1], alone.losses[0], rtol=0, atol=1e-5)
    assert np.all(np.isfinite(together.losses[r]))
  # Losses move: training happened.
  assert np.abs(together.losses[:, -1] - together.losses[:, 0]).max() > 1e-3


def test_all_pad_step_is_exact_noop_for_params_and_adam_state():
  _, variables, trainer = _setup()
  state = trainer_lib.init_state(variables, num_runs=2, tuning="full",
                                 optimizer=trainer.optimizer, seed=0)
  state, _, _ = trainer.train_step(state, jnp.array([[0, 1], [2, 3]], jnp.int32), POOL, TEST)
  before = jax.tree.map(np.asarray, (state.trainable, state.opt_state))
  state, loss, test = trainer.train_step(state, jnp.full((2, 2), -1, jnp.int32), POOL, TEST)
  after = jax.tree.map(np.asarray, (state.trainable, state.opt_state))
  jax.tree.map(np.testing.assert_array_equal, before, after)
  np.testing.assert_array_equal(np.asarray(loss), 0.0)
  assert trainer.train_step._cache_size() == 1  # recompilation guard


def test_short_batch_averages_over_its_real_examples():
  _, padded = _train([[[4, -1], [2, 7]]])
  _, dense = _train([[[4, 4], [2, 7]]])   # mean over [4, 4] == mean over [4]
  np.testing.assert_allclose(padded.losses, dense.losses, rtol=0, atol=1e-6)
  np.testing.assert_allclose(padded.train_losses, dense.train_losses, rtol=0, atol=1e-6)


def test_recorded_loss_equals_recomputation_from_run_checkpoint(tmp_path):
  model, variables, trainer = _setup()
  state = trainer_lib.init_state(variables, num_runs=3, tuning="full",
                                 optimizer=trainer.optimizer, seed=0)
  progress = trainer_lib.Progress.empty(3, 5, 5)
  saved = []

  def on_save(s, p):
    checkpoints.save_run_checkpoints(tmp_path, ["a", "b", "c"], s)
    saved.append(int(s.step))

  trainer_lib.train_group(trainer, state, progress, positions=CURRICULA, pool=POOL,
                          test_batch=TEST, save_steps=trainer_lib.tracin_steps(5, 2),
                          on_save=on_save)
  assert saved == [3, 5] and checkpoints.all_steps(tmp_path / "b") == [3, 5]
  loaded = checkpoints.load_variables(tmp_path / "b", 3)
  direct = _loss_fn(model)(loaded, TEST, None)
  np.testing.assert_allclose(progress.losses[1, 3], np.asarray(direct), rtol=1e-6, atol=1e-6)
  with pytest.raises(FileNotFoundError, match="no checkpoint_<step>"):
    checkpoints.load_variables(tmp_path / "zz")


def test_ia3_trains_only_ia3_and_shares_frozen_params():
  _, variables, trainer = _setup(tuning="ia3", use_ia3=True)
  state = trainer_lib.init_state(variables, num_runs=3, tuning="ia3",
                                 optimizer=trainer.optimizer, seed=0)
  assert state.frozen["params"]["Dense_0"]["kernel"].shape == (D, V)  # not replicated
  progress = trainer_lib.Progress.empty(3, 5, 5)
  state, progress = trainer_lib.train_group(trainer, state, progress, positions=CURRICULA,
                                            pool=POOL, test_batch=TEST)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, variables["params"]),
               jax.tree.map(np.asarray, state.frozen["params"]))
  scale = np.asarray(state.trainable["ia3"]["scale"])
  assert scale.shape == (3, D) and np.abs(scale - 1).max() > 1e-3
  assert np.abs(scale[0] - scale[1]).max() > 1e-4   # runs diverge
  assert np.abs(progress.losses[:, -1] - progress.losses[:, 0]).max() > 1e-3


def test_same_seed_gives_bit_identical_traces_with_adafactor():
  _, a = _train(CURRICULA, optimizer="adafactor", dropout=True, seed=3)
  _, b = _train(CURRICULA, optimizer="adafactor", dropout=True, seed=3)
  np.testing.assert_array_equal(a.losses, b.losses)
  _, c = _train(CURRICULA, optimizer="adafactor", dropout=True, seed=4)
  assert not np.array_equal(a.losses, c.losses)  # the seed reaches dropout


def test_resume_from_group_checkpoint_is_bit_identical(tmp_path):
  # With dropout, so the restored per-run rng matters too.
  _, variables, trainer = _setup(optimizer="adafactor", dropout=True)
  full_state, full = _train(CURRICULA, optimizer="adafactor", dropout=True, seed=3)

  def fresh():
    return (trainer_lib.init_state(variables, num_runs=3, tuning="full",
                                   optimizer=trainer.optimizer, seed=3),
            trainer_lib.Progress.empty(3, 5, 5))

  state, progress = fresh()
  checkpoints.check_group(tmp_path, "g", {"runs": ["a", "b", "c"]})
  on_save = lambda s, p: checkpoints.save_group(tmp_path, "g", s, p)
  trainer_lib.train_group(trainer, state, progress, positions=CURRICULA[:, :2], pool=POOL,
                          test_batch=TEST, save_steps=[1, 2], on_save=on_save)
  template_state, template_progress = fresh()
  state, progress = checkpoints.restore_group(tmp_path, "g", template_state, template_progress)
  assert int(state.step) == 2 and np.isnan(progress.losses[:, 3:]).all()
  assert checkpoints.all_steps(checkpoints.group_dir(tmp_path, "g")) == [1, 2]
  state, progress = trainer_lib.train_group(trainer, state, progress, positions=CURRICULA,
                                            pool=POOL, test_batch=TEST)
  np.testing.assert_array_equal(progress.losses, full.losses)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.opt_state),
               jax.tree.map(np.asarray, full_state.opt_state))
  with pytest.raises(ValueError, match="different experiment"):
    checkpoints.check_group(tmp_path, "g", {"runs": ["a"]})


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs >= 2 (host) devices")
def test_sharded_runs_axis_matches_single_device():
  mesh = trainer_lib.runs_mesh(4, jax.devices()[:2])
  positions = np.concatenate([CURRICULA, CURRICULA[:1, ::-1]])
  state, sharded = _train(positions, mesh=mesh)
  assert state.trainable["params"]["Dense_0"]["kernel"].sharding.spec[0] == "runs"
  _, single = _train(positions)
  np.testing.assert_allclose(sharded.losses, single.losses, rtol=0, atol=1e-6)


def test_recording_is_invariant_to_run_chunking():
  _, one_at_a_time = _train(CURRICULA, tuning="ia3", use_ia3=True, record_chunk=1)
  _, vmapped = _train(CURRICULA, tuning="ia3", use_ia3=True, record_chunk=None)
  np.testing.assert_allclose(one_at_a_time.losses, vmapped.losses, rtol=0, atol=1e-6)


def test_tracin_steps():
  assert trainer_lib.tracin_steps(64, 10) == [7, 13, 20, 26, 32, 39, 45, 52, 58, 64]
  assert trainer_lib.tracin_steps(3, 10) == [1, 2, 3]
  assert trainer_lib.tracin_steps(5, 0) == []
