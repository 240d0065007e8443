"""Method-level tests: jitted outer steps of every data-free method on a tiny synthetic setup.

No data are needed: the teacher is a randomly initialised `lenet5_bn` (`state.FrozenModel`), the
student a `lenet5_half_bn`, images 32x32x1, with the repository's tiny config (batch 32, ngf 8,
2 student steps, 3 inversion steps). Each method is built and compiled once per mesh size
(module cache) and stepped; the tests read the recorded states. The default mesh has the 8 fake
CPU devices of conftest, exactly as `train_and_evaluate` uses them, so the end-to-end tests
reuse these compilations through the persistent compilation cache.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfkd_jax.train import distill
from dfkd_jax import parallel
from dfkd_jax import phases
from steps import (GENERATIVE, IMAGE_SHAPE, METHODS, NUM_CLASSES, STEPS, build, host,
                   random_teacher, run, tiny_config,
                   tree_allclose, tree_equal)


@pytest.mark.parametrize("method", METHODS)
def test_step_updates_student_and_keeps_teacher_frozen(method):
  r = run(method)
  before, after = r.states[0], r.states[1]
  assert not tree_equal(before.student.params, after.student.params)
  assert int(after.student.step) >= 1
  assert tree_equal(before.teacher.params, after.teacher.params)
  assert tree_equal(before.teacher.batch_stats, after.teacher.batch_stats)
  assert all(bool(m["finite"]) for m in r.metrics)
  assert [int(s.step) for s in r.states] == list(range(STEPS + 1))


@pytest.mark.parametrize("method", METHODS)
def test_student_updates_per_step(method):
  r = run(method)
  per_step = int(r.states[1].student.step) - int(r.states[0].student.step)
  assert per_step == r.config.distill.student_steps


@pytest.mark.parametrize("method", GENERATIVE)
def test_generator_is_updated(method):
  r = run(method)
  before, after = r.states[0].generator, r.states[1].generator
  assert int(after.step) == int(before.step) + 1
  assert not tree_equal(before.params, after.params)


@pytest.mark.parametrize("method,prefix", [("dafl", "dafl"), ("dfad", "generator"),
                                           ("zskt", "generator"), ("mb_dfkd", "generator"),
                                           ("pre_dfkd", "generator")])
def test_synthesis_loss_and_generator_gradient_are_nonzero(method, prefix):
  r = run(method)
  metrics = r.metrics[0]
  if method in ("dfad", "zskt"):
    # The adversarial term plus the BatchNorm matching both add by default (the papers'
    # adversarial-only losses under `faithful`).
    nonzero = {k for k in ("oh", "ie", "act", "adv", "bn", "tv", "l2", "ce") if r.config.loss[k]}
    assert nonzero == {"adv", "bn"}
  assert abs(float(metrics[f"{prefix}/loss"])) > 1e-6
  assert float(metrics[f"{prefix}/grad_norm"]) > 1e-6
  if method != "dafl":
    # The adversarial term itself (Fast-Datafree's student=teacher bug makes it exactly zero).
    assert abs(float(metrics[f"{prefix}/adv"])) > 1e-6


def test_adi_competition_term_is_active():
  metrics = run("adi").metrics[0]
  # js_adv = 1 - JS; with a real student/teacher pair the JS part is strictly positive.
  assert 0.0 < float(metrics["synth/adv"]) < 1.0


@pytest.mark.parametrize("method", METHODS)
def test_every_nonzero_loss_weight_is_reported(method):
  """A non-zero synthesis weight in the config produces its metric (the term is computed)."""
  r = run(method)
  weights = {k: v for k, v in r.config.loss.items()
             if k in ("oh", "ie", "act", "adv", "bn", "tv", "l2", "ce") and v}
  assert weights, "every method has at least one synthesis term"
  keys = {k.split("/")[-1] for k in r.metrics[0]}
  assert set(weights) <= keys
  if r.config.loss.at_beta:
    assert "student/at" in r.metrics[0]


@pytest.mark.parametrize("method", METHODS)
def test_student_and_teacher_are_distinct(method):
  """The anchor bug (student=teacher) would make the adversarial term vanish."""
  _, m = build(method)
  state = m.init(jax.random.key(0))
  assert state.student.params is not state.teacher.params
  assert (jax.tree.map(jnp.shape, state.student.params)
          != jax.tree.map(jnp.shape, state.teacher.params))
  x = jax.random.normal(jax.random.key(2), (4, *IMAGE_SHAPE))
  t_logits, _ = state.teacher(x)
  s_logits, _ = state.student.apply_fn(state.student.variables, x, train=False)
  assert not np.allclose(t_logits, s_logits, atol=1e-3)


@pytest.mark.parametrize("method", ["deepinversion", "adi"])
def test_pool_grows_by_one_batch_per_iteration(method):
  r = run(method)
  batch, capacity = r.config.distill.batch_size, r.config.deepinversion.pool_size
  assert r.states[0].pool.capacity == capacity and capacity < STEPS * batch  # it wraps
  assert [int(s.pool.count) for s in r.states] == [
      min(i * batch, capacity) for i in range(STEPS + 1)]
  assert [int(s.pool.cursor) for s in r.states] == [
      i * batch % capacity for i in range(STEPS + 1)]
  # The pushed images are the optimised pixels, not zeros.
  assert np.abs(r.states[1].pool.images[:batch]).sum() > 0
  assert np.abs(r.states[1].pool.images[batch:]).sum() == 0
  # The third round overwrites the first one.
  assert not np.array_equal(r.states[3].pool.images[:batch], r.states[1].pool.images[:batch])
  np.testing.assert_array_equal(r.states[3].pool.images[batch:], r.states[2].pool.images[batch:])


@pytest.mark.parametrize("method", METHODS)
def test_make_step_traces_once(method):
  """`make_step` is wrapped in chex.assert_max_traces(n=1); three calls reuse one trace."""
  assert run(method).traces == [1] * STEPS


def test_step_is_deterministic_given_the_state():
  r = run("dfad")
  ctx, m = build("dfad")
  chex.clear_trace_counter()
  step_fn = distill.make_step(m)
  state = m.init(jax.random.key(0))  # the same structure, filled with the recorded state
  leaves = [jax.random.wrap_key_data(y) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
            else jnp.asarray(y)
            for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(r.states[1]))]
  state = jax.tree.unflatten(jax.tree.structure(state), leaves)
  state, _ = step_fn(parallel.replicate(state, ctx.mesh))
  assert tree_equal(host(state.student.params), r.states[2].student.params)
  assert tree_equal(host(state.generator.params), r.states[2].generator.params)


@pytest.mark.multidevice
@pytest.mark.parametrize("method", ["dfad", "deepinversion"])
def test_data_parallel_step_matches_single_device(method):
  """One outer step on 8 (fake) devices equals the same step on 1 device, to float tolerance."""
  assert jax.device_count() >= 8, "conftest sets 8 fake CPU devices"
  single = run(method, num_devices=1, steps=1)
  multi = run(method, num_devices=8)
  ref, got = single.states[1], multi.states[1]
  assert not tree_equal(single.states[0].student.params, ref.student.params)
  assert tree_allclose(ref.student.params, got.student.params, rtol=1e-4, atol=1e-5)
  assert tree_allclose(ref.student.batch_stats, got.student.batch_stats, rtol=1e-4, atol=1e-5)
  assert tree_allclose(ref.student.opt_state, got.student.opt_state, rtol=1e-3, atol=1e-4)
  # Adam's first step moves every parameter by about ±lr whatever the gradient's size, so
  # float noise in a near-zero gradient (a conv bias before BN) flips by up to 2·lr: compare
  # Adam's moments (the gradient itself) tightly and the Adam-updated values loosely.
  if method == "dfad":
    assert tree_allclose(ref.generator.opt_state, got.generator.opt_state, rtol=1e-4, atol=1e-6)
    lr = single.config.gen_optimizer.lr
    assert tree_allclose(ref.generator.params, got.generator.params, rtol=0, atol=2.5 * lr)
    assert tree_allclose(ref.generator.batch_stats, got.generator.batch_stats, rtol=1e-4,
                         atol=1e-5)
  else:
    lr = single.config.deepinversion.lr
    diff = np.abs(ref.pool.images - got.pool.images)
    assert diff.max() < 0.1 * lr and diff.mean() < 1e-4
  for k, v in single.metrics[0].items():
    np.testing.assert_allclose(multi.metrics[0][k], v, rtol=1e-4, atol=1e-4, err_msg=k)


@pytest.mark.multidevice
def test_generator_images_are_sharded_over_data_axis():
  ctx, m = build("dfad", num_devices=8)
  state = parallel.replicate(m.init(jax.random.key(0)), ctx.mesh)
  batch, latent = ctx.d.batch_size, ctx.d.latent_dim
  sample = jax.jit(lambda s: phases.sample_generator(s, jax.random.key(3), batch, latent,
                                                     ctx.mesh))
  x = sample(state)
  assert x.shape == (batch, *IMAGE_SHAPE)
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start)
  assert len(shards) == 8 and all(s.data.shape[0] == batch // 8 for s in shards)
  datas = [np.asarray(s.data) for s in shards]
  assert all(not np.array_equal(a, b) for i, a in enumerate(datas) for b in datas[i + 1:])


def test_deepinversion_pool_must_hold_a_batch():
  c = tiny_config("deepinversion")
  c.deepinversion.pool_size = c.distill.batch_size - 1
  with pytest.raises(ValueError, match="pool_size"):
    build("deepinversion", config=c)


def test_dafl_requires_one_student_step():
  c = tiny_config("dafl")
  c.distill.student_steps = 2
  with pytest.raises(ValueError, match="student_steps=1"):
    build("dafl", config=c)


def test_build_rejects_indivisible_batch_and_unknown_method():
  c = tiny_config("dfad")
  c.distill.batch_size = 12
  with pytest.raises(ValueError, match="not divisible by the 8 devices"):
    build("dfad", num_devices=8, config=c)
  c = tiny_config("dfad")
  c.method = "nope"
  with pytest.raises(ValueError, match="Valid data-free methods: adi, dafl"):
    build("dfad", config=c)


def test_student_ema_follows_the_student_with_a_warm_started_decay():
  """The "student_ema" part: w_ema <- d_t w_ema + (1 - d_t) w, d_t = min(0.9, (1+t)/(10+t))."""
  mesh = parallel.make_mesh(1)
  _, raw, _ = distill.build(tiny_config("dfad"), mesh=mesh, teacher=random_teacher(),
                            image_shape=IMAGE_SHAPE, num_classes=NUM_CLASSES)
  assert distill.with_student_ema(raw, 0.0) is raw
  method = distill.wrap_step(distill.with_student_ema(raw, 0.9))
  state = distill.place_state(method.init(jax.random.key(0)), mesh)
  expected = jax.device_get(state.student.params)
  assert tree_equal(host(state.student_ema["params"]), expected)
  step = distill.make_step(method)
  for t in range(3):
    state, _ = step(state)
    d = min(0.9, (1 + t) / (10 + t))
    student = jax.device_get(state.student.params)
    expected = jax.tree.map(lambda e, w, d=d: d * e + (1 - d) * w, expected, student)
  flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])  # noqa: E731
  np.testing.assert_allclose(flat(host(state.student_ema["params"])), flat(expected), rtol=1e-5,
                             atol=1e-7)
  assert not np.allclose(flat(host(state.student_ema["params"])), flat(student))
