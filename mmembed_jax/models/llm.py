"""The Qwen2 language model: GQA with qkv bias, RMSNorm, SwiGLU, M-RoPE; causal or bidirectional."""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from mmembed_jax.models import packed_attention, remat, splash
from mmembed_jax.models.config import ModelConfig
from mmembed_jax.models.layers import (Linear, RMSNorm, activation, apply_rotary,
                                       dtype_of, inverse_frequencies)


def mrope_tables(positions: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
  """M-RoPE cos/sin [batch, length, head_dim] from positions [batch, 3, length].

  Frequency j rotates by the temporal, height or width position according to which
  `mrope_section` chunk it falls in; the table is then doubled for the two rotate_half halves.
  """
  text = config.text
  inv_freq = jnp.asarray(inverse_frequencies(text.head_dim, text.rope_theta))  # [head_dim // 2]
  axis_of_freq = np.repeat(np.arange(len(text.mrope_section)) % 3, text.mrope_section)
  chosen = positions.astype(jnp.float32)[:, axis_of_freq, :]  # [batch, head_dim // 2, length]
  angles = jnp.swapaxes(chosen, 1, 2) * inv_freq  # [batch, length, head_dim // 2]
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def attention_mask(segment_ids: jax.Array, causal: bool) -> jax.Array:
  """bool [batch, length, length]: same segment (padding = segment 0 only sees padding), causal if asked."""
  mask = segment_ids[:, :, None] == segment_ids[:, None, :]
  if causal:
    length = segment_ids.shape[1]
    mask = mask & jnp.tril(jnp.ones((length, length), dtype=bool))[None]
  return mask


def layer_mask(segment_ids: jax.Array, config: ModelConfig, regions: Optional[jax.Array] = None):
  """What the layers take: the bool [batch, length, length] mask on the XLA path, None where the
  splash kernel runs or, off TPU, rows of at least packed_attention.MIN_LENGTH attend by blocks
  (both read the segment ids themselves); with `config.region_mask` and regions [batch, length],
  the pair (below, above) of models/region_mask.py, on every path."""
  region_mask = config.region_mask if regions is not None else None
  length = segment_ids.shape[1]
  by_segments = (splash.resolve(config.attention_impl, length) != "xla"
                 or (config.attention_impl == "auto" and length >= packed_attention.MIN_LENGTH))
  if region_mask is None and by_segments:
    return None
  mask = attention_mask(segment_ids, causal=config.attention == "causal")
  return mask if region_mask is None else region_mask.masks(mask, regions)


class Attention(nn.Module):
  """Grouped-query attention with biased q/k/v projections and M-RoPE."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x, cos, sin, mask, segment_ids):
    text = self.config.text
    kw = dict(dtype=dtype_of(self.config.dtype), param_dtype=dtype_of(self.config.param_dtype),
              adapter=self.config.adapter)
    batch, length, _ = x.shape
    query = Linear((text.num_heads * text.head_dim,), ("embed", "heads"), name="q_proj", **kw)(x)
    key = Linear((text.num_kv_heads * text.head_dim,), ("embed", "kv_heads"), name="k_proj", **kw)(x)
    value = Linear((text.num_kv_heads * text.head_dim,), ("embed", "kv_heads"), name="v_proj",
                   **kw)(x)
    query = query.reshape(batch, length, text.num_heads, text.head_dim)
    key = key.reshape(batch, length, text.num_kv_heads, text.head_dim)
    value = value.reshape(batch, length, text.num_kv_heads, text.head_dim)
    query = nn.with_logical_constraint(query, ("batch", "length", "act_heads", "head_dim"))
    query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
    out = splash.attend(query, key, value, mask, segment_ids, self.config.attention == "causal",
                        kw["dtype"], self.config.attention_impl)
    out = out.reshape(batch, length, text.num_heads * text.head_dim)
    return Linear((text.hidden_size,), ("heads", "embed"), use_bias=False, name="o_proj", **kw)(out)


class MLP(nn.Module):
  """SwiGLU without biases."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    text = self.config.text
    kw = dict(dtype=dtype_of(self.config.dtype), param_dtype=dtype_of(self.config.param_dtype),
              use_bias=False, adapter=self.config.adapter)
    gate = Linear((text.intermediate_size,), ("embed", "mlp"), name="gate_proj", **kw)(x)
    up = Linear((text.intermediate_size,), ("embed", "mlp"), name="up_proj", **kw)(x)
    hidden = nn.with_logical_constraint(activation(text.hidden_act, gate) * up,
                                        ("batch", "length", "act_mlp"))
    return Linear((text.hidden_size,), ("mlp", "embed"), name="down_proj", **kw)(hidden)


class DecoderLayer(nn.Module):
  """Pre-norm decoder layer (the same weights serve causal and bidirectional attention)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x, cos, sin, mask, segment_ids, above=False):
    if isinstance(mask, tuple):  # (below, above) split_layer: region masks
      mask = jnp.where(above, mask[1], mask[0])
    kw = dict(eps=self.config.text.rms_norm_eps, dtype=dtype_of(self.config.dtype),
              param_dtype=dtype_of(self.config.param_dtype))
    x = x + Attention(self.config, name="self_attn")(RMSNorm(name="input_layernorm", **kw)(x),
                                                      cos, sin, mask, segment_ids)
    x = x + MLP(self.config, name="mlp")(RMSNorm(name="post_attention_layernorm", **kw)(x))
    x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
    return checkpoint_name(x, "block_out"), None


class TextDecoder(nn.Module):
  """Input embeddings [batch, length, embed] -> final-normed hidden states [batch, length, embed]
  (before the final norm when `config.final_norm` is False)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, inputs_embeds, segment_ids, positions, regions=None):
    """regions: int [batch, length] region ids for `config.region_mask` (None: not used)."""
    config = self.config
    cos, sin = mrope_tables(positions, config)
    mask = layer_mask(segment_ids, config, regions)
    num_layers = config.text.num_layers
    above = [isinstance(mask, tuple) and config.region_mask.uses_above(i) for i in range(num_layers)]
    layer = remat.wrap(DecoderLayer, config.remat_policy, config.scan_layers)
    x = inputs_embeds
    if config.scan_layers:
      stack = nn.scan(layer, variable_axes={"params": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast,) * 4 + (0,), length=num_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = stack(config, name="layers")(x, cos, sin, mask, segment_ids, jnp.asarray(above))
    else:
      for i in range(num_layers):
        x, _ = layer(config, name=f"layers_{i}")(x, cos, sin, mask, segment_ids, above[i])
    if not config.final_norm:
      return x
    return RMSNorm(eps=config.text.rms_norm_eps, dtype=dtype_of(config.dtype),
                   param_dtype=dtype_of(config.param_dtype), name="norm")(x)
