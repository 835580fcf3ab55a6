"""(ModelConfig, Flax params) -> a directory transformers loads with `from_pretrained`.

Writes sharded safetensors with their index, config.json, the tokenizer and preprocessor
files of a source directory, and `mmembed.json`, which records how embeddings are made
(pooling, attention, normalisation, prompts) so the PyTorch side reproduces them.
"""
import json
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from mmembed_jax.convert.mapping import tensor_maps
from mmembed_jax.models.config import ModelConfig, to_hf_config_dict

EMBEDDING_FILE = "mmembed.json"
# Files copied from the source model directory when present (tokenizer, image processor, chat).
CARRIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                 "merges.txt", "added_tokens.json", "chat_template.json", "chat_template.jinja",
                 "preprocessor_config.json", "generation_config.json")


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
  for key in path:
    if key not in tree:
      raise KeyError(f"params have no '{'/'.join(path)}' (missing '{key}')")
    tree = tree[key]
  return tree


def export_hf(config: ModelConfig, params: Mapping, out_dir: str, *,
              source_dir: Optional[str] = None, embedding: Optional[Mapping[str, Any]] = None,
              dtype: Optional[str] = None, max_shard_bytes: int = 2 * 1024**3) -> epath.Path:
  """Writes the HF checkpoint; `dtype` (e.g. 'bfloat16') casts on write, default keeps params' dtype.

  source_dir: directory whose tokenizer / preprocessor files are carried over;
  embedding: the embedding conventions written to mmembed.json (pooling, attention, ...).
  """
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  maps = list(tensor_maps(config))
  leaves = {m.path: _get(params, m.path) for m in maps}
  out_dtype = jnp.dtype(dtype) if dtype else None

  def size(m):
    itemsize = (out_dtype or jnp.dtype(leaves[m.path].dtype)).itemsize
    return int(np.prod(m.hf_shape)) * itemsize

  shards, current, current_bytes = [], [], 0
  for m in maps:
    if current and current_bytes + size(m) > max_shard_bytes:
      shards.append(current)
      current, current_bytes = [], 0
    current.append(m)
    current_bytes += size(m)
  shards.append(current)

  weight_map, total = {}, 0
  for number, shard in enumerate(shards, start=1):
    name = (f"model-{number:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1
            else "model.safetensors")
    tensors = {}
    for m in shard:
      leaf = leaves[m.path]
      array = np.asarray(jax.device_get(leaf[m.layer] if m.layer is not None else leaf))
      tensor = m.to_hf(array)
      tensors[m.hf_name] = tensor.astype(out_dtype) if out_dtype is not None else tensor
      weight_map[m.hf_name] = name
      total += tensors[m.hf_name].nbytes
    (out / name).write_bytes(safetensors.numpy.save(tensors, metadata={"format": "pt"}))
  if len(shards) > 1:
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

  saved_dtype = str(out_dtype or jnp.dtype(next(iter(leaves.values())).dtype))
  hf_config = to_hf_config_dict(config, dtype=saved_dtype)
  (out / "config.json").write_text(json.dumps(hf_config, indent=2))
  if source_dir is not None:
    for filename in CARRIED_FILES:
      source = epath.Path(source_dir) / filename
      if source.exists():
        (out / filename).write_bytes(source.read_bytes())
  record = {"attention": config.attention, "pooling": "last", "normalize": True,
            "prompt_format": "text with <image> markers; no chat template; "
                             "<image> -> <|vision_start|> N*<|image_pad|> <|vision_end|>",
            "image_marker": "<image>"}
  record.update(embedding or {})
  (out / EMBEDDING_FILE).write_text(json.dumps(record, indent=2))
  return out
