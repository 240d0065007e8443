"""JAX step vs the PyTorch reference of benchmarks/torch_ref/: same weights, same random draws,
same losses, for both teacher -> student pairs (LeNet-5-BN -> LeNet-5-half-BN and ResNet-20 ->
ResNet-8). Skipped where PyTorch is not installed (CI: it is only in the optional
`bench` extra)."""
import os
import sys

import helpers
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.join(helpers.REPO_ROOT, "benchmarks"))
from torch_ref import (  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
    losses, models, parity, weights)


def _check(method, pair, numerics_scope, iterations=2, gen_lr=None):
  """Parity over `iterations` outer iterations. Two iterations run with JAX's own conv
  gradients, Flax's BatchNorm and XLA's default CPU options (numerics
  conv_grads="xla", batch_norm="xla", xla_cpu_ynn="default"; tests/models/test_conv.py, test_norm.py and
  test_compile.py check that the library's replacements compute the same values and
  gradients): the second iteration starts from weights after one Adam
  step, which is about lr * sign(g) per coordinate, so coordinates whose gradient is at
  float-noise level (biases before a BN, ...) take opposite +-lr steps as soon as two programs
  round differently. XLA's default (YNNPACK) convolutions happen to round like PyTorch's; with
  the library's options (no YNNPACK; as accurate against float64) LeNet DAFL's second-iteration
  grad_norm differs by 11 %, and with the canonical conv gradients ResNet DAFL's by 4.8 %,
  although the first iteration agrees to 1e-4. The shipped settings are therefore checked on
  the first iteration."""
  torch.set_num_threads(1)
  if iterations > 1:
    numerics_scope(conv_grads="xla", batch_norm="xla", xla_cpu_ynn="default",
                   upsample_conv="direct")
  else:
    numerics_scope(conv_grads="auto", batch_norm="auto", xla_cpu_ynn="none",
                   upsample_conv="direct")
  # PRE-DFKD's memory samples come from the VAE decoder in eval mode, i.e. from BN running
  # variances, which PyTorch updates with the unbiased batch variance and Flax with the biased
  # one: a framework difference of ~1e-4 relative that the later iteration amplifies. With the
  # ResNet pair the second iteration drifts more (see `check_method`): vae_kl differs by up to
  # ~4e-3 (1.5e-4 when the PyTorch side restarts the iteration from the JAX weights).
  # The ResNet pair's generator gradient is rounding-sensitive: against a float64 evaluation its
  # float32 value is off by 0.8e-3 to 2.2e-3 (relative L2) with XLA's or the library's settings
  # alike (measured on a DAFL loss), so grad_norm differs from PyTorch's by ~1.4e-4.
  loose = method == "pre_dfkd"
  rtol = 1e-3 if loose else (5e-4 if pair == "resnet" else 1e-4)
  rows = parity.check_method(method, iterations=iterations, rtol=rtol,
                             rtol_later=1e-2 if loose else 5e-3, pair=pair, gen_lr=gen_lr)
  assert {it for it, *_ in rows} == set(range(iterations))
  assert len(rows) >= 5 * iterations
  bad = [f"iteration {it} {k}: jax {a:.7g} torch {b:.7g} (rtol {tol:g})"
         for it, k, a, b, tol, ok in rows if not ok]
  assert not bad, "\n".join(bad)


@pytest.mark.parametrize("method", [
    "dafl", "dfad",
    pytest.param("deepinversion", marks=pytest.mark.slow),
    pytest.param("mb_dfkd", marks=pytest.mark.slow),
    pytest.param("pre_dfkd", marks=pytest.mark.slow),
])
def test_losses_match_torch(method, numerics_scope):
  _check(method, "lenet", numerics_scope)


