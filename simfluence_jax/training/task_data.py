"""Offline example pools and pretraining text generated from the `countryinfo` package.

`country_pools(name)` are the makers behind the built-in seqio tasks (`country_tasks`
registers them; every consumer reads them through `tasks.load_pools`, like any seqio task).
`Example` / `TaskPools` are the dataclasses every task's examples come in.

Everything here is deterministic: countries are sorted by name, every random choice uses a
seeded `np.random.default_rng`, and nothing iterates a dict or set in hash order. Ids are
`base + position` with per-task, per-split bases (ID_BASES), so they are stable across
processes and disjoint between tasks and splits. No seqio / tensorflow import here.

Length budget (seqio.ByteVocabulary = one token per UTF-8 byte, + EOS): inputs <= 63 bytes,
targets <= 15 bytes, so every example fits input_length=64, target_length=16.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

MAX_INPUT_BYTES = 63   # + EOS = 64 tokens
MAX_TARGET_BYTES = 15  # + EOS = 16 tokens
TASK_NAMES = ("country_yesno", "country_freetext", "country_manyshot")
# (train id base, test id base); pools are far smaller than the gaps.
ID_BASES = {"country_yesno": (1000, 5000), "country_freetext": (11000, 15000),
            "country_manyshot": (20000, 40000)}
POOL_SIZES = {"country_yesno": (100, 100), "country_freetext": (100, 100),
              "country_manyshot": (1536, 200)}   # (train, test)
_SEEDS = {"country_yesno": 101, "country_freetext": 202, "country_manyshot": 303}


@dataclasses.dataclass(frozen=True)
class Example:
  """One example: a stable id, its texts (reports) and, from a seqio task, its token ids."""
  id: int
  inputs: str
  targets: str
  # JSON-able: task, relation, country, value, ... (tests, reports); not part of the hash.
  meta: dict = dataclasses.field(default_factory=dict, hash=False)
  # Token ids as the task's output features encode them (EOS included where the feature adds
  # one), int [len]; None: tasks.encode_examples tokenizes the text with the byte vocabulary.
  input_tokens: tuple[int, ...] | None = dataclasses.field(default=None, repr=False)
  target_tokens: tuple[int, ...] | None = dataclasses.field(default=None, repr=False)


@dataclasses.dataclass(frozen=True)
class TaskPools:
  """A task's train pool and test examples, and where they came from (tasks.load_pools)."""
  name: str
  train: tuple[Example, ...]
  test: tuple[Example, ...]
  module: str | None = None         # imported before the seqio registry was read
  train_split: str | None = None
  test_split: str | None = None
  vocab_size: int | None = None     # ids of the output features' vocabularies (None: bytes)


@dataclasses.dataclass(frozen=True)
class Country:
  name: str
  capital: str
  region: str
  subregion: str
  alpha3: str
  currencies: tuple[str, ...]
  languages: tuple[str, ...]
  borders: tuple[str, ...]    # neighbour country names (only unambiguous alpha-3 codes)
  provinces: tuple[str, ...]


def _nbytes(s: str) -> int:
  return len(s.encode("utf-8"))


@functools.lru_cache(maxsize=None)
def all_country_records() -> tuple[dict, ...]:
  """Raw countryinfo records of ALL entries, sorted by name (for the pretraining corpus)."""
  from countryinfo import CountryInfo  # pylint: disable=g-import-not-at-top
  return tuple(sorted(CountryInfo.all().values(), key=lambda r: r["name"]))


@functools.lru_cache(maxsize=None)
def countries() -> tuple[Country, ...]:
  """Entries with a single capital, a region and a subregion and a unique alpha-3 code."""
  clean = [r for r in all_country_records()
           if isinstance(r.get("capital"), str) and r["capital"] and r.get("region")
           and r.get("subregion") and r.get("ISO", {}).get("alpha3")]
  codes = [r["ISO"]["alpha3"] for r in clean]
  clean = [r for r in clean if codes.count(r["ISO"]["alpha3"]) == 1]
  code_to_name = {r["ISO"]["alpha3"]: r["name"] for r in clean}
  return tuple(Country(
      name=r["name"], capital=r["capital"], region=r["region"], subregion=r["subregion"],
      alpha3=r["ISO"]["alpha3"], currencies=tuple(r.get("currencies") or ()),
      languages=tuple(r.get("languages") or ()),
      borders=tuple(sorted(code_to_name[b] for b in (r.get("borders") or ())
                           if b in code_to_name)),
      provinces=tuple(r.get("provinces") or ())) for r in clean)


