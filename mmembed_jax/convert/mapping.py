"""Which Hugging Face tensor is which Flax parameter, and how each is transposed or reshaped.

Each module group declares its own names next to each other (vision block, vision merger,
decoder layer, embeddings), so import and export read the same table. With `scan_layers`
the per-layer parameters are stacked on a leading `layers` axis: `layer` says where.
"""
import dataclasses
import re
from typing import Callable, Iterator, Optional

import numpy as np

from mmembed_jax.models.config import ModelConfig

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class TensorMap:
  """One HF tensor <-> one Flax parameter (or one layer's slice of a stacked parameter)."""
  hf_name: str
  path: Path  # path in the Flax params tree
  layer: Optional[int]  # index on the stacked leading axis, None when not stacked
  hf_shape: tuple[int, ...]
  flax_shape: tuple[int, ...]  # shape of this tensor's slice on the Flax side
  kind: str  # "linear" (transpose), "patch_embed" (Conv3d), "copy"

  def to_flax(self, tensor: np.ndarray) -> np.ndarray:
    """HF tensor -> Flax slice."""
    if self.kind == "linear":  # torch Linear weight [out, in] -> kernel [in, *out]
      return transpose(tensor).reshape(self.flax_shape)
    if self.kind == "patch_embed":  # Conv3d [width, c, t, p, p] -> kernel [c*t*p*p, width]
      return transpose(tensor.reshape(tensor.shape[0], -1))
    return tensor.reshape(self.flax_shape)

  def to_hf(self, array: np.ndarray) -> np.ndarray:
    """Flax slice -> HF tensor."""
    if self.kind in ("linear", "patch_embed"):
      return transpose(np.asarray(array).reshape(array.shape[0], -1)).reshape(self.hf_shape)
    return np.asarray(array).reshape(self.hf_shape)


def transpose(matrix: np.ndarray, tile: int = 256) -> np.ndarray:
  """Contiguous transpose of a 2-D array, tile by tile (about 3x faster than .T on big matrices,
  whose strided reads miss the cache)."""
  rows, cols = matrix.shape
  out = np.empty((cols, rows), matrix.dtype)
  for i in range(0, rows, tile):
    for j in range(0, cols, tile):
      out[j:j + tile, i:i + tile] = matrix[i:i + tile, j:j + tile].T
  return out


def _linear(prefix: str, path: Path, d_in: int, out_shape: tuple[int, ...], bias: bool):
  out = int(np.prod(out_shape))
  yield (f"{prefix}.weight", path + ("kernel",), (out, d_in), (d_in,) + out_shape, "linear")
  if bias:
    yield (f"{prefix}.bias", path + ("bias",), (out,), out_shape, "copy")


def _norm(prefix: str, path: Path, width: int, with_bias: bool):
  yield (f"{prefix}.weight", path + ("scale",), (width,), (width,), "copy")
  if with_bias:
    yield (f"{prefix}.bias", path + ("bias",), (width,), (width,), "copy")


def _vision_block(config: ModelConfig, prefix: str, path: Path):
  v = config.vision
  layer_norm = config.family == "qwen2_vl"
  yield from _norm(f"{prefix}.norm1", path + ("norm1",), v.hidden_size, layer_norm)
  yield from _norm(f"{prefix}.norm2", path + ("norm2",), v.hidden_size, layer_norm)
  yield from _linear(f"{prefix}.attn.qkv", path + ("attn", "qkv"), v.hidden_size, (3, v.hidden_size),
                     True)
  yield from _linear(f"{prefix}.attn.proj", path + ("attn", "proj"), v.hidden_size, (v.hidden_size,),
                     True)
  if config.family == "qwen2_5_vl":
    for name in ("gate_proj", "up_proj"):
      yield from _linear(f"{prefix}.mlp.{name}", path + ("mlp", name), v.hidden_size,
                         (v.intermediate_size,), True)
    yield from _linear(f"{prefix}.mlp.down_proj", path + ("mlp", "down_proj"), v.intermediate_size,
                       (v.hidden_size,), True)
  else:
    yield from _linear(f"{prefix}.mlp.fc1", path + ("mlp", "fc1"), v.hidden_size,
                       (v.intermediate_size,), True)
    yield from _linear(f"{prefix}.mlp.fc2", path + ("mlp", "fc2"), v.intermediate_size,
                       (v.hidden_size,), True)


