"""Tests of the model zoo: classifier contract, parameter counts, generators.

Compile time dominates on CPU, so the big networks are initialised with
`jax.eval_shape` (no compile) and given cheap fan-in-scaled random parameters;
real `init` numerics are checked on the small networks. Jitted functions are
compiled with XLA's backend optimisations off (a per-call option, no global
config change).
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfkd_jax import models
from dfkd_jax.models import generators as generators_lib
from dfkd_jax.models import registry

_FAST_COMPILE = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}
_NUM_CLASSES = 7  # Not the default 10, so the num_classes plumbing is tested.
_BATCH = 4

# Exact counts (32x32 inputs; 3 channels except where noted), 10 / 100 classes.
_EXACT_PARAMS = {
    "lenet5": (61_706, 69_356),  # 1 channel.
    "lenet5_half": (15_738, 19_608),  # 1 channel.
    "lenet5_bn": (61_932, 69_582),  # 1 channel.
    "lenet5_half_bn": (15_851, 19_721),  # 1 channel.
    "resnet8": (78_042, 83_892),
    "resnet20": (272_474, 278_324),
    "resnet32": (466_906, 472_756),
    "resnet18": (11_173_962, 11_220_132),
    "resnet34": (21_282_122, 21_328_292),
    "wrn16_1": (175_066, 180_916),
    "wrn16_2": (691_674, 703_284),
    "wrn40_1": (563_930, 569_780),
    "wrn40_2": (2_243_546, 2_255_156),
    "convnet3": (320_010, 504_420),
    "mobilenetv2": (2_236_682, 2_351_972),
}

# Published values: (name, num_classes, channels, count).
_PUBLISHED_PARAMS = [
    ("resnet18", 10, 3, 11.17e6),
    ("resnet18", 100, 3, 11.22e6),
    ("resnet34", 10, 3, 21.28e6),
    ("resnet34", 100, 3, 21.33e6),
    ("wrn40_2", 10, 3, 2.24e6),
    ("wrn40_2", 100, 3, 2.26e6),
    ("resnet20", 10, 3, 0.27e6),  # He et al. 2016, Table 6.
    ("lenet5", 10, 1, 61_706),  # LeCun et al. 1998 layer sizes, 32x32 input.
]


def _fast_jit(fn: Callable[..., Any]) -> Callable[..., Any]:
  """Jits `fn`, compiling once per call signature with cheap XLA options."""
  cache = {}

  def wrapped(*args):
    key = jax.tree.structure(args), tuple(
        (x.shape, x.dtype) for x in jax.tree.leaves(args))
    if key not in cache:
      cache[key] = jax.jit(fn).lower(*args).compile(_FAST_COMPILE)
    return cache[key](*args)

  return wrapped


def _count(tree: Any) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract_variables(module: nn.Module, x_shape: tuple[int, ...]) -> Any:
  return jax.eval_shape(module.init, jax.random.key(0),
                        jax.ShapeDtypeStruct(x_shape, jnp.float32))


def _fill(abstract: Any, seed: int = 0) -> Any:
  """Cheap concrete variables: fan-in-scaled normal kernels, BN defaults."""
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = path[-1].key
    if name == "var":
      return np.ones(s.shape, np.float32)
    if name in ("mean", "bias"):
      return np.zeros(s.shape, np.float32)
    if name == "scale":
      return np.ones(s.shape, np.float32)
    fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 1
    return rng.normal(0.0, fan_in ** -0.5, s.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(leaf, abstract)


def _assert_finite(tree: Any) -> None:
  for x in jax.tree.leaves(tree):
    assert np.all(np.isfinite(np.asarray(x, np.float32)))


# ----------------------------------------------------------------------------
# Classifiers.


def _forward_both_modes(module: nn.Module):
  def fn(variables, x):
    train_out, updates = module.apply(
        variables, x, train=True, mutable=["batch_stats"])
    eval_out = module.apply(variables, x, train=False)
    return train_out, updates, eval_out

  return _fast_jit(fn)


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_classifier_contract(name):
  # LeNets run on 1 channel (Fashion-MNIST); lenet5 also on 3, to check that
  # the input channels come from x.
  channels = {"lenet5": (1, 3), "lenet5_half": (1,), "lenet5_bn": (1,),
              "lenet5_half_bn": (1,)}.get(name, (3,))
  module = models.get_model(name, _NUM_CLASSES)
  forward = _forward_both_modes(module)
  for c in channels:
    shape = (_BATCH, 32, 32, c)
    abstract = _abstract_variables(module, shape)
    variables = _fill(abstract)
    x = jax.random.normal(jax.random.key(c), shape)
    (logits_t, aux_t), updates, (logits_e, aux_e) = forward(variables, x)
    for logits, aux in ((logits_t, aux_t), (logits_e, aux_e)):
      assert logits.shape == (_BATCH, _NUM_CLASSES)
      assert logits.dtype == jnp.float32
      feature = aux["feature"]
      assert feature.ndim == 2 and feature.shape[0] == _BATCH
      assert feature.dtype == jnp.float32
      assert isinstance(aux["stages"], tuple) and aux["stages"]
      for stage in aux["stages"]:
        assert stage.shape[0] == _BATCH and stage.ndim == 4
        assert stage.dtype == jnp.float32
      _assert_finite((logits, aux))
    # The logits layer reads the pooled feature: its width matches the kernel.
    assert variables["params"]["fc"]["kernel"].shape == (
        feature.shape[1], _NUM_CLASSES)
    if "batch_stats" in variables:
      # Train mode normalises with batch statistics and updates the averages.
      assert (jax.tree.structure(updates["batch_stats"])
              == jax.tree.structure(variables["batch_stats"]))
      changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)),
                             updates["batch_stats"], variables["batch_stats"])
      assert all(jax.tree.leaves(changed))
      assert not np.allclose(logits_t, logits_e)
    else:
      assert not updates  # No BN: nothing to update.
      np.testing.assert_allclose(logits_t, logits_e, rtol=1e-6)


@pytest.mark.parametrize("name", ["lenet5_half", "resnet8"])
def test_real_init_runs_and_is_finite(name):
  module = models.get_model(name, _NUM_CLASSES)
  x = jax.random.normal(jax.random.key(1), (_BATCH, 32, 32, 3))
  variables = _fast_jit(module.init)(jax.random.key(0), x)
  _assert_finite(variables)
  (logits, _), _ = _fast_jit(lambda v, x: module.apply(
      v, x, train=True, mutable=["batch_stats"]))(variables, x)
  assert logits.shape == (_BATCH, _NUM_CLASSES)
  _assert_finite(logits)
  if name != "lenet5_half":
    # Convs use Kaiming-normal (fan-out): std = sqrt(2 / (9 * out_channels)).
    kernel = np.asarray(variables["params"]["stem_conv"]["kernel"])
    expected = np.sqrt(2.0 / (9 * kernel.shape[-1]))
    assert 0.7 * expected < kernel.std() < 1.3 * expected


@pytest.mark.parametrize("name", sorted(_EXACT_PARAMS))
def test_exact_parameter_counts(name):
  channels = 1 if name.startswith("lenet") else 3
  for num_classes, expected in zip((10, 100), _EXACT_PARAMS[name]):
    module = models.get_model(name, num_classes)
    abstract = _abstract_variables(module, (2, 32, 32, channels))
    got = _count(abstract["params"])
    print(f"{name} K={num_classes}: {got:,} parameters")
    assert got == expected


@pytest.mark.parametrize("name,num_classes,channels,published",
                         _PUBLISHED_PARAMS)
def test_parameter_counts_match_published(name, num_classes, channels,
                                          published):
  module = models.get_model(name, num_classes)
  got = _count(_abstract_variables(module, (2, 32, 32, channels))["params"])
  assert abs(got - published) / published < 0.01, (name, num_classes, got)


def test_exact_counts_cover_registry():
  assert set(_EXACT_PARAMS) == set(models.MODELS)


def test_unknown_model_name_lists_valid_names():
  with pytest.raises(ValueError) as excinfo:
    models.get_model("resnet1000", 10)
  message = str(excinfo.value)
  assert "resnet1000" in message
  listed = message.split("valid names: ")[1].rstrip(".").split(", ")
  assert listed == sorted(registry.MODELS)


def test_teacher_student_pairs_have_equal_stage_counts():
  pairs = [("resnet34", "resnet18"), ("wrn40_2", "wrn16_2"),
           ("wrn40_2", "wrn16_1"), ("wrn40_1", "wrn16_1"),
           ("resnet32", "resnet8"), ("resnet32", "resnet20"),
           ("lenet5", "lenet5_half"), ("lenet5_bn", "lenet5_half_bn")]
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)

  def stage_shapes(name):
    module = models.get_model(name, 10)
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    _, aux = jax.eval_shape(module.apply, variables, x)
    return [s.shape[1:3] for s in aux["stages"]]

  for teacher, student in pairs:
    # Same number of stages, at the same resolutions (ZSKT's attention term).
    assert stage_shapes(teacher) == stage_shapes(student), (teacher, student)


def test_resnet18_stage_and_feature_shapes():
  module = models.get_model("resnet18", 10)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(module.init, jax.random.key(0), x)
  _, aux = jax.eval_shape(module.apply, variables, x)
  assert [s.shape for s in aux["stages"]] == [
      (2, 32, 32, 64), (2, 16, 16, 128), (2, 8, 8, 256), (2, 4, 4, 512)]
  assert aux["feature"].shape == (2, 512)


@pytest.mark.parametrize("name", ["resnet18", "wrn16_1", "mobilenetv2",
                                  "lenet5_bn"])
def test_bfloat16_compute_keeps_float32_params_and_outputs(name):
  module = models.get_model(name, 10, dtype=jnp.bfloat16)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(module.init, jax.random.key(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  logits, aux = jax.eval_shape(
      lambda v, x: module.apply(v, x, train=False), variables, x)
  assert logits.dtype == jnp.float32
  assert aux["feature"].dtype == jnp.float32
  assert aux["stages"][0].dtype == jnp.bfloat16  # Stages: compute dtype.


def test_lenet_rejects_28x28_and_accepts_larger_inputs():
  module = models.get_model("lenet5", 10)
  with pytest.raises(ValueError, match="32x32"):
    _abstract_variables(module, (2, 28, 28, 1))
  variables = _abstract_variables(module, (2, 40, 36, 1))
  logits, aux = jax.eval_shape(
      module.apply, variables, jax.ShapeDtypeStruct((2, 40, 36, 1),
                                                    jnp.float32))
  assert logits.shape == (2, 10)
  assert aux["feature"].shape == (2, 84)
  # Same parameters at any size >= 32: the conv3 map is averaged over space.
  assert _count(variables) == _EXACT_PARAMS["lenet5"][0]


def test_lenet_bn_has_bn_after_every_conv_and_hidden_layer():
  for name, widths in (("lenet5_bn", (6, 16, 120, 84)),
                       ("lenet5_half_bn", (3, 8, 60, 42))):
    variables = _abstract_variables(models.get_model(name, 10), (2, 32, 32, 1))
    stats = variables["batch_stats"]
    assert [stats[f"bn{i}"]["mean"].shape[0] for i in range(1, 5)] == list(
        widths)
    assert "bias" not in variables["params"]["conv1"]


@pytest.mark.parametrize("name", ["resnet8", "wrn16_1", "mobilenetv2",
                                  "lenet5_half_bn"])
def test_bn_inputs_can_be_intercepted_with_batch_stats_structure(name):
  # bn_stats.py captures BN inputs by intercepting nn.BatchNorm.__call__; the
  # captured tree must mirror batch_stats (every norm is an nn.BatchNorm).
  def interceptor(next_fun, args, kwargs, context):
    if (isinstance(context.module, nn.BatchNorm)
        and context.method_name == "__call__"):
      axes = tuple(range(args[0].ndim - 1))
      for stat, fn in (("mean", jnp.mean), ("var", jnp.var)):
        context.module.sow("bn_inputs", stat, fn(args[0], axis=axes),
                           reduce_fn=lambda _, b: b)
    return next_fun(*args, **kwargs)

  module = models.get_model(name, 10)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(module.init, jax.random.key(0), x)

  def run(v, x):
    with nn.intercept_methods(interceptor):
      return module.apply(v, x, train=False, mutable=["bn_inputs"])

  _, captured = jax.eval_shape(run, variables, x)
  expected = jax.tree.map(lambda s: s.shape, variables["batch_stats"])
  got = jax.tree.map(lambda s: s.shape, captured["bn_inputs"])
  assert got == expected


# ----------------------------------------------------------------------------
# Generators.


def test_upsample_nearest_2x_equals_jax_image_resize():
  x = jax.random.normal(jax.random.key(0), (2, 5, 7, 3))
  expected = jax.image.resize(x, (2, 10, 14, 3), "nearest")
  np.testing.assert_array_equal(models.upsample_nearest_2x(x), expected)


def _gen_apply(gen: nn.Module, mutable: bool):
  if mutable:
    return _fast_jit(lambda v, z: gen.apply(v, z, train=True,
                                            mutable=["batch_stats"]))
  return _fast_jit(lambda v, z: gen.apply(v, z, train=False))


@pytest.mark.parametrize("final_tanh", [True, False])
def test_generator_output_is_standardised_in_train_mode(final_tanh):
  gen = models.Generator(img_size=16, channels=3, ngf=8, bn_eps=0.8,
                         final_tanh=final_tanh)
  z = jax.random.normal(jax.random.key(1), (16, 12))
  variables = _fast_jit(gen.init)(jax.random.key(0), z)
  x, updates = _gen_apply(gen, True)(variables, z)
  assert x.shape == (16, 16, 16, 3) and x.dtype == jnp.float32
  _assert_finite(x)
  x = np.asarray(x, np.float64)
  np.testing.assert_allclose(x.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
  np.testing.assert_allclose(x.var(axis=(0, 1, 2)), 1.0, rtol=2e-2)
  # The final BN has no affine parameters; the others do.
  assert "bn_out" not in variables["params"]
  assert set(variables["params"]["bn1"]) == {"scale", "bias"}
  # Running averages were updated; eval mode uses them, so outputs differ.
  assert not np.allclose(updates["batch_stats"]["bn_out"]["mean"], 0.0)
  x_eval = _gen_apply(gen, False)(variables, z)
  assert x_eval.shape == x.shape
  assert not np.allclose(x_eval, x, atol=1e-3)
  if final_tanh:
    # At the initial running stats (mean 0, var 1) the final BN is almost the
    # identity in eval mode, so the tanh output stays within [-1, 1].
    assert np.all(np.abs(np.asarray(x_eval)) <= 1.0 + 1e-4)


def test_generator_architecture_shapes():
  gen = models.Generator(img_size=32, channels=3, ngf=64)
  variables = jax.eval_shape(gen.init, jax.random.key(0),
                             jax.ShapeDtypeStruct((2, 1000), jnp.float32))
  params = variables["params"]
  assert params["linear"]["kernel"].shape == (1000, 128 * 8 * 8)
  assert params["block1"]["conv"]["kernel"].shape == (3, 3, 128, 128)
  assert params["block2"]["conv"]["kernel"].shape == (3, 3, 128, 64)
  assert params["block3"]["conv"]["kernel"].shape == (3, 3, 64, 3)
  assert _count(params) == 8_423_939  # docs/methods.md §7: G_m 8.42 M at d=1000.
  out = jax.eval_shape(
      lambda v, z: gen.apply(v, z, train=True, mutable=["batch_stats"]),
      variables, jax.ShapeDtypeStruct((2, 1000), jnp.float32))[0]
  assert out.shape == (2, 32, 32, 3)


def test_spectral_norm_generator_state_and_power_iteration():
  gen = models.Generator(img_size=8, channels=3, ngf=4, spectral_norm=True,
                         weight_init="uniform008")
  z = jax.random.normal(jax.random.key(1), (8, 6))
  variables = _fast_jit(gen.init)(jax.random.key(0), z)
  stats = variables["batch_stats"]
  for block in ("block1", "block2", "block3"):
    assert {"conv/kernel/u", "conv/kernel/sigma"} <= set(stats[block]["sn"])
  step = _gen_apply(gen, True)
  for _ in range(30):
    x, updates = step(variables, z)
    variables = {**variables, **updates}
  _assert_finite(x)
  assert x.shape == (8, 8, 8, 3)
  for block in ("block1", "block2", "block3"):
    kernel = np.asarray(variables["params"][block]["conv"]["kernel"])
    true_sigma = np.linalg.svd(kernel.reshape(-1, kernel.shape[-1]),
                               compute_uv=False)[0]
    sigma = float(variables["batch_stats"][block]["sn"]["conv/kernel/sigma"])
    np.testing.assert_allclose(sigma, true_sigma, rtol=2e-2)
  # Eval mode runs without mutating the spectral-norm state.
  x_eval = _gen_apply(gen, False)(variables, z)
  _assert_finite(x_eval)
  # The normalised kernel differs from the raw one: SN is applied.
  no_sn = models.Generator(img_size=8, channels=3, ngf=4,
                           weight_init="uniform008")
  plain = {"params": variables["params"],
           "batch_stats": {k: v for k, v in variables["batch_stats"].items()
                           if k.startswith("bn")}}
  assert not np.allclose(_gen_apply(no_sn, False)(plain, z), x_eval,
                         atol=1e-3)


def test_uniform008_init():
  gen = models.Generator(img_size=8, channels=3, ngf=8,
                         weight_init="uniform008")
  z = jnp.zeros((2, 50))
  params = _fast_jit(gen.init)(jax.random.key(0), z)["params"]
  for layer in ("linear",):
    kernel = np.asarray(params[layer]["kernel"])
    assert np.all(np.abs(kernel) <= 0.08) and np.abs(kernel).max() > 0.075
    np.testing.assert_array_equal(params[layer]["bias"], 0.0)
  for block in ("block1", "block2", "block3"):
    kernel = np.asarray(params[block]["conv"]["kernel"])
    assert np.all(np.abs(kernel) <= 0.08) and np.abs(kernel).max() > 0.07
    np.testing.assert_array_equal(params[block]["conv"]["bias"], 0.0)
  # BN layers keep the default scale 1, bias 0.
  np.testing.assert_array_equal(params["bn1"]["scale"], 1.0)


def test_default_init_is_pytorch_default():
  gen = models.Generator(img_size=8, channels=3, ngf=8)
  params = _fast_jit(gen.init)(jax.random.key(0), jnp.zeros((2, 50)))["params"]
  bound = 1.0 / np.sqrt(50)
  for leaf in (params["linear"]["kernel"], params["linear"]["bias"]):
    leaf = np.asarray(leaf)
    assert np.all(np.abs(leaf) <= bound) and np.abs(leaf).max() > 0.9 * bound
  bound = 1.0 / np.sqrt(9 * 16)
  bias = np.asarray(params["block2"]["conv"]["bias"])
  assert np.all(np.abs(bias) <= bound) and np.any(bias != 0)


def test_unknown_weight_init_raises():
  gen = models.Generator(img_size=8, weight_init="xavier")
  with pytest.raises(ValueError, match="xavier"):
    jax.eval_shape(gen.init, jax.random.key(0), jnp.zeros((2, 4)))


@pytest.mark.parametrize("cls", [models.Generator, models.ZSKTGenerator])
def test_img_size_not_divisible_by_4_raises(cls):
  gen = cls(img_size=30)
  with pytest.raises(ValueError, match="multiple of 4"):
    jax.eval_shape(gen.init, jax.random.key(0), jnp.zeros((2, 4)))


def test_zskt_generator():
  gen = models.ZSKTGenerator(img_size=32, channels=3, ngf=64)
  z_spec = jax.ShapeDtypeStruct((2, 100), jnp.float32)
  variables = jax.eval_shape(gen.init, jax.random.key(0), z_spec)
  assert variables["params"]["linear"]["kernel"].shape == (100, 128 * 10 * 10)
  assert _count(variables["params"]) == 1_516_547
  # Generalisation: the first map is 10 s / 32 pixels wide.
  big = models.ZSKTGenerator(img_size=64, channels=1, ngf=4)
  big_vars = jax.eval_shape(big.init, jax.random.key(0), z_spec)
  assert big_vars["params"]["linear"]["kernel"].shape == (100, 8 * 20 * 20)
  # Small real run: standardised output, no tanh.
  small = models.ZSKTGenerator(img_size=16, channels=3, ngf=8)
  z = jax.random.normal(jax.random.key(1), (16, 10))
  small_vars = _fast_jit(small.init)(jax.random.key(0), z)
  x, _ = _gen_apply(small, True)(small_vars, z)
  assert x.shape == (16, 16, 16, 3) and x.dtype == jnp.float32
  x = np.asarray(x, np.float64)
  np.testing.assert_allclose(x.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
  np.testing.assert_allclose(x.var(axis=(0, 1, 2)), 1.0, rtol=2e-2)
  assert "bn_out" not in small_vars["params"]


def test_zskt_nearest_resize_indices():
  # 10 -> 16 nearest (half-pixel centres), documented in generators.py.
  x = jnp.arange(10.0).reshape(1, 10, 1, 1)
  idx = np.asarray(jax.image.resize(x, (1, 16, 1, 1), "nearest")).ravel()
  np.testing.assert_array_equal(
      idx, [0, 0, 1, 2, 2, 3, 4, 4, 5, 5, 6, 7, 7, 8, 9, 9])


def test_generator_bfloat16_output_is_float32():
  gen = models.Generator(img_size=8, channels=3, ngf=4, dtype=jnp.bfloat16)
  z = jax.ShapeDtypeStruct((2, 6), jnp.float32)
  variables = jax.eval_shape(gen.init, jax.random.key(0), z)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  out, _ = jax.eval_shape(
      lambda v, z: gen.apply(v, z, train=True, mutable=["batch_stats"]),
      variables, z)
  assert out.dtype == jnp.float32


def test_layer_inits_reject_unknown():
  with pytest.raises(ValueError):
    generators_lib._layer_inits("nope", 4)  # pylint: disable=protected-access
