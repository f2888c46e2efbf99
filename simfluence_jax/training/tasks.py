"""Tasks: offline example pools, byte-level encoding, span-corruption pretraining, seqio tasks.

Data comes from `task_data` (countryinfo, no downloads). Encoding follows
seqio.ByteVocabulary(extra_ids=100): token = UTF-8 byte + 3, pad 0, EOS 1, UNK 2, and the 100
sentinel ids 358, 357, ... at the top of the 359-id vocabulary. `encode_examples` is a pure
numpy fast path equal to seqio's EncDecFeatureConverter(pack=False) on the registered Task
(tests/tasks_test.py checks that).

seqio (and tensorflow, ~10 s to import) is imported only by `register_seqio_tasks()`, which
is idempotent: call it before `seqio.get_mixture_or_task(name)`.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from simfluence_jax.training.task_data import Example  # re-exported: the agreed interface
from simfluence_jax.training.task_data import get_pools
from simfluence_jax.training.task_data import ID_BASES
from simfluence_jax.training.task_data import POOL_SIZES
from simfluence_jax.training.task_data import pretraining_text
from simfluence_jax.training.task_data import TASK_NAMES
from simfluence_jax.training.task_data import TaskPools

__all__ = ["Example", "TaskPools", "get_pools", "encode_examples", "pretraining_text",
           "pretraining_batches", "span_corrupt", "register_seqio_tasks", "TASK_NAMES",
           "ID_BASES", "POOL_SIZES"]

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


def encode_examples(examples, *, input_length: int, target_length: int
                    ) -> dict[str, np.ndarray]:
  """Batch for `examples` (Example or dict with id/inputs/targets), rows in order.

  Returns int32 encoder_input_tokens [b, input_length], decoder_input_tokens and
  decoder_target_tokens [b, target_length], float32 decoder_loss_weights [b, target_length].
  Raises ValueError naming the example id if inputs+EOS or targets+EOS do not fit: nothing is
  truncated silently.
  """
  inputs, targets = [], []
  for ex in examples:
    for field, length, out in (("inputs", input_length, inputs),
                               ("targets", target_length, targets)):
      ids = np.append(tokenize(_field(ex, field)), np.int32(EOS_ID))
      if len(ids) > length:
        raise ValueError(
            f"example id {_field(ex, 'id')}: {field} is {len(ids)} tokens with EOS but "
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
                        seed: int) -> Iterator[dict[str, np.ndarray]]:
  """Infinite iterator of span-corrupted batches (the encode_examples keys) on pretraining_text.

  Each pass shuffles the sentences (rng = default_rng(seed)), joins them with spaces into one
  byte stream, and cuts it into chunks of raw_length_for(input_length, target_length)
  tokens; every chunk is span-corrupted (noise density 0.15, mean span length 3) and ends in
  EOS. Deterministic per seed.
  """
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
# seqio registration (imports seqio lazily).
# ---------------------------------------------------------------------------------------------
def _dataset_fn(task_name: str):
  def dataset_fn(split: str, shuffle_files: bool = False, seed: int | None = None):
    del shuffle_files, seed  # in-memory, fixed order
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    pools = get_pools(task_name)
    examples = {"train": pools.train, "test": pools.test}[split]
    return tf.data.Dataset.from_tensor_slices({
        "id": np.asarray([e.id for e in examples], np.int64),
        "inputs": [e.inputs for e in examples],
        "targets": [e.targets for e in examples]})
  return dataset_fn


def register_seqio_tasks() -> tuple[str, ...]:
  """Registers one seqio.Task per task name (skips names already registered)."""
  import seqio  # pylint: disable=g-import-not-at-top
  vocab = seqio.ByteVocabulary(extra_ids=EXTRA_IDS)
  features = {"inputs": seqio.Feature(vocabulary=vocab, add_eos=True),
              "targets": seqio.Feature(vocabulary=vocab, add_eos=True)}
  for name in TASK_NAMES:
    if name in seqio.TaskRegistry.names():
      continue
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(_dataset_fn(name), splits=("train", "test")),
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
        output_features=features)
  return TASK_NAMES
