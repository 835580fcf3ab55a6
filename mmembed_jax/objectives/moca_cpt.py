"""MoCa stage 1: modality-aware continual pre-training, L = L_MLM + w * L_MAE (bidirectional).

The batch carries host-made masks (`data/masking.py`, deterministic per example):
  mlm_mask  int32 [batch, length]   1 = this text token is replaced by `<|mask|>`
  mae_mask  int32 [buffers, patches]  1 = this patch is masked (whole 2x2 merged groups)

Text: masked ids become `<|mask|>`; cross-entropy on masked positions only, predicted from
position i-1 (`mlm_shift_labels`, paper) or at i (released code). Image: masked patches are
replaced in normalised pixel space by Gaussian noise (one shared vector, as the released
code, or fresh per patch); one extra bidirectional decoder layer (a copy of LLM layer L//2)
runs over the final hidden states, then Linear(d, 4*1176) at each masked visual token
predicts its four original patches; MSE over the masked patches' values.
"""
import dataclasses
from typing import Any, ClassVar, Mapping, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmembed_jax.models.config import ModelConfig
from mmembed_jax.models.inputs import rows_by_buffer
from mmembed_jax.models.layers import Linear, dtype_of
from mmembed_jax.models.llm import DecoderLayer, layer_mask, mrope_tables
from mmembed_jax.models.vlm import VisionLanguageModel
from mmembed_jax.objectives.base import Objective
from mmembed_jax.objectives.lm_loss import chunked_cross_entropy

MAE_DECODER = "mae_decoder"  # top-level key of the decoder's params, beside the backbone's


MAE_HEAD_LAYOUTS = ("interleaved", "blocked")


class MaeDecoder(nn.Module):
  """One bidirectional decoder layer + Linear(d, merge**2 * patch_dim) at merged visual tokens.

  `layout` says how the head's merge**2 * patch_dim outputs are read as patches: "interleaved"
  (MoCa's released code: value d of patch p at d * merge**2 + p, its
  `rearrange("b (d p) -> (b p) d")`), or "blocked" (p * patch_dim + d), so a head trained by
  either codebase loads into the other unchanged.
  """
  config: ModelConfig
  layout: str = "interleaved"

  @nn.compact
  def __call__(self, hidden, segment_ids, positions, token_of_slot):
    """hidden [batch, length, embed]; token_of_slot [buffers, merged] (index into the buffer's
    rows back to back, models/inputs.py) -> [buffers, merged, 4, 1176]."""
    config = self.config.replace(attention="bidirectional", adapter=None)  # trained in full
    cos, sin = mrope_tables(positions, config)
    hidden, _ = DecoderLayer(config, name="layer")(hidden, cos, sin,
                                                    layer_mask(segment_ids, config), segment_ids)
    hidden = rows_by_buffer(hidden, token_of_slot.shape[0])  # [buffers, rows * length, embed]
    slots = jnp.take_along_axis(hidden, token_of_slot[..., None], axis=1)  # [buffers, merged, embed]
    unit = config.vision.spatial_merge_size**2
    out = Linear((unit * config.vision.patch_dim,), ("embed", "mlp"), dtype=dtype_of(config.dtype),
                 param_dtype=dtype_of(config.param_dtype), name="head")(slots)
    if self.layout == "blocked":
      return out.reshape(out.shape[:2] + (unit, config.vision.patch_dim))
    return jnp.swapaxes(out.reshape(out.shape[:2] + (config.vision.patch_dim, unit)), -1, -2)


def token_of_slot(input_ids: jax.Array, image_token_id: int, num_slots: int,
                  video_token_id: int = -1) -> jax.Array:
  """Index of the token holding each merged visual token (of an image or a video): int32
  [batch, num_slots] (0 if none). Pass `rows_by_buffer(input_ids, buffers)` for the index into a
  patch buffer's rows back to back."""
  is_image = (input_ids == image_token_id) | (input_ids == video_token_id)
  slot = jnp.where(is_image, jnp.cumsum(is_image, axis=1) - 1, num_slots)  # overflow -> dropped
  batch, length = input_ids.shape
  table = jnp.zeros((batch, num_slots + 1), jnp.int32)
  table = table.at[jnp.arange(batch)[:, None], slot].set(jnp.arange(length, dtype=jnp.int32))
  return table[:, :num_slots]


