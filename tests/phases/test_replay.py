"""MB-DFKD's memory bank and PRE-DFKD's VAE replay (phase level, random tiny teacher, no data)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfkd_jax.ops import losses
from dfkd_jax import phases
from dfkd_jax.phases import replay
from dfkd_jax import state as state_lib
from dfkd_jax.models import vae as vae_lib

import steps  # the cached tiny runs of every method
from steps import IMAGE_SHAPE, tree_equal


# ----------------------------------------------------------------- student_step extras


@pytest.fixture(scope="module")
def dfad_state():
  ctx, _, state = steps.build_small("dfad")
  return ctx, state


def _student_loss_over(state, x):
  """The L1 KD loss over a whole batch, as one train-mode student forward computes it."""
  t_logits, _ = state.teacher(x)
  s_logits, _, _ = phases.student_forward(state.student, state.student.params, x, train=True)
  return float(losses.l1_logits(t_logits, s_logits))


@pytest.mark.parametrize("valid", [True, False])
def test_normalized_extra_equals_loss_over_concatenation(dfad_state, valid):
  ctx, state = dfad_state
  x = jax.random.normal(jax.random.key(0), (16, *IMAGE_SHAPE))
  xe = jax.random.normal(jax.random.key(1), (4, *IMAGE_SHAPE))
  w = 4 / 16 if valid else 0.0
  step = phases.student_step(lambda s, k: x, kd="l1",
                             extras=(("replay", lambda s, k: (xe, jnp.float32(w))),),
                             normalize=("replay",))
  _, m = jax.jit(step)(state, jax.random.key(2))
  whole = _student_loss_over(state, jnp.concatenate([x, xe]))
  if valid:  # exactly the KD loss over [x; x_replay] (MB-DFKD / PRE-DFKD)
    np.testing.assert_allclose(float(m["loss"]), whole, rtol=1e-5)
  else:  # an empty bank: the replay part is masked out, the loss is the main batch's
    np.testing.assert_allclose(float(m["loss"]), float(m["kd"]), rtol=1e-6)
    assert abs(float(m["loss"]) - whole) > 1e-4
  assert float(m["replay_loss"]) > 0


def test_unnormalized_extra_is_added_with_its_weight(dfad_state):
  ctx, state = dfad_state
  x = jax.random.normal(jax.random.key(0), (16, *IMAGE_SHAPE))
  xe = jax.random.normal(jax.random.key(1), (8, *IMAGE_SHAPE))
  step = phases.student_step(lambda s, k: x, kd="l1",
                             extras=(("condensed", lambda s, k: (xe, jnp.float32(2.0))),))
  _, m = step(state, jax.random.key(2))
  np.testing.assert_allclose(float(m["loss"]), float(m["kd"]) + 2.0 * float(m["condensed_loss"]),
                             rtol=1e-5)


# ----------------------------------------------------------------------------- MB-DFKD


def test_mb_dfkd_bank_fills_at_push_iterations_and_replay_is_masked_while_empty():
  r = steps.run("mb_dfkd")
  every, slots = r.config.mb_dfkd.push_every, r.config.mb_dfkd.slots
  counts = [int(s.bank.count) for s in r.states]
  # A push at the end of iterations 0, every, 2 every, ...
  assert counts == [min(slots, len([i for i in range(n) if i % every == 0]))
                    for n in range(len(r.states))]
  assert np.abs(r.states[1].bank.images[0]).sum() > 0
  assert np.abs(r.states[1].bank.images[1:]).sum() == 0
  # Iteration 0 trains before the first push: its student loss is the novel batch's alone.
  m0, m1 = r.metrics[0], r.metrics[1]
  np.testing.assert_allclose(m0["student/loss"], m0["student/kd"], rtol=1e-6)
  assert abs(float(m1["student/loss"]) - float(m1["student/kd"])) > 1e-6
  assert float(m0["bank/slots_filled"]) == 1.0


def test_mb_dfkd_generator_has_bn_statistics_and_adversarial_terms():
  m = steps.run("mb_dfkd").metrics[0]
  for term in ("oh", "ie", "act", "adv", "bn"):
    assert np.isfinite(m[f"generator/{term}"]) and abs(float(m[f"generator/{term}"])) > 0, term


def test_mb_dfkd_rejects_bad_slot_size():
  c = steps.tiny_config("mb_dfkd")
  c.mb_dfkd.slot_size = 12  # not a multiple of the 8 devices
  with pytest.raises(ValueError, match="slot_size=12"):
    steps.build("mb_dfkd", config=c)


# ----------------------------------------------------------------------------- PRE-DFKD


def test_vae_parameter_counts_match_the_official_model():
  module = vae_lib.VAE(img_size=32, channels=3, latent_dim=1000)
  shapes = jax.eval_shape(lambda: module.init({"params": jax.random.key(0)},
                                              jnp.zeros((2, 32, 32, 3)), jax.random.key(1),
                                              train=False))
  counts = {k: state_lib.num_params(v) for k, v in shapes["params"].items()}
  assert counts == {"encoder": 4_321_872, "decoder": 8_423_939}


def test_encoder_height_normalisation_and_bad_option():
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 1)) * 5
  outs = {}
  for norm in ("none", "height"):
    enc = vae_lib.Encoder(latent_dim=4, normalize=norm)
    v = enc.init(jax.random.key(0), x, train=False)
    outs[norm] = enc.apply(v, x, train=False)[0]
    # "height" sees x / ||x||_H: scaling the input does not change its output.
    if norm == "height":
      np.testing.assert_allclose(enc.apply(v, 3 * x, train=False)[0], outs[norm], rtol=1e-4,
                                 atol=1e-5)
  assert not np.allclose(outs["none"], outs["height"])
  with pytest.raises(ValueError, match="normalize"):
    vae_lib.Encoder(normalize="width").init(jax.random.key(0), x, train=False)


@pytest.fixture(scope="module")
def pre_setup():
  ctx, m = steps.build("pre_dfkd", num_devices=1)
  state = m.init(jax.random.key(0))
  p = ctx.config.pre_dfkd
  spec = replay.VAEReplay(memory_batch=p.memory_batch, latent_dim=p.vae_latent_dim,
                          vae_input=p.vae_input)
  return ctx, state, spec


def test_memory_inference_is_one_signed_adam_step(pre_setup):
  _, state, spec = pre_setup
  key = jax.random.key(3)
  x_m, _, _, _ = replay.infer_memory(spec, state, key, train=False)
  z = jax.random.normal(key, (spec.memory_batch, spec.latent_dim))
  g = jax.grad(lambda z_: replay.memory_latent_loss(spec, state, state.vae.params,
                                                    state.vae.batch_stats, z_, False)[0])(z)
  # A fresh Adam state moves every coordinate by lr * g / (|g| + eps) = lr * sign(g).
  z1 = z - spec.z_lr * g / (jnp.abs(g) + 1e-8)
  expected, _ = replay.decode(state.vae, state.vae.params, state.vae.batch_stats, z1, False)
  np.testing.assert_allclose(x_m, expected, rtol=1e-4, atol=1e-4)
  assert x_m.shape == (spec.memory_batch, *IMAGE_SHAPE)


def test_memory_latent_loss_has_class_balance_and_moment_terms(pre_setup):
  _, state, spec = pre_setup
  z = jnp.zeros((spec.memory_batch, spec.latent_dim))  # var 0, mean 0: moment term = 1
  loss, _ = replay.memory_latent_loss(spec, state, state.vae.params, state.vae.batch_stats,
                                      z, False)
  x, _ = replay.decode(state.vae, state.vae.params, state.vae.batch_stats, z, False)
  t = state.teacher(x)[0]
  np.testing.assert_allclose(loss, 5 * losses.dafl_ie(t) + losses.dafl_oh(t) + 1.0, rtol=1e-5)


@pytest.mark.parametrize("step", [0, 3])
def test_vae_update_and_the_leaked_latent_gradient(pre_setup, step):
  ctx, state, spec = pre_setup
  state = state.replace(step=jnp.asarray(step, jnp.int32))
  x = jax.random.normal(jax.random.key(4), (ctx.d.batch_size, *IMAGE_SHAPE))
  out = {}
  for leak in (False, True):
    s = dataclasses.replace(spec, leak_z_grad_into_vae=leak)
    new, m = jax.jit(lambda st, x_: replay.vae_update(s, st, jax.random.key(5), x_))(state, x)
    out[leak] = new.vae.params
    assert np.isfinite(float(m["loss"])) and float(m["pixel"]) > 0 and float(m["logit"]) > 0
  for part in ("encoder", "decoder"):
    assert not tree_equal(out[False][part], state.vae.params[part]), part
  # The leak only touches G_m, and only after the first iteration (no inference there).
  assert tree_equal(out[False]["encoder"], out[True]["encoder"])
  assert tree_equal(out[False]["decoder"], out[True]["decoder"]) == (step == 0)


def test_pre_dfkd_iteration_schedule():
  r = steps.run("pre_dfkd")
  c = r.config
  before, after = r.states[0], r.states[1]
  assert int(after.generator.step) == 1
  assert int(after.student.step) == c.distill.student_steps
  assert int(after.vae.step) == c.pre_dfkd.vae_steps
  m = r.metrics[0]
  assert "kd_vae/vae_loss" in m and "kd_vae/memory_loss" in m
  # our BN-statistics term (the official code has none: `faithful`, tests/test_configs.py)
  assert "generator/bn" in m and c.loss.bn == 10.0


def test_pre_dfkd_rejects_inconsistent_sizes():
  c = steps.tiny_config("pre_dfkd")
  c.pre_dfkd.vae_steps = c.distill.student_steps + 1
  with pytest.raises(ValueError, match="vae_steps"):
    steps.build("pre_dfkd", config=c)
  c = steps.tiny_config("pre_dfkd")
  c.pre_dfkd.vae_input = c.distill.batch_size
  with pytest.raises(ValueError, match="vae_input"):
    steps.build("pre_dfkd", config=c)


def test_faithful_config_switches_the_official_quirks():
  cfg = steps.config_module().get_config("method=pre_dfkd,faithful")
  default = steps.config_module().get_config("method=pre_dfkd")
  assert (cfg.pre_dfkd.vae_bn_eps, cfg.generator.bn_eps) == (0.8, 0.8)
  assert cfg.pre_dfkd.leak_z_grad_into_vae and cfg.pre_dfkd.encoder_normalize == "height"
  assert (default.pre_dfkd.vae_bn_eps, default.generator.bn_eps) == (1e-5, 1e-5)
  assert not default.pre_dfkd.leak_z_grad_into_vae
  assert default.pre_dfkd.encoder_normalize == "none"
  assert default.loss.adv_detach_teacher  # JS(student(x), sg(teacher(x))), as the official code
