"""Model zoo: CIFAR/MNIST classifiers (via `get_model`) and image generators."""

from dfkd_jax.models import conv
from dfkd_jax.models import norm
from dfkd_jax.models.generators import FastGenerator
from dfkd_jax.models.generators import Generator
from dfkd_jax.models.generators import NoisyLayerGenerator
from dfkd_jax.models.generators import upsample_nearest_2x
from dfkd_jax.models.generators import ZSKTGenerator
from dfkd_jax.models.registry import get_model
from dfkd_jax.models.registry import MODELS

__all__ = [
    "FastGenerator",
    "Generator",
    "NoisyLayerGenerator",
    "MODELS",
    "ZSKTGenerator",
    "conv",
    "get_model",
    "norm",
    "upsample_nearest_2x",
]
