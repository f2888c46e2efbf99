"""Part 2: training runs that emit traces (T5X conventions, many runs under `jax.vmap`).

`models/` (T5.1.1 in Flax, IA3; losses), `tasks` (any seqio task by name: the pools a run
trains on), `task_data` / `country_tasks` (the built-in offline countryinfo tasks),
`curricula`, `trainer` (the vmapped multi-run step), `checkpoints` (orbax), `distributed`
(meshes, multi-host). Imports only `simfluence_jax.traces`.
"""
