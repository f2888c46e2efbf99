"""train_runs against a plain loop: each run trained alone, one python step at a time
(jax.grad + optax by hand on the batch's real examples: no vmap, no trainer, no slot weights;
the step is jitted only for speed), on the same tiny Flax model.

The model: tanh MLP classifier with a per-unit "adapter" scale in its own collection, so a
"LoRA-style" choice (train only that collection) and a predicate (train only the head) are
both real choices. The pool's ids are non-contiguous and unsorted (ids are not positions).
The curricula cover: a short batch (-1 pads), an all-pad step mid-run (a no-op: the loop
simply skips it, so a trainer that advanced Adam's step count would drift), runs of different
lengths and batch sizes in one group.
"""

import functools
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from simfluence_jax.traces import contract as traces
from simfluence_jax.training import distributed
from simfluence_jax.training import runs
from simfluence_jax.training import trainer as trainer_lib

D, H, C, LR = 3, 6, 3, 0.1
POOL_IDS = np.array([503, 17, 42, 8, 260, 99, 1000, 3, 71, 64], np.int64)
TEST_IDS = np.array([7, 900, 12, 5], np.int64)
CURRICULA = {
    "long": np.array([[503, 17, 42], [8, 260, 99], [1000, 3, -1], [71, 64, 503],
                      [17, 17, 8], [260, 3, 64]], np.int32),            # T=6, k=3
    "short": np.array([[42, 8], [-1, -1], [64, -1]], np.int32),        # T=3: pad step, pads
    "mid": np.array([[3, 71], [99, 1000], [503, 42], [8, 17]], np.int32),  # T=4, k=2
}
HEAD_ONLY = lambda path: path[:2] == ("params", "Dense_1")


class _Adapted(nn.Module):
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, deterministic=True):
    h = jnp.tanh(nn.Dense(H)(x))                                    # [b, H]
    h = h * self.variable("adapter", "scale", jnp.ones, (H,)).value
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    return nn.Dense(C)(h)                                           # [b, C]


def _data():
  rng = np.random.default_rng(0)
  n, m = len(POOL_IDS), len(TEST_IDS)
  x = rng.normal(size=(n + m, D)).astype(np.float32)
  y = rng.integers(0, C, n + m).astype(np.int32)
  return {"x": x[:n], "y": y[:n]}, {"x": x[n:], "y": y[n:]}


POOL, TEST = _data()


def _xent(logits, batch):
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])   # [b]


@functools.lru_cache(maxsize=None)
def _setup(dropout=0.0):
  """(model, variables, loss_fn): one loss_fn object per model, so train_runs reuses its
  compiled steps across tests (as a user's repeated calls would)."""
  model = _Adapted(dropout)
  variables = model.init(jax.random.PRNGKey(1), POOL["x"][:1])
  # Adapter scales away from 1, so they matter to the frozen/trained comparison.
  variables["adapter"]["scale"] = jnp.linspace(0.5, 1.5, H)
  return model, variables, runs.flax_loss(model, _xent, deterministic="deterministic")


OPTIMIZER = optax.adam(LR)


def _train(ws, *, trainable="all", dropout=0.0, seed=0, record_every=1, overwrite=False,
           curricula=None, **kwargs):
  _, variables, loss_fn = _setup(dropout)
  return runs.train_runs(
      ws, loss_fn=loss_fn, variables=variables, optimizer=OPTIMIZER, pool=POOL,
      pool_ids=POOL_IDS, test=TEST, test_ids=TEST_IDS,
      curricula=CURRICULA if curricula is None else curricula, trainable=trainable,
      seed=seed, dropout=dropout > 0, record_every=record_every,
      metadata={"model": "adapted_mlp"}, overwrite=overwrite, **kwargs)


@functools.lru_cache(maxsize=None)
def _reference(trainable) -> dict[str, np.ndarray]:
  """The plain loop: {run_id: float32 [T+1, m] test losses}, each run trained alone."""
  model, variables, _ = _setup()
  flat = traverse_util.flatten_dict(variables)
  if trainable == "all":
    keep = lambda path: True
  elif isinstance(trainable, str):
    keep = lambda path: path[0] == trainable
  else:
    keep = trainable
  frozen = {p: v for p, v in flat.items() if not keep(p)}
  full = lambda tr: traverse_util.unflatten_dict({**frozen, **tr})
  row_of = {int(i): p for p, i in enumerate(POOL_IDS)}
  opt = optax.adam(LR)

  @jax.jit   # only for speed (eager dispatch compiles every op: ~7 s); one run, one step
  def step(tr, opt_state, x, y):
    mean_loss = lambda tr: jnp.mean(_xent(model.apply(full(tr), x), {"y": y}))
    updates, opt_state = opt.update(jax.grad(mean_loss)(tr), opt_state, tr)
    return optax.apply_updates(tr, updates), opt_state

  test_losses = jax.jit(lambda tr: _xent(model.apply(full(tr), TEST["x"]), TEST))
  out = {}
  for run_id, batches in CURRICULA.items():
    trained = {p: v for p, v in flat.items() if keep(p)}
    opt_state = opt.init(trained)
    losses = [test_losses(trained)]
    for batch in batches:
      rows = [row_of[int(i)] for i in batch if i >= 0]   # the real examples only
      if rows:   # an all-pad step changes nothing
        trained, opt_state = step(trained, opt_state, POOL["x"][rows], POOL["y"][rows])
      losses.append(test_losses(trained))
    out[run_id] = np.asarray(np.stack(losses), np.float32)
  return out


