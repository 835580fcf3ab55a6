"""(ModelConfig, Flax params) -> a directory transformers loads with `from_pretrained`.

Writes sharded safetensors with their index, config.json, the tokenizer and preprocessor
files of a source directory, and `mmembed.json`, which records how embeddings are made
(pooling, attention, normalisation, prompts) so the PyTorch side reproduces them.

The directory is written whole under a temporary name beside the target and then renamed into
place, so a reader never sees a half-written export or a mixture of two (an earlier export's
shards and index left beside a new single file). A non-empty target is refused unless
`overwrite`; then the old directory is moved aside, the new one renamed in, the old one deleted.
"""
import contextlib
import json
import os
import shutil
import struct
from typing import Any, Iterator, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from mmembed_jax.convert.mapping import tensor_maps
from mmembed_jax.data.special_tokens import compression_tokens
from mmembed_jax.models.config import ModelConfig, to_hf_config_dict

EMBEDDING_FILE = "mmembed.json"
VIDEO_PREPROCESSOR_FILE = "video_preprocessor_config.json"
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


def _to_host(leaf: Any, layer: Optional[int]) -> np.ndarray:
  """One tensor (one layer of a stacked leaf) on the host; a leaf sharded over several processes
  is gathered (every process must call this, in the same order)."""
  part = leaf[layer] if layer is not None else leaf
  if not isinstance(part, jax.Array):
    return np.asarray(part)
  if not part.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(part, tiled=True))
  # Assembled from the shards: np.asarray(part) would also keep a host copy cached on the
  # parameter itself, so the export would end up holding the whole model twice.
  out = np.empty(part.shape, part.dtype)
  for shard in part.addressable_shards:
    if shard.replica_id == 0:
      out[shard.index] = np.asarray(shard.data)
  return out


# numpy dtype name -> safetensors dtype code
_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64",
                       "int64": "I64", "int32": "I32", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def _shard_names(shards: list) -> list:
  """[(file name, shard)]: model.safetensors, or model-0000i-of-0000n.safetensors."""
  if len(shards) == 1:
    return [("model.safetensors", shards[0])]
  return [(f"model-{i:05d}-of-{len(shards):05d}.safetensors", shard)
          for i, shard in enumerate(shards, start=1)]


