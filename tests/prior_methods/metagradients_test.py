"""Exact metagradients (prior_methods/metagradients.py) against independent references.

  * central finite differences of real retraining (the vmapped Trainer, its slot weights
    moved by ±ε), in float64 on a tiny T5 (model, loss and optimizer all float64), for IA3 and
    full tuning under Adam and Adafactor: relative error ≤ 1e-5 (measured ~1e-8);
  * forward mode (directional) = reverse mode (final_grads) contracted with the direction;
  * a masked removal retrained for real (the slot a pad) against the first-order prediction:
    the remainder is of higher order (it falls ≥ 4× when the weight change halves);
  * the edit directions (masked / aligned / reweighted) built by hand, and the exactness of
    the homotopy's end: replaying w0 + Δw equals training the edited curriculum;
  * the one-step derivatives of adding an example against finite differences of one step.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simfluence_jax.prior_methods import metagradients as mg
from simfluence_jax.training import trainer as trainer_lib
from simfluence_jax.training.models import t5
from tests.training import trainer_test as bag

T, K, P, M = 4, 2, 8, 3
# Step 3 is short (slot 1 a pad): its weight moves pool row 0 in, as the trainer's weights do.
POSITIONS = np.array([[0, 1], [2, 3], [4, -1], [5, 6]], np.int32)
EPS = 1e-6   # central differences: truncation ~ε², rounding ~1e-16/ε, both ≪ 1e-5


@pytest.fixture(scope="module", autouse=True)
def _release_compiled():
  # The float64 executables of this module are large; free them for the rest of the suite.
  yield
  _t5_setup.cache_clear()
  _bag_setup.cache_clear()
  jax.clear_caches()


def _t5_examples(n, seed):
  rng = np.random.default_rng(seed)
  tgt = rng.integers(2, 32, (n, 3))
  return {"encoder_input_tokens": jnp.asarray(rng.integers(2, 32, (n, 5)), jnp.int32),
          "decoder_input_tokens": jnp.asarray(np.c_[np.zeros((n, 1), int), tgt[:, :-1]],
                                              jnp.int32),
          "decoder_target_tokens": jnp.asarray(tgt, jnp.int32),
          "decoder_loss_weights": jnp.asarray(np.c_[np.ones((n, 2)), rng.integers(0, 2, (n, 1))],
                                              jnp.float64)}


@functools.lru_cache(maxsize=None)   # one Metagradients and one Trainer per configuration
def _t5_setup(tuning, optimizer):
  cfg = t5.T5Config(vocab_size=32, emb_dim=8, num_heads=2, head_dim=4, mlp_dim=16,
                    num_encoder_layers=1, num_decoder_layers=1, dtype="float64")
  model = t5.Transformer(cfg, use_ia3=tuning == "ia3")
  variables = t5.init_variables(cfg, jax.random.PRNGKey(0), use_ia3=tuning == "ia3",
                                input_length=5, target_length=3)
  variables = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), variables)
  if tuning == "ia3":   # away from the all-ones init, so IA3 gradients are generic
    rng = np.random.default_rng(1)
    variables["ia3"] = jax.tree.map(
        lambda x: x + 0.2 * jnp.asarray(rng.normal(size=x.shape)), variables["ia3"])
  loss_fn = trainer_lib.t5_loss_fn(model)
  opt = trainer_lib.make_optimizer(optimizer, 0.05 if optimizer == "adam" else 0.1)
  return (variables, mg.Metagradients(loss_fn, opt), trainer_lib.Trainer(loss_fn, opt),
          _t5_examples(P, 0), _t5_examples(M, 1))


def _retrain(trainer, variables, tuning, pool, test, positions, weights):
  """Real retraining: the Trainer's jitted vmapped step, one run per row of weights [R,T,S]
  -> test losses [R, T+1, m] after every step."""
  weights = np.asarray(weights, np.float64)
  state = trainer_lib.init_state(variables, num_runs=weights.shape[0], tuning=tuning,
                                 optimizer=trainer.optimizer, seed=0)
  out = [trainer.record(state, test)]
  pos = jnp.asarray(np.broadcast_to(positions, (weights.shape[0],) + positions.shape))
  for t in range(positions.shape[0]):
    state, _, rec = trainer.train_step(state, pos[:, t], pool, test, jnp.asarray(weights[:, t]))
    out.append(rec)
  return np.stack([np.asarray(o) for o in out], axis=1)


def _args(variables, tuning, pool, test):
  trainable, frozen = trainer_lib.split_variables(variables, tuning)
  return trainable, frozen, pool, test


W0 = (POSITIONS >= 0).astype(np.float64)
LIVE = np.ones(T, bool)


@pytest.mark.parametrize("tuning,optimizer", [("ia3", "adam"), ("ia3", "adafactor"),
                                              ("full", "adam"), ("full", "adafactor")])
def test_final_grads_match_central_finite_differences_of_retraining(x64, tuning, optimizer):
  variables, grads, trainer, pool, test = _t5_setup(tuning, optimizer)
  final, g = grads.final_grads(*_args(variables, tuning, pool, test), jnp.asarray(POSITIONS),
                               jnp.asarray(W0), jnp.asarray(LIVE), chunk=M)
  g = np.asarray(g)                                                      # [m, T, S]
  # Every (t, s): runs with w_ts ± ε, all in one vmapped group.
  slots = [(t, s) for t in range(T) for s in range(K)]
  weights = np.repeat(W0[None], 2 * len(slots), axis=0)
  for i, (t, s) in enumerate(slots):
    weights[2 * i, t, s] += EPS
    weights[2 * i + 1, t, s] -= EPS
  losses = _retrain(trainer, variables, tuning, pool, test, POSITIONS,
                    np.concatenate([W0[None], weights]))
  np.testing.assert_allclose(final, losses[0, -1], rtol=0, atol=1e-12)   # replay = training
  fd = (losses[1::2, -1] - losses[2::2, -1]) / (2 * EPS)                 # [slots, m]
  want = np.stack([g[:, t, s] for t, s in slots])
  assert np.abs(want).max() > 1e-4                                       # not all zero
  rel = np.abs(fd - want).max() / np.abs(want).max()
  assert rel <= 1e-5, rel


def test_forward_mode_equals_reverse_mode_and_finite_differences_at_every_step(x64):
  variables, grads, trainer, pool, test = _t5_setup("ia3", "adam")
  args = _args(variables, "ia3", pool, test)
  dw = np.random.default_rng(2).normal(size=(2, T, K))
  dw /= np.linalg.norm(dw, axis=(1, 2), keepdims=True)     # unit directions
  primal, tangent = grads.directional(*args, jnp.asarray(POSITIONS), jnp.asarray(W0),
                                      jnp.asarray(LIVE), jnp.asarray(dw), record_every=2)
  _, g = grads.final_grads(*args, jnp.asarray(POSITIONS), jnp.asarray(W0), jnp.asarray(LIVE),
                           chunk=M)
  contracted = np.einsum("mts,ets->em", np.asarray(g), dw)
  np.testing.assert_allclose(np.asarray(tangent)[:, -1], contracted, rtol=1e-10, atol=1e-13)
  losses = _retrain(trainer, variables, "ia3", pool, test, POSITIONS,
                    np.stack([W0 + EPS * dw[0], W0 - EPS * dw[0], W0]))
  np.testing.assert_allclose(np.asarray(primal), losses[2, ::2], rtol=0, atol=1e-12)
  fd = (losses[0, ::2] - losses[1, ::2]) / (2 * EPS)                     # steps 0, 2, 4
  np.testing.assert_allclose(np.asarray(tangent)[0], fd, rtol=0,
                             atol=1e-5 * np.abs(fd).max())
  np.testing.assert_array_equal(np.asarray(tangent)[:, 0], 0.0)         # L_0 has no weights


def test_masked_removal_matches_retraining_to_first_order(x64):
  variables, grads, trainer, pool, test = _t5_setup("ia3", "adam")
  _, g = grads.final_grads(*_args(variables, "ia3", pool, test), jnp.asarray(POSITIONS),
                           jnp.asarray(W0), jnp.asarray(LIVE), chunk=M)
  t, s = 1, 0
  pred = -np.asarray(g)[:, t, s]                      # Δw_ts = −1: the slot removed
  masked = POSITIONS.copy()
  masked[t, s] = -1                                   # the bench's masked removal, for real
  removed = _retrain(trainer, variables, "ia3", pool, test, masked,
                     (masked >= 0)[None].astype(np.float64))[0, -1]
  hs = 0.5 ** np.arange(6)                            # weight changes h: w_ts = 1 − h
  weights = W0[None].repeat(hs.size + 1, 0)
  weights[1:, t, s] = 1.0 - hs
  runs = _retrain(trainer, variables, "ia3", pool, test, POSITIONS, weights)[:, -1]
  # w_ts = 0 IS the masked removal (the step averages over the slots left).
  np.testing.assert_allclose(runs[1], removed, rtol=0, atol=1e-12)
  err = np.array([np.abs(runs[1 + i] - runs[0] - h * pred).max() for i, h in enumerate(hs)])
  # First order: below h = 1/2 the remainder falls ≥ 3× per halving of h (2nd order: 4×;
  # from h = 1 to 1/2 only 2.7×: a whole slot of a batch of 2 is not small), and at
  # h = 1/32 the prediction is within 5% of the observed change.
  assert np.all(err[2:] < err[1:-1] / 3), err
  obs = runs[-1] - runs[0]
  assert np.abs(obs).max() > 1e-4
  assert err[-1] < 0.05 * np.abs(obs).max(), (err, obs)


# ------------------------------------------------------------------- edit directions (numpy)
IDS = {i: i - 10 for i in range(10, 20)}                 # train id -> pool row


def test_masked_direction_marks_removed_slots_with_duplicates_and_pads():
  base = np.array([[10, 11], [12, 12], [13, -1]])
  edited = np.array([[-1, 11], [12, -1], [-1, -1]])
  d = mg.edit_direction(base, edited, IDS)
  assert d.form == "masked"
  np.testing.assert_array_equal(d.positions, [[0, 1], [2, 2], [3, -1]])
  np.testing.assert_array_equal(d.weights, [[1, 1], [1, 1], [1, 0]])
  np.testing.assert_array_equal(d.delta, [[-1, 0], [0, -1], [-1, 0]])
  np.testing.assert_array_equal(d.live, [True, True, True])


def test_aligned_direction_puts_both_batches_side_by_side():
  base = np.array([[10, 11], [12, -1]])
  edited = np.array([[12, -1], [10, 11]])            # reversed
  d = mg.edit_direction(base, edited, IDS)
  assert d.form == "aligned"
  np.testing.assert_array_equal(d.positions, [[0, 1, 2, -1], [2, -1, 0, 1]])
  np.testing.assert_array_equal(d.weights, [[1, 1, 0, 0], [1, 0, 0, 0]])
  np.testing.assert_array_equal(d.delta, [[-1, -1, 1, 0], [-1, 0, 1, 1]])


def test_reweighted_direction_scales_each_id_where_the_base_saw_it():
  base = np.array([[10, 11], [10, 12], [13, -1]])
  repacked = np.array([[11, 12], [13, -1]])          # 10 removed, shorter
  np.testing.assert_array_equal(mg.edit_direction(base, repacked, IDS).delta,
                                [[-1, 0], [-1, 0], [0, 0]])
  repeated = np.array([[10, 11], [10, 10], [12, 10], [13, -1]])   # 10: 2 -> 4 times
  d = mg.edit_direction(base, repeated, IDS)
  assert d.form == "reweighted"
  np.testing.assert_array_equal(d.delta, [[1, 0], [1, 0], [0, 0]])
  with pytest.raises(ValueError, match=r"\[14\] that its base never saw"):
    mg.edit_direction(base, np.array([[14, 11]]), IDS)
  with pytest.raises(ValueError, match=r"not in the pool"):
    mg.edit_direction(base, np.array([[99, 11]]), IDS)


def test_pad_steps_appends_noop_steps():
  d = mg.pad_steps(mg.edit_direction(np.array([[10, 11]] * 3), np.array([[10, -1]] * 3), IDS),
                   4)
  assert d.positions.shape == (4, 2) and not d.live[3] and d.live[:3].all()
  np.testing.assert_array_equal(d.delta[3], 0.0)


# ---------------------------------------------- homotopy ends and one-step derivatives (bag)
@functools.lru_cache(maxsize=None)
def _bag_setup():
  model = bag._BagModel()                                   # pylint: disable=protected-access
  variables = model.init(jax.random.PRNGKey(0), bag.POOL["encoder_input_tokens"][:2])
  variables = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), dict(variables))
  loss_fn = bag._loss_fn(model)                             # pylint: disable=protected-access
  opt = trainer_lib.make_optimizer("adam", 0.05)
  return variables, mg.Metagradients(loss_fn, opt), trainer_lib.Trainer(loss_fn, opt)


@pytest.mark.parametrize("edited", [
    [[3, 4], [0, 1], [-1, 2]],                             # aligned (other batches)
    [[0, -1], [2, -1], [-1, 3]],                           # masked
])
def test_homotopy_end_is_the_edited_run(x64, edited):
  variables, grads, trainer = _bag_setup()
  base = np.array([[0, 1], [2, 3], [4, 3]])
  ids = {i: i for i in range(10)}
  d = mg.edit_direction(base, np.array(edited), ids)
  assert d.form == ("aligned" if len(edited[0]) and edited[0][0] == 3 else "masked")
  trainable, frozen = trainer_lib.split_variables(variables, "full")
  end = grads.replay(trainable, frozen, bag.POOL, bag.TEST, jnp.asarray(d.positions),
                     jnp.asarray(d.weights + d.delta), jnp.asarray(d.live), record_every=1)
  want = _retrain(trainer, variables, "full", bag.POOL, bag.TEST, np.array(edited, np.int32),
                  (np.array(edited)[None] >= 0).astype(np.float64))[0]
  np.testing.assert_allclose(np.asarray(end), want, rtol=0, atol=1e-12)


def test_step_derivatives_match_finite_differences_of_one_step(x64):
  variables, grads, trainer = _bag_setup()
  trainable, frozen = trainer_lib.split_variables(variables, "full")
  before = np.array([[0, 1], [2, 3]], np.int32)
  w_before = np.ones((2, 2))
  batch, extra = np.array([4, 5], np.int32), np.array([6, 7, 4], np.int32)
  state = grads.state_at(trainable, frozen, bag.POOL, jnp.asarray(before),
                         jnp.asarray(w_before), jnp.ones(2, bool))
  got = np.asarray(grads.step_derivatives(state[0], state[1], frozen, bag.POOL, bag.TEST,
                                          jnp.asarray(batch), jnp.ones(2), jnp.asarray(extra)))
  for j, p in enumerate(extra):
    pos = np.concatenate([np.c_[before, [-1, -1]], [[*batch, p]]]).astype(np.int32)
    w = np.concatenate([np.c_[w_before, [0, 0]], [[1, 1, 0]]])
    runs = _retrain(trainer, variables, "full", bag.POOL, bag.TEST, pos,
                    np.stack([w + np.pad([[0, 0, 0], [0, 0, 0], [0, 0, EPS]], 0),
                              w - np.pad([[0, 0, 0], [0, 0, 0], [0, 0, EPS]], 0)]))
    fd = (runs[0, -1] - runs[1, -1]) / (2 * EPS)
    assert np.abs(fd).max() > 1e-4
    np.testing.assert_allclose(got[j], fd, rtol=0, atol=1e-7 * np.abs(fd).max())
