"""Tests for tasks.py / task_data.py / country_tasks.py: the built-in tasks read through seqio
equal the countryinfo makers (pinned), ids, labels vs countryinfo, run.json metadata, encoding,
span corruption. tasks.get_pools reads through seqio (imported once, ~4 s).
"""

import hashlib
import json
import os
import subprocess
import sys

import gin
import numpy as np
import pytest
from countryinfo import CountryInfo

from simfluence_jax.cli import gin_setup
from simfluence_jax.training import task_data
from simfluence_jax.training import tasks

GIN_DIR = gin_setup.GIN_CONFIGS_DIR
TASK_NAMES = task_data.TASK_NAMES
# sha256 of json.dumps([(id, inputs, targets) for train + test]) of each built-in task, as
# the makers gave them before the tasks went through seqio: the README's experiments and
# their traces depend on exactly these pools.
PINNED = {
    "country_yesno": "cc2105ee118f2e2517619073a2f59f4e4120f7e87dd30fd9872d9744f2153d7d",
    "country_freetext": "e7f7a31f0904ab57ef3bdfb90ea483c615d020d58f2e948dc229d97dd52a42f9",
    "country_manyshot": "335c6bd4573e66bf97eb5ce472025d61152dd8f57777d216a0db69aed5bb49b3",
}


def _digest(pools) -> str:
  rows = [(e.id, e.inputs, e.targets, e.meta) for e in pools.train + pools.test]
  return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


@pytest.mark.parametrize("name", TASK_NAMES)
def test_seqio_path_gives_exactly_the_makers_pools(name):
  pools = tasks.get_pools(name)   # load_pools(name, COUNTRY_MODULE, "train", "validation")
  made = task_data.country_pools(name)
  rows = lambda p: [(e.id, e.inputs, e.targets) for e in p.train + p.test]
  assert rows(pools) == rows(made)
  assert hashlib.sha256(json.dumps(rows(pools)).encode()).hexdigest() == PINNED[name]
  assert [e.meta for e in pools.train + pools.test] == [e.meta for e in made.train + made.test]
  assert (pools.module, pools.train_split, pools.test_split, pools.vocab_size) == (
      tasks.COUNTRY_MODULE, "train", "validation", tasks.VOCAB_SIZE)
  # The token ids seqio made are the byte tokenization + EOS the makers' texts give.
  for e in pools.train[:20] + pools.test[:20]:
    assert e.input_tokens == tuple(tasks.tokenize(e.inputs)) + (tasks.EOS_ID,)
    assert e.target_tokens == tuple(tasks.tokenize(e.targets)) + (tasks.EOS_ID,)


def test_run_metadata_gets_the_same_pools_back_and_old_runs_keep_working():
  pools = tasks.load_pools("country_freetext", tasks.COUNTRY_MODULE, train_split="train",
                           test_split="validation", pool_size=40, num_test_examples=7,
                           subset_size=8)
  meta = tasks.pools_metadata(pools)
  assert meta == {"task": "country_freetext", "task_module": tasks.COUNTRY_MODULE,
                  "train_split": "train", "test_split": "validation", "pool_size": 40,
                  "num_test_examples": 7}
  back = tasks.pools_from_metadata(json.loads(json.dumps(meta)))   # through run.json
  assert back.train == pools.train == tasks.get_pools("country_freetext").train[:40]
  assert back.test == pools.test and len(back.test) == 7
  # run.json written before these keys: the built-in task, its module, the whole splits.
  old = tasks.pools_from_metadata({"task": "country_yesno", "tuning": "ia3"})
  assert old == tasks.get_pools("country_yesno")
  with pytest.raises(ValueError, match="run.json metadata has no task name"):
    tasks.pools_from_metadata({"tuning": "ia3"})


@pytest.mark.parametrize("name", TASK_NAMES)
def test_pool_sizes_ids_and_disjointness(name):
  pools = tasks.get_pools(name)
  n_train, n_test = task_data.POOL_SIZES[name]
  assert (len(pools.train), len(pools.test)) == (n_train, n_test)
  if name == "country_manyshot":
    assert n_train >= 1536
  train_ids, test_ids = [e.id for e in pools.train], [e.id for e in pools.test]
  base_train, base_test = task_data.ID_BASES[name]
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
  ids = [e.id for n in TASK_NAMES for p in [tasks.get_pools(n)] for e in p.train + p.test]
  assert len(ids) == len(set(ids))


def test_pools_stable_across_processes_and_hash_seeds():
  code = ("import hashlib, json; from simfluence_jax.training import task_data as t\n"
          "for n in t.TASK_NAMES:\n"
          "  p = t.country_pools(n)\n"
          "  rows = [(e.id, e.inputs, e.targets, e.meta) for e in p.train + p.test]\n"
          "  print(hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest())\n")
  outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONHASHSEED": s}).stdout.split()
          for s in ("1", "2")]
  assert outs[0] == outs[1] == [_digest(tasks.get_pools(n)) for n in TASK_NAMES]


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
  # An Example with its task's own token ids is encoded from them, not from its text.
  own = tasks.Example(id=3, inputs="ignored", targets="", input_tokens=(9, 8, 1),
                      target_tokens=(500, 7))
  got = tasks.encode_examples([own], input_length=4, target_length=3)
  np.testing.assert_array_equal(got["encoder_input_tokens"], [[9, 8, 1, 0]])
  np.testing.assert_array_equal(got["decoder_target_tokens"], [[500, 7, 0]])
  np.testing.assert_array_equal(got["decoder_input_tokens"], [[0, 500, 7]])
  np.testing.assert_array_equal(got["decoder_loss_weights"], [[1, 1, 0]])
  with pytest.raises(ValueError, match=r"example id 3: targets is 2 tokens \(as the task "
                                       r"encodes it\) but target_length is 1"):
    tasks.encode_examples([own], input_length=4, target_length=1)