@dataclasses.dataclass(frozen=True)
class MocaCpt(Objective):
  """The objective: call as fn(params, batch, rng) -> (loss, metrics); `init_extra` adds the decoder."""
  name: ClassVar[str] = "moca_cpt"
  inputs: ClassVar[Tuple[str, ...]] = ("moca_cpt",)
  derived: ClassVar[Tuple[str, ...]] = ("mask_token_id",)

  config: ModelConfig
  mask_token_id: int
  mae_weight: float = 0.5  # paper 0.5, released code 0.1
  mlm_shift_labels: bool = True  # paper: predict token i from position i-1
  noise: str = "shared"  # "shared" (released code: one N(0,1) vector) or "per_patch"
  logits_chunk: int = 512
  mae_head_layout: str = "interleaved"  # the head's output layout (MaeDecoder); released code's

  @classmethod
  def from_config(cls, model_config: ModelConfig, fields: Mapping[str, Any],
                  tokenizer_dir: str) -> "MocaCpt":
    """The objective with `<|mask|>`'s id read from the run's tokenizer."""
    import transformers  # pylint: disable=g-import-not-at-top
    from mmembed_jax.data.special_tokens import mask_token_id  # pylint: disable=g-import-not-at-top
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    return cls(model_config, mask_token_id(tokenizer, model_config.text.vocab_size), **fields)

  def __post_init__(self):
    if self.noise not in ("shared", "per_patch"):
      raise ValueError(f"objective.noise must be 'shared' or 'per_patch', got '{self.noise}'")
    if self.mae_head_layout not in MAE_HEAD_LAYOUTS:
      raise ValueError(f"objective.mae_head_layout must be one of {MAE_HEAD_LAYOUTS}, got "
                       f"'{self.mae_head_layout}'")
    if not 0 <= self.mask_token_id < self.config.text.vocab_size:
      raise ValueError(f"mask_token_id {self.mask_token_id} is outside the vocabulary "
                       f"(size {self.config.text.vocab_size}): the embedding is never resized")

  def init_extra(self, rng: jax.Array, params: Mapping[str, Any]) -> dict:
    """{MAE_DECODER: params}: the head random (normal 0.02, zero bias), the layer a copy of L//2."""
    config = self.config
    merged = 4
    dummy = jnp.zeros((1, merged, config.text.hidden_size), jnp.float32)
    decoder = nn.meta.unbox(MaeDecoder(config).init(
        rng, dummy, jnp.ones((1, merged), jnp.int32), jnp.zeros((1, 3, merged), jnp.int32),
        jnp.zeros((1, merged), jnp.int32))["params"])
    middle = config.text.num_layers // 2
    layers = params["language_model"]
    if config.scan_layers:
      source = jax.tree.map(lambda x: x[middle], layers["layers"])
    else:
      source = layers[f"layers_{middle}"]
    decoder["layer"] = jax.tree.map(jnp.array, source)
    return {MAE_DECODER: decoder}

  def extra_param_shapes(self) -> dict:
    """Abstract decoder params with logical axis names (for the trainer's shardings)."""
    merged = 4
    shapes = jax.eval_shape(
        MaeDecoder(self.config).init, jax.random.key(0),
        jnp.zeros((1, merged, self.config.text.hidden_size), jnp.float32),
        jnp.ones((1, merged), jnp.int32), jnp.zeros((1, 3, merged), jnp.int32),
        jnp.zeros((1, merged), jnp.int32))
    return {MAE_DECODER: shapes["params"]}

  def __call__(self, params, batch, rng):
    config, model = self.config, VisionLanguageModel(self.config)
    input_ids, segment_ids = batch["input_ids"], batch["segment_ids"]  # [batch, length]
    mlm_mask = batch["mlm_mask"].astype(bool) & (segment_ids > 0)
    patches = batch["pixel_patches"]  # [buffers, patches, 1176]
    mae_mask = batch["mae_mask"].astype(bool) & (batch["patch_image_ids"] > 0)  # [buffers, patches]

    # Inputs: <|mask|> for masked text, Gaussian noise for masked patches (normalised space).
    noise_shape = (1, 1, patches.shape[-1]) if self.noise == "shared" else patches.shape
    noise = jax.random.normal(rng, noise_shape, jnp.float32).astype(patches.dtype)
    # Made once: XLA would otherwise fuse the [1176] draw into the [patches, 1176] select and
    # redraw it for every patch.
    noise = jax.lax.optimization_barrier(noise)
    masked_batch = dict(batch, input_ids=jnp.where(mlm_mask, self.mask_token_id, input_ids),
                        pixel_patches=jnp.where(mae_mask[..., None], noise, patches))
    hidden = model.apply({"params": params}, masked_batch,  # [batch, length, embed]
                         rngs={"dropout": jax.random.fold_in(rng, 1)})  # adapter dropout

    # MLM over masked text positions.
    if self.mlm_shift_labels:
      same_segment = segment_ids[:, 1:] == segment_ids[:, :-1]
      mlm_hidden, targets = hidden[:, :-1], input_ids[:, 1:]
      weights = (mlm_mask[:, 1:] & same_segment).astype(jnp.float32)
      mlm_hidden = jnp.pad(mlm_hidden, ((0, 0), (0, 1), (0, 0)))  # keep length for chunking
      targets = jnp.pad(targets, ((0, 0), (0, 1)))
      weights = jnp.pad(weights, ((0, 0), (0, 1)))
    else:
      mlm_hidden, targets, weights = hidden, input_ids, mlm_mask.astype(jnp.float32)
    loss_sum, correct_sum = chunked_cross_entropy(model, params, mlm_hidden, targets, weights,
                                                  self.logits_chunk)
    masked_tokens = jnp.sum(weights)
    mlm_loss = loss_sum / jnp.maximum(masked_tokens, 1.0)

    # MAE over masked patches, predicted at their merged visual tokens.
    metrics = {"mlm_loss": mlm_loss, "mlm_accuracy": correct_sum / jnp.maximum(masked_tokens, 1.0),
               "masked_tokens": masked_tokens}
    loss = mlm_loss
    if patches.shape[1] > 0:
      unit = config.vision.spatial_merge_size**2
      slots = patches.shape[1] // unit
      prediction = MaeDecoder(config, self.mae_head_layout).apply(
          {"params": params[MAE_DECODER]}, hidden, segment_ids, batch["positions"],
          token_of_slot(rows_by_buffer(input_ids, patches.shape[0]), config.image_token_id, slots,
                        config.video_token_id))  # [buffers, slots, 4, 1176]
      target = patches.reshape(prediction.shape).astype(jnp.float32)
      patch_weights = mae_mask.reshape(prediction.shape[:3]).astype(jnp.float32)
      squared = jnp.sum(jnp.square(prediction.astype(jnp.float32) - target), axis=-1)
      masked_patches = jnp.sum(patch_weights)
      mae_loss = jnp.sum(squared * patch_weights) / jnp.maximum(masked_patches * target.shape[-1],
                                                                1.0)
      loss = loss + self.mae_weight * mae_loss
      metrics.update(mae_loss=mae_loss, masked_patches=masked_patches)
    return loss, metrics
