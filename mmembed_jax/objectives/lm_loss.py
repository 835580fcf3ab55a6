"""The language-model loss without the [batch, length, vocab] logits in memory."""
from typing import Any

import jax
import jax.numpy as jnp

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
    logits = logits.astype(jnp.float32)  # [batch, chunk, vocab]
    # optax's softmax cross-entropy, spelled out so that its max also gives the accuracy: the
    # target is correct when it holds the largest logit (an argmax is a second, index-carrying
    # reduction over the vocabulary, which XLA:CPU does element by element).
    peak = jax.lax.stop_gradient(logits.max(axis=-1))  # [batch, chunk]
    target = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0] - peak
    ce = jnp.log(jnp.exp(logits - peak[..., None]).sum(axis=-1)) - target
    correct = (target >= 0).astype(jnp.float32)
    return (carry[0] + jnp.sum(ce * w), carry[1] + jnp.sum(correct * w)), None

  def split(x):
    return jnp.swapaxes(x.reshape((batch, length // chunk, chunk) + x.shape[2:]), 0, 1)

  zero = jnp.zeros((), jnp.float32)
  (loss_sum, correct_sum), _ = jax.lax.scan(one, (zero, zero), (split(hidden), split(targets),
                                                                split(weights)))
  return loss_sum, correct_sum
