"""Part 4: Simfluence simulators and their solvers.

`design` (one-step transitions from traces), `ridge` (batched closed-form ridge, Eq. 2),
`rollout` (Eq. 1 under `lax.scan`), `simfluence` (fit / select λ / simulate), `streaming`
(fits larger than memory), `featurized` and `uncertainty` (our extensions). Imports only
`traces` and `yardstick`.
"""
