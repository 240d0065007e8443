"""Pictures for people who do not run TensorBoard: image grids and accuracy curves as PNG."""
from __future__ import annotations

import os

import numpy as np

from dfkd_jax import parallel


def image_grid(images: np.ndarray, ncol: int = 8) -> np.ndarray:
  """[N, H, W, C] images in [0, 1] -> one [rows*(H+1)+1, ncol*(W+1)+1, 3] grid in [0, 1]."""
  images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  n, h, w, c = images.shape
  ncol = min(ncol, n)
  nrow = -(-n // ncol)
  grid = np.ones((nrow * (h + 1) + 1, ncol * (w + 1) + 1, c), np.float32)
  for i in range(n):
    r, q = divmod(i, ncol)
    grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = images[i]
  return grid


def save_png(path: str, grid: np.ndarray, scale: int = 3) -> None:
  """An HWC grid in [0, 1] as a PNG (process 0 only in a multi-process run)."""
  if not parallel.is_main_process():
    return
  from PIL import Image  # pylint: disable=g-import-not-at-top
  arr = (np.clip(grid, 0, 1) * 255).round().astype(np.uint8)
  img = Image.fromarray(arr)
  if scale > 1:
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp.png"
  img.save(tmp)
  os.replace(tmp, path)


def plot_curves(path: str, curves: dict[str, tuple[list, list]], title: str = "",
                ylabel: str = "test accuracy (%)") -> None:
  """Line plot of {label: (x, y)} saved as PNG (matplotlib, Agg backend; process 0 only)."""
  if not parallel.is_main_process():
    return
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
  for label, (x, y) in curves.items():
    ax.plot(x, y, marker="o", markersize=3, label=label)
  ax.set_xlabel("iteration")
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  if len(curves) > 1:
    ax.legend()
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp)
  plt.close(fig)
  os.replace(tmp, path)
