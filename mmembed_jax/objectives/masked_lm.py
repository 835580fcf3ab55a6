"""A plain masked-LM objective over text (bidirectional): the engine's test objective."""
import dataclasses
from typing import ClassVar, Tuple

import jax
import jax.numpy as jnp
import optax

from mmembed_jax.models.config import ModelConfig
from mmembed_jax.models.vlm import VisionLanguageModel
from mmembed_jax.objectives.base import Objective


@dataclasses.dataclass(frozen=True)
class MaskedLm(Objective):
  """Masks non-pad tokens with `mask_prob` (drawn in the step), cross-entropy on masked positions."""
  name: ClassVar[str] = "masked_lm"
  inputs: ClassVar[Tuple[str, ...]] = ("synthetic_tokens",)

  config: ModelConfig
  mask_prob: float = 0.15
  mask_token_id: int = -1  # -1: the last id of the vocabulary

  def __call__(self, params, batch, rng):
    model = VisionLanguageModel(self.config)
    mask_token_id = (self.mask_token_id if self.mask_token_id >= 0
                     else self.config.text.vocab_size - 1)
    input_ids = batch["input_ids"]  # [batch, length]
    masked = jax.random.bernoulli(rng, self.mask_prob, input_ids.shape) & (batch["segment_ids"] > 0)
    hidden = model.apply({"params": params}, dict(batch, input_ids=jnp.where(
        masked, mask_token_id, input_ids)), rngs={"dropout": jax.random.fold_in(rng, 1)})
    logits = model.apply({"params": params}, hidden, method=VisionLanguageModel.lm_logits)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), input_ids)
    weights = masked.astype(jnp.float32)
    count = jnp.maximum(weights.sum(), 1.0)
    loss = (losses * weights).sum() / count
    accuracy = ((jnp.argmax(logits, -1) == input_ids) * weights).sum() / count
    return loss, {"mlm_loss": loss, "mlm_accuracy": accuracy, "masked_tokens": weights.sum()}
