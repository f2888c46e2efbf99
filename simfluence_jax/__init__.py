"""simfluence_jax: training data attribution by simulation (Simfluence, Guu et al. 2023), in JAX.

The package top holds the binaries (`python -m simfluence_jax.<name>`: train, pretrain, fit,
evaluate, simulate, report, import_traces, split, merge_workspaces, study, counterfactuals,
metagradients; `python -m simfluence_jax` lists them). The library lives in one subpackage
per part, each importing only the parts above it in this list (docs/ARCHITECTURE.md):

  traces         the workspace trace contract and its I/O
  training       T5X-style training runs that emit traces
  yardstick      held-out metrics and the no-curriculum baselines
  simulators     Simfluence simulators, their batched ridge solvers, rollouts
  prior_methods  TracIn-CP, influence functions (EK-FAC), Source, Hypothetical Linear
  evaluation     counterfactual curricula, proponents / opponents, reports
  experiments    the experiment pipeline
  cli            the binaries' flag / gin / error plumbing

The names below are the curated public API; each is imported on first use, so
`import simfluence_jax` itself loads neither JAX nor any other heavy dependency.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> (module, attribute)
_PUBLIC = {
    # the trace contract
    "RunTrace": ("simfluence_jax.traces.contract", "RunTrace"),
    "TraceError": ("simfluence_jax.traces.contract", "TraceError"),
    "read_run": ("simfluence_jax.traces.contract", "read_run"),
    "write_run": ("simfluence_jax.traces.contract", "write_run"),
    "list_runs": ("simfluence_jax.traces.contract", "list_runs"),
    "import_long_format": ("simfluence_jax.traces.importers", "import_long_format"),
    "TraceWriter": ("simfluence_jax.traces.writer", "TraceWriter"),
    "train_runs": ("simfluence_jax.training.runs", "train_runs"),
    "flax_loss": ("simfluence_jax.training.runs", "flax_loss"),
    "FitParams": ("simfluence_jax.traces.fit_params", "FitParams"),
    "save_fit": ("simfluence_jax.traces.fit_params", "save_fit"),
    "load_fit": ("simfluence_jax.traces.fit_params", "load_fit"),
    # simulators
    "fit": ("simfluence_jax.simulators.simfluence", "fit"),
    "simulate_curriculum": ("simfluence_jax.simulators.simfluence", "simulate_curriculum"),
    "rollout": ("simfluence_jax.simulators.rollout", "rollout"),
    # yardstick
    "score_runs": ("simfluence_jax.yardstick.metrics", "score_runs"),
    # questions
    "remove_examples": ("simfluence_jax.evaluation.counterfactuals", "remove_examples"),
    "reorder_first": ("simfluence_jax.evaluation.counterfactuals", "reorder_first"),
    "reverse": ("simfluence_jax.evaluation.counterfactuals", "reverse"),
    "duplicate": ("simfluence_jax.evaluation.counterfactuals", "duplicate"),
    "repacked_removal_effects": ("simfluence_jax.evaluation.attribution",
                                 "repacked_removal_effects"),
    "write_report": ("simfluence_jax.evaluation.reports", "write_report"),
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
  if name in _PUBLIC:
    module, attr = _PUBLIC[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'simfluence_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_PUBLIC))
