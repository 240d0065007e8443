"""Datasets: per-dataset constants, preparation from local files and in-memory loading through TFDS."""
from dfkd_jax.data.datasets import DATASETS, DatasetInfo, get_info, load_split, normalize, denormalize

__all__ = ["DATASETS", "DatasetInfo", "get_info", "load_split", "normalize", "denormalize"]