def _vision_rest(config: ModelConfig):
  v = config.vision
  yield ("model.visual.patch_embed.proj.weight", ("visual", "patch_embed", "kernel"),
         (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size),
         (v.patch_dim, v.hidden_size), "patch_embed")
  merged_width = v.hidden_size * v.spatial_merge_size**2
  yield from _norm("model.visual.merger.ln_q", ("visual", "merger", "ln_q"), v.hidden_size,
                   config.family == "qwen2_vl")
  yield from _linear("model.visual.merger.mlp.0", ("visual", "merger", "mlp_0"), merged_width,
                     (merged_width,), True)
  yield from _linear("model.visual.merger.mlp.2", ("visual", "merger", "mlp_2"), merged_width,
                     (v.out_hidden_size,), True)


def _decoder_layer(config: ModelConfig, prefix: str, path: Path):
  t = config.text
  kv_width = t.num_kv_heads * t.head_dim
  yield from _norm(f"{prefix}.input_layernorm", path + ("input_layernorm",), t.hidden_size, False)
  yield from _norm(f"{prefix}.post_attention_layernorm", path + ("post_attention_layernorm",),
                   t.hidden_size, False)
  attn = path + ("self_attn",)
  yield from _linear(f"{prefix}.self_attn.q_proj", attn + ("q_proj",), t.hidden_size,
                     (t.num_heads * t.head_dim,), True)
  yield from _linear(f"{prefix}.self_attn.k_proj", attn + ("k_proj",), t.hidden_size, (kv_width,), True)
  yield from _linear(f"{prefix}.self_attn.v_proj", attn + ("v_proj",), t.hidden_size, (kv_width,), True)
  yield from _linear(f"{prefix}.self_attn.o_proj", attn + ("o_proj",), t.num_heads * t.head_dim,
                     (t.hidden_size,), False)
  for name in ("gate_proj", "up_proj"):
    yield from _linear(f"{prefix}.mlp.{name}", path + ("mlp", name), t.hidden_size,
                       (t.intermediate_size,), False)
  yield from _linear(f"{prefix}.mlp.down_proj", path + ("mlp", "down_proj"), t.intermediate_size,
                     (t.hidden_size,), False)


def decoder_layer_maps(config: ModelConfig, prefix: str = "") -> Iterator[TensorMap]:
  """One unstacked decoder layer's tensors: HF names `{prefix}.input_layernorm.weight`, ...
  (no prefix: `input_layernorm.weight`), Flax paths relative to the layer."""
  for hf_name, path, hf_shape, flax_shape, kind in _decoder_layer(config, prefix, ()):
    yield TensorMap(hf_name.lstrip("."), path, None, hf_shape, flax_shape, kind)


def _text_rest(config: ModelConfig):
  t = config.text
  yield ("model.language_model.embed_tokens.weight", ("embed_tokens", "embedding"),
         (t.vocab_size, t.hidden_size), (t.vocab_size, t.hidden_size), "copy")
  yield from _norm("model.language_model.norm", ("language_model", "norm"), t.hidden_size, False)
  if not config.tie_word_embeddings:
    yield ("lm_head.weight", ("lm_head",), (t.vocab_size, t.hidden_size),
           (t.hidden_size, t.vocab_size), "linear")


def tensor_maps(config: ModelConfig) -> Iterator[TensorMap]:
  """Every tensor of the checkpoint, in HF state-dict order (vision, then LLM, then head)."""
  def stacked(group: Callable, prefix: str, base: Path, count: int):
    for i in range(count):
      path = base if config.scan_layers else base[:-1] + (f"{base[-1]}_{i}",)
      for hf_name, rest, hf_shape, flax_shape, kind in group(config, f"{prefix}.{i}", ()):
        yield TensorMap(hf_name, path + rest, i if config.scan_layers else None, hf_shape,
                        flax_shape, kind)

  for hf_name, path, hf_shape, flax_shape, kind in _vision_rest(config):
    yield TensorMap(hf_name, path, None, hf_shape, flax_shape, kind)
  yield from stacked(_vision_block, "model.visual.blocks", ("visual", "blocks"), config.vision.depth)
  yield from stacked(_decoder_layer, "model.language_model.layers", ("language_model", "layers"),
                     config.text.num_layers)
  for hf_name, path, hf_shape, flax_shape, kind in _text_rest(config):
    yield TensorMap(hf_name, path, None, hf_shape, flax_shape, kind)


# Checkpoints saved before transformers 4.52 name the LLM `model.layers...` and the vision tower
# `visual...`; current ones `model.language_model.layers...` and `model.visual...`.
_LEGACY_NAMES = ((re.compile(r"^visual\."), "model.visual."),
                 (re.compile(r"^model\.(?!visual\.|language_model\.)"), "model.language_model."))


def canonical_hf_name(name: str) -> str:
  """Maps either HF naming generation to the current one."""
  for pattern, replacement in _LEGACY_NAMES:
    name = pattern.sub(replacement, name)
  return name