# ResNet-20 -> ResNet-8 (configs/fashion_mnist_resnet20.py, every student repeat unrolled): a
# deeper teacher, 21 BN layers in DeepInversion's / MB-DFKD's BN loss, projection shortcuts.
# With this deeper teacher the generator's first Adam step (about lr * sign(g)) turns float
# noise into +-lr weight differences: DAFL's second-iteration grad_norm drifts from PyTorch's by
# ~5 % and PRE-DFKD's VAE losses by up to 4 % even in the first iteration, whatever the conv
# gradients. With a negligible generator lr both agree to <= 2e-4 (measured), so these checks
# freeze the generator (its update is checked with the LeNet pair above).
@pytest.mark.parametrize("method", [
    "dafl", "deepinversion",
    pytest.param("dfad", marks=pytest.mark.slow),
    pytest.param("mb_dfkd", marks=pytest.mark.slow),
    pytest.param("pre_dfkd", marks=pytest.mark.slow),
])
def test_resnet_losses_match_torch(method, numerics_scope):
  _check(method, "resnet", numerics_scope,
         gen_lr=1e-9 if method in ("dafl", "pre_dfkd") else None)


@pytest.mark.parametrize("method,pair", [
    ("dafl", "lenet"), ("dfad", "lenet"), ("deepinversion", "lenet"), ("dafl", "resnet"),
    pytest.param("mb_dfkd", "lenet", marks=pytest.mark.slow),
    pytest.param("pre_dfkd", "lenet", marks=pytest.mark.slow),
])
def test_shipped_compiler_options_match_torch_first_iteration(method, pair, numerics_scope):
  # PRE-DFKD's first iteration starts with a generator Adam step (the same chaos as above: with
  # the library's rounding its KD losses then differ by up to 3 %), so its generator is frozen.
  _check(method, pair, numerics_scope, iterations=1,
         gen_lr=1e-9 if method == "pre_dfkd" else None)


def test_resnet_forward_matches_torch():
  """TorchResNetCifar + load_resnet reproduce the Flax ResNet-20 (logits, pooled feature) in
  both BN modes, and the BN-statistics hooks see the JAX BN loss's layers in its call order."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dfkd_jax.ops import bn_stats  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(1)
  teacher = parity.random_teacher(perturb_stats=True, pair="resnet")
  net = models.torch_model("resnet20")
  to_numpy = parity._to_numpy_tree  # pylint: disable=protected-access
  weights.load_model(net, to_numpy(teacher.params), to_numpy(teacher.batch_stats))
  x = jax.random.normal(jax.random.key(0), (4, *models.IMAGE_SHAPE))
  xt = weights._t(x).permute(0, 3, 1, 2)  # pylint: disable=protected-access
  for train in (False, True):
    out = teacher.apply_fn(teacher.variables, x, train=train,
                           **({"mutable": ["batch_stats"]} if train else {}))
    logits, aux = out[0] if train else out
    net.train(train)
    with torch.no_grad():
      t_logits, t_feature = net(xt)
    np.testing.assert_allclose(t_logits.numpy(), np.asarray(logits), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(t_feature.numpy(), np.asarray(aux["feature"]), rtol=1e-4,
                               atol=1e-4)
  capture = losses.BNCapture(net.eval())
  capture.active = True
  with torch.no_grad():
    net(xt)
  names = {m: n.replace(".", "/") for n, m in net.named_modules()}
  _, _, order = bn_stats.capture_bn_inputs(teacher.apply_fn, teacher.variables, x, train=False)
  assert [names[m] for m, *_ in capture.stats] == ["/".join(p) for p in order]
  assert len(order) == 1 + 3 * 3 * 2 + 2  # stem, two per block, two projection shortcuts


def test_config_arguments_and_overrides_reach_the_compared_config():
  config = parity.jax_config("pre_dfkd", batch=256, config_arg="faithful",
                             overrides=["generator.ngf=64", "pre_dfkd.memory_batch=32"])
  assert config.generator.bn_eps == 0.8  # faithful
  assert config.pre_dfkd.leak_z_grad_into_vae
  assert config.distill.batch_size == 256 and config.generator.ngf == 64
  assert config.pre_dfkd.memory_batch == 32  # the override wins over batch // 8
  with pytest.raises(Exception, match="no_such_field"):
    parity.jax_config("dafl", overrides=["distill.no_such_field=1"])


def test_memory_mode_passes_every_other_flag_to_its_children():
  import compare_torch  # pylint: disable=g-import-not-at-top
  argv = ["--batch", "64", "--methods", "dafl,dfad", "--set=generator.ngf=8", "--methods=x"]
  assert compare_torch._drop_flag(argv, "--methods") == ["--batch", "64", "--set=generator.ngf=8"]
