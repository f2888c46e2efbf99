"""Tasks: any seqio task's examples as pools, model features, span-corruption pretraining.

`load_pools(name, module, *, train_split, test_split, ...)` is how every consumer gets a
run's examples: it imports `module` (T5X's MIXTURE_OR_TASK_MODULE: the dotted path of the
python module that registers the task, or None), looks `name` (MIXTURE_OR_TASK_NAME) up with
`seqio.get_mixture_or_task`, and reads the train pool from one split and the test examples
from another, in the split's order (no shuffling, no truncation). Ids: the integer feature
`id` when the task has one, else the example's index in its split. `pools_metadata` gives
the run.json keys that get the same pools back in another process; `pools_from_metadata`
reads them back (run.json files written before those keys existed: the built-in countryinfo
tasks of `country_tasks`, whose data comes from `task_data`).

`encode_examples` turns examples into the seqio EncDecFeatureConverter(pack=False) features:
the token ids the task produced, or for plain dicts (examples files) seqio.ByteVocabulary(
extra_ids=100): token = UTF-8 byte + 3, pad 0, EOS 1, UNK 2, and the 100 sentinel ids 358,
357, ... at the top of the 359-id vocabulary (tests/tasks_test.py checks it against seqio).

seqio (and tensorflow, ~4 s to import) is imported only when `load_pools` first runs.
"""

from __future__ import annotations

import difflib
import functools
import importlib
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from simfluence_jax.training.task_data import Example  # re-exported: the agreed interface
from simfluence_jax.training.task_data import pretraining_text
from simfluence_jax.training.task_data import TaskPools

__all__ = ["Example", "TaskPools", "load_pools", "pools_metadata", "pools_from_metadata",
           "get_pools", "check_vocabulary", "encode_examples", "pretraining_text",
           "pretraining_batches", "span_corrupt", "COUNTRY_MODULE"]

# The module registering the built-in countryinfo tasks (an ordinary seqio task module).
COUNTRY_MODULE = "simfluence_jax.training.country_tasks"

PAD_ID, EOS_ID, NUM_SPECIAL = 0, 1, 3
EXTRA_IDS = 100
VOCAB_SIZE = NUM_SPECIAL + 256 + EXTRA_IDS   # 359 == seqio.ByteVocabulary(100).vocab_size
NOISE_DENSITY, MEAN_NOISE_SPAN_LENGTH = 0.15, 3.0


def tokenize(text: str) -> np.ndarray:
  """ByteVocabulary ids of text, without EOS: int32 [len(utf-8 bytes)]."""
  return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + NUM_SPECIAL


def detokenize(ids) -> str:
  """Inverse of tokenize; drops pad/EOS/UNK and sentinel ids (as ByteVocabulary.decode)."""
  ids = [int(i) - NUM_SPECIAL for i in np.asarray(ids).reshape(-1)
         if NUM_SPECIAL <= int(i) < NUM_SPECIAL + 256]
  return bytes(ids).decode("utf-8", errors="ignore")


def _field(example, name: str):
  return example[name] if isinstance(example, dict) else getattr(example, name)


def _pad_rows(rows: Sequence[np.ndarray], length: int) -> np.ndarray:
  out = np.zeros((len(rows), length), np.int32)
  for r, row in enumerate(rows):
    out[r, :len(row)] = row
  return out


def _model_features(inputs: Sequence[np.ndarray], targets: Sequence[np.ndarray], *,
                    input_length: int, target_length: int) -> dict[str, np.ndarray]:
  """Rows already end in EOS -> EncDecFeatureConverter(pack=False) features."""
  enc = _pad_rows(inputs, input_length)                          # [b, Li]
  dec_target = _pad_rows(targets, target_length)                 # [b, Lt]
  dec_input = np.zeros_like(dec_target)                          # shift right, BOS = 0
  dec_input[:, 1:] = dec_target[:, :-1]
  return {"encoder_input_tokens": enc, "decoder_input_tokens": dec_input,
          "decoder_target_tokens": dec_target,
          "decoder_loss_weights": (dec_target != PAD_ID).astype(np.float32)}


