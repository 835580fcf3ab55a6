"""A plain masked-LM objective over text (bidirectional): the engine's test objective."""
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from mmembed_jax.models.config import ModelConfig
from mmembed_jax.models.vlm import VisionLanguageModel


def make_masked_lm(config: ModelConfig, mask_token_id: int, mask_prob: float,
                   never_mask: Sequence[int] = ()) -> Callable:
  """Objective: mask non-pad tokens with `mask_prob`, cross-entropy on masked positions only."""
  model = VisionLanguageModel(config)
  protected = jnp.asarray(list(never_mask) or [-1], jnp.int32)

  def objective(params, batch, rng):
    input_ids = batch["input_ids"]  # [batch, length]
    maskable = (batch["segment_ids"] > 0) & ~jnp.isin(input_ids, protected)
    masked = jax.random.bernoulli(rng, mask_prob, input_ids.shape) & maskable
    hidden = model.apply({"params": params}, dict(batch, input_ids=jnp.where(
        masked, mask_token_id, input_ids)))
    logits = model.apply({"params": params}, hidden, method=VisionLanguageModel.lm_logits)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), input_ids)
    weights = masked.astype(jnp.float32)
    count = jnp.maximum(weights.sum(), 1.0)
    loss = (losses * weights).sum() / count
    accuracy = ((jnp.argmax(logits, -1) == input_ids) * weights).sum() / count
    return loss, {"mlm_loss": loss, "mlm_accuracy": accuracy, "masked_tokens": weights.sum()}

  return objective
