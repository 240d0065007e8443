"""Condensed-sample guidance (docs/methods.md §8) on every host, at phase level (random tiny teacher).

A random condensed set (10 images per class) is written with `condensed.save_condensed`; each
host is built with `guidance="condensed"` (discriminator + feature alignment + condensed KD) or
`"naive"` (condensed KD only) and stepped once on one device.
"""
import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dfkd_jax.condensation import condensed_set as condensed_lib
from dfkd_jax.train import distill
from dfkd_jax.phases import guidance
from dfkd_jax.models import discriminator as disc_lib

from dfkd_jax import state as state_lib
import steps
from steps import IMAGE_SHAPE, NUM_CLASSES, tree_equal

HOSTS = steps.METHODS  # every registered host takes guidance


@pytest.fixture(scope="module")
def condensed_file(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("condensed") / "set.npz")
  rng = np.random.default_rng(0)
  images = rng.normal(size=(10 * NUM_CLASSES, *IMAGE_SHAPE)).astype(np.float32)
  labels = np.repeat(np.arange(NUM_CLASSES), 10).astype(np.int32)
  condensed_lib.save_condensed(path, images, labels, {"kind": "test", "num_classes": 10})
  return path


def guided_config(method, mode, path):
  c = steps.tiny_config(method)
  c.guidance = mode
  c.condensed.path = path
  return c


_STEPPED = {}


def stepped(method, mode, path):
  """(config, state before, state after, metrics) of one jitted outer step on 1 device."""
  key = (method, mode)
  if key not in _STEPPED:
    c = guided_config(method, mode, path)
    ctx, m = steps.build(method, num_devices=1, config=c)
    state = distill.place_state(m.init(jax.random.key(0)), ctx.mesh)
    before = steps.host(state)
    chex.clear_trace_counter()  # each host builds its own step from the same source
    state, metrics = distill.make_step(m)(state)
    _STEPPED[key] = (c, before, steps.host(state), jax.device_get(metrics))
  return _STEPPED[key]


@pytest.mark.parametrize("method", HOSTS)
def test_guided_host_aligns_features_trains_discriminator_and_distils_condensed(
    method, condensed_file):
  c, before, after, m = stepped(method, "condensed", condensed_file)
  fa = [k for k in m if k.endswith("/fa")]
  assert fa and all(np.isfinite(m[k]) for k in fa), sorted(m)
  d_loss = [k for k in m if k.split("/")[-1] == "d_loss"]
  assert d_loss and all(0 < float(m[k]) < 10 for k in d_loss)
  assert any(k.endswith("condensed_loss") for k in m), sorted(m)
  assert not tree_equal(before.discriminator.params, after.discriminator.params)
  assert tree_equal(before.teacher.params, after.teacher.params)
  assert tree_equal(before.condensed["images"], after.condensed["images"])
  assert bool(m["finite"])


@pytest.mark.parametrize("method", ["dfad", "deepinversion"])
def test_naive_mixing_has_no_discriminator(method, condensed_file):
  _, _, after, m = stepped(method, "naive", condensed_file)
  assert not after.has("discriminator") and after.has("condensed")
  assert not any(k.split("/")[-1] in ("fa", "d_loss") for k in m)
  assert any(k.endswith("condensed_loss") for k in m)


def test_alignment_loss_reaches_the_generator(condensed_file):
  """With every host weight at zero, the generator's gradient is the alignment term's alone."""
  c = guided_config("dfad", "condensed", condensed_file)
  c.loss.adv = 0.0
  ctx, m = steps.build("dfad", num_devices=1, config=c)
  state = m.init(jax.random.key(0))
  gen = jax.jit(lambda s: m.step(s)[1])(state)
  assert abs(float(gen["generator/fa"])) > 0
  assert float(gen["generator/grad_norm"]) > 1e-6


