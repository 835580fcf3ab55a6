"""The PyTorch side for downstream users: embed rows with an exported directory and transformers.

    embed = mmembed_jax.torch_embed.load("exported/")
    vectors = embed([{"text": "a red circle", "image": "circle.png"}])  # np.ndarray [1, d]

The same rows, preprocessing, M-RoPE positions, attention mode and pooling as the JAX model
(recorded in the directory's mmembed.json); the network is transformers' own
`Qwen2(_5)VLModel`. Bidirectional attention is a padding-only 4-D mask handed to its layers.
torch is imported only when `load` is called.
"""
import json
import os
from typing import Any, Callable, Optional, Sequence

import numpy as np

from mmembed_jax.data import images as images_lib
from mmembed_jax.data import rows as rows_lib
from mmembed_jax.data import video as video_lib
from mmembed_jax.data.conventions import read_conventions
from mmembed_jax.data.prompts import PromptFormat
from mmembed_jax.data.sequences import SequenceEncoder
from mmembed_jax.data.special_tokens import compression_tokens


def _pool(hidden, valid, method: str, num_ctokens: int = 0):
  """hidden [batch, length, embed] (torch) -> L2-normalised [batch, embed] numpy; 'ctoken':
  the mean of the last `num_ctokens` non-pad tokens."""
  import torch  # pylint: disable=g-import-not-at-top
  hidden = hidden.float()
  if method == "last":
    length = valid.shape[1]
    last = length - 1 - torch.argmax(torch.flip(valid, dims=[1]).int(), dim=1)
    pooled = hidden[torch.arange(hidden.shape[0]), last]
  elif method in ("mean", "ctoken"):
    if method == "ctoken":
      valid = valid & (torch.flip(torch.cumsum(torch.flip(valid.int(), [1]), 1), [1]) <= num_ctokens)
    weights = valid.float()[..., None]
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
  else:
    raise ValueError(f"torch_embed supports pooling 'mean', 'last' or 'ctoken', got '{method}'")
  return torch.nn.functional.normalize(pooled, dim=-1, eps=1e-12).numpy()


def _video_items(input_ids: np.ndarray, valid: np.ndarray, grid_thw: np.ndarray,
                 image_token_id: int, video_token_id: int, merge_size: int) -> np.ndarray:
  """bool [k]: which of the batch's vision items (in order, each t*h*w / merge**2 consecutive
  vision tokens) are videos, read from the pad token each item's tokens carry."""
  tokens = np.asarray(input_ids)[np.asarray(valid, bool)]  # row-major, as the items are
  is_video, start = [], 0
  vision = np.flatnonzero(np.isin(tokens, [image_token_id, video_token_id]))
  for t, h, w in np.asarray(grid_thw).reshape(-1, 3):
    is_video.append(tokens[vision[start]] == video_token_id)
    start += t * h * w // merge_size**2
  return np.asarray(is_video, bool)


def forward_hidden(model: Any, input_ids: np.ndarray, valid: np.ndarray, positions: np.ndarray,
                   pixel_values: Optional[np.ndarray], image_grid_thw: Optional[np.ndarray],
                   attention: str, grad: bool = False, final_norm: bool = True):
  """transformers' final hidden states [batch, length, embed] for one padded batch.

  input_ids, valid [batch, length]; positions [batch, 3, length]; pixel_values [patches, 1176]
  and image_grid_thw [k, 3] of every image and video in order (videos go to transformers as
  pixel_values_videos / video_grid_thw); grad: keep the autograd graph (tests compare
  gradients).
  """
  import torch  # pylint: disable=g-import-not-at-top
  valid_t = torch.as_tensor(valid).bool()
  if attention == "causal":
    mask = valid_t.long()
  elif attention == "bidirectional":
    batch, length = valid.shape
    dtype = next(model.parameters()).dtype
    keep = valid_t[:, None, None, :].expand(batch, 1, length, length)
    mask = {"full_attention": torch.where(keep, 0.0, torch.finfo(dtype).min).to(dtype)}
  else:
    raise ValueError(f"attention must be 'causal' or 'bidirectional', got '{attention}'")
  kwargs = {}
  if pixel_values is not None and len(pixel_values):
    grids = np.asarray(image_grid_thw).reshape(-1, 3)
    config = model.config
    is_video = _video_items(input_ids, valid, grids, config.image_token_id, config.video_token_id,
                            config.vision_config.spatial_merge_size)
    item = np.repeat(np.arange(len(grids)), grids.prod(-1))  # [patches]: the item of each patch
    for name, grid_name, chosen in (("pixel_values", "image_grid_thw", ~is_video),
                                    ("pixel_values_videos", "video_grid_thw", is_video)):
      if chosen.any():
        kwargs[name] = torch.as_tensor(np.asarray(pixel_values)[chosen[item]])
        kwargs[grid_name] = torch.as_tensor(grids[chosen])
  before_norm = []  # the final RMSNorm's input, when pooled before it
  hook = None if final_norm else model.model.language_model.norm.register_forward_pre_hook(
      lambda module, args: before_norm.append(args[0]))
  try:
    with torch.set_grad_enabled(grad):
      out = model.model(input_ids=torch.as_tensor(input_ids).long(), attention_mask=mask,
                        position_ids=torch.as_tensor(positions).long().permute(1, 0, 2), **kwargs)
  finally:
    if hook is not None:
      hook.remove()
  return out.last_hidden_state if final_norm else before_norm[0]