# ---------------------------------------------------------------------------------------------
# Relations: sentence templates and (true value, distractor) sampling.
# ---------------------------------------------------------------------------------------------
RELATIONS = ("capital", "region", "subregion", "currency", "language", "borders")


def _true_values(c: Country, relation: str) -> tuple[str, ...]:
  return {"capital": (c.capital,), "region": (c.region,), "subregion": (c.subregion,),
          "currency": c.currencies, "language": c.languages, "borders": c.borders}[relation]


def _all_values(relation: str) -> list[str]:
  return sorted({v for c in countries() for v in _true_values(c, relation)})


def _distractor(c: Country, relation: str, rng: np.random.Generator) -> str | None:
  """A value of `relation` that is false for c (compared case-insensitively)."""
  true = {v.casefold() for v in _true_values(c, relation)} | {c.name.casefold()}
  options = [v for v in _all_values(relation) if v.casefold() not in true]
  return options[rng.integers(len(options))] if options else None


def yesno_sentence(c: Country, relation: str, value: str) -> str:
  return {"capital": f"{c.name}'s capital is {value}.",
          "region": f"{c.capital} is in {value}.",       # needs: capital -> country -> region
          "subregion": f"{c.name} is in {value}.",
          "currency": f"{c.name} pays in {value}.",
          "language": f"{c.name} speaks {value}.",
          "borders": f"{c.name} borders {value}."}[relation]


def _yesno_candidates(rng: np.random.Generator) -> list[dict]:
  out = []
  for c in countries():
    for relation in RELATIONS:
      true = _true_values(c, relation)
      false = _distractor(c, relation, rng)
      if not true or false is None:
        continue
      value_true = true[rng.integers(len(true))]
      out.append(dict(country=c, relation=relation, value_true=value_true, value_false=false))
  return out


def _make_yesno(rng: np.random.Generator, n_train: int, n_test: int) -> tuple[list, list]:
  # Each (country, relation) pair gives one example; pairs are split train / test, so the
  # two splits are disjoint in (country, relation). Labels alternate -> exactly balanced.
  examples = []
  cands = _yesno_candidates(rng)
  for j in rng.permutation(len(cands)):
    cand = cands[j]
    c, relation = cand["country"], cand["relation"]
    label = "yes" if len(examples) % 2 == 0 else "no"
    value = cand["value_true"] if label == "yes" else cand["value_false"]
    hyp = yesno_sentence(c, relation, value)
    # Premise: a true fact about the same country; the capital for the region relation.
    prem_rels = ["capital"] if relation == "region" else [
        r for r in RELATIONS if r not in (relation, "region") and _true_values(c, r)]
    prem_rel = prem_rels[rng.integers(len(prem_rels))]
    prem_vals = _true_values(c, prem_rel)
    premise = yesno_sentence(c, prem_rel, prem_vals[rng.integers(len(prem_vals))])
    inputs = f"P: {premise} H: {hyp}"
    if _nbytes(inputs) > MAX_INPUT_BYTES:
      continue
    examples.append(dict(inputs=inputs, targets=label, meta=dict(
        country=c.name, relation=relation, value=value, label=label,
        premise_relation=prem_rel)))
    if len(examples) == n_train + n_test:
      break
  return examples[:n_train], examples[n_train:]


def _freetext_question(c: Country, relation: str) -> str:
  return {"capital": f"Capital of {c.name}?", "region": f"Region of {c.capital}?",
          "subregion": f"Subregion of {c.name}?", "currency": f"Currency of {c.name}?",
          "language": f"Language of {c.name}?", "borders": f"Neighbour of {c.name}?",
          "capital_of": f"{c.capital} is the capital of?"}[relation]