@pytest.mark.parametrize("trainable", ["all", "adapter", HEAD_ONLY],
                         ids=["all", "adapter_collection", "head_predicate"])
def test_traces_equal_each_run_trained_alone_in_a_plain_loop(tmp_path, trainable):
  assert _train(tmp_path, trainable=trainable) == list(CURRICULA)
  assert traces.list_runs(tmp_path) == sorted(CURRICULA)
  for run_id, batches in CURRICULA.items():
    trace = traces.read_run(tmp_path, run_id)
    # Its own shape (not the group's T=6, k=3), its own curriculum and the ids it consumed.
    np.testing.assert_array_equal(trace.curriculum, batches)
    assert trace.losses.shape == (len(batches) + 1, len(TEST_IDS))
    assert trace.losses.dtype == np.float32
    np.testing.assert_array_equal(trace.train_ids, np.unique(batches[batches >= 0]))
    np.testing.assert_array_equal(trace.test_ids, TEST_IDS)
    np.testing.assert_allclose(trace.losses, _reference(trainable)[run_id],
                               rtol=1e-5, atol=1e-5)
  # The short run's all-pad step 2 is a no-op: L_2 == L_1 exactly.
  short = traces.read_run(tmp_path, "short").losses
  np.testing.assert_array_equal(short[2], short[1])
  meta = traces.read_run(tmp_path, "long").metadata
  assert meta["model"] == "adapted_mlp" and meta["seed"] == 0
  assert meta["num_trained_params"] == {"all": D * H + H + H * C + C + H, "adapter": H}.get(
      trainable, H * C + C)
  if trainable != "all":
    # Freezing is what the comparison checks: training everything gives other losses.
    long = traces.read_run(tmp_path, "long").losses
    assert np.abs(long - _reference("all")["long"]).max() > 1e-2


def test_record_every_keeps_recorded_rows_and_each_runs_last_step(tmp_path):
  texts = lambda ids: [{"id": int(i), "inputs": f"x{i}", "targets": "y"} for i in ids]
  _train(tmp_path, record_every=4, train_examples=texts(POOL_IDS),
         test_examples=texts(TEST_IDS))
  assert traces.read_examples(tmp_path, "test")[900] == {"id": 900, "inputs": "x900",
                                                         "targets": "y"}
  assert sorted(traces.read_examples(tmp_path, "train")) == sorted(POOL_IDS.tolist())
  for run_id, batches in CURRICULA.items():
    trace = traces.read_run(tmp_path, run_id)
    t = len(batches)
    # Every 4th step and every run's last step (3, 4, 6), for the whole group.
    recorded = [s for s in (0, 3, 4, 6) if s <= t]
    ref = _reference("all")[run_id]
    np.testing.assert_allclose(trace.losses[recorded], ref[recorded], rtol=1e-5, atol=1e-5)
    others = [s for s in range(t + 1) if s not in recorded]
    assert np.isnan(trace.losses[others]).all()
    assert trace.metadata["record_every"] == 4


