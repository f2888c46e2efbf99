"""T5.1.1-style encoder-decoder with IA3 (t5.py) and its losses (losses.py)."""

from simfluence_jax.training.models.losses import per_example_loss
from simfluence_jax.training.models.losses import shift_right
from simfluence_jax.training.models.t5 import IA3_COLLECTION
from simfluence_jax.training.models.t5 import init_variables
from simfluence_jax.training.models.t5 import num_parameters
from simfluence_jax.training.models.t5 import relative_position_bucket
from simfluence_jax.training.models.t5 import T5Config
from simfluence_jax.training.models.t5 import Transformer

__all__ = [
    "IA3_COLLECTION",
    "T5Config",
    "Transformer",
    "init_variables",
    "num_parameters",
    "per_example_loss",
    "relative_position_bucket",
    "shift_right",
]
