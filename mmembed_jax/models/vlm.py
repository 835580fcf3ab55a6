"""The whole backbone: token embedding, vision tower, visual tokens placed into the text, LLM, LM head.

Pure functional: `VisionLanguageModel(config).apply({"params": params}, batch)` maps the batch
dict of `models/inputs.py` to final hidden states `[batch, length, embed]`; `method="logits"`
also applies the LM head. Parameter names follow transformers' module names so that the
Hugging Face conversion is a rename plus transposes.
"""
from typing import Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmembed_jax.models.config import ModelConfig
from mmembed_jax.models.inputs import rows_by_buffer
from mmembed_jax.models.layers import INIT_STD, dtype_of
from mmembed_jax.models.llm import TextDecoder
from mmembed_jax.models.vision import VisionTower


def place_visual_tokens(text_embeds: jax.Array, visual_tokens: jax.Array, input_ids: jax.Array,
                        image_token_id: int, video_token_id: int) -> jax.Array:
  """The k-th image or video token of a patch buffer's rows takes the buffer's k-th visual token;
  static shapes (models/inputs.py).

  text_embeds [batch, length, embed]; visual_tokens [buffers, merged, embed]; input_ids
  [batch, length].
  """
  buffers = visual_tokens.shape[0]
  ids = rows_by_buffer(input_ids, buffers)  # [buffers, rows * length]
  is_image = (ids == image_token_id) | (ids == video_token_id)
  index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, visual_tokens.shape[1] - 1)
  gathered = jnp.take_along_axis(visual_tokens, index[..., None], axis=1)
  placed = jnp.where(is_image[..., None], gathered.astype(text_embeds.dtype),
                     rows_by_buffer(text_embeds, buffers))
  return placed.reshape(text_embeds.shape)


class VisionLanguageModel(nn.Module):
  """Qwen2-VL / Qwen2.5-VL: batch dict -> hidden states (and logits through `logits`)."""
  config: ModelConfig

  def setup(self):
    config = self.config
    self.embed_tokens = nn.Embed(
        config.text.vocab_size, config.text.hidden_size,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(INIT_STD),
                                                    ("vocab", "embed")),
        dtype=dtype_of(config.dtype), param_dtype=dtype_of(config.param_dtype))
    self.visual = VisionTower(config)
    self.language_model = TextDecoder(config)
    if not config.tie_word_embeddings:
      self.lm_head = self.param(
          "lm_head", nn.with_logical_partitioning(nn.initializers.normal(INIT_STD),
                                                  ("embed", "vocab")),
          (config.text.hidden_size, config.text.vocab_size), dtype_of(config.param_dtype))

  def embed_inputs(self, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Token embeddings with visual tokens in place of `<|image_pad|>` and `<|video_pad|>`:
    [batch, length, embed]."""
    embeds = self.embed_tokens(batch["input_ids"])
    if batch["pixel_patches"].shape[1] > 0:
      visual = self.visual(batch["pixel_patches"], batch["patch_image_ids"], batch["image_grid_thw"])
      embeds = place_visual_tokens(embeds, visual, batch["input_ids"], self.config.image_token_id,
                                   self.config.video_token_id)
    return nn.with_logical_constraint(embeds, ("batch", "length", "act_embed"))

  def __call__(self, batch: Mapping[str, jax.Array],
               inputs_embeds: Optional[jax.Array] = None) -> jax.Array:
    """Final hidden states [batch, length, embed]; `inputs_embeds` overrides `embed_inputs`;
    `attention_regions` [batch, length] in the batch feeds `config.region_mask`."""
    if inputs_embeds is None:
      inputs_embeds = self.embed_inputs(batch)
    return self.language_model(inputs_embeds, batch["segment_ids"], batch["positions"],
                               batch.get("attention_regions"))

  def lm_logits(self, hidden: jax.Array) -> jax.Array:
    """LM-head logits [batch, length, vocab] from hidden states [batch, length, embed]."""
    dtype = dtype_of(self.config.dtype)
    if self.config.tie_word_embeddings:
      kernel = self.embed_tokens.embedding.T
    else:
      kernel = self.lm_head
    logits = jnp.einsum("ble,ev->blv", hidden.astype(dtype), kernel.astype(dtype))
    return nn.with_logical_constraint(logits, ("batch", "length", "act_vocab"))

  def logits(self, batch: Mapping[str, jax.Array]) -> jax.Array:
    """LM-head logits [batch, length, vocab] of the batch."""
    return self.lm_logits(self(batch))
