"""Part 5: prior TDA methods cast as simulators (TracIn-CP, influence functions with EK-FAC,
Source, Hypothetical Simfluence-Linear), all returning `FitParams` so `evaluate` scores them
like any simulator. `gradients` (per-example gradients, K-FAC taps), `ekfac`, `methods`.
Imports `traces`, `training`, `yardstick`, `simulators`.
"""
