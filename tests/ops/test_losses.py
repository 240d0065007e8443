"""Numeric tests of dfkd_jax.ops.losses against hand-computed values (numpy loops, float64)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfkd_jax.ops import losses

T = np.array([[2.0, 0.5, -1.0], [0.1, 0.3, 1.2]])
S = np.array([[1.0, 1.5, -0.5], [0.0, -0.2, 0.7]])


# ----------------------------------------------------------- numpy references (explicit loops)


def np_softmax_row(z, tau=1.0):
  z = [v / tau for v in z]
  m = max(z)
  e = [math.exp(v - m) for v in z]
  tot = sum(e)
  return [v / tot for v in e]


def np_kl_rows(t, s, tau=1.0):
  """Per-row KL(p^τ(t) ‖ p^τ(s)) by loops."""
  out = []
  for ti, si in zip(t, s):
    pt, ps = np_softmax_row(ti, tau), np_softmax_row(si, tau)
    out.append(sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps)))
  return out


def np_js(s, t, tau, reduction):
  clip = lambda v: min(max(v, 0.01), 0.99)  # noqa: E731
  b, k = len(s), len(s[0])
  kl_s = kl_t = 0.0
  for si, ti in zip(s, t):
    ps, pt = np_softmax_row(si, tau), np_softmax_row(ti, tau)
    for c in range(k):
      m = clip(0.5 * (ps[c] + pt[c]))
      kl_s += m * (math.log(m) - math.log(clip(ps[c])))
      kl_t += m * (math.log(m) - math.log(clip(pt[c])))
  denom = b if reduction == "batch" else b * k
  return 0.5 * kl_s / denom + 0.5 * kl_t / denom  # before the clip to [0, 1]


# ----------------------------------------------------------------- KD losses


def test_kd_kl_with_and_without_t2():
  tau = 2.0
  ref = sum(np_kl_rows(T, S, tau)) / len(T)
  np.testing.assert_allclose(losses.kd_kl(T, S, tau, scale_t2=False), ref, rtol=1e-5)
  np.testing.assert_allclose(losses.kd_kl(T, S, tau), tau**2 * ref, rtol=1e-5)
  np.testing.assert_allclose(losses.kd_kl(T, S, tau), 4.0 * losses.kd_kl(T, S, tau, False),
                             rtol=1e-6)


def test_kd_kl_is_zero_for_equal_logits_and_float32():
  out = losses.kd_kl(jnp.asarray(T, jnp.bfloat16), jnp.asarray(T, jnp.bfloat16), 3.0)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, 0.0, atol=1e-6)


def test_dafl_kd_is_batch_mean_tau1():
  ref = sum(np_kl_rows(T, S)) / len(T)
  np.testing.assert_allclose(losses.dafl_kd(T, S), ref, rtol=1e-5)


def test_kl_elem_is_elementwise_mean():
  b, k = T.shape
  ref = sum(np_kl_rows(T, S)) / (b * k)
  np.testing.assert_allclose(losses.kl_elem(T, S), ref, rtol=1e-5)
  # Batch mean vs elementwise mean: a factor K apart.
  np.testing.assert_allclose(losses.dafl_kd(T, S), k * losses.kl_elem(T, S), rtol=1e-5)


def test_l1_logits():
  ref = 0.0
  for i in range(T.shape[0]):
    for j in range(T.shape[1]):
      ref += abs(T[i, j] - S[i, j])
  np.testing.assert_allclose(losses.l1_logits(T, S), ref / T.size, rtol=1e-6)


# ----------------------------------------------------------------- js_adv


@pytest.mark.parametrize("reduction", ["batch", "elementwise"])
def test_js_adv_matches_loops(reduction):
  tau = 3.0
  pre = np_js(S, T, tau, reduction)
  assert 0.0 < pre < 1.0
  np.testing.assert_allclose(losses.js_adv(S, T, tau, reduction), 1.0 - pre, rtol=1e-5)


def test_js_adv_elementwise_is_batch_over_k_before_clip():
  k = T.shape[1]
  one_minus_batch = 1.0 - losses.js_adv(S * 3, T * 3, 1.0, "batch")
  one_minus_elem = 1.0 - losses.js_adv(S * 3, T * 3, 1.0, "elementwise")
  assert 0.0 < float(one_minus_batch) < 1.0
  np.testing.assert_allclose(one_minus_elem, one_minus_batch / k, rtol=1e-4)


def test_js_adv_argument_order_student_first():
  # KL(M‖P_S) + KL(M‖P_T) is symmetric in (s, t), so swapping gives the same value.
  np.testing.assert_allclose(losses.js_adv(S, T, 1.0, "batch"), losses.js_adv(T, S, 1.0, "batch"),
                             rtol=1e-6)


def test_js_adv_clip_at_one_saturates_batch_but_not_elementwise():
  k = 10
  s = np.full((1, k), -100.0)
  t = np.full((1, k), -100.0)
  s[0, 0] = 100.0
  t[0, 1] = 100.0
  # By hand: M = (.5, .5, .01 × 8), P_S = (.99, .01, ...), P_T = (.01, .99, ...).
  kl = 0.5 * math.log(0.5 / 0.99) + 0.5 * math.log(0.5 / 0.01)
  assert kl > 1.0
  batch = losses.js_adv(s, t, 1.0, "batch")
  np.testing.assert_allclose(batch, 0.0, atol=1e-7)
  np.testing.assert_allclose(losses.js_adv(s, t, 1.0, "elementwise"), 1.0 - kl / k, rtol=1e-5)
  g = jax.jit(jax.grad(lambda z: losses.js_adv(z, t, 1.0, "batch")))(jnp.asarray(s * 0.05))
  assert float(jnp.abs(g).sum()) == 0.0  # still saturated at these logits


def test_js_adv_clip_at_zero():
  # Clipped vectors are not normalised, so ½KL(M‖P_S) + ½KL(M‖P_T) can be slightly negative.
  s = np.array([[-1.05920311, -7.35042556, -3.27840503, -0.81341488, 2.85413351]])
  t = np.array([[-9.59152536, -1.73544518, 0.65823973, -6.00506981, 4.78007976]])
  pre = np_js(s, t, 1.0, "batch")
  assert pre < 0.0
  np.testing.assert_allclose(losses.js_adv(s, t, 1.0, "batch"), 1.0, atol=1e-7)
  g = jax.jit(jax.grad(lambda z: losses.js_adv(z, t, 1.0, "batch")))(jnp.asarray(s))
  assert float(jnp.abs(g).sum()) == 0.0


def test_js_adv_gradient_nonzero_when_unclipped():
  g = jax.grad(lambda z: losses.js_adv(z, T, 3.0, "elementwise"))(jnp.asarray(S))
  assert float(jnp.abs(g).sum()) > 0.0


def test_js_adv_bad_reduction():
  with pytest.raises(ValueError, match="reduction"):
    losses.js_adv(S, T, 1.0, "sum")


# ----------------------------------------------------------------- DAFL terms


def test_dafl_oh():
  ref = 0.0
  for row in T:
    p = np_softmax_row(row)
    ref += -math.log(p[int(np.argmax(row))])
  np.testing.assert_allclose(losses.dafl_oh(T), ref / len(T), rtol=1e-5)


def test_dafl_ie_uses_log10():
  k = T.shape[1]
  p_bar = [0.0] * k
  for row in T:
    for c, v in enumerate(np_softmax_row(row)):
      p_bar[c] += v / len(T)
  ref10 = sum(p * math.log10(p) for p in p_bar)
  ref_e = sum(p * math.log(p) for p in p_bar)
  out = losses.dafl_ie(T)
  np.testing.assert_allclose(out, ref10, rtol=1e-5)
  assert abs(float(out) - ref_e) > 1e-2
  np.testing.assert_allclose(losses.dafl_ie(np.zeros((4, 10))), -1.0, rtol=1e-6)  # −log10(10)


def test_dafl_act():
  f = np.array([[1.0, -2.0], [0.5, 0.0]])
  np.testing.assert_allclose(losses.dafl_act(f), -(1 + 2 + 0.5 + 0) / 4, rtol=1e-6)


# ----------------------------------------------------------------- image priors


def test_tv_on_known_array():
  x = np.array([[1.0, 2.0], [3.0, 5.0]]).reshape(1, 2, 2, 1)
  # right: (1-2, 3-5); down: (1-3, 2-5); anti-diagonal: 3-2; diagonal: 1-5.
  want_l2 = math.sqrt(1 + 4) + math.sqrt(4 + 9) + 1.0 + 4.0
  want_l1 = 1.5 + 2.5 + 1.0 + 4.0
  np.testing.assert_allclose(losses.tv_l2(x), want_l2, rtol=1e-6)
  np.testing.assert_allclose(losses.tv_l1(x), want_l1, rtol=1e-6)


def test_tv_l2_random_against_loops():
  x = np.random.default_rng(0).normal(size=(2, 3, 4, 2))
  b, h, w, c = x.shape
  sq = [0.0] * 4
  for n in range(b):
    for i in range(h):
      for j in range(w):
        for ch in range(c):
          if j + 1 < w:
            sq[0] += (x[n, i, j, ch] - x[n, i, j + 1, ch]) ** 2
          if i + 1 < h:
            sq[1] += (x[n, i, j, ch] - x[n, i + 1, j, ch]) ** 2
          if i + 1 < h and j + 1 < w:
            sq[2] += (x[n, i + 1, j, ch] - x[n, i, j + 1, ch]) ** 2
            sq[3] += (x[n, i, j, ch] - x[n, i + 1, j + 1, ch]) ** 2
  np.testing.assert_allclose(losses.tv_l2(x), sum(math.sqrt(v) for v in sq), rtol=1e-5)


def test_tv_l2_gradient_finite_on_constant_image():
  g = jax.grad(losses.tv_l2)(jnp.ones((1, 4, 4, 3)))
  assert bool(jnp.all(jnp.isfinite(g)))


def test_img_l2_modes():
  x = np.array([3.0, 4.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]).reshape(2, 2, 2, 1)
  np.testing.assert_allclose(losses.img_l2(x), (5.0 + 1.0) / 2, rtol=1e-6)
  np.testing.assert_allclose(losses.img_l2(x, per_image=False), math.sqrt(26.0), rtol=1e-6)


# ----------------------------------------------------------------- attention transfer


def np_attention(a):
  b, h, w, c = a.shape
  out = np.zeros((b, h * w))
  for n in range(b):
    for i in range(h):
      for j in range(w):
        out[n, i * w + j] = sum(a[n, i, j, ch] ** 2 for ch in range(c)) / c
    out[n] /= max(math.sqrt(sum(v * v for v in out[n])), 1e-12)
  return out


def test_attention_transfer_known_values():
  # Hand example: a_T = (1, 0), a_S = (0, 1): mean squared difference (1 + 1)/2 = 1.
  t = [np.array([1.0, 0.0]).reshape(1, 1, 2, 1)]
  s = [np.array([0.0, 2.0]).reshape(1, 1, 2, 1)]
  np.testing.assert_allclose(losses.attention_transfer(t, s, beta=250.0), 250.0, rtol=1e-6)

  rng = np.random.default_rng(1)
  t = [rng.normal(size=(2, 4, 4, 3)), rng.normal(size=(2, 2, 2, 5))]
  s = [rng.normal(size=(2, 4, 4, 6)), rng.normal(size=(2, 2, 2, 2))]  # channels may differ
  ref = sum(np.mean((np_attention(a) - np_attention(b)) ** 2) for a, b in zip(t, s))
  np.testing.assert_allclose(losses.attention_transfer(t, s, beta=2.0), 2.0 * ref, rtol=1e-5)


def test_attention_transfer_errors():
  a = np.ones((2, 4, 4, 3))
  with pytest.raises(ValueError, match="same number of stages"):
    losses.attention_transfer([a, a], [a])
  with pytest.raises(ValueError, match="spatial"):
    losses.attention_transfer([a], [np.ones((2, 2, 2, 3))])


# ----------------------------------------------------------------- supervised helpers


def test_cross_entropy_and_accuracy():
  labels = np.array([1, 2])
  ref = -(math.log(np_softmax_row(T[0])[1]) + math.log(np_softmax_row(T[1])[2])) / 2
  np.testing.assert_allclose(losses.cross_entropy(T, labels), ref, rtol=1e-5)
  np.testing.assert_allclose(losses.accuracy(T, np.array([0, 0])), 0.5)
  np.testing.assert_allclose(losses.accuracy(T, np.array([0, 2])), 1.0)


# ----------------------------------------------------------------- BN matching


def _bn_trees():
  stats = {"a": {"mean": np.array([1.0, 2.0]), "var": np.array([1.0, 1.0])},
           "b": {"c": {"mean": np.array([0.0]), "var": np.array([4.0])}}}
  running = {"a": {"mean": np.array([1.0, 0.0]), "var": np.array([2.0, 1.0])},
             "b": {"c": {"mean": np.array([4.0]), "var": np.array([4.0])}}}
  return stats, running


def test_bn_l2_hand_values():
  stats, running = _bn_trees()
  # a: ‖(0, 2)‖ + ‖(−1, 0)‖ = 3;  b/c: ‖(−4)‖ + ‖(0)‖ = 4.
  np.testing.assert_allclose(losses.bn_l2(stats, running), 7.0, rtol=1e-6)
  a_first = (("a",), ("b", "c"))
  c_first = (("b", "c"), ("a",))
  np.testing.assert_allclose(
      losses.bn_l2(stats, running, first_layer_scale=10.0, order=a_first), 34.0, rtol=1e-6)
  np.testing.assert_allclose(
      losses.bn_l2(stats, running, first_layer_scale=10.0, order=c_first), 43.0, rtol=1e-6)
  np.testing.assert_allclose(
      losses.bn_l2(stats, running, layer_weights={"a": 0.5}), 5.5, rtol=1e-6)
  np.testing.assert_allclose(
      losses.bn_l2(stats, running, layer_weights=[2.0, 3.0], order=a_first), 18.0, rtol=1e-6)


def test_bn_l2_errors():
  stats, running = _bn_trees()
  other = {"a": running["a"], "d": running["b"]["c"]}
  with pytest.raises(ValueError, match="different BatchNorm layers"):
    losses.bn_l2(stats, other)
  with pytest.raises(ValueError, match="different BatchNorm layers"):
    losses.bn_gauss_kl(stats, other)
  bad_shape = {"a": {"mean": np.zeros(3), "var": np.ones(3)}, "b": running["b"]}
  with pytest.raises(ValueError, match="shape"):
    losses.bn_l2(stats, bad_shape)
  with pytest.raises(ValueError, match="order"):
    losses.bn_l2(stats, running, first_layer_scale=10.0)
  with pytest.raises(ValueError, match="order"):
    losses.bn_l2(stats, running, first_layer_scale=10.0, order=(("a",),))


def test_bn_l2_gradient_finite_at_equality():
  _, running = _bn_trees()
  running = jax.tree.map(jnp.asarray, running)
  g = jax.grad(lambda st: losses.bn_l2(st, running))(running)
  assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(g))


def test_bn_gauss_kl_hand_values():
  stats, running = _bn_trees()
  def kl(m, v, rm, rv):
    return ((m - rm) ** 2 + v) / (2 * rv) - math.log(math.sqrt(v) / math.sqrt(rv)) - 0.5
  ref = kl(1, 1, 1, 2) + kl(2, 1, 0, 1) + kl(0, 4, 4, 4)
  np.testing.assert_allclose(losses.bn_gauss_kl(stats, running, eps=0.0), ref, rtol=1e-6)
  np.testing.assert_allclose(losses.bn_gauss_kl(running, running), 0.0, atol=1e-6)
  np.testing.assert_allclose(losses.bn_gauss_kl(stats, stats), 0.0, atol=1e-6)


# ----------------------------------------------------------------- VAE


def test_vae_kl():
  mu = np.array([[0.5, -1.0], [0.0, 0.0]])
  logvar = np.array([[0.0, math.log(2.0)], [0.0, 0.0]])
  ref = 0.0
  for i in range(2):
    for j in range(2):
      ref += -0.5 * (1 + logvar[i, j] - mu[i, j] ** 2 - math.exp(logvar[i, j]))
  np.testing.assert_allclose(losses.vae_kl(mu, logvar), ref / 2, rtol=1e-6)
  np.testing.assert_allclose(losses.vae_kl(np.zeros((3, 4)), np.zeros((3, 4))), 0.0, atol=1e-7)
