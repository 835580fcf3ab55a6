"""The language-model loss without the [batch, length, vocab] logits in memory."""
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mmembed_jax.models.vlm import VisionLanguageModel


def chunked_cross_entropy(model: VisionLanguageModel, params: Any, hidden: jax.Array,
                          targets: jax.Array, weights: jax.Array, chunk: int):
  """(sum of weighted CE, sum of weighted correct) without materialising [batch, length, vocab].

  The sequence is cut into chunks of `chunk` positions, each chunk's logits recomputed in the
  backward pass (jax.checkpoint), so memory is [batch, chunk, vocab].
  """
  batch, length, width = hidden.shape
  chunk = length if chunk <= 0 or length % chunk else chunk

  @jax.checkpoint
  def one(carry, xs):
    h, t, w = xs
    logits = model.apply({"params": params}, h, method=VisionLanguageModel.lm_logits)
    logits = logits.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, t)
    correct = (jnp.argmax(logits, -1) == t).astype(jnp.float32)
    return (carry[0] + jnp.sum(ce * w), carry[1] + jnp.sum(correct * w)), None

  def split(x):
    return jnp.swapaxes(x.reshape((batch, length // chunk, chunk) + x.shape[2:]), 0, 1)

  zero = jnp.zeros((), jnp.float32)
  (loss_sum, correct_sum), _ = jax.lax.scan(one, (zero, zero), (split(hidden), split(targets),
                                                                split(weights)))
  return loss_sum, correct_sum