def _disc_state(feature_dim=8, hidden=16):
  cfg = ml_collections.ConfigDict(dict(condensed=dict(d_lr=1e-2, d_b1=0.5, d_b2=0.999,
                                                      d_hidden=hidden)))
  spec = guidance.GuidanceSpec(batch=8, augment=False)

  # A parameter-free "teacher" whose feature is the flattened image (width feature_dim).
  teacher = state_lib.FrozenModel(
      params={}, batch_stats={},
      apply_fn=lambda v, x, train=False: (x.reshape(x.shape[0], -1),
                                          {"feature": x.reshape(x.shape[0], -1)}))
  d = guidance.init_discriminator(jax.random.key(0), spec, teacher, (feature_dim, 1, 1), 3,
                                  cfg)
  return spec, teacher, d


def test_discriminator_learns_to_separate_condensed_from_synthetic():
  spec, teacher, d = _disc_state()
  xc = jnp.ones((6, 8, 1, 1)) + 0.1 * jax.random.normal(jax.random.key(1), (6, 8, 1, 1))
  state = state_lib.DFKDState(
      step=jnp.zeros((), jnp.int32), rng=jax.random.key(0), teacher=teacher, student=None,
      parts={"discriminator": d, "condensed": {"images": xc, "labels": jnp.arange(6) % 3}})
  h_syn = -jnp.ones((8, 8))
  y_syn = jnp.arange(8) % 3
  step = jax.jit(lambda s, k: guidance.discriminator_step(spec, s, k, h_syn, y_syn))
  losses = []
  for i in range(30):
    state, m = step(state, jax.random.key(i))
    losses.append(float(m["d_loss"]))
  assert losses[0] > 1.0 and losses[-1] < 0.5 * losses[0]
  # Spectral-norm power-iteration state is updated by the discriminator's own step only.
  assert not tree_equal(d.batch_stats, state.discriminator.batch_stats)


def test_projection_discriminator_is_class_conditional():
  module = disc_lib.ProjectionDiscriminator(num_classes=4, hidden=16)
  h = jax.random.normal(jax.random.key(0), (5, 8))
  v = module.init(jax.random.key(1), h, jnp.zeros((5,), jnp.int32))
  a = module.apply(v, h, jnp.zeros((5,), jnp.int32))
  b = module.apply(v, h, jnp.ones((5,), jnp.int32))
  assert a.shape == (5,) and not np.allclose(a, b)


def test_condensed_batch_rounds_to_devices_and_set_size():
  c = steps.tiny_config("dfad")
  c.guidance, c.condensed.batch = "condensed", 128
  assert guidance.spec_from_config(c, num_devices=8, num_images=10).batch == 8
  assert guidance.spec_from_config(c, num_devices=8, num_images=1000).batch == 128
  assert guidance.spec_from_config(c, num_devices=1, num_images=10).batch == 10
  c.guidance = "none"
  assert guidance.spec_from_config(c) is None
  c.guidance = "bogus"
  with pytest.raises(ValueError, match="Unknown guidance 'bogus'"):
    guidance.spec_from_config(c)


def test_condensed_set_that_does_not_match_the_teacher_is_a_clear_error(tmp_path):
  path = str(tmp_path / "rgb.npz")
  condensed_lib.save_condensed(path, np.zeros((10, 32, 32, 3), np.float32),
                               np.arange(10, dtype=np.int32), {"num_classes": 10})
  with pytest.raises(condensed_lib.CondensedDataError,
                     match="32x32x3 but the teacher expects 32x32x1"):
    steps.build("dfad", num_devices=1, config=guided_config("dfad", "condensed", path))
  c = guided_config("dfad", "condensed", "")
  with pytest.raises(ValueError, match="condensed.path"):
    steps.build("dfad", num_devices=1, config=c)


def test_config_arguments_turn_guidance_on_and_label_the_run():
  module = steps.config_module()
  c = module.get_config("method=mb_dfkd,guidance=condensed,condensed=/x/fm_ipc10.npz")
  assert c.guidance == "condensed" and c.condensed.path == "/x/fm_ipc10.npz"
  assert c.label == "mb_dfkd + condensed (fm_ipc10)"
  with pytest.raises(ValueError, match="needs a condensed set"):
    module.get_config("method=dfad,guidance=naive")
