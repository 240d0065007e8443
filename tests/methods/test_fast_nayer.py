"""Fast-DFKD and NAYER: their generators, losses, bn_mmt memory, label embeddings, and the
method-specific behaviour of their jitted steps (warm-up, pool growth, generator life).

The generic method tests (tests/steps.py, tests/train/test_distill_e2e.py) already run both
hosts through the registry; these tests check what is particular to them.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import steps
from dfkd_jax.train import distill
from dfkd_jax.ops import losses
from dfkd_jax import models
from dfkd_jax import phases
from dfkd_jax.methods import base
from dfkd_jax.methods import fast_nayer

MEAN, STD = (0.2860,), (0.3530,)


def _noisy_generator(batch=12, num_classes=5):
  g = models.NoisyLayerGenerator(num_layers=-(-batch // num_classes), num_classes=num_classes,
                                 emb_size=16, img_size=32, channels=1, ngf=8, mean=MEAN, std=STD)
  emb = jnp.asarray(fast_nayer.label_embeddings("one_hot", num_classes))[
      phases.inversion_labels(batch, num_classes)]
  return g, emb, g.init(jax.random.key(0), emb, train=False)


def test_noisy_layer_generator_output_is_in_the_teachers_input_range():
  g, emb, variables = _noisy_generator()
  x, _ = g.apply(variables, emb, train=True, mutable=["batch_stats"])
  assert x.shape == (12, 32, 32, 1)
  lo, hi = (0.0 - MEAN[0]) / STD[0], (1.0 - MEAN[0]) / STD[0]
  assert float(x.min()) >= lo - 1e-5 and float(x.max()) <= hi + 1e-5
  # 3 noisy layers for 12 rows of 5 classes (the last one serves the 2 remainder rows).
  assert variables["params"]["noisy_kernel"].shape == (3, 5, 16)


def test_noisy_layer_generator_rejects_a_batch_larger_than_its_layers():
  g, emb, variables = _noisy_generator(batch=10, num_classes=5)
  with pytest.raises(ValueError, match="noisy layers"):
    g.apply(variables, jnp.concatenate([emb, emb[:1]]), train=True, mutable=["batch_stats"])


def test_redrawing_the_noisy_layers_changes_the_images_but_not_the_trunk():
  g, emb, variables = _noisy_generator()
  params = variables["params"]
  redrawn = fast_nayer.redraw_noisy(params, jax.random.key(5))
  assert not np.allclose(redrawn["noisy_kernel"], params["noisy_kernel"])
  assert float(jnp.abs(redrawn["noisy_bias"]).sum()) == 0.0
  chex_equal = jax.tree.map(np.array_equal, redrawn["trunk"], params["trunk"])
  assert all(jax.tree.leaves(chex_equal))
  run = lambda p: g.apply({**variables, "params": p}, emb, train=True,  # noqa: E731
                          mutable=["batch_stats"])[0]
  assert float(jnp.abs(run(redrawn) - run(params)).mean()) > 1e-3


def test_fast_generator_output_range_and_shape():
  g = models.FastGenerator(img_size=32, channels=1, ngf=8, mean=MEAN, std=STD)
  z = jax.random.normal(jax.random.key(0), (4, 16))
  variables = g.init(jax.random.key(1), z, train=False)
  x, _ = g.apply(variables, z * 100.0, train=True, mutable=["batch_stats"])
  assert x.shape == (4, 32, 32, 1)
  assert float(x.min()) >= -MEAN[0] / STD[0] - 1e-5
  assert float(x.max()) <= (1 - MEAN[0]) / STD[0] + 1e-5


def test_adv_masked_kl_value_mask_and_gradients():
  t = jnp.array([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]])
  s = jnp.array([[1.0, 0.5, 0.0], [2.0, 0.0, 0.0]])  # row 0 agrees, row 1 does not
  pt, ps = jax.nn.softmax(t), jax.nn.softmax(s)
  kl0 = float(jnp.sum(pt[0] * (jnp.log(pt[0]) - jnp.log(ps[0]))))
  np.testing.assert_allclose(losses.adv_masked_kl(s, t), -kl0 / 2, rtol=1e-6)
  gs, gt = jax.grad(lambda s, t: losses.adv_masked_kl(s, t), argnums=(0, 1))(s, t)
  assert float(jnp.abs(gs[0]).sum()) > 0 and float(jnp.abs(gt[0]).sum()) > 0  # t not detached
  assert float(jnp.abs(gs[1]).sum()) == 0 and float(jnp.abs(gt[1]).sum()) == 0  # masked out
  # No sample agrees: the term and its gradient vanish (why tests must force agreement).
  assert float(losses.adv_masked_kl(s[1:], t[1:])) == 0.0


def test_bn_momentum_memory_copies_then_averages():
  stats = {"a": {"mean": jnp.ones(3), "var": 2 * jnp.ones(3)}}
  empty = {"stats": jax.tree.map(jnp.zeros_like, stats), "ready": jnp.zeros((), bool)}
  # Before the first record the batch moments are used as they are.
  mixed = phases.momentum_bn_stats(stats, empty, 0.9)
  np.testing.assert_allclose(mixed["a"]["mean"], 1.0)
  memory = phases.update_bn_memory(empty, stats, 0.9)
  assert bool(memory["ready"])
  np.testing.assert_allclose(memory["stats"]["a"]["var"], 2.0)  # copied
  new = jax.tree.map(lambda v: 3 * v, stats)
  memory = phases.update_bn_memory(memory, new, 0.9)
  np.testing.assert_allclose(memory["stats"]["a"]["mean"], 0.9 * 1 + 0.1 * 3, rtol=1e-6)
  mixed = phases.momentum_bn_stats(new, memory, 0.9)
  np.testing.assert_allclose(mixed["a"]["mean"], 0.1 * 3 + 0.9 * 1.2, rtol=1e-6)
  # The memory carries no gradient.
  g = jax.grad(lambda m: phases.momentum_bn_stats(new, {"stats": m, "ready": jnp.array(True)},
                                                  0.9)["a"]["mean"].sum())(memory["stats"])
  assert float(jnp.abs(g["a"]["mean"]).sum()) == 0.0


def test_label_embeddings(tmp_path):
  np.testing.assert_array_equal(fast_nayer.label_embeddings("one_hot", 4), np.eye(4))
  g1 = fast_nayer.label_embeddings("gaussian", 4, size=8, seed=3)
  assert g1.shape == (4, 8) and np.array_equal(
      g1, fast_nayer.label_embeddings("gaussian", 4, size=8, seed=3))
  path = tmp_path / "emb.npy"
  np.save(path, np.arange(12, dtype=np.float64).reshape(4, 3))
  table = fast_nayer.label_embeddings("file", 4, path=str(path))
  assert table.dtype == np.float32 and table.shape == (4, 3)
  with pytest.raises(ValueError, match=r"expected \[5, L\]"):
    fast_nayer.label_embeddings("file", 5, path=str(path))
  with pytest.raises(ValueError, match="Cannot read"):
    fast_nayer.label_embeddings("file", 4, path=str(tmp_path / "missing.npy"))
  with pytest.raises(ValueError, match="label_emb_path"):
    fast_nayer.label_embeddings("file", 4)
  with pytest.raises(ValueError, match="valid: one_hot, gaussian, file"):
    fast_nayer.label_embeddings("clip", 4)


def test_pixel_normalisation_needs_stats_for_an_unknown_dataset():
  config = steps.tiny_config("fast")
  assert base.pixel_normalisation(config) == (MEAN, STD)
  config.dataset = "my_scans"
  with pytest.raises(ValueError, match="pixel_mean"):
    base.pixel_normalisation(config)
  config.pixel_mean, config.pixel_std = (0.5,), (0.25,)
  assert base.pixel_normalisation(config) == ((0.5,), (0.25,))


@pytest.mark.parametrize("method,per_iter", [("fast", 1), ("nayer", 1)])
def test_pool_grows_by_the_kept_batches(method, per_iter):
  r = steps.run(method)
  b = r.config.distill.batch_size
  capacity = r.states[0].pool.capacity
  assert [int(s.pool.count) for s in r.states] == [
      min(i * per_iter * b, capacity) for i in range(steps.STEPS + 1)]
  assert np.abs(r.states[1].pool.images[:b]).sum() > 0
  # The bn_mmt memory is recorded after the first synthesis.
  assert not bool(r.states[0].bn_memory["ready"]) and bool(r.states[1].bn_memory["ready"])


def _run_with(method, iters=3, student_steps=None, **block):
  config = steps.tiny_config(method)
  config[method].update(block)
  if student_steps:
    config.distill.student_steps = student_steps
  ctx, m = steps.build(method, config=config)
  state = distill.place_state(m.init(jax.random.key(0)), ctx.mesh)
  chex.clear_trace_counter()
  step = distill.make_step(m)  # advances state.step; the state is donated
  out, updates = [], []
  for _ in range(iters):
    before, n = jax.device_get(state.student.params), int(state.student.step)
    state, metrics = step(state)
    out.append((before, jax.device_get(state.student.params), jax.device_get(metrics)))
    updates.append(int(state.student.step) - n)
  _UPDATES[(method, iters)] = updates
  return config, out


_UPDATES = {}


@pytest.mark.parametrize("method", ["fast", "nayer"])
def test_warmup_skips_the_student_and_the_adversarial_term(method):
  config, out = _run_with(method, iters=2, warmup=1)
  (b0, a0, m0), (b1, a1, m1) = out
  assert steps.tree_equal(b0, a0)          # iteration 0: warm-up, student untouched
  assert not steps.tree_equal(b1, a1)      # iteration 1: the student trains
  w = config.loss
  during = w.bn * m0["synth/bn"] + w.ce * m0["synth/ce"]
  np.testing.assert_allclose(m0["synth/loss"], during, rtol=1e-5)  # no adv during warm-up
  after = w.bn * m1["synth/bn"] + w.ce * m1["synth/ce"] + w.adv * m1["synth/adv"]
  np.testing.assert_allclose(m1["synth/loss"], after, rtol=1e-5, atol=1e-6)


def test_nayer_generator_life_resets_the_generator_and_chunks_count_every_step():
  # 4 student steps in scanned chunks of 2: still 4 updates per iteration.
  _, out = _run_with("nayer", iters=3, g_life=2, student_steps=4, student_chunk=2)
  assert [float(m["synth/reset"]) for _, _, m in out] == [0.0, 0.0, 1.0]
  assert _UPDATES[("nayer", 3)] == [4, 4, 4]


@pytest.mark.parametrize("n,chunk", [(9, 3), (9, 4), (5, 2), (3, 5), (4, 0)])
def test_chunked_loop_runs_every_index_once_in_order(n, chunk):
  # carry = 10 * carry + i + 1 spells the visited indices as digits: order and count exact.
  run = jax.jit(lambda c: fast_nayer._loop(n, lambda c, i: 10 * c + i + 1, c, True, chunk))
  assert int(run(jnp.asarray(0, jnp.int64 if jax.config.x64_enabled else jnp.int32))) == int(
      "".join(str(i + 1) for i in range(n)))


def test_nayer_chunked_synthesis_trains():
  # The same steps as the unrolled loop (the test above); Adam's sign-like first updates
  # amplify float rounding, so the two runs are not compared number by number.
  _, out = _run_with("nayer", iters=2, g_steps=6, synth_chunk=2)
  for _, _, m in out:
    assert np.isfinite(float(m["synth/loss"]))
    assert float(m["synth/best_loss"]) <= float(m["synth/loss"]) + 1e-6


def test_fast_meta_step_moves_the_meta_generator():
  r = steps.run("fast")
  m = r.metrics[0]
  assert float(m["synth/meta_grad_norm"]) > 0
  # The kept batch is the lowest-loss one, so its loss is at most the last step's.
  assert float(m["synth/best_loss"]) <= float(m["synth/loss"]) + 1e-6


@pytest.mark.parametrize("method,key,value,match", [
    ("fast", "k", 0, "fast.k"),
    ("fast", "warmup", 6, "leaves no student training"),
    ("nayer", "g_steps", 0, "nayer.g_steps"),
    ("nayer", "pool_size", 8, "pool_size"),
])
def test_bad_settings_are_clear_errors(method, key, value, match):
  config = steps.tiny_config(method)
  config[method][key] = value
  with pytest.raises(ValueError, match=match):
    steps.build(method, config=config)


def test_student_steps_must_fill_whole_chunks():
  config = steps.tiny_config("fast")
  config.distill.student_steps, config.fast.student_chunk = 4, 3
  with pytest.raises(ValueError, match="multiple of student_chunk=3"):
    steps.build("fast", config=config)


def test_student_flip_changes_what_the_student_sees():
  """Same seed, same synthesis; with student_flip the student's batches are mirrored at random,
  so its weights after the first student iteration differ (and stay finite)."""
  _, plain = _run_with("nayer", iters=2, warmup=1, student_jitter=0)
  _, flipped = _run_with("nayer", iters=2, warmup=1, student_jitter=0, student_flip=True)
  assert steps.tree_equal(plain[0][1], flipped[0][1])  # warm-up: no student step yet
  assert not steps.tree_equal(plain[1][1], flipped[1][1])
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(flipped[1][1]))
