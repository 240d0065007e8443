"""Loss library of docs/methods.md §0.2: pure functions, all computed in float32.

Notation: B batch size, K number of classes, t and s teacher and student logits ([B, K]),
p^τ(z) = softmax(z/τ), KL(p‖q) = Σ_k p_k (log p_k − log q_k). Every function casts its inputs to
float32 first, whatever the model dtype.

| Function | Formula |
|---|---|
| kd_kl | τ² · (1/B) Σ_i KL(p^τ(t_i) ‖ p^τ(s_i))  (τ² optional) |
| dafl_kd | (1/B) Σ_i KL(p¹(t_i) ‖ p¹(s_i)) |
| kl_elem | (1/(B·K)) Σ_ik p¹(t)_ik (log p¹(t)_ik − log p¹(s)_ik) |
| l1_logits | (1/(B·K)) Σ_ik |t_ik − s_ik| |
| js_adv | 1 − clip(½ KL(M‖P_S) + ½ KL(M‖P_T), 0, 1), clipped probabilities, see its docstring |
| dafl_oh | (1/B) Σ_i CE(t_i, argmax_k t_ik) |
| dafl_ie | Σ_k p̄_k log₁₀ p̄_k,  p̄ = (1/B) Σ_i p¹(t_i) |
| dafl_act | −(1/(B·F)) Σ_ij |f_ij| |
| tv_l2 | Σ_{d ∈ 4 neighbour directions} ‖Δ_d x‖_F |
| tv_l1 | Σ_{d ∈ 4 neighbour directions} mean |Δ_d x| |
| img_l2 | (1/B) Σ_i ‖x_i‖₂  or  ‖x‖₂ over the whole batch |
| attention_transfer | β Σ_l (1/(B·n_l)) Σ_ij (a^T_l − a^S_l)²_ij |
| cross_entropy | (1/B) Σ_i −log p¹(z_i)_{y_i} |
| bn_l2 | Σ_l w_l (‖μ_l − μ̂_l‖₂ + ‖σ²_l − σ̂²_l‖₂) |
| bn_gauss_kl | Σ_l Σ_c [((μ_lc − μ̂_lc)² + σ²_lc)/(2σ̂²_lc) − log(σ_lc/σ̂_lc) − ½] |
| vae_kl | (1/B) Σ_i −½ Σ_j (1 + logvar_ij − μ²_ij − exp(logvar_ij)) |

Norms use a safe square root whose gradient at 0 is 0 (instead of NaN), so a term that happens to be
exactly zero (a constant image, stats equal to the running stats) does not poison the gradients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from dfkd_jax.ops import bn_stats

PyTree = Any
LayerPath = tuple[str, ...]

_JS_CLIP_LO = 0.01
_JS_CLIP_HI = 0.99


def _f32(x: Any) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def _safe_norm(x: jax.Array, axis: int | tuple[int, ...] | None = None) -> jax.Array:
  """ℓ2 / Frobenius norm sqrt(Σ x²) with a zero (not NaN) gradient at x = 0."""
  sq = jnp.sum(jnp.square(x), axis=axis)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


# --------------------------------------------------------------------------- distillation losses


def kd_kl(teacher_logits: jax.Array, student_logits: jax.Array, temperature: float = 1.0,
          scale_t2: bool = True) -> jax.Array:
  """Hinton KD loss, batch mean of the per-sample KL divergence.

  L = τ² · (1/B) Σ_i KL(p^τ(t_i) ‖ p^τ(s_i)),  KL(p‖q) = Σ_k p_k (log p_k − log q_k),
  without the τ² factor when ``scale_t2=False``. The class axis is the last one; all leading axes
  are averaged.

  Args:
    teacher_logits: t, [..., K].
    student_logits: s, [..., K].
    temperature: τ.
    scale_t2: multiply by τ² (keeps gradient magnitudes comparable across τ).

  Returns:
    Scalar float32 loss.
  """
  tau = float(temperature)
  log_pt = jax.nn.log_softmax(_f32(teacher_logits) / tau, axis=-1)
  log_ps = jax.nn.log_softmax(_f32(student_logits) / tau, axis=-1)
  per_sample = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)
  loss = jnp.mean(per_sample)
  return loss * tau**2 if scale_t2 else loss


def dafl_kd(teacher_logits: jax.Array, student_logits: jax.Array) -> jax.Array:
  """DAFL student loss: L = (1/B) Σ_i KL(p¹(t_i) ‖ p¹(s_i)) (τ = 1, no τ² factor).

  Args:
    teacher_logits: t, [B, K].
    student_logits: s, [B, K].

  Returns:
    Scalar float32 loss.
  """
  return kd_kl(teacher_logits, student_logits, temperature=1.0, scale_t2=False)


def kl_elem(teacher_logits: jax.Array, student_logits: jax.Array) -> jax.Array:
  """ZSKT KL with an elementwise mean (PyTorch ``kl_div`` default ``reduction="mean"``).

  L = (1/(B·K)) Σ_ik p¹(t)_ik (log p¹(t)_ik − log p¹(s)_ik), i.e. ``dafl_kd`` / K.

  Args:
    teacher_logits: t, [B, K].
    student_logits: s, [B, K].

  Returns:
    Scalar float32 loss.
  """
  log_pt = jax.nn.log_softmax(_f32(teacher_logits), axis=-1)
  log_ps = jax.nn.log_softmax(_f32(student_logits), axis=-1)
  return jnp.mean(jnp.exp(log_pt) * (log_pt - log_ps))


def l1_logits(teacher_logits: jax.Array, student_logits: jax.Array) -> jax.Array:
  """Mean absolute logit difference (DFAD, MB-DFKD, PRE-DFKD).

  L = (1/(B·K)) Σ_ik |t_ik − s_ik|.

  Args:
    teacher_logits: t, [B, K].
    student_logits: s, [B, K].

  Returns:
    Scalar float32 loss.
  """
  return jnp.mean(jnp.abs(_f32(teacher_logits) - _f32(student_logits)))


def js_adv(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 3.0,
           reduction: str = "elementwise") -> jax.Array:
  """Clipped "Jensen–Shannon" competition loss of the official DeepInversion/PRE-DFKD code.

  P_S = clip(p^τ(s), .01, .99),  P_T = clip(p^τ(t), .01, .99),
  M   = clip(½ (p^τ(s) + p^τ(t)), .01, .99),
  KL(M‖P) = Σ_k M_k (log M_k − log P_k)  (reduced by ``reduction``),
  L = 1 − clip(½ KL(M‖P_S) + ½ KL(M‖P_T), 0, 1).

  Reductions of the KL terms, applied BEFORE the clip to [0, 1]:
    - ``"batch"``: sum over k, mean over the batch (ADI / DeepInversion, PyTorch "batchmean");
    - ``"elementwise"``: mean over all B·K entries (PRE-DFKD, MB-DFKD, PyTorch "mean").

  Traps (reproduced on purpose, docs/methods.md §0.2):
    1. KL is taken with M as the *target* distribution, KL(M‖P); the textbook JS divergence uses
       KL(P‖M). With clipped (hence unnormalised) vectors the sum can even be slightly negative, in
       which case the clip at 0 makes the loss exactly 1 with zero gradient.
    2. The elementwise reduction is exactly 1/K times the batch reduction before the clip, and so is
       its gradient. Since each clipped log-ratio is at most log 99 ≈ 4.6, the clip at 1 is never
       reached for K ≥ 5 under the elementwise mean, while under the batch mean a large disagreement
       saturates it (loss 0, zero gradient). The two reductions change the effective loss weight.

  Minimising L pushes the inputs towards teacher–student disagreement.

  Args:
    student_logits: s, [B, K] (note the argument order: student first, like the official code).
    teacher_logits: t, [B, K].
    temperature: τ.
    reduction: ``"elementwise"`` or ``"batch"``.

  Returns:
    Scalar float32 loss in [0, 1].
  """
  if reduction not in ("elementwise", "batch"):
    raise ValueError(f"reduction must be 'elementwise' or 'batch', got {reduction!r}")
  tau = float(temperature)
  ps = jax.nn.softmax(_f32(student_logits) / tau, axis=-1)
  pt = jax.nn.softmax(_f32(teacher_logits) / tau, axis=-1)
  m = jnp.clip(0.5 * (ps + pt), _JS_CLIP_LO, _JS_CLIP_HI)
  ps = jnp.clip(ps, _JS_CLIP_LO, _JS_CLIP_HI)
  pt = jnp.clip(pt, _JS_CLIP_LO, _JS_CLIP_HI)
  log_m = jnp.log(m)
  kl_ms = m * (log_m - jnp.log(ps))
  kl_mt = m * (log_m - jnp.log(pt))
  if reduction == "batch":
    reduce = lambda a: jnp.mean(jnp.sum(a, axis=-1))  # noqa: E731
  else:
    reduce = jnp.mean
  js = 0.5 * reduce(kl_ms) + 0.5 * reduce(kl_mt)
  return 1.0 - jnp.clip(js, 0.0, 1.0)


def adv_masked_kl(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """CMI/Fast/NAYER "decision adversarial" term (docs/methods.md §11.3), to be minimised:

  L = −(1/B) Σ_i m_i Σ_k p(t_i)_k (log p(t_i)_k − log p(s_i)_k),  m_i = 1[argmax s_i = argmax t_i]

  (τ = 1, no τ² factor). The mask carries no gradient; the mean runs over all B samples, the
  masked ones included, so the term is about 0 while the student rarely agrees with the teacher.
  Neither logit is detached: the gradient flows through the teacher's softmax too.

  Args:
    student_logits: s, [B, K] (student first, as in `js_adv`).
    teacher_logits: t, [B, K].

  Returns:
    Scalar float32 loss (<= 0).
  """
  s, t = _f32(student_logits), _f32(teacher_logits)
  mask = jax.lax.stop_gradient(
      (jnp.argmax(s, -1) == jnp.argmax(t, -1)).astype(jnp.float32))
  log_pt = jax.nn.log_softmax(t, -1)
  kl = jnp.sum(jnp.exp(log_pt) * (log_pt - jax.nn.log_softmax(s, -1)), -1)
  return -jnp.mean(mask * kl)


# --------------------------------------------------------------------------- DAFL generator terms


def dafl_oh(teacher_logits: jax.Array) -> jax.Array:
  """DAFL one-hot loss: L = (1/B) Σ_i CE(t_i, argmax_k t_ik).

  The pseudo-labels come from an argmax, which has no gradient; the loss is differentiated
  through the logits inside the cross-entropy only.

  Args:
    teacher_logits: t, [B, K].

  Returns:
    Scalar float32 loss.
  """
  t = _f32(teacher_logits)
  return cross_entropy(t, jnp.argmax(t, axis=-1))


def dafl_ie(teacher_logits: jax.Array) -> jax.Array:
  """DAFL information-entropy term (log base 10), minimised to balance the classes.

  L = Σ_k p̄_k log₁₀ p̄_k,  p̄ = (1/B) Σ_i p¹(t_i), i.e. minus the base-10 entropy of the batch-mean
  prediction. Entries with p̄_k = 0 contribute 0.

  Args:
    teacher_logits: t, [B, K].

  Returns:
    Scalar float32 loss (≤ 0; its minimum −log₁₀ K is reached by a uniform p̄).
  """
  p_bar = jnp.mean(jax.nn.softmax(_f32(teacher_logits), axis=-1), axis=0)
  positive = p_bar > 0
  safe = jnp.where(positive, p_bar, 1.0)
  return jnp.sum(jnp.where(positive, p_bar * jnp.log10(safe), 0.0))


def dafl_act(features: jax.Array) -> jax.Array:
  """DAFL activation loss: L = −(1/(B·F)) Σ_ij |f_ij| (f: the teacher's pooled feature).

  Args:
    features: f, [B, F] (any shape: the mean runs over every entry).

  Returns:
    Scalar float32 loss.
  """
  return -jnp.mean(jnp.abs(_f32(features)))


# --------------------------------------------------------------------------- image priors


def _neighbour_differences(x: jax.Array) -> tuple[jax.Array, ...]:
  """The 4 neighbour differences of an NHWC batch: right, down and the two diagonals."""
  return (
      x[:, :, :-1, :] - x[:, :, 1:, :],       # right (along W)
      x[:, :-1, :, :] - x[:, 1:, :, :],       # down (along H)
      x[:, 1:, :-1, :] - x[:, :-1, 1:, :],    # anti-diagonal
      x[:, :-1, :-1, :] - x[:, 1:, 1:, :],    # diagonal
  )


def tv_l2(x: jax.Array) -> jax.Array:
  """DeepInversion L2 total variation of an NHWC batch.

  L = Σ_{d} ‖Δ_d x‖_F, summed over the 4 neighbour differences d (right x[:, i, j] − x[:, i, j+1],
  down x[:, i, j] − x[:, i+1, j], and the diagonals x[:, i+1, j] − x[:, i, j+1] and
  x[:, i, j] − x[:, i+1, j+1]); each Frobenius norm is over the whole difference tensor (batch
  included) and is not squared.

  Args:
    x: images, [B, H, W, C].

  Returns:
    Scalar float32 loss.
  """
  x = _f32(x)
  return sum(_safe_norm(d) for d in _neighbour_differences(x))


def tv_l1(x: jax.Array) -> jax.Array:
  """L1 total variation over the same 4 neighbour differences as ``tv_l2``.

  L = Σ_d mean |Δ_d x| (mean over every entry of each difference tensor). DeepInversion's defaults
  give this term weight 0 (docs/methods.md §5); our normalisation (plain means, no extra scale) is our
  choice.

  Args:
    x: images, [B, H, W, C].

  Returns:
    Scalar float32 loss.
  """
  x = _f32(x)
  return sum(jnp.mean(jnp.abs(d)) for d in _neighbour_differences(x))


def img_l2(x: jax.Array, per_image: bool = True) -> jax.Array:
  """DeepInversion ℓ2 image prior.

  per_image=True (ImageNet script): L = (1/B) Σ_i ‖x_i‖₂ (norm over H, W, C of each image);
  per_image=False (CIFAR script): L = ‖x‖₂ over the whole batch.

  Args:
    x: images, [B, ...].
    per_image: see above.

  Returns:
    Scalar float32 loss.
  """
  x = _f32(x)
  if per_image:
    return jnp.mean(_safe_norm(x.reshape(x.shape[0], -1), axis=-1))
  return _safe_norm(x)


def attention_transfer(teacher_stages: Sequence[jax.Array], student_stages: Sequence[jax.Array],
                       beta: float = 250.0) -> jax.Array:
  """ZSKT attention-transfer term over matching stage outputs.

  a_l = vec(mean_c A_l²) / max(‖vec(mean_c A_l²)‖₂, 1e-12)   (per sample, A_l: [B, H, W, C]),
  L = β Σ_l (1/(B·n_l)) Σ_ij (a^T_l − a^S_l)²_ij,  n_l = H_l·W_l.

  Channel counts may differ between teacher and student; batch and spatial sizes must match.

  Args:
    teacher_stages: sequence of teacher stage outputs, each NHWC.
    student_stages: sequence of student stage outputs, same length and spatial shapes.
    beta: β.

  Returns:
    Scalar float32 loss.

  Raises:
    ValueError: if the numbers of stages differ, or a pair of stages differs in batch or spatial
      shape.
  """
  teacher_stages = list(teacher_stages)
  student_stages = list(student_stages)
  if len(teacher_stages) != len(student_stages):
    raise ValueError(
        f"attention_transfer needs the same number of stages in teacher and student; got "
        f"{len(teacher_stages)} teacher stages and {len(student_stages)} student stages")

  def attention(a: jax.Array) -> jax.Array:
    a = _f32(a)
    am = jnp.mean(jnp.square(a), axis=-1).reshape(a.shape[0], -1)
    norm = jnp.sqrt(jnp.sum(jnp.square(am), axis=-1, keepdims=True))
    return am / jnp.maximum(norm, 1e-12)

  total = jnp.zeros((), jnp.float32)
  for i, (a_t, a_s) in enumerate(zip(teacher_stages, student_stages)):
    if a_t.shape[:-1] != a_s.shape[:-1]:
      raise ValueError(
          f"attention_transfer stage {i}: teacher and student outputs must share batch and spatial "
          f"shape (NHWC without C); got teacher {tuple(a_t.shape)} and student {tuple(a_s.shape)}")
    total = total + jnp.mean(jnp.square(attention(a_t) - attention(a_s)))
  return beta * total


# --------------------------------------------------------------------------- supervised helpers


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy with integer labels: L = (1/B) Σ_i −log p¹(z_i)_{y_i}.

  Args:
    logits: z, [B, K].
    labels: y, [B] integers in [0, K).

  Returns:
    Scalar float32 loss.
  """
  log_p = jax.nn.log_softmax(_f32(logits), axis=-1)
  picked = jnp.take_along_axis(log_p, jnp.asarray(labels)[..., None].astype(jnp.int32), axis=-1)
  return -jnp.mean(picked)


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Top-1 accuracy: (1/B) Σ_i [argmax_k z_ik = y_i], as float32.

  Args:
    logits: z, [B, K].
    labels: y, [B] integers.

  Returns:
    Scalar float32 in [0, 1].
  """
  return jnp.mean((jnp.argmax(logits, axis=-1) == jnp.asarray(labels)).astype(jnp.float32))


# --------------------------------------------------------------------------- BN-statistics matching


def _paired_layers(stats: PyTree, running_stats: PyTree,
                   order: Sequence[LayerPath] | None) -> tuple[LayerPath, ...]:
  """Checks that both trees hold the same BN layers with the same shapes; returns the layer paths.

  The paths come back in ``order`` when given (call order), otherwise sorted by name.
  """
  got = bn_stats.layer_paths(stats)
  want = bn_stats.layer_paths(running_stats)
  if not got:
    raise ValueError("stats holds no BatchNorm layer (no node with 'mean' and 'var')")
  if got != want:
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    raise ValueError(
        "stats and running_stats describe different BatchNorm layers: "
        f"in running_stats only: {['/'.join(p) for p in missing]}; "
        f"in stats only: {['/'.join(p) for p in extra]}")
  for path in got:
    s, r = bn_stats.get_layer(stats, path), bn_stats.get_layer(running_stats, path)
    for name in ("mean", "var"):
      if jnp.shape(s[name]) != jnp.shape(r[name]):
        raise ValueError(
            f"BatchNorm layer {'/'.join(path)}: {name} has shape {jnp.shape(s[name])} in stats "
            f"but {jnp.shape(r[name])} in running_stats")
  if order is None:
    return got
  order = tuple(tuple(p) for p in order)
  if sorted(order) != list(got) or len(set(order)) != len(order):
    raise ValueError(
        f"order {['/'.join(p) for p in order]} does not list each BatchNorm layer of stats exactly "
        f"once: {['/'.join(p) for p in got]}")
  return order


def _layer_weights(paths: tuple[LayerPath, ...], layer_weights: Any, first_layer_scale: float,
                   order: Sequence[LayerPath] | None) -> list[Any]:
  """Resolves per-layer weights w_l for ``bn_l2``."""
  if layer_weights is None:
    weights = [1.0] * len(paths)
  elif isinstance(layer_weights, Mapping):
    lookup = {}
    for k, v in layer_weights.items():
      key = tuple(k.split("/")) if isinstance(k, str) else tuple(k)
      if key not in paths:
        raise ValueError(f"layer_weights names an unknown BatchNorm layer {'/'.join(key)!r}")
      lookup[key] = v
    weights = [lookup.get(p, 1.0) for p in paths]
  else:
    if order is None:
      raise ValueError("a sequence of layer_weights needs `order` (the call order of the layers)")
    weights = list(layer_weights)
    if len(weights) != len(paths):
      raise ValueError(f"got {len(weights)} layer_weights for {len(paths)} BatchNorm layers")
  if first_layer_scale != 1.0:
    if order is None:
      raise ValueError(
          "first_layer_scale needs `order` (the call order returned by capture_bn_inputs) to know "
          "which BatchNorm layer comes first")
    weights[0] = weights[0] * first_layer_scale
  return weights


def bn_l2(stats: PyTree, running_stats: PyTree, layer_weights: Any = None,
          first_layer_scale: float = 1.0, order: Sequence[LayerPath] | None = None) -> jax.Array:
  """DeepInversion BN-statistics matching loss (norms not squared).

  L = Σ_l w_l (‖μ_l − μ̂_l‖₂ + ‖σ²_l − σ̂²_l‖₂),

  with μ_l, σ²_l the moments of the input of BN layer l (``stats``) and μ̂_l, σ̂²_l its running
  statistics (``running_stats``). The first layer in call order (``order[0]``) has its weight
  multiplied by ``first_layer_scale`` (10 in DeepInversion's ImageNet script).

  Args:
    stats: the ``stats`` tree of ``bn_stats.capture_bn_inputs`` (leaves ``{"mean", "var"}``).
    running_stats: the model's ``batch_stats`` tree, walked by the same paths.
    layer_weights: None (all 1), a mapping from layer path (tuple or ``"a/b"`` string) to weight
      (missing layers weigh 1), or a sequence of weights aligned with ``order``.
    first_layer_scale: multiplier of the first layer's weight; needs ``order`` unless it is 1.
    order: the call order returned by ``capture_bn_inputs``.

  Returns:
    Scalar float32 loss.

  Raises:
    ValueError: if the two trees hold different layers or shapes, or if ``order`` is needed and
      missing or inconsistent.
  """
  paths = _paired_layers(stats, running_stats, order)
  weights = _layer_weights(paths, layer_weights, first_layer_scale, order)
  total = jnp.zeros((), jnp.float32)
  for path, w in zip(paths, weights):
    s, r = bn_stats.get_layer(stats, path), bn_stats.get_layer(running_stats, path)
    term = (_safe_norm(_f32(s["mean"]) - _f32(r["mean"]))
            + _safe_norm(_f32(s["var"]) - _f32(r["var"])))
    total = total + w * term
  return total


def bn_gauss_kl(stats: PyTree, running_stats: PyTree, eps: float = 1e-5) -> jax.Array:
  """KL divergence between per-channel Gaussians of the batch and of the running statistics.

  L = Σ_l Σ_c [((μ_lc − μ̂_lc)² + σ²_lc) / (2σ̂²_lc) − log(σ_lc/σ̂_lc) − ½]
    = Σ_l Σ_c KL(N(μ_lc, σ²_lc) ‖ N(μ̂_lc, σ̂²_lc)),

  with ``eps`` added to both variances (σ² ← σ² + eps, σ̂² ← σ̂² + eps). It is 0 when the stats
  equal the running statistics.

  Args:
    stats: the ``stats`` tree of ``bn_stats.capture_bn_inputs``.
    running_stats: the model's ``batch_stats`` tree.
    eps: variance floor.

  Returns:
    Scalar float32 loss.

  Raises:
    ValueError: if the two trees hold different layers or shapes.
  """
  paths = _paired_layers(stats, running_stats, None)
  total = jnp.zeros((), jnp.float32)
  for path in paths:
    s, r = bn_stats.get_layer(stats, path), bn_stats.get_layer(running_stats, path)
    var = _f32(s["var"]) + eps
    rvar = _f32(r["var"]) + eps
    term = ((jnp.square(_f32(s["mean"]) - _f32(r["mean"])) + var) / (2.0 * rvar)
            - 0.5 * (jnp.log(var) - jnp.log(rvar)) - 0.5)
    total = total + jnp.sum(term)
  return total


# --------------------------------------------------------------------------- VAE


def vae_kl(mu: jax.Array, logvar: jax.Array) -> jax.Array:
  """VAE KL to N(0, I), summed over latent dims, averaged over the batch.

  L = (1/B) Σ_i −½ Σ_j (1 + logvar_ij − μ²_ij − exp(logvar_ij)).

  Args:
    mu: μ, [B, d] (trailing axes are flattened into d).
    logvar: log σ², same shape as ``mu``.

  Returns:
    Scalar float32 loss.
  """
  mu = _f32(mu).reshape(jnp.shape(mu)[0], -1)
  logvar = _f32(logvar).reshape(jnp.shape(logvar)[0], -1)
  per_sample = -0.5 * jnp.sum(1.0 + logvar - jnp.square(mu) - jnp.exp(logvar), axis=-1)
  return jnp.mean(per_sample)
