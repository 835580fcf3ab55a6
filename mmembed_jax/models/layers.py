"""Building blocks shared by the vision tower and the LLM: linear layers, norms, rotary, attention.

Every parameter carries logical axis names (resolved to mesh axes by the training rules);
activations are constrained with logical names too. Norms, rotary and softmax run in float32.
"""
import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from mmembed_jax.models import adapters

Dtype = Any
INIT_STD = 0.02  # HF initializer_range
NEG_INF = -0.7 * float(np.finfo(np.float32).max)  # finite, so fully masked rows never give NaN


def dtype_of(name: str) -> Dtype:
  """Maps 'float32' / 'bfloat16' / 'float16' to the jnp dtype."""
  return jnp.dtype(name)


class Linear(nn.Module):
  """y = x @ kernel (+ bias); kernel [in, *out_shape] with logical axes `kernel_axes`; a LoRA or
  DoRA adapter on top when `adapter` targets this module's path (models/adapters.py)."""
  out_shape: Sequence[int]
  kernel_axes: tuple[Optional[str], ...]
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  adapter: Optional[adapters.AdapterSpec] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    out_shape = tuple(self.out_shape)
    kernel = self.param(
        "kernel",
        nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), self.kernel_axes),
        (x.shape[-1],) + out_shape, self.param_dtype)
    out_dims = "jklm"[:len(out_shape)]

    def contract(x, kernel):  # [..., in] x [in, *out] -> [..., *out]
      return jnp.einsum(f"...i,i{out_dims}->...{out_dims}", x, kernel)

    y = contract(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.adapter is not None and self.adapter.targets_path(self.path):
      y = adapters.adapt(self, self.adapter, x, kernel, y, contract, self.kernel_axes, self.dtype,
                         self.param_dtype)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.kernel_axes[1:]),
                        out_shape, self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class RMSNorm(nn.Module):
  """Qwen RMSNorm: normalise in float32, cast back, then scale (as transformers does)."""
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * normed.astype(self.dtype)


class LayerNorm(nn.Module):
  """LayerNorm with weight and bias (Qwen2-VL vision tower), statistics in float32."""
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (features,), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                      (features,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    normed = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def activation(name: str, x: jax.Array) -> jax.Array:
  """The activations the Qwen-VL family uses, by their transformers names."""
  if name == "silu":
    return jax.nn.silu(x)
  if name == "quick_gelu":
    return x * jax.nn.sigmoid(1.702 * x)
  if name in ("gelu", "gelu_pytorch_exact"):
    return jax.nn.gelu(x, approximate=False)
  if name == "gelu_pytorch_tanh":
    return jax.nn.gelu(x, approximate=True)
  raise ValueError(f"unsupported activation '{name}'")


def inverse_frequencies(dim: int, theta: float) -> np.ndarray:
  """RoPE inverse frequencies [dim // 2], computed in float32 as transformers does."""
  exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  return (1.0 / (np.float32(theta) ** exponent)).astype(np.float32)


def rotate_half(x: jax.Array) -> jax.Array:
  """[..., d] -> [-x2, x1] with x1, x2 the two halves of the last axis."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [batch, length, heads, head_dim] rotated by cos/sin [batch, length, head_dim], in float32."""
  x32 = x.astype(jnp.float32)
  out = x32 * cos[:, :, None, :] + rotate_half(x32) * sin[:, :, None, :]
  return out.astype(x.dtype)


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                          mask: jax.Array, dtype: Dtype) -> jax.Array:
  """Masked softmax attention with grouped-query heads.

  query [batch, q_len, heads, head_dim]; key, value [batch, kv_len, kv_heads, head_dim];
  mask bool [batch, q_len, kv_len] (True = may attend). Returns [batch, q_len, heads, head_dim].
  """
  batch, q_len, num_heads, head_dim = query.shape
  num_kv_heads = key.shape[2]
  groups = num_heads // num_kv_heads
  # Head-major operands (head h uses kv head h // groups, as transformers' repeat_kv does), so
  # both products are plain batched matmuls and the softmax runs along the scores' minor axis:
  # XLA then transposes only [length, head_dim] operands, never the [q_len, kv_len] scores.
  query = jnp.transpose(query.reshape(batch, q_len, num_kv_heads, groups, head_dim), (0, 2, 3, 1, 4))
  key, value = jnp.transpose(key, (0, 2, 1, 3)), jnp.transpose(value, (0, 2, 1, 3))
  out = _masked_attention(query, key, value, mask, jnp.dtype(dtype))
  out = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(batch, q_len, num_heads, head_dim)
  return checkpoint_name(out, "attention_out")


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _masked_attention(query, key, value, mask, dtype):
  """query [batch, kv_heads, groups, q, d], key/value [batch, kv_heads, kv, d] -> like query."""
  return _masked_attention_fwd(query, key, value, mask, dtype)[0]


def _masked_attention_fwd(query, key, value, mask, dtype):
  scores = jnp.einsum("bkgqd,bksd->bkgqs", query.astype(dtype), key.astype(dtype),
                      preferred_element_type=jnp.float32)  # [batch, kv_heads, groups, q, kv]
  scores = jnp.where(mask[:, None, None], scores * (query.shape[-1]**-0.5), NEG_INF)
  # Softmax with one reciprocal per query row and multiplies ([q, kv] divides cost XLA:CPU more).
  weights = jnp.exp(scores - scores.max(axis=-1, keepdims=True))
  probs = (weights * (1.0 / weights.sum(axis=-1, keepdims=True))).astype(dtype)
  out = jnp.einsum("bkgqs,bksd->bkgqd", probs, value.astype(dtype))
  return out, (query, key, value, mask, probs, out)


def _masked_attention_bwd(dtype, residuals, d_out):
  """Softmax attention's gradient from the saved probabilities (flash attention's): one
  [q, kv] elementwise pass, dS = P * (dP - rowsum(dO * O)), instead of autodiff's chain."""
  query, key, value, mask, probs, out = residuals
  d_out = d_out.astype(dtype)
  d_value = jnp.einsum("bkgqs,bkgqd->bksd", probs, d_out, preferred_element_type=jnp.float32)
  d_probs = jnp.einsum("bkgqd,bksd->bkgqs", d_out, value.astype(dtype),
                       preferred_element_type=jnp.float32)
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  d_scores = jnp.where(mask[:, None, None], probs * (d_probs - delta), 0.0)  # masked: no gradient
  d_scores = (d_scores * (query.shape[-1]**-0.5)).astype(dtype)
  d_query = jnp.einsum("bkgqs,bksd->bkgqd", d_scores, key.astype(dtype),
                       preferred_element_type=jnp.float32)
  d_key = jnp.einsum("bkgqs,bkgqd->bksd", d_scores, query.astype(dtype),
                     preferred_element_type=jnp.float32)
  return (d_query.astype(query.dtype), d_key.astype(key.dtype), d_value.astype(value.dtype), None)


_masked_attention.defvjp(_masked_attention_fwd, _masked_attention_bwd)
