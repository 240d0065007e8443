"""PyTorch reference of the library's data-free methods: eager twins of the JAX models and of
one outer iteration of each method, for the timing script (benchmarks/compare_torch.py) and the
parity test (tests/benchmarks/test_compare_torch.py). dfkd_jax itself never imports PyTorch.

- `models`: the PyTorch twins of the classifiers (LeNet-5-BN, CIFAR ResNets), the DAFL / PRE-DFKD
  generator and the PRE-DFKD VAE, and the input shape / class count they are built for.
- `weights`: copies JAX weights into them (NHWC -> NCHW, Dense kernels transposed, BN
  statistics, spectral-norm vectors).
- `losses`: the PyTorch losses (KD, adversarial, one-hot, information entropy, total variation)
  and the BN-statistics hooks of DeepInversion-style matching.
- `methods`: `TorchMethod`, one outer iteration of each method in eager PyTorch, with fresh
  random draws (`TorchRandom`) or the JAX step's own (`JaxKeys`).
- `parity`: the teacher -> student pairs, the JAX side (config, random teacher, jitted step) and
  `check_method`, the numerical check of the JAX step against `TorchMethod`.

Needs PyTorch (CPU): `pip install -e '.[bench]'`.
"""
import importlib.util
import os

# PyTorch's OpenMP threads spin-wait between parallel regions by default; with a concurrent job
# on this 2-core machine that made its steps 3-11x slower and erratic (benchmarks/RESULTS.md).
# Wait passively unless the caller chose a policy (OMP_WAIT_POLICY=ACTIVE restores the default).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if importlib.util.find_spec("torch") is None:  # pragma: no cover
  raise ImportError("benchmarks/torch_ref needs PyTorch: pip install -e '.[bench]'")
