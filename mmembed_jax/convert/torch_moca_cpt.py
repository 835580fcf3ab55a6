"""MoCa stage 1 (CPT) loss in PyTorch on transformers' Qwen2(.5)-VL, from the same parameters.

What `objectives/moca_cpt.MocaCpt` computes, on the same packed batch: `<|mask|>` at masked text,
the noise vector at masked patches, one bidirectional pass (attention within segments), MLM cross
entropy over the vocabulary at every position weighted to the masked ones, and the MAE decoder
(one decoder layer + a linear head) regressing the masked patches at their merged visual tokens.
`launch/benchmark.py` times it against the JAX step; tests check the two losses agree.
"""
import tempfile
from typing import Any, Dict, Mapping

import numpy as np
import torch

from mmembed_jax.convert.hf_export import _get, export_hf
from mmembed_jax.convert.mapping import decoder_layer_maps
from mmembed_jax.models.config import ModelConfig
from mmembed_jax.models.inputs import rows_by_buffer
from mmembed_jax.objectives.moca_cpt import MAE_DECODER, MocaCpt, token_of_slot


def torch_batch(batch: Mapping[str, np.ndarray], config: ModelConfig) -> Dict[str, torch.Tensor]:
  """The pipeline's padded batch in the form transformers takes (images concatenated, a 4-D
  segment mask, positions [3, batch, length]) plus what the losses need; no model compute."""
  segments = np.asarray(batch["segment_ids"])  # [batch, length]
  patch_ids = np.asarray(batch["patch_image_ids"])  # [buffers, patches]
  grids = np.asarray(batch["image_grid_thw"]).reshape(-1, 3)
  same = segments[:, None, :, None] == segments[:, None, None, :]  # [batch, 1, length, length]
  unit = config.vision.spatial_merge_size**2
  slots = patch_ids.shape[1] // unit
  out = {
      "input_ids": torch.as_tensor(np.asarray(batch["input_ids"]), dtype=torch.long),
      "segment_ids": torch.as_tensor(segments, dtype=torch.long),
      "mlm_mask": torch.as_tensor(np.asarray(batch["mlm_mask"]) > 0),
      "mae_mask": torch.as_tensor((np.asarray(batch["mae_mask"]) > 0) & (patch_ids > 0)),
      "patch_valid": torch.as_tensor(patch_ids > 0),
      "pixel_patches": torch.as_tensor(np.asarray(batch["pixel_patches"], np.float32)),
      "image_grid_thw": torch.as_tensor(grids[grids.prod(-1) > 0], dtype=torch.long),
      "attention_mask": torch.where(torch.as_tensor(same), 0.0, torch.finfo(torch.float32).min),
      "position_ids": torch.as_tensor(np.asarray(batch["positions"]), dtype=torch.long
                                      ).permute(1, 0, 2),
      "token_of_slot": torch.tensor(np.asarray(token_of_slot(  # [buffers, slots]
          rows_by_buffer(np.asarray(batch["input_ids"]), patch_ids.shape[0]),
          config.image_token_id, slots, config.video_token_id)), dtype=torch.long),
  }
  return out