def _make_freetext(rng: np.random.Generator, n_train: int, n_test: int) -> tuple[list, list]:
  # COPA/Winogrande-like: two free-text options, target = the correct option's text.
  # The answer's position is exactly balanced (alternating over the shuffled candidates).
  rels = ("capital", "region", "currency", "language", "borders", "capital_of", "subregion")
  cands = [(c, r) for c in countries() for r in rels]
  examples = []
  for j in rng.permutation(len(cands)):
    c, relation = cands[j]
    if relation == "capital_of":
      answer = c.name
      others = [o.name for o in countries() if o.name != c.name and o.region == c.region]
      wrong = others[rng.integers(len(others))] if others else None
      value_rel = "capital"
    else:
      true = _true_values(c, relation)
      if not true:
        continue
      answer = true[rng.integers(len(true))]
      wrong = _distractor(c, relation, rng)
      value_rel = relation
    if wrong is None or max(_nbytes(answer), _nbytes(wrong)) > MAX_TARGET_BYTES:
      continue
    first = len(examples) % 2 == 0
    options = (answer, wrong) if first else (wrong, answer)
    inputs = f"question: {_freetext_question(c, relation)} options: {options[0]} | {options[1]}"
    if _nbytes(inputs) > MAX_INPUT_BYTES:
      continue
    examples.append(dict(inputs=inputs, targets=answer, meta=dict(
        country=c.name, relation=relation, value_relation=value_rel, answer=answer,
        distractor=wrong, options=list(options))))
    if len(examples) == n_train + n_test:
      break
  return examples[:n_train], examples[n_train:]


def _make_manyshot(rng: np.random.Generator, n_train: int, n_test: int) -> tuple[list, list]:
  # Winogrande-scale pool of free-text questions whose answer is a country name:
  # province -> country (provinces named in exactly one country) and capital -> country.
  prov_count: dict[str, int] = {}
  cap_count: dict[str, int] = {}
  for c in countries():
    for p in set(c.provinces):
      prov_count[p] = prov_count.get(p, 0) + 1
    cap_count[c.capital] = cap_count.get(c.capital, 0) + 1
  cands = []
  for c in countries():
    if _nbytes(c.name) > MAX_TARGET_BYTES:
      continue
    if cap_count[c.capital] == 1:
      cands.append((f"Which country has the capital {c.capital}?", c.name, "capital", c.capital))
    for p in sorted(set(c.provinces)):
      if prov_count[p] == 1 and p != c.name:
        cands.append((f"Which country has the province {p}?", c.name, "province", p))
  cands = [x for x in cands if _nbytes(x[0]) <= MAX_INPUT_BYTES]
  if len(cands) < n_train + n_test:
    raise ValueError(f"country_manyshot: only {len(cands)} candidates for a pool of "
                     f"{n_train} + {n_test}")
  picked = [cands[j] for j in rng.permutation(len(cands))[:n_train + n_test]]
  examples = [dict(inputs=q, targets=a, meta=dict(country=a, relation=rel, subject=s))
              for q, a, rel, s in picked]
  return examples[:n_train], examples[n_train:]


_MAKERS = {"country_yesno": _make_yesno, "country_freetext": _make_freetext,
           "country_manyshot": _make_manyshot}


@functools.lru_cache(maxsize=None)
def country_pools(task_name: str) -> TaskPools:
  """The countryinfo maker's train pool and test examples (cached; treat as read-only).

  The data of the seqio tasks `country_tasks` registers; consumers use tasks.load_pools.
  """
  if task_name not in _MAKERS:
    raise ValueError(f"unknown task {task_name!r}; known tasks: {list(TASK_NAMES)}")
  n_train, n_test = POOL_SIZES[task_name]
  train, test = _MAKERS[task_name](np.random.default_rng(_SEEDS[task_name]), n_train, n_test)
  if (len(train), len(test)) != (n_train, n_test):
    raise ValueError(f"{task_name}: generated {len(train)} train / {len(test)} test examples, "
                     f"expected {n_train} / {n_test}")
  train_base, test_base = ID_BASES[task_name]
  mk = lambda base, exs: tuple(
      Example(id=base + i, inputs=e["inputs"], targets=e["targets"],
              meta={"task": task_name, **e["meta"]}) for i, e in enumerate(exs))
  return TaskPools(name=task_name, train=mk(train_base, train), test=mk(test_base, test))


