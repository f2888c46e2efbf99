"""Tests for tasks.py / task_data.py: pools, ids, labels vs countryinfo, encoding, span corruption.

Only test_encode_examples_equals_seqio_feature_converter imports seqio (~10 s).
"""

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import gin
import numpy as np
import pytest
from countryinfo import CountryInfo

from simfluence_jax.cli import gin_setup
from simfluence_jax.training import tasks

GIN_DIR = gin_setup.GIN_CONFIGS_DIR


def _digest(pools) -> str:
  rows = [(e.id, e.inputs, e.targets, e.meta) for e in pools.train + pools.test]
  return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


@pytest.mark.parametrize("name", tasks.TASK_NAMES)
def test_pool_sizes_ids_and_disjointness(name):
  pools = tasks.get_pools(name)
  n_train, n_test = tasks.POOL_SIZES[name]
  assert (len(pools.train), len(pools.test)) == (n_train, n_test)
  if name == "country_manyshot":
    assert n_train >= 1536
  train_ids, test_ids = [e.id for e in pools.train], [e.id for e in pools.test]
  base_train, base_test = tasks.ID_BASES[name]
  assert train_ids[0] == base_train and test_ids[0] == base_test   # ids, not positions
  assert len(set(train_ids) | set(test_ids)) == n_train + n_test
  assert all(isinstance(i, int) and i >= 0 for i in train_ids + test_ids)
  inputs = [e.inputs for e in pools.train + pools.test]
  assert len(set(inputs)) == len(inputs)   # no test example duplicates a train example
  key = lambda e: (e.meta["country"], e.meta["relation"], e.meta.get("subject"))
  assert not {key(e) for e in pools.train} & {key(e) for e in pools.test}
  for e in pools.train + pools.test:       # fits input_length 64 / target_length 16
    assert len(e.inputs.encode()) + 1 <= 64 and len(e.targets.encode()) + 1 <= 16, e
    json.dumps(e.meta)


def test_id_ranges_disjoint_across_tasks():
  ids = [e.id for n in tasks.TASK_NAMES for p in [tasks.get_pools(n)] for e in p.train + p.test]
  assert len(ids) == len(set(ids))


def test_pools_stable_across_processes_and_hash_seeds():
  code = ("import hashlib, json; from simfluence_jax.training import task_data as t\n"
          "for n in t.TASK_NAMES:\n"
          "  p = t.get_pools(n)\n"
          "  rows = [(e.id, e.inputs, e.targets, e.meta) for e in p.train + p.test]\n"
          "  print(hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest())\n")
  outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONHASHSEED": s}).stdout.split()
          for s in ("1", "2")]
  assert outs[0] == outs[1] == [_digest(tasks.get_pools(n)) for n in tasks.TASK_NAMES]


def _holds(country: str, relation: str, value: str) -> bool:
  """Independent truth check through the public countryinfo API."""
  c = CountryInfo(country)
  if relation == "capital":
    return c.capital() == value
  if relation == "region":
    return c.region() == value
  if relation == "subregion":
    return c.subregion().casefold() == value.casefold()
  if relation == "currency":
    return value in c.currencies()
  if relation == "language":
    return value in c.languages()
  if relation == "borders":
    return CountryInfo(value).iso(3) in c.borders()
  raise AssertionError(relation)


def test_yesno_labels_are_true_against_countryinfo_and_balanced():
  pools = tasks.get_pools("country_yesno")
  for split in (pools.train, pools.test):
    assert sum(e.targets == "yes" for e in split) == len(split) // 2
    assert {e.meta["relation"] for e in split} == {"capital", "region", "subregion",
                                                    "currency", "language", "borders"}
  for e in pools.train + pools.test:
    assert e.targets in ("yes", "no")
    assert _holds(e.meta["country"], e.meta["relation"], e.meta["value"]) == (
        e.targets == "yes"), e
    assert e.meta["value"] in e.inputs.split(" H: ")[1]
  e = next(e for e in pools.train if e.meta["relation"] == "region")
  assert CountryInfo(e.meta["country"]).capital() in e.inputs.split(" H: ")[1]


def test_freetext_targets_are_an_option_and_correct():
  pools = tasks.get_pools("country_freetext")
  firsts = 0
  for e in pools.train + pools.test:
    options = e.inputs.split(" options: ")[1].split(" | ")
    assert e.targets in options and len(options) == 2 and options[0] != options[1]
    firsts += options[0] == e.targets
    wrong = options[1 - options.index(e.targets)]
    if e.meta["relation"] == "capital_of":
      assert CountryInfo(e.targets).capital() in e.inputs
      assert CountryInfo(wrong).capital() not in e.inputs
    else:
      assert _holds(e.meta["country"], e.meta["relation"], e.targets), e
      assert not _holds(e.meta["country"], e.meta["relation"], wrong), e
  assert firsts == 100   # answer position balanced over the 200 examples


def test_manyshot_answers_against_countryinfo():
  pools = tasks.get_pools("country_manyshot")
  for e in pools.train[::37] + pools.test[::7]:
    c = CountryInfo(e.targets)
    facts = c.provinces() if e.meta["relation"] == "province" else [c.capital()]
    assert e.meta["subject"] in facts and e.meta["subject"] in e.inputs