def _tokens(example, field: str) -> tuple[np.ndarray, str]:
  """(token ids [len], how they were made): the task's own ids, else byte-tokenized + EOS."""
  own = getattr(example, f"{field[:-1]}_tokens", None) if not isinstance(example, dict) \
      else example.get(f"{field[:-1]}_tokens")
  if own is not None:
    return np.asarray(own, np.int32).reshape(-1), "as the task encodes it"
  return np.append(tokenize(_field(example, field)), np.int32(EOS_ID)), "with EOS"


def encode_examples(examples, *, input_length: int, target_length: int
                    ) -> dict[str, np.ndarray]:
  """Batch for `examples` (Example or dict with id/inputs/targets), rows in order.

  An Example from load_pools brings its task's token ids (input_tokens / target_tokens);
  an example without them (a dict read from an examples file) is byte-tokenized + EOS.
  Returns int32 encoder_input_tokens [b, input_length], decoder_input_tokens and
  decoder_target_tokens [b, target_length], float32 decoder_loss_weights [b, target_length].
  Raises ValueError naming the example id if inputs or targets do not fit: nothing is
  truncated silently.
  """
  inputs, targets = [], []
  for ex in examples:
    for field, length, out in (("inputs", input_length, inputs),
                               ("targets", target_length, targets)):
      ids, how = _tokens(ex, field)
      if len(ids) > length:
        raise ValueError(
            f"example id {_field(ex, 'id')}: {field} is {len(ids)} tokens ({how}) but "
            f"{field[:-1]}_length is {length}; raise {field[:-1].upper()}_LENGTH (the task "
            f"gin files give lengths that fit every example)")
      out.append(ids)
  return _model_features(inputs, targets, input_length=input_length,
                         target_length=target_length)


# ---------------------------------------------------------------------------------------------
# T5 span corruption (Raffel et al. 2020, t5.data.preprocessors.span_corruption semantics).
# ---------------------------------------------------------------------------------------------
def _span_counts(length: int) -> tuple[int, int]:
  """(num_noise_tokens, num_noise_spans) for a raw sequence of `length` tokens."""
  num_noise = int(np.clip(round(length * NOISE_DENSITY), 1, length - 1))
  num_spans = max(1, int(round(num_noise / MEAN_NOISE_SPAN_LENGTH)))
  return num_noise, num_spans


def raw_length_for(input_length: int, target_length: int) -> int:
  """Largest raw token count whose corrupted inputs and targets (+ EOS) both fit.

  inputs = raw - noise + spans (one sentinel per span) + EOS; targets = noise + spans + EOS.
  """
  best = 0
  for n in range(2, 4 * input_length):
    noise, spans = _span_counts(n)
    if n - noise + spans + 1 <= input_length and noise + spans + 1 <= target_length:
      best = n
  if best == 0:
    raise ValueError(f"input_length={input_length}, target_length={target_length} leave no "
                     "room for span corruption")
  return best


