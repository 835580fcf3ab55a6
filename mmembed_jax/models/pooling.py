"""Pooling final hidden states into L2-normalised embeddings."""
import jax
import jax.numpy as jnp

POOLINGS = ("mean", "last", "ctoken")


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) along the last axis, in float32; a zero vector stays zero.

  The norm is taken as rsqrt(max(sum x^2, eps^2)), not max(sqrt(sum x^2), eps): the gradient of
  sqrt at 0 is infinite, and 0 * inf made every masked (all-padding, mean-pooled to zero) slot
  of a contrastive batch turn the whole gradient into NaN.
  """
  x = x.astype(jnp.float32)
  squared = jnp.sum(x * x, axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(squared, eps * eps))


def pool(hidden: jax.Array, segment_ids: jax.Array, method: str, num_ctokens: int = 0,
         normalize: bool = True) -> jax.Array:
  """hidden [batch, length, embed] -> [batch, embed].

  mean: mean over non-pad tokens (segment_ids != 0); last: the last non-pad token (works with
  left or right padding); ctoken: mean over the last `num_ctokens` non-pad tokens, the
  compression tokens every sequence ends with (CoMa; the released code's "avg" pooling).
  """
  hidden = hidden.astype(jnp.float32)
  valid = segment_ids != 0
  if method == "last":
    length = valid.shape[1]
    last = length - 1 - jnp.argmax(valid[:, ::-1], axis=1)  # [batch]
    pooled = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
  elif method in ("mean", "ctoken"):
    if method == "ctoken":
      if num_ctokens < 1:
        raise ValueError("pooling 'ctoken' needs num_ctokens >= 1 (the compression tokens)")
      from_end = jnp.cumsum(valid[:, ::-1], axis=1)[:, ::-1]  # non-pad tokens at or after i
      valid = valid & (from_end <= num_ctokens)
    weights = valid.astype(jnp.float32)[..., None]
    pooled = jnp.sum(hidden * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
  else:
    raise ValueError(f"unknown pooling '{method}', expected one of {POOLINGS}")
  return l2_normalize(pooled) if normalize else pooled
