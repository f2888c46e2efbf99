"""Part 3: the yardstick every method is judged by: held-out trajectory metrics and the
no-curriculum baselines. Imports only `simfluence_jax.traces`.
"""