class TorchMocaCpt(torch.nn.Module):
  """transformers' model + the MAE decoder layer and head; forward(batch, noise) -> (loss, metrics)."""

  def __init__(self, model: Any, decoder_layer: torch.nn.Module, head: torch.nn.Linear,
               objective: MocaCpt):
    super().__init__()
    self.model, self.decoder_layer, self.head = model, decoder_layer, head
    self.objective = objective

  def forward(self, batch: Mapping[str, torch.Tensor], noise: torch.Tensor):
    """noise [1, 1, patch_dim] (shared) or [batch, patches, patch_dim] (per patch)."""
    objective, config = self.objective, self.objective.config
    ids, segments = batch["input_ids"], batch["segment_ids"]
    mlm_mask = batch["mlm_mask"] & (segments > 0)
    mae_mask, patches = batch["mae_mask"], batch["pixel_patches"]
    masked_ids = torch.where(mlm_mask, objective.mask_token_id, ids)
    masked_patches = torch.where(mae_mask[..., None], noise, patches)
    mask = {"full_attention": batch["attention_mask"]}
    hidden = self.model.model(
        input_ids=masked_ids, attention_mask=mask, position_ids=batch["position_ids"],
        pixel_values=masked_patches[batch["patch_valid"]],
        image_grid_thw=batch["image_grid_thw"]).last_hidden_state  # [batch, length, embed]

    # MLM: logits at every position (as a Hugging Face head computes them), masked ones counted.
    if objective.mlm_shift_labels:
      states, targets = hidden[:, :-1], ids[:, 1:]
      weights = (mlm_mask[:, 1:] & (segments[:, 1:] == segments[:, :-1])).float()
    else:
      states, targets, weights = hidden, ids, mlm_mask.float()
    logits = self.model.lm_head(states).float()  # [batch, length, vocab]
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                           reduction="none").view(targets.shape)
    masked_tokens = weights.sum()
    mlm_loss = (ce * weights).sum() / masked_tokens.clamp(min=1.0)
    metrics = {"mlm_loss": mlm_loss}
    loss = mlm_loss
    if patches.shape[1] > 0:
      text_model = self.model.model.language_model
      rotary = text_model.rotary_emb(hidden, batch["position_ids"])
      decoded = self.decoder_layer(hidden, attention_mask=batch["attention_mask"],
                                   position_ids=batch["position_ids"], position_embeddings=rotary)
      decoded = decoded[0] if isinstance(decoded, tuple) else decoded
      index = batch["token_of_slot"][..., None].expand(-1, -1, decoded.shape[-1])
      decoded = decoded.reshape(index.shape[0], -1, decoded.shape[-1])  # rows of each buffer
      prediction = self.head(torch.gather(decoded, 1, index))  # [buffers, slots, 4 * patch_dim]
      unit, patch_dim = config.vision.spatial_merge_size**2, config.vision.patch_dim
      if objective.mae_head_layout == "blocked":
        prediction = prediction.view(prediction.shape[0], -1, unit, patch_dim).float()
      else:  # MoCa's released code: rearrange(pred, "b (d p) -> (b p) d", p=4)
        prediction = prediction.view(prediction.shape[0], -1, patch_dim, unit).transpose(
            -1, -2).float()
      target = patches.view(prediction.shape)
      patch_weights = mae_mask.view(prediction.shape[:3]).float()
      squared = (prediction - target).square().sum(-1)
      mae_loss = (squared * patch_weights).sum() / (patch_weights.sum() * patch_dim).clamp(min=1.0)
      loss = loss + objective.mae_weight * mae_loss
      metrics["mae_loss"] = mae_loss
    return loss, metrics


def build(objective: MocaCpt, params: Mapping[str, Any], dtype: str = "float32") -> TorchMocaCpt:
  """The torch objective holding copies of `params` (the backbone via an HF export, the MAE
  decoder tensor by tensor)."""
  import transformers  # pylint: disable=g-import-not-at-top
  config = objective.config
  backbone = {k: v for k, v in params.items() if k != MAE_DECODER}
  with tempfile.TemporaryDirectory(prefix="mmembed_torch_cpt_") as directory:
    export_hf(config, backbone, directory)
    model = transformers.AutoModelForImageTextToText.from_pretrained(
        directory, dtype=getattr(torch, dtype), attn_implementation="sdpa")
  text_model = model.model.language_model
  layer = type(text_model.layers[0])(model.config.text_config, layer_idx=0)
  decoder = params[MAE_DECODER]
  layer.load_state_dict({m.hf_name: torch.tensor(m.to_hf(np.asarray(_get(decoder["layer"], m.path),
                                                                    np.float32)))
                         for m in decoder_layer_maps(config)})
  kernel = np.asarray(decoder["head"]["kernel"], np.float32)  # [embed, 4 * patch_dim]
  head = torch.nn.Linear(*kernel.shape)
  head.weight.data = torch.as_tensor(kernel.T.copy())
  head.bias.data = torch.tensor(np.asarray(decoder["head"]["bias"], np.float32))
  module = TorchMocaCpt(model, layer, head, objective)
  return module.to(getattr(torch, dtype)).train()