def _segment(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
  """Random split of num_items into num_segments non-empty lengths (uniform over splits)."""
  cuts = np.sort(rng.choice(np.arange(1, num_items), num_segments - 1, replace=False))
  return np.diff(np.concatenate([[0], cuts, [num_items]]))


def noise_mask(length: int, rng: np.random.Generator) -> np.ndarray:
  """bool [length]: spans alternate non-noise, noise, ...; starts with non-noise."""
  num_noise, num_spans = _span_counts(length)
  num_spans = min(num_spans, num_noise, length - num_noise)
  noise = _segment(num_noise, num_spans, rng)
  nonnoise = _segment(length - num_noise, num_spans, rng)
  mask = np.zeros(length, bool)
  start = 0
  for a, b in zip(nonnoise, noise):
    mask[start + a:start + a + b] = True
    start += a + b
  return mask


def span_corrupt(tokens: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, targets) without EOS: noise span i -> sentinel VOCAB_SIZE-1-i in inputs;
  targets = sentinel i followed by noise span i, for every span (t5 convention)."""
  tokens = np.asarray(tokens, np.int32)
  inputs, targets, span = [], [], -1
  for pos, (tok, is_noise) in enumerate(zip(tokens, mask)):
    if is_noise:
      if pos == 0 or not mask[pos - 1]:
        span += 1
        sentinel = VOCAB_SIZE - 1 - span
        inputs.append(sentinel)
        targets.append(sentinel)
      targets.append(tok)
    else:
      inputs.append(tok)
  if span + 1 > EXTRA_IDS:
    raise ValueError(f"{span + 1} noise spans exceed the {EXTRA_IDS} sentinel ids")
  return np.asarray(inputs, np.int32), np.asarray(targets, np.int32)


def pretraining_batches(*, batch_size: int, input_length: int, target_length: int,
                        seed: int, prompted_fraction: float = 0.0
                        ) -> Iterator[dict[str, np.ndarray]]:
  """Infinite iterator of pretraining batches (the encode_examples keys).

  Span corruption on pretraining_text: each pass shuffles the sentences (rng =
  default_rng(seed)), joins them with spaces into one byte stream, and cuts it into chunks of
  raw_length_for(input_length, target_length) tokens; every chunk is span-corrupted (noise
  density 0.15, mean span length 3) and ends in EOS.
  prompted_fraction: the share of each batch (rounded) taken instead from the T0-like
  multitask prompts (task_data.prompted_examples: yes/no and free-text questions over the
  countryinfo facts, the fine-tuned tasks' examples held out), cycled in shuffled passes.
  0 is the span-corruption-only start. Deterministic per seed.
  """
  if not 0.0 <= prompted_fraction <= 1.0:
    raise ValueError(f"prompted_fraction must be in [0, 1], got {prompted_fraction}")
  num_prompted = int(round(prompted_fraction * batch_size))
  span = _span_batches(batch_size=batch_size - num_prompted, input_length=input_length,
                       target_length=target_length, seed=seed) if num_prompted < batch_size \
      else None
  prompted = _prompted_batches(num_prompted, input_length=input_length,
                               target_length=target_length, seed=seed) if num_prompted else None
  while True:
    parts = [next(it) for it in (span, prompted) if it is not None]
    yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _prompted_batches(batch_size: int, *, input_length: int, target_length: int,
                      seed: int) -> Iterator[dict[str, np.ndarray]]:
  from simfluence_jax.training import task_data  # pylint: disable=g-import-not-at-top
  examples = task_data.prompted_examples()
  rng = np.random.default_rng([seed, 1])
  while True:
    order = rng.permutation(len(examples))
    for b in range(len(order) // batch_size):
      rows = [examples[i] for i in order[b * batch_size:(b + 1) * batch_size]]
      yield encode_examples([Example(id=0, inputs=e["inputs"], targets=e["targets"])
                             for e in rows], input_length=input_length,
                            target_length=target_length)


def _span_batches(*, batch_size: int, input_length: int, target_length: int,
                  seed: int) -> Iterator[dict[str, np.ndarray]]:
  rng = np.random.default_rng(seed)
  sentences = pretraining_text()
  raw = raw_length_for(input_length, target_length)
  while True:
    order = rng.permutation(len(sentences))
    stream = tokenize(" ".join(sentences[i] for i in order))
    chunks = stream[:len(stream) // raw * raw].reshape(-1, raw)
    for b in range(len(chunks) // batch_size):
      inputs, targets = [], []
      for chunk in chunks[b * batch_size:(b + 1) * batch_size]:
        i, t = span_corrupt(chunk, noise_mask(raw, rng))
        inputs.append(np.append(i, np.int32(EOS_ID)))
        targets.append(np.append(t, np.int32(EOS_ID)))
      yield _model_features(inputs, targets, input_length=input_length,
                            target_length=target_length)


# ---------------------------------------------------------------------------------------------
# Any seqio task or mixture -> TaskPools (seqio imported lazily).
# ---------------------------------------------------------------------------------------------
TOKEN_FEATURES = ("inputs", "targets")   # the EncDecFeatureConverter's task features
MAX_ID = 2**31 - 1                       # curricula hold ids as int32


def import_task_module(module: str | None) -> None:
  """Imports MIXTURE_OR_TASK_MODULE (it registers its tasks when imported); None: nothing."""
  if module is None:
    return
  if not isinstance(module, str) or not module.strip():
    raise ValueError(f"MIXTURE_OR_TASK_MODULE must be a dotted module path or None, got "
                     f"{module!r}")
  try:
    importlib.import_module(module)
  except Exception as e:  # pylint: disable=broad-except  any failure while it registers
    raise ValueError(f"MIXTURE_OR_TASK_MODULE {module!r} cannot be imported "
                     f"({type(e).__name__}: {e}); it must be a module on PYTHONPATH (or in "
                     "the working directory) that registers the task") from None


def _lookup(name: str, module: str | None):
  """The registered seqio Task or Mixture `name`, after importing `module`."""
  import seqio  # pylint: disable=g-import-not-at-top
  import_task_module(module)
  names = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
  if name not in names:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.0)
    raise ValueError(f"unknown seqio task or mixture {name!r} (MIXTURE_OR_TASK_NAME) after "
                     f"importing MIXTURE_OR_TASK_MODULE={module!r}; the most similar of the "
                     f"{len(names)} registered: {close}")
  task = seqio.get_mixture_or_task(name)
  features = task.output_features
  for key in TOKEN_FEATURES:
    if key not in features:
      raise ValueError(f"task {name!r}: its output features {sorted(features)} lack {key!r}; "
                       "the encoder-decoder needs 'inputs' and 'targets'")
    if features[key].rank != 1:
      raise ValueError(f"task {name!r}: output feature {key!r} has rank "
                       f"{features[key].rank}; token sequences (rank 1) are needed")
  return task


def _text(value: Any) -> str:
  value = value.item() if isinstance(value, np.ndarray) else value
  return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _jsonable(value: Any) -> Any:
  """A feature value as JSON (Example.meta): bytes -> str, arrays -> lists, numpy -> python."""
  if isinstance(value, np.ndarray):
    return [_jsonable(v) for v in value.tolist()] if value.ndim else _jsonable(value.item())
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="replace")
  if isinstance(value, list):
    return [_jsonable(v) for v in value]
  return value


def _example(task, row: Mapping[str, Any], ex_id: int) -> Example:
  """One preprocessed seqio example -> Example: the task's token ids, the texts (the
  `<feature>_pretokenized` copies seqio's tokenize keeps, else the vocabulary's decoding),
  every other feature in meta (with the task's name)."""
  features = task.output_features
  texts, tokens = {}, {}
  for key in TOKEN_FEATURES:
    ids = [int(t) for t in np.asarray(row[key]).reshape(-1)]
    tokens[key] = tuple(ids)
    pre = row.get(f"{key}_pretokenized")
    texts[key] = _text(pre) if pre is not None else str(features[key].vocabulary.decode(ids))
  skip = {"id", *features, *(f"{k}_pretokenized" for k in features)}
  meta = {"task": task.name,
          **{k: _jsonable(v) for k, v in sorted(row.items()) if k not in skip}}
  return Example(id=ex_id, inputs=texts["inputs"], targets=texts["targets"], meta=meta,
                 input_tokens=tokens["inputs"], target_tokens=tokens["targets"])


def _read_split(task, name: str, split: str, limit: int | None, role: str
                ) -> tuple[Example, ...]:
  """The first `limit` (None: all) examples of a split, in its order, with their ids.

  A Mixture's split is its tasks' splits concatenated in the mixture's (name) order; mixing
  rates are ignored (Simfluence samples its own curricula).
  """
  import seqio  # pylint: disable=g-import-not-at-top
  if split not in task.splits:
    raise ValueError(f"task {name!r} has no split {split!r} (its {role} split: "
                     f"run_experiment.{role}_split); its splits: {sorted(task.splits)}")
  parts = task.tasks if isinstance(task, seqio.Mixture) else [task]
  rows, has_id = [], True
  for part in parts:
    if split not in part.splits or (limit is not None and len(rows) >= limit):
      continue
    ds = part.get_dataset(None, split=split, use_cached=False, shuffle=False, seed=0,
                          num_epochs=1, trim_output_features=False)   # no truncation
    spec = ds.element_spec.get("id")
    if spec is not None and (not spec.dtype.is_integer or spec.shape.rank != 0):
      raise ValueError(f"task {part.name!r} split {split!r}: feature 'id' is "
                       f"{spec.dtype.name} of shape {spec.shape}; example ids must be one "
                       "integer per example (or drop the feature: ids are then indices)")
    has_id &= spec is not None
    if limit is not None:
      ds = ds.take(limit - len(rows))
    rows += [(part, row) for row in ds.as_numpy_iterator()]
  out, seen = [], {}
  for index, (part, row) in enumerate(rows):
    ex_id = int(row["id"]) if has_id else index
    if not 0 <= ex_id <= MAX_ID:
      raise ValueError(f"task {name!r} split {split!r}: example {index} has id {ex_id}; "
                       f"ids must be integers in [0, {MAX_ID}]")
    if ex_id in seen:
      raise ValueError(f"task {name!r} split {split!r}: id {ex_id} repeats (examples "
                       f"{seen[ex_id]} and {index} of the split); the 'id' feature must be "
                       "unique within a split")
    seen[ex_id] = index
    out.append(_example(part, row, ex_id))
  return tuple(out)


@functools.lru_cache(maxsize=16)
def load_pools(name: str, module: str | None = None, *, train_split: str, test_split: str,
               pool_size: int | None = None, num_test_examples: int | None = None,
               subset_size: int = 1) -> TaskPools:
  """A seqio task's (or mixture's) train pool and test examples (cached; read-only).

  module: imported first (MIXTURE_OR_TASK_MODULE; None: the task is registered already).
  train_split / test_split: the splits the pool and the test examples come from.
  pool_size / num_test_examples: the first that many examples of each split (None: all).
  subset_size: examples each run draws from the pool (the run protocol's need).
  Ids: the integer feature `id` when the task has one, else the index in the split. Every
  Example carries the task's token ids; TaskPools.vocab_size is the larger of the inputs /
  targets vocabularies' sizes. Raises ValueError (one line) for an unknown task (naming the
  most similar registered ones), a module that cannot be imported, a missing split (listing
  the task's), a split too small for the protocol, and an id that repeats in a split.
  """
  if pool_size is not None and pool_size < subset_size:
    raise ValueError(f"pool_size={pool_size} is smaller than subset_size={subset_size} (the "
                     "examples each run draws from the pool)")
  task = _lookup(name, module)
  train = _read_split(task, name, train_split, pool_size, "train")
  need = max(subset_size, pool_size or 1)
  if len(train) < need:
    raise ValueError(
        f"task {name!r}: train split {train_split!r} has {len(train)} examples; the run "
        f"protocol needs {need} (subset_size={subset_size} train examples per run"
        f"{f', pool_size={pool_size}' if pool_size else ''})")
  test = _read_split(task, name, test_split, num_test_examples, "test")
  need = 1 if num_test_examples is None else max(num_test_examples, 1)
  if len(test) < need:
    raise ValueError(
        f"task {name!r}: test split {test_split!r} has {len(test)} examples; the run "
        f"protocol needs {need} (num_test_examples={num_test_examples} test examples)")
  vocab_size = max(int(task.output_features[k].vocabulary.vocab_size) for k in TOKEN_FEATURES)
  return TaskPools(name=name, train=train, test=test, module=module, train_split=train_split,
                   test_split=test_split, vocab_size=vocab_size)


def pools_metadata(pools: TaskPools) -> dict[str, Any]:
  """The run.json metadata keys from which pools_from_metadata gets `pools` back."""
  return {"task": pools.name, "task_module": pools.module, "train_split": pools.train_split,
          "test_split": pools.test_split, "pool_size": len(pools.train),
          "num_test_examples": len(pools.test)}


def pools_from_metadata(metadata: Mapping[str, Any]) -> TaskPools:
  """The pools of a run written by simfluence_jax.train, from its run.json metadata.

  A run written before these keys existed gets the defaults of that time: task_module
  COUNTRY_MODULE, splits "train" / "validation", the whole splits.
  """
  if not isinstance(metadata.get("task"), str):
    raise ValueError(f"run.json metadata has no task name ('task': {metadata.get('task')!r}); "
                     "only runs written by simfluence_jax.train know their examples")
  return load_pools(metadata["task"], metadata.get("task_module", COUNTRY_MODULE),
                    train_split=metadata.get("train_split", "train"),
                    test_split=metadata.get("test_split", "validation"),
                    pool_size=metadata.get("pool_size"),
                    num_test_examples=metadata.get("num_test_examples"))


def get_pools(task_name: str) -> TaskPools:
  """A built-in countryinfo task's whole pools, through load_pools like any seqio task."""
  return load_pools(task_name, COUNTRY_MODULE, train_split="train", test_split="validation")


def check_vocabulary(pools: TaskPools, model_vocab_size: int) -> None:
  """Raises ValueError unless the model's embedding covers the task's vocabulary."""
  if pools.vocab_size is not None and pools.vocab_size > model_vocab_size:
    raise ValueError(f"task {pools.name!r}: its output features' vocabulary has "
                     f"{pools.vocab_size} ids but model_config.vocab_size is "
                     f"{model_vocab_size}; set model_config.vocab_size >= {pools.vocab_size} "
                     "(and pretrain that model)")