# ---------------------------------------------------------------------------------------------
# T0-like prompted pretraining: the answer formats, never the fine-tuned examples' facts.
# ---------------------------------------------------------------------------------------------
# yes/no in two templates other than the yes/no task's "P: ... H: ...", and short free-text
# questions; each (country, relation) pair gives a true and a false statement.
_YESNO_TEMPLATES = ("Is it true that {s}?", "Question: {s} Yes or no?")


@functools.lru_cache(maxsize=None)
def prompted_examples(held_out: tuple[str, ...] = TASK_NAMES) -> tuple[dict, ...]:
  """Multitask prompts {"inputs", "targets", "country", "relation"} over countryinfo relations (T0-like: the model
  learns to answer prompts before fine-tuning), with every (country, relation) pair that a
  train or test example of a `held_out` task asks about left out, and none in the yes/no
  task's own template: fine-tuning starts knowing the answer format, not the answers.
  Deterministic (sorted countries, fixed seed)."""
  asked = set()
  for name in held_out:
    pools = country_pools(name)
    for e in pools.train + pools.test:
      rel = e.meta.get("value_relation", e.meta.get("relation"))
      asked.add((e.meta.get("country"), rel))
      asked.add((e.meta.get("country"), e.meta.get("relation")))
  rng = np.random.default_rng(404)
  out = []
  for c in countries():
    for relation in RELATIONS:
      true = _true_values(c, relation)
      if not true or (c.name, relation) in asked:
        continue
      false = _distractor(c, relation, rng)
      for label, value in (("yes", true[0]), ("no", false)):
        if value is None:
          continue
        template = _YESNO_TEMPLATES[rng.integers(len(_YESNO_TEMPLATES))]
        sentence = yesno_sentence(c, relation, value)
        inputs = template.format(s=sentence if "Question" in template else sentence[:-1])
        if _nbytes(inputs) <= MAX_INPUT_BYTES:
          out.append({"inputs": inputs, "targets": label, "country": c.name,
                      "relation": relation})
      question = _freetext_question(c, relation)
      if _nbytes(true[0]) <= MAX_TARGET_BYTES and _nbytes(question) + 3 <= MAX_INPUT_BYTES:
        out.append({"inputs": f"Q: {question}", "targets": true[0], "country": c.name,
                    "relation": relation})
  return tuple(out)


# ---------------------------------------------------------------------------------------------
# Pretraining corpus: facts about ALL countryinfo entries, including every fact the tasks ask.
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def pretraining_text() -> tuple[str, ...]:
  """Sentences stating countryinfo facts for all entries (sorted, deterministic)."""
  records = all_country_records()
  code_to_names: dict[str, list[str]] = {}
  for r in records:
    code = (r.get("ISO") or {}).get("alpha3")
    if code:
      code_to_names.setdefault(code, []).append(r["name"])
  out = []
  for r in records:
    n = r["name"]
    caps = r.get("capital")
    caps = [caps] if isinstance(caps, str) else list(caps or [])
    for cap in caps:
      if cap:
        out += [f"{n}'s capital is {cap}.", f"{cap} is the capital of {n}."]
    if r.get("region"):
      out.append(f"{n} is in {r['region']}.")
      out += [f"{cap} is in {r['region']}." for cap in caps if cap]
    if r.get("subregion"):
      out.append(f"{n} is in {r['subregion']}.")
    out += [f"{n} pays in {cur}." for cur in r.get("currencies") or ()]
    out += [f"{n} speaks {lang}." for lang in r.get("languages") or ()]
    for code in r.get("borders") or ():
      out += [f"{n} borders {m}." for m in code_to_names.get(code, ())]
    out += [f"{p} is a province of {n}." for p in r.get("provinces") or ()]
    if r.get("population"):
      out.append(f"{n} has {r['population']} people.")
    if r.get("area"):
      out.append(f"{n} covers {r['area']} km2.")
    if r.get("demonym"):
      out.append(f"People of {n} are {r['demonym']}.")
  return tuple(out)