def _files(ws: pathlib.Path) -> dict:
  return {str(p.relative_to(ws)): p.read_bytes()
          for p in sorted((ws / "runs").rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_the_seed_reaches_dropout(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  _train(a, dropout=0.5, seed=3)
  devices = jax.local_devices()
  mesh = trainer_lib.runs_mesh(distributed.padded_num_runs(len(CURRICULA), len(devices)),
                               devices)
  trainer = runs._trainer(_setup(0.5)[2], OPTIMIZER, True, mesh)  # pylint: disable=protected-access
  compiled = trainer.train_step._cache_size()
  _train(b, dropout=0.5, seed=3)
  assert trainer.train_step._cache_size() == compiled == 1   # the second call compiled nothing
  assert _files(a) == _files(b) and len(_files(a)) == 3 * len(CURRICULA)
  first = traces.read_run(a, "long").losses
  # Another seed: other dropout masks, so other losses; into `a` only with overwrite=True,
  # and a refused write leaves every run as it was.
  with pytest.raises(traces.TraceError, match="already exist with different content"):
    _train(a, dropout=0.5, seed=4)
  assert _files(a) == _files(b)
  _train(a, dropout=0.5, seed=4, overwrite=True)
  assert np.abs(traces.read_run(a, "long").losses[1:] - first[1:]).max() > 1e-4
  np.testing.assert_array_equal(traces.read_run(a, "long").losses[0], first[0])


@pytest.mark.parametrize("curricula, error, match", [
    ({"r0": CURRICULA["mid"], "bad": [[503, 17], [8, 4242]]}, ValueError,
     r"run 'bad': step 2 \(row 1\) consumes id 4242, which is not in pool_ids"),
    ({"bad": [[0, 1]]}, ValueError, r"run 'bad': step 1 \(row 0\) consumes id 0"),  # rows
    ({"bad": [[503, 17], [-1, 8]]}, traces.TraceError,
     r"run 'bad'.*step 2 \(row 1\) has -1 padding before an id"),
    ({"bad": [[-1, -1]]}, traces.TraceError, r"run 'bad'.*every step is all padding"),
    ({"bad": [503, 17]}, ValueError, r"run 'bad' must be a 2-D array"),
    ({"bad": np.zeros((0, 2), np.int32)}, ValueError, r"run 'bad' must be a 2-D array"),
    ({"bad": [[503.0, 17.0]]}, ValueError, r"run 'bad' must hold integer ids"),
    ({"bad/run": [[503]]}, traces.TraceError, r"run_id 'bad/run' is not a valid name"),
])
def test_bad_curricula_fail_before_training_naming_run_and_step(tmp_path, curricula, error,
                                                                match):
  with pytest.raises(error, match=match):
    _train(tmp_path, curricula=curricula)
  assert not (tmp_path / "runs").exists()


def test_bad_inputs_say_what_is_wrong(tmp_path):
  model, variables, loss_fn = _setup()
  kwargs = dict(loss_fn=loss_fn, variables=variables,
                optimizer=optax.sgd(LR), pool=POOL, pool_ids=POOL_IDS, test=TEST,
                test_ids=TEST_IDS, curricula={"a": [[503]]})
  with pytest.raises(ValueError, match=r"pool\['y'\] has shape \(9,\)"):
    runs.train_runs(tmp_path, **{**kwargs, "pool": {**POOL, "y": POOL["y"][:9]}})
  with pytest.raises(ValueError, match=r"no collection \['lora'\].*\['adapter', 'params'\]"):
    runs.train_runs(tmp_path, **kwargs, trainable="lora")
  with pytest.raises(ValueError, match="selects no leaf"):
    runs.train_runs(tmp_path, **kwargs, trainable=lambda path: False)
  with pytest.raises(traces.TraceError, match="duplicate id 17"):
    runs.train_runs(tmp_path, **{**kwargs, "pool_ids": np.r_[POOL_IDS[:-1], 17]})
  with pytest.raises(ValueError, match=r"one loss per example, shape \[4\].*got shape \(\)"):
    runs.train_runs(tmp_path, **{**kwargs, "loss_fn": lambda v, b, r: _xent(
        model.apply(v, b["x"]), b).mean()})
  with pytest.raises(ValueError, match=r"run_metadata names runs \['z'\]"):
    runs.train_runs(tmp_path, **kwargs, run_metadata={"z": {}})
  with pytest.raises(ValueError, match=r"test_examples must hold one dict per id \(missing "
                                       r"\[5\], not an id \[6\]"):
    runs.train_runs(tmp_path, **kwargs, test_examples=[
        {"id": i, "inputs": "", "targets": ""} for i in (7, 900, 12, 6)])
  assert not (tmp_path / "runs").exists()


def test_a_diverged_run_is_an_error_naming_run_step_and_example(tmp_path):
  # A loss over a plain params pytree (no Flax): exp(w) x_0², finite at w = 0, inf after a
  # step of gradient *ascent* of rate 1e3 (w = 1e3 mean(x_0²) >> 88).
  loss_fn = lambda v, batch, rng: jnp.exp(v["params"]["w"]) * batch["x"][:, 0] ** 2
  with pytest.raises(ValueError, match=r"run 'up' diverged: the loss of test example 7 "
                                       r"after step 1 is inf"):
    runs.train_runs(tmp_path, loss_fn=loss_fn, variables={"params": {"w": jnp.zeros(())}},
                    optimizer=optax.sgd(-1e3), pool=POOL, pool_ids=POOL_IDS, test=TEST,
                    test_ids=TEST_IDS, curricula={"up": [[42, 8], [42, 8]]})
  assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(len(jax.local_devices()) < 2, reason="needs >= 2 (host) devices")
def test_runs_sharded_over_two_devices_equal_one_device(tmp_path):
  one, two = tmp_path / "one", tmp_path / "two"
  _, variables, loss_fn = _setup()
  for ws, devices in ((one, jax.local_devices()[:1]), (two, jax.local_devices()[:2])):
    runs.train_runs(ws, loss_fn=loss_fn, variables=variables, optimizer=OPTIMIZER, pool=POOL, pool_ids=POOL_IDS, test=TEST,
                    test_ids=TEST_IDS, curricula=CURRICULA, devices=devices)  # 3 -> 4 runs
  for run_id in CURRICULA:
    np.testing.assert_allclose(traces.read_run(two, run_id).losses,
                               traces.read_run(one, run_id).losses, rtol=1e-6, atol=1e-6)