def _write_safetensors(path: Optional[epath.Path], entries: list, tensors: Iterator[np.ndarray]
                       ) -> None:
  """Streams tensors into a safetensors file: the header comes from `entries` (name, shape,
  dtype), then each tensor is written and dropped, so the host holds one tensor at a time.
  path None: the tensors are still produced (every process gathers) but nothing is written."""
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for name, shape, dtype in entries:
    nbytes = int(np.prod(shape)) * jnp.dtype(dtype).itemsize
    header[name] = {"dtype": _SAFETENSORS_DTYPES[jnp.dtype(dtype).name], "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
  with (path.open("wb") if path is not None else contextlib.nullcontext()) as f:
    if f is not None:
      f.write(struct.pack("<Q", len(encoded)) + encoded)
    for (name, shape, dtype), tensor in zip(entries, tensors):
      if tuple(tensor.shape) != tuple(shape) or tensor.dtype != jnp.dtype(dtype):
        raise ValueError(f"{name}: produced {tensor.dtype}{list(tensor.shape)}, expected "
                         f"{jnp.dtype(dtype)}{list(shape)}")
      if f is not None:
        f.write(np.ascontiguousarray(tensor).view(np.uint8).reshape(-1).data)


def check_target(out_dir: str, overwrite: bool = False) -> None:
  """ValueError unless `out_dir` can receive an export: absent or an empty directory, or any
  directory with `overwrite`; never a file."""
  out = epath.Path(out_dir)
  if out.exists() and not out.is_dir():
    raise ValueError(f"export target {out_dir} is a file, not a directory")
  if out.exists() and any(out.iterdir()) and not overwrite:
    raise ValueError(f"export target {out_dir} is not empty; choose an empty directory or pass "
                     f"--overwrite to replace it")


def _remove(directory: epath.Path) -> None:
  """Deletes a directory tree, local or gs://."""
  if "://" in str(directory):
    directory.rmtree()
  else:
    shutil.rmtree(directory)


def _swap_in(staging: epath.Path, out: epath.Path) -> None:
  """Renames the finished `staging` directory to `out`, replacing what was there."""
  old = out.parent / f".{out.name}.old-{os.getpid()}"
  if out.exists():
    out.rename(old)
  staging.rename(out)
  if old.exists():
    _remove(old)


def export_hf(config: ModelConfig, params: Mapping, out_dir: str, *,
              source_dir: Optional[str] = None, embedding: Optional[Mapping[str, Any]] = None,
              dtype: Optional[str] = None, preprocessor: Optional[Mapping[str, Any]] = None,
              max_shard_bytes: int = 2 * 1024**3, overwrite: bool = False) -> epath.Path:
  """Writes the HF checkpoint; `dtype` (e.g. 'bfloat16') casts on write, default keeps params' dtype.

  source_dir: directory whose tokenizer / preprocessor files are carried over;
  embedding: the embedding conventions written to mmembed.json (pooling, attention, ...);
  preprocessor: a preprocessor_config.json dict written over the carried one;
  overwrite: replace a non-empty `out_dir` (else ValueError).
  Tensors are gathered and written one at a time, so the host holds one tensor beyond the
  params; with several processes all take part in the gathers and process 0 writes. Files go
  to a staging directory beside `out_dir`, renamed into place once complete (deleted on failure).
  """
  check_target(out_dir, overwrite)
  writer = jax.process_index() == 0
  target = epath.Path(out_dir)
  staging = target.parent / f".{target.name}.tmp-{os.getpid()}"
  if writer:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging.mkdir()
  try:
    _write_files(config, params, staging if writer else None, source_dir=source_dir,
                 embedding=embedding, dtype=dtype, preprocessor=preprocessor,
                 max_shard_bytes=max_shard_bytes)
  except BaseException:
    if writer:
      _remove(staging)
    raise
  if writer:
    _swap_in(staging, target)
  return target


def _write_files(config: ModelConfig, params: Mapping, out: Optional[epath.Path], *,
                 source_dir: Optional[str], embedding: Optional[Mapping[str, Any]],
                 dtype: Optional[str], preprocessor: Optional[Mapping[str, Any]],
                 max_shard_bytes: int) -> None:
  """Writes every file of the export into `out` (None: only take part in the gathers)."""
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

  weight_map = {m.hf_name: name for name, shard in _shard_names(shards) for m in shard}
  for name, shard in _shard_names(shards):
    entries = [(m.hf_name, m.hf_shape, out_dtype or jnp.dtype(leaves[m.path].dtype)) for m in shard]

    def tensors(shard=shard):
      for m in shard:
        tensor = m.to_hf(_to_host(leaves[m.path], m.layer))
        yield tensor.astype(out_dtype, copy=False) if out_dtype is not None else tensor

    _write_safetensors(out / name if out is not None else None, entries, tensors())
  total = sum(size(m) for m in maps)
  if out is None:
    return
  if len(shards) > 1:
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

  saved_dtype = str(out_dtype or jnp.dtype(next(iter(leaves.values())).dtype))
  hf_config = to_hf_config_dict(config, dtype=saved_dtype)
  (out / "config.json").write_text(json.dumps(hf_config, indent=2))
  write_side_files(out, config, source_dir=source_dir, embedding=embedding,
                   preprocessor=preprocessor)


def add_special_tokens(path: epath.Path, tokens: Sequence[str]) -> None:
  """Adds the special tokens a tokenizer.json lacks, in order (the ids the run gave them)."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  tokenizer = tokenizers.Tokenizer.from_str(path.read_text())
  tokenizer.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                for t in tokens if tokenizer.token_to_id(t) is None])
  path.write_text(tokenizer.to_str())


def video_preprocessor_config(preprocessor: Mapping[str, Any], video: Mapping[str, Any]
                              ) -> dict:
  """transformers' `Qwen2VLVideoProcessor` settings: the image processor's patches and
  normalisation, the video processor's pixel bounds (mmembed.json 'video'), no frame sampling
  (the caller samples, as qwen-vl-utils does; mmembed.json 'video' says how)."""
  keys = ("do_resize", "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean",
          "image_std", "patch_size", "temporal_patch_size", "merge_size", "do_convert_rgb")
  out = {k: preprocessor[k] for k in keys if k in preprocessor}
  out.update(video_processor_type="Qwen2VLVideoProcessor", do_sample_frames=False,
             cap_pixels_per_frame=False,  # the sampler applied the budget (qwen-vl-utils)
             size={"shortest_edge": video["processor_min_pixels"],
                   "longest_edge": video["processor_max_pixels"]})
  return out


def write_side_files(out: epath.Path, config: ModelConfig, *, source_dir: Optional[str],
                     embedding: Optional[Mapping[str, Any]],
                     preprocessor: Optional[Mapping[str, Any]]) -> None:
  """The files beside the weights: the source's tokenizer and processor files, the
  preprocessor_config.json given, and mmembed.json (how to embed)."""
  if source_dir is not None:
    for filename in CARRIED_FILES:
      source = epath.Path(source_dir) / filename
      if source.exists():
        (out / filename).write_bytes(source.read_bytes())
  count = (embedding or {}).get("compression_tokens", 0)
  if count and (out / "tokenizer.json").exists():  # CoMa: the tokenizer carries them
    add_special_tokens(out / "tokenizer.json", compression_tokens(count))
  if preprocessor is not None:
    (out / "preprocessor_config.json").write_text(json.dumps(dict(preprocessor), indent=2))
  video = (embedding or {}).get("video")
  if video is not None and (out / "preprocessor_config.json").exists():
    # transformers' video processor with the run's video bounds
    image = json.loads((out / "preprocessor_config.json").read_text())
    (out / VIDEO_PREPROCESSOR_FILE).write_text(json.dumps(
        video_preprocessor_config(image, video), indent=2))
  record = {"attention": config.attention, "pooling": "last", "normalize": True,
            "prompt_format": "text with <image> markers; no chat template; "
                             "<image> -> <|vision_start|> N*<|image_pad|> <|vision_end|>",
            "image_marker": "<image>"}
  record.update(embedding or {})
  (out / EMBEDDING_FILE).write_text(json.dumps(record, indent=2))
