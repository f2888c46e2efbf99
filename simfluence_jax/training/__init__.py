"""Part 2: training runs that emit traces (T5X conventions, many runs under `jax.vmap`).

`models/` (T5.1.1 in Flax, IA3; losses), `task_data` / `tasks` (offline pools, seqio tasks),
`curricula`, `trainer` (the vmapped multi-run step), `checkpoints` (orbax), `distributed`
(meshes, multi-host). Imports only `simfluence_jax.traces`.
"""
