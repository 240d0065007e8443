"""Phase-level tests on a tiny synthetic setup (random lenet5_bn teacher, no data).

They target the bugs of public DFKD code listed in style.md §4.5: a vanishing adversarial term
(student=teacher), BN hooks left registered during KD, hard-coded inversion labels, gradient
leakage from the student loss into the generator (DAFL), and per-device noise.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dfkd_jax.ops import bn_stats
from dfkd_jax.train import distill
from dfkd_jax import models
from dfkd_jax import parallel
from dfkd_jax import phases
import steps
from steps import BATCH, LATENT, IMAGE_SHAPE, NUM_CLASSES

@pytest.fixture(scope="module")
def gen_setup():
  """A dfad context and state (teacher, student, generator)."""
  ctx, _, state = steps.build_small("dfad")
  return ctx, state


def _norm(tree):
  return float(optax.tree.norm(tree))


# --------------------------------------------------------------- the adversarial term's gradient

# DFAD (l1) and ZSKT (kl) configs have the adversarial weight only: test_methods checks their
# generator gradient on a full step. The JS forms (ADI's, and the generator-based MB-DFKD and
# PRE-DFKD's) are checked here on a generator step.
ADV_TYPES = ("js", "js_batch")


@pytest.fixture(scope="module")
def adversarial_generator_steps(gen_setup):
  """One generator step per adversarial loss, with ONLY the adversarial weight non-zero."""
  ctx, state = gen_setup

  @jax.jit
  def steps(state):
    out = {}
    for adv_type in ADV_TYPES:
      w = phases.SynthesisWeights(adv=1.0, adv_type=adv_type)
      phase = phases.generator_step(w, batch=BATCH, latent_dim=LATENT, mesh=ctx.mesh)
      new_state, metrics = phase(state, jax.random.key(5))
      out[adv_type] = (metrics, new_state.generator.params)
    return out

  return jax.device_get(steps(state)), jax.device_get(state.generator.params)


@pytest.mark.parametrize("adv_type", ADV_TYPES)
def test_adversarial_term_alone_moves_the_generator(adversarial_generator_steps, adv_type):
  out, params_before = adversarial_generator_steps
  metrics, params_after = out[adv_type]
  assert set(metrics) >= {"adv", "loss", "grad_norm"}
  assert abs(float(metrics["adv"])) > 1e-6
  assert float(metrics["grad_norm"]) > 1e-6
  assert _norm(jax.tree.map(lambda a, b: a - b, params_after, params_before)) > 0


def _pixel_gradients(state, x):
  """Gradient of the adversarial term alone w.r.t. the pixels (ADI's competition term)."""
  out = {}
  for adv_type in ("l1", "js_batch"):
    w = phases.SynthesisWeights(adv=1.0, adv_type=adv_type, adv_temperature=3.0)
    term = lambda p, w=w: phases.synthesis_terms(w, p, state, student_train=False)[1]["adv"]
    out[adv_type] = jax.value_and_grad(term)(x)
  return out


@pytest.fixture(scope="module")
def pixels():
  return jax.random.normal(jax.random.key(4), (BATCH, *IMAGE_SHAPE))


def test_adi_competition_term_moves_the_pixels(gen_setup, pixels):
  _, state = gen_setup
  assert state.student.params is not state.teacher.params
  for adv_type, (value, grad) in jax.jit(_pixel_gradients)(state, pixels).items():
    assert abs(float(value)) > 1e-6, adv_type
    assert float(jnp.linalg.norm(grad)) > 1e-4, adv_type


def test_student_equal_to_teacher_kills_the_adversarial_gradient(gen_setup, pixels):
  """Control: the anchor bug (student=teacher) gives a zero gradient; the test above catches it."""
  _, state = gen_setup
  teacher = state.teacher
  clone = state.student.replace(params=teacher.params, batch_stats=teacher.batch_stats,
                                apply_fn=teacher.apply_fn)
  bad = state.replace(student=clone)
  for adv_type, (_, grad) in jax.jit(_pixel_gradients)(bad, pixels).items():
    assert float(jnp.linalg.norm(grad)) < 1e-6, adv_type


# --------------------------------------------------------------- DAFL's student-loss leakage


@pytest.fixture(scope="module")
def dafl_fused_steps(gen_setup):
  """DAFL's fused step with ALL synthesis weights zero: only the student loss is left."""
  ctx, state = gen_setup

  @jax.jit
  def steps(state):
    out = {}
    for to_gen in (False, True):
      phase = phases.generator_step(
          phases.SynthesisWeights(), batch=BATCH, latent_dim=LATENT, mesh=ctx.mesh,
          fused_student=phases.FusedStudent("dafl_kd", 1.0, grad_to_generator=to_gen))
      new_state, metrics = phase(state, jax.random.key(6))
      out[to_gen] = (metrics, new_state.student.params)
    return out

  return jax.device_get(steps(state)), jax.device_get(state.student.params)


def test_dafl_student_loss_does_not_reach_generator_by_default(dafl_fused_steps):
  out, student_before = dafl_fused_steps
  metrics, student_after = out[False]
  assert float(metrics["student_loss"]) > 0
  # The student still learns from the fused step ...
  assert _norm(jax.tree.map(lambda a, b: a - b, student_after, student_before)) > 0
  # ... but sg(x) stops the student loss from reaching the generator.
  assert float(metrics["grad_norm"]) == 0.0
  assert float(metrics["loss"]) == 0.0


def test_dafl_kd_grad_to_generator_reproduces_earlier_revision(dafl_fused_steps):
  out, _ = dafl_fused_steps
  assert float(out[True][0]["grad_norm"]) > 1e-6
  # The student's own update does not depend on the flag.
  np.testing.assert_allclose(out[True][0]["student_loss"], out[False][0]["student_loss"])


# --------------------------------------------------------------- DeepInversion labels


@pytest.mark.parametrize("batch", [10, 16, 32, 48, 256])
def test_inversion_labels_cover_all_classes(batch):
  labels = np.asarray(phases.inversion_labels(batch, NUM_CLASSES))
  assert labels.shape == (batch,)
  counts = np.bincount(labels, minlength=NUM_CLASSES)
  assert counts.size == NUM_CLASSES and counts.min() >= 1
  assert counts.max() - counts.min() <= 1  # balanced


def test_inversion_labels_with_many_classes():
  labels = np.asarray(phases.inversion_labels(256, 100))
  assert labels.shape == (256,) and set(labels.tolist()) == set(range(100))


def test_inversion_labels_reject_batch_smaller_than_classes():
  with pytest.raises(ValueError, match="cannot cover all 10 classes"):
    phases.inversion_labels(8, 10)


def test_inversion_round_uses_configured_batch_and_classes(monkeypatch):
  calls = []
  real = phases.inversion_labels

  def spy(batch, num_classes):
    calls.append((batch, num_classes))
    return real(batch, num_classes)

  monkeypatch.setattr(phases, "inversion_labels", spy)
  for batch in (16, 48):
    phases.inversion_round(phases.SynthesisWeights(ce=1.0), batch=batch, image_shape=IMAGE_SHAPE,
                           num_classes=NUM_CLASSES, iterations=1, lr=0.1, b1=0.9, b2=0.999,
                           jitter=0, flip=False, mesh=parallel.make_mesh(1))
  assert calls == [(16, NUM_CLASSES), (48, NUM_CLASSES)]


# --------------------------------------------------------------- no BN capture during KD


def _probing_teacher_apply(log):
  """A teacher apply_fn that records, per call, whether a BN-input capture is active.

  Before the real call it re-runs the model with every collection mutable: any interceptor that
  sows BN moments (such as `bn_stats.capture_bn_inputs`'s) makes a `bn_inputs` collection
  appear. Nothing else about the call changes.
  """
  real = models.get_model("lenet5_bn", num_classes=NUM_CLASSES).apply

  def apply_fn(variables, x, *args, **kwargs):
    probe_kwargs = {k: v for k, v in kwargs.items() if k != "mutable"}
    _, collections = real(variables, x, *args, mutable=True, **probe_kwargs)
    log.append({"captured": bn_stats.BN_INPUTS in collections,
                "mutable": kwargs.get("mutable")})
    return real(variables, x, *args, **kwargs)

  return apply_fn


def test_kd_student_step_does_not_capture_bn_inputs(monkeypatch, pixels):
  log = []
  _, _, state = steps.build_small("dfad", teacher=steps.teacher_with(_probing_teacher_apply(log)))
  captures = []
  real_capture = bn_stats.capture_bn_inputs
  monkeypatch.setattr(bn_stats, "capture_bn_inputs",
                      lambda *a, **k: captures.append(1) or real_capture(*a, **k))
  phase = phases.student_step(lambda s, k: pixels, kd="kl", temperature=3.0)
  jax.eval_shape(phase, state, jax.random.key(0))
  assert log, "the student step calls the teacher"
  assert not any(call["captured"] for call in log)
  assert all(not call["mutable"] for call in log)
  assert not captures

  # Control: the synthesis phase with a BN term does capture, and the probe sees it.
  log.clear()
  jax.eval_shape(lambda s, x: phases.synthesis_terms(phases.SynthesisWeights(bn=1.0), x, s)[0],
                 state, pixels)
  assert captures and any(call["captured"] for call in log)


def test_deepinversion_step_captures_only_during_synthesis():
  """In one DeepInversion outer step, BN inputs are captured by the inversion scan and not by
  the KD steps that follow (compare Fast-Datafree, where the hooks stay registered)."""
  log = []
  _, m, state = steps.build_small("deepinversion", teacher=steps.teacher_with(_probing_teacher_apply(log)))
  jax.eval_shape(distill.wrap_step(m).step, state)
  captured = [call["captured"] for call in log]
  assert captured[0] and not captured[-1]
  # After the first uncaptured call (the student phase), nothing is captured any more.
  first_kd = captured.index(False)
  assert not any(captured[first_kd:])


# --------------------------------------------------------------- per-device noise


@pytest.mark.multidevice
def test_sharded_latents_differ_across_devices():
  mesh8, mesh1 = parallel.make_mesh(8), parallel.make_mesh(1)
  key = jax.random.key(11)
  z = jax.jit(lambda k: phases.latents(k, BATCH, LATENT, mesh8))(key)
  assert z.sharding.spec == parallel.batch_sharding(mesh8).spec
  shards = sorted(z.addressable_shards, key=lambda s: s.index[0].start)
  assert len({s.device for s in shards}) == 8
  data = [np.asarray(s.data) for s in shards]
  assert all(d.shape == (BATCH // 8, LATENT) for d in data)
  assert all(not np.allclose(a, b) for i, a in enumerate(data) for b in data[i + 1:])
  # The shards are slices of ONE global draw: the same batch as on a single device.
  z1 = jax.jit(lambda k: phases.latents(k, BATCH, LATENT, mesh1))(key)
  np.testing.assert_array_equal(np.asarray(z), np.asarray(z1))


def test_pool_samples_are_jittered_views_of_pooled_images():
  """sample_pool(jitter=j): every drawn image is its pooled image rolled by one (dy, dx) with
  |dy|, |dx| <= j (shared by the batch, as DeepInversion's jitter); j = 0 returns pool images."""
  from dfkd_jax.ops import buffers  # pylint: disable=g-import-not-at-top
  image = jnp.arange(8 * 8, dtype=jnp.float32).reshape(1, 8, 8, 1)  # every pixel distinct
  pool = buffers.add(buffers.pool_init(4, (8, 8, 1)), image)

  class State:
    pass

  state = State()
  state.pool = pool
  mesh = parallel.make_mesh(1)
  plain = phases.sample_pool(state, jax.random.key(0), 3, mesh)
  np.testing.assert_array_equal(plain, jnp.repeat(image, 3, 0))
  shifts = set()
  for seed in range(12):
    x = np.asarray(phases.sample_pool(state, jax.random.key(seed), 3, mesh, jitter=2))
    found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
             if np.array_equal(x, np.repeat(np.roll(image, (dy, dx), (1, 2)), 3, 0))]
    assert len(found) == 1, f"seed {seed}: not a single <=2-pixel roll of the pooled image"
    shifts.add(found[0])
  assert len(shifts) > 1  # the shift is random