def test_encode_examples_equals_seqio_feature_converter():
  import seqio  # pylint: disable=g-import-not-at-top
  from simfluence_jax.training import country_tasks  # pylint: disable=g-import-not-at-top
  assert country_tasks.register() == country_tasks.register() == TASK_NAMES  # idempotent
  assert seqio.ByteVocabulary(extra_ids=100).vocab_size == tasks.VOCAB_SIZE
  lengths = {"inputs": 64, "targets": 16}
  for name, split in (("country_yesno", "validation"), ("country_manyshot", "train")):
    ds = seqio.get_mixture_or_task(name).get_dataset(lengths, split=split, shuffle=False,
                                                     use_cached=False)
    ds = seqio.EncDecFeatureConverter(pack=False)(ds, lengths).take(6)
    got = list(ds.as_numpy_iterator())
    pools = tasks.get_pools(name)
    pool = (pools.train if split == "train" else pools.test)[:6]
    ours = tasks.encode_examples(pool, input_length=64, target_length=16)
    as_text = tasks.encode_examples([{"id": e.id, "inputs": e.inputs, "targets": e.targets}
                                     for e in pool], input_length=64, target_length=16)
    for key in ours:
      np.testing.assert_array_equal(np.stack([g[key] for g in got]), ours[key], err_msg=key)
      np.testing.assert_array_equal(as_text[key], ours[key], err_msg=key)


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


def test_prompted_examples_hold_out_every_fine_tuned_fact_and_template():
  from simfluence_jax.training import task_data  # pylint: disable=g-import-not-at-top
  prompts = task_data.prompted_examples()
  asked = set()
  for name in TASK_NAMES:
    pools = tasks.get_pools(name)
    for e in pools.train + pools.test:
      asked |= {(e.meta.get("country"), e.meta.get(k)) for k in ("relation", "value_relation")}
  assert not {(p["country"], p["relation"]) for p in prompts} & asked
  assert not any(p["inputs"].startswith("P: ") for p in prompts)   # not the task's template
  yes = sum(p["targets"] == "yes" for p in prompts)
  no = sum(p["targets"] == "no" for p in prompts)
  assert yes > 500 and no > 500 and abs(yes - no) < 0.1 * (yes + no)   # answer formats, balanced
  assert len(prompts) - yes - no > 500                                 # and free-text questions
  assert all(len(p["inputs"].encode()) <= 63 and len(p["targets"].encode()) <= 15
             for p in prompts)
  assert task_data.prompted_examples.__wrapped__() == prompts          # deterministic


def test_pretraining_batches_mix_span_corruption_and_prompts():
  from simfluence_jax.training import task_data  # pylint: disable=g-import-not-at-top
  mixed = next(tasks.pretraining_batches(batch_size=8, input_length=64, target_length=16,
                                         seed=3, prompted_fraction=0.25))
  span = next(tasks.pretraining_batches(batch_size=6, input_length=64, target_length=16,
                                        seed=3))
  for k in span:   # the first 6 rows: the span-only stream of the same seed
    np.testing.assert_array_equal(mixed[k][:6], span[k])
  prompts = {(p["inputs"], p["targets"]) for p in task_data.prompted_examples()}
  for row in range(6, 8):   # the last 2: prompts, encoded with EOS
    enc = mixed["encoder_input_tokens"][row]
    dec = mixed["decoder_target_tokens"][row]
    pair = (tasks.detokenize(enc[enc > 1]), tasks.detokenize(dec[dec > 1]))
    assert pair in prompts, pair
  with pytest.raises(ValueError, match="prompted_fraction"):
    next(tasks.pretraining_batches(batch_size=4, input_length=64, target_length=16, seed=0,
                                   prompted_fraction=1.5))


@pytest.mark.parametrize("name", TASK_NAMES)
def test_task_gin_files(name):
  gin.clear_config()
  gin.parse_config_file(str(GIN_DIR / "tasks" / f"{name}.gin"))
  q = lambda m: gin.query_parameter(f"%{m}")
  assert q("MIXTURE_OR_TASK_NAME") == name
  assert q("MIXTURE_OR_TASK_MODULE") == tasks.COUNTRY_MODULE
  assert (q("TRAIN_POOL_SIZE"), q("TEST_POOL_SIZE")) == task_data.POOL_SIZES[name]
  pools = tasks.load_pools(name, q("MIXTURE_OR_TASK_MODULE"), train_split=q("TRAIN_SPLIT"),
                           test_split=q("TEST_SPLIT"), pool_size=q("TRAIN_POOL_SIZE"))
  assert (len(pools.train), len(pools.test)) == task_data.POOL_SIZES[name]
  tasks.encode_examples(pools.train + pools.test, input_length=q("INPUT_LENGTH"),
                        target_length=q("TARGET_LENGTH"))
  gin.clear_config()