def test_encode_decode_round_trip_and_layout():
  exs = list(tasks.get_pools("country_freetext").train[:5])
  b = tasks.encode_examples(exs, input_length=64, target_length=16)
  assert {k: v.dtype for k, v in b.items()} == {
      "encoder_input_tokens": np.int32, "decoder_input_tokens": np.int32,
      "decoder_target_tokens": np.int32, "decoder_loss_weights": np.float32}
  for r, e in enumerate(exs):
    assert tasks.detokenize(b["encoder_input_tokens"][r]) == e.inputs
    assert tasks.detokenize(b["decoder_target_tokens"][r]) == e.targets
    n = len(e.targets.encode())
    assert b["decoder_target_tokens"][r, n] == 1 and b["decoder_loss_weights"][r].sum() == n + 1
    np.testing.assert_array_equal(b["decoder_input_tokens"][r, 1:n + 2],
                                  b["decoder_target_tokens"][r, :n + 1])
    assert b["decoder_input_tokens"][r, 0] == 0
  # hand-computed: "yes" = bytes 121,101,115 (+3)
  one = tasks.encode_examples([{"id": 7, "inputs": "A", "targets": "yes"}], input_length=3,
                              target_length=5)
  np.testing.assert_array_equal(one["encoder_input_tokens"], [[68, 1, 0]])
  np.testing.assert_array_equal(one["decoder_target_tokens"], [[124, 104, 118, 1, 0]])
  np.testing.assert_array_equal(one["decoder_input_tokens"], [[0, 124, 104, 118, 1]])
  np.testing.assert_array_equal(one["decoder_loss_weights"], [[1, 1, 1, 1, 0]])
  with pytest.raises(ValueError, match=f"example id {exs[0].id}: inputs"):
    tasks.encode_examples(exs, input_length=8, target_length=16)


def test_encode_examples_equals_seqio_feature_converter():
  import seqio  # pylint: disable=g-import-not-at-top
  assert tasks.register_seqio_tasks() == tasks.register_seqio_tasks()  # idempotent
  assert seqio.ByteVocabulary(extra_ids=100).vocab_size == tasks.VOCAB_SIZE
  lengths = {"inputs": 64, "targets": 16}
  for name, split in (("country_yesno", "test"), ("country_manyshot", "train")):
    ds = seqio.get_mixture_or_task(name).get_dataset(lengths, split=split, shuffle=False,
                                                     use_cached=False)
    ds = seqio.EncDecFeatureConverter(pack=False)(ds, lengths).take(6)
    got = list(ds.as_numpy_iterator())
    pool = getattr(tasks.get_pools(name), split)[:6]
    ours = tasks.encode_examples(pool, input_length=64, target_length=16)
    for key in ours:
      np.testing.assert_array_equal(np.stack([g[key] for g in got]), ours[key], err_msg=key)


def test_span_corruption_reconstructs_and_noise_density():
  rng = np.random.default_rng(0)
  raw = tasks.raw_length_for(64, 16)
  fractions = []
  for _ in range(200):
    tokens = rng.integers(3, 259, raw).astype(np.int32)
    mask = tasks.noise_mask(raw, rng)
    assert not mask[0]                         # starts with non-noise, as t5 does
    inputs, targets = tasks.span_corrupt(tokens, mask)
    sentinels = inputs[inputs >= 259]
    np.testing.assert_array_equal(sentinels, 358 - np.arange(len(sentinels)))
    np.testing.assert_array_equal(targets[targets >= 259], sentinels)
    # reconstruct: replace each sentinel in inputs by its span from targets
    spans = np.split(targets, np.flatnonzero(targets >= 259))[1:]
    span_of = {int(s[0]): s[1:] for s in spans}
    rebuilt = np.concatenate([span_of[int(t)] if t >= 259 else [t] for t in inputs])
    np.testing.assert_array_equal(rebuilt, tokens)
    fractions.append(mask.mean())
  assert abs(np.mean(fractions) - 0.15) < 0.01 and max(abs(np.array(fractions) - 0.15)) < 0.02


def test_pretraining_batches_deterministic_fit_and_cover_all_countries():
  text = tasks.pretraining_text()
  assert any("Lima is the capital of Peru." == s for s in text)
  joined = " ".join(text)
  assert all(r["name"] in joined for r in CountryInfo.all().values())
  for e in tasks.get_pools("country_manyshot").test[:20]:  # task facts are in the corpus
    assert f"{e.meta['subject']}" in joined
  it1 = tasks.pretraining_batches(batch_size=4, input_length=64, target_length=16, seed=5)
  it2 = tasks.pretraining_batches(batch_size=4, input_length=64, target_length=16, seed=5)
  it3 = tasks.pretraining_batches(batch_size=4, input_length=32, target_length=8, seed=6)
  b1, b2, b3 = next(it1), next(it2), next(it3)
  for k in b1:
    np.testing.assert_array_equal(b1[k], b2[k])
  assert b3["encoder_input_tokens"].shape == (4, 32) and b3["decoder_target_tokens"].shape == (4, 8)
  assert not np.array_equal(next(it1)["encoder_input_tokens"], b1["encoder_input_tokens"])
  tgt = b1["decoder_target_tokens"]
  assert (tgt[:, 0] == 358).all() and ((tgt == 1).sum(1) == 1).all()   # sentinel 0, one EOS
  np.testing.assert_array_equal(b1["decoder_loss_weights"], (tgt > 0).astype(np.float32))


@pytest.mark.parametrize("name", tasks.TASK_NAMES)
def test_task_gin_files(name):
  gin.clear_config()
  gin.parse_config_file(str(GIN_DIR / "tasks" / f"{name}.gin"))
  q = lambda m: gin.query_parameter(f"%{m}")
  assert q("TASK_NAME") == name
  assert (q("TRAIN_POOL_SIZE"), q("TEST_POOL_SIZE")) == tasks.POOL_SIZES[name]
  pools = tasks.get_pools(name)
  tasks.encode_examples(pools.train + pools.test, input_length=q("INPUT_LENGTH"),
                        target_length=q("TARGET_LENGTH"))
  gin.clear_config()
