"""The method registry is the one list of methods: configs, demo, CLI and tests derive from it."""
import dataclasses
import functools
import importlib.util
import os

import helpers
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dfkd_jax.cli import demo
from dfkd_jax.train import distill
from dfkd_jax.cli import main as main_lib
from dfkd_jax import methods
from dfkd_jax import phases
from dfkd_jax import state as state_lib
from dfkd_jax.methods import generative

import steps


def _config_module(name):
  path = os.path.join(helpers.CONFIGS_DIR, name)
  spec = importlib.util.spec_from_file_location("registry_cfg_" + name[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_method_lists_derive_from_the_registry():
  names = tuple(methods.METHODS)
  # the demo runs every method once, in the registry's order (the best measured first)
  assert demo.DEFAULT_METHODS == names
  assert helpers.DATA_FREE_METHODS == names
  assert steps.METHODS == names
  assert set(methods.SUPERVISED_METHODS).isdisjoint(names)
  assert methods.ALL_METHODS == methods.SUPERVISED_METHODS + names
  usage = main_lib.usage()
  for name in methods.ALL_METHODS:
    assert name in usage, f"--help does not list {name}"


@pytest.mark.parametrize("name", list(methods.METHODS))
def test_every_entry_writes_its_defaults_onto_the_shared_blocks(name):
  spec = methods.METHODS[name]
  assert callable(spec.build) and spec.summary
  c = ml_collections.ConfigDict()
  common = _config_module("common.py")
  common.distill(c, name)
  blank = ml_collections.ConfigDict()
  common.distill(blank, name)
  # Deterministic, and every method changes at least one loss weight from the all-zero block.
  assert c.to_dict() == blank.to_dict()
  weights = ("oh", "ie", "act", "adv", "bn", "tv", "ce")
  assert any(c.loss[w] for w in weights), f"{name}: its defaults set no synthesis loss"


def test_a_newly_registered_method_reaches_configs_and_builder(monkeypatch):
  def defaults(c):
    generative.dafl_defaults(c)
    c.loss.oh = 2.5
  spec = dataclasses.replace(methods.METHODS["dafl"], defaults=defaults)
  monkeypatch.setitem(methods.METHODS, "my_dafl", spec)
  methods.check_method("my_dafl")
  config = _config_module("fashion_mnist_lenet5.py").get_config("method=my_dafl,tiny")
  assert config.method == "my_dafl"
  assert config.loss.oh == 2.5 and config.loss.ie == 5.0
  assert config.distill.num_iters <= 20  # the shared tiny sizing applies to it too
  ctx, m = steps.build("my_dafl", num_devices=1, config=config)  # registry -> builder
  assert ctx.config.method == "my_dafl"
  state = distill.place_state(m.init(jax.random.key(0)), ctx.mesh)
  _, metrics = distill.make_step(m)(state)
  assert metrics and all(np.isfinite(np.asarray(v)).all() for v in jax.device_get(metrics).values())


def test_a_new_method_brings_its_own_state_part(monkeypatch):
  """A method defines a state piece of its own (a running count of synthetic images and their
  mean pixel) without touching DFKDState or the initialiser; it is built, stepped, donated and
  placed like the library's parts."""

  def build(ctx):
    base_method = generative.make_dafl(ctx)
    tally = state_lib.Part("tally", lambda key, ctx: {"images": jnp.zeros((), jnp.int32),
                                                      "mean": jnp.zeros((), jnp.float32)})
    init = functools.partial(methods.base.init_state, ctx=ctx,
                             parts=(methods.base.generator_part(ctx), tally))

    def step(state, key):
      state, metrics = base_method.step(state, key)
      x = phases.sample_generator(state, key, ctx.d.batch_size, ctx.d.latent_dim, ctx.mesh)
      t = state.tally
      n = t["images"] + x.shape[0]
      mean = t["mean"] + (jnp.mean(x) - t["mean"]) * x.shape[0] / n
      return state.with_parts(tally={"images": n, "mean": mean}), metrics

    return methods.types.Method(init=init, step=step)

  spec = dataclasses.replace(methods.METHODS["dafl"], build=build)
  monkeypatch.setitem(methods.METHODS, "tally_dafl", spec)
  config = _config_module("fashion_mnist_lenet5.py").get_config("method=tally_dafl,tiny")
  ctx, m = steps.build("tally_dafl", num_devices=1, config=config)
  state = distill.place_state(m.init(jax.random.key(0)), ctx.mesh)
  assert sorted(state.parts) == ["generator", "tally"] and state.has("tally")
  step = distill.make_step(m)
  for _ in range(2):
    state, _ = step(state)
  assert int(state.tally["images"]) == 2 * config.distill.batch_size
  assert np.isfinite(float(state.tally["mean"])) and float(state.tally["mean"]) != 0.0
  with pytest.raises(AttributeError, match=r"no part 'bank' \(its parts: \['generator', 'tally'\]\)"):
    _ = state.bank


def test_state_parts_must_have_distinct_names():
  config = _config_module("fashion_mnist_lenet5.py").get_config("method=dafl,tiny")
  ctx, _ = steps.build("dafl", num_devices=1, config=config)
  part = methods.base.generator_part(ctx)
  with pytest.raises(ValueError, match="share a name"):
    methods.base.init_state(jax.random.key(0), ctx, (part, part))
  with pytest.raises(ValueError, match=r"\['student'\] are DFKDState's own attributes"):
    methods.base.init_state(jax.random.key(0), ctx, (part._replace(name="student"),))


def test_unknown_method_names_the_valid_ones():
  with pytest.raises(ValueError, match="Unknown method 'dafll'") as e:
    methods.check_method("dafll")
  for name in methods.ALL_METHODS:
    assert name in str(e.value)