class TorchEmbedder:
  """Callable: list of rows -> np.ndarray [n, embed] (L2-normalised)."""

  def __init__(self, model: Any, tokenizer: Any, image_config: images_lib.ImageProcessingConfig,
               attention: str, pooling: str, max_length: int, batch_size: int,
               num_ctokens: int = 0, video: Optional[dict] = None,
               pooling_point: str = "final_norm", vision_tokens: str = "wrapped",
               positions: str = "mrope", prompt: PromptFormat = PromptFormat()):
    self.model, self.tokenizer, self.image_config = model, tokenizer, image_config
    self.pooling_point = pooling_point  # data/conventions.py
    hf_config = model.config
    self.encoder = SequenceEncoder(  # the JAX side's encoder
        tokenizer, image_config, suffix_tokens=compression_tokens(num_ctokens),
        video=video_lib.VideoSettings.from_spec(video, (
            hf_config.vision_config.tokens_per_second
            if hf_config.model_type == "qwen2_5_vl" else None), "mmembed.json video"),
        vision_tokens=vision_tokens, positions=positions)
    self.attention, self.pooling, self.num_ctokens = attention, pooling, num_ctokens
    self.max_length, self.batch_size = max_length, batch_size
    self.prompt = prompt

  @property
  def dim(self) -> int:
    """The embedding width (the language model's hidden size)."""
    return int(self.model.config.text_config.hidden_size)

  def __call__(self, rows: Sequence[dict], base_dir: Optional[str] = None) -> np.ndarray:
    """Embeds rows of the row convention; relative image paths resolve against base_dir."""
    encoded = [rows_lib.encode_row(row, self.encoder, self.image_config, self.max_length,
                                   base_dir, f"row {i + 1}", self.prompt)
               for i, row in enumerate(rows)]
    out = []
    for start in range(0, len(encoded), self.batch_size):
      chunk = encoded[start:start + self.batch_size]
      length = max(row.num_tokens for row in chunk)
      input_ids = np.full((len(chunk), length), self.tokenizer.pad_token_id or 0, np.int64)
      valid = np.zeros((len(chunk), length), bool)
      positions = np.zeros((len(chunk), 3, length), np.int64)
      for i, row in enumerate(chunk):
        input_ids[i, :row.num_tokens] = row.input_ids
        valid[i, :row.num_tokens] = True
        positions[i, :, :row.num_tokens] = row.positions
      patches = [row.patches for row in chunk if row.num_images]
      grids = [row.grid_thw for row in chunk if row.num_images]
      hidden = forward_hidden(self.model, input_ids, valid, positions,
                              np.concatenate(patches) if patches else None,
                              np.concatenate(grids) if grids else None, self.attention,
                              final_norm=self.pooling_point == "final_norm")
      import torch  # pylint: disable=g-import-not-at-top
      out.append(_pool(hidden, torch.as_tensor(valid), self.pooling, self.num_ctokens))
    return np.concatenate(out)


def load(export_dir: str, *, attention: Optional[str] = None, pooling: Optional[str] = None,
         dtype: str = "float32", max_length: int = 8192, batch_size: int = 8) -> Callable:
  """Loads an exported directory with transformers (or a peft adapter directory with peft, on
  the base model its adapter_config.json names); options default to its mmembed.json."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from mmembed_jax.convert import peft_export  # pylint: disable=g-import-not-at-top
  from mmembed_jax.convert.hf_import import safetensors_files  # pylint: disable=g-import-not-at-top
  adapter_dir = None
  if peft_export.is_adapter_dir(export_dir):
    adapter_dir = export_dir
    export_dir = peft_export.read_adapter_config(adapter_dir).get("base_model_name_or_path") or ""
    if not export_dir:
      raise ValueError(f"{adapter_dir}/adapter_config.json names no base_model_name_or_path")
  safetensors_files(export_dir)  # refuses a directory mixing two exports, as the JAX loader does
  record = {}
  record_path = os.path.join(adapter_dir or export_dir, "mmembed.json")
  if os.path.exists(record_path):
    with open(record_path) as f:
      record = json.load(f)
  config = transformers.AutoConfig.from_pretrained(export_dir)
  classes = {"qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
             "qwen2_vl": transformers.Qwen2VLForConditionalGeneration}
  if config.model_type not in classes:
    raise ValueError(f"{export_dir}/config.json: model_type '{config.model_type}' is not Qwen2(.5)-VL")
  model = classes[config.model_type].from_pretrained(
      export_dir, dtype=getattr(torch, dtype), attn_implementation="eager").eval()
  if adapter_dir is not None:
    import peft  # pylint: disable=g-import-not-at-top
    model = peft.PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().eval()
    export_dir = adapter_dir  # its tokenizer, preprocessor and mmembed.json are the run's
  tokenizer = transformers.AutoTokenizer.from_pretrained(export_dir)
  preprocessor = os.path.join(export_dir, "preprocessor_config.json")
  image_config = (images_lib.ImageProcessingConfig.from_preprocessor_config(preprocessor)
                  if os.path.exists(preprocessor) else images_lib.ImageProcessingConfig())
  return TorchEmbedder(model, tokenizer, image_config,
                       attention=attention or record.get("attention", "causal"),
                       pooling=pooling or record.get("pooling", "last"),
                       max_length=max_length, batch_size=batch_size,
                       num_ctokens=int(record.get("compression_tokens", 0)),
                       **read_conventions(record, record_path),
                       video=record.get("video"))
