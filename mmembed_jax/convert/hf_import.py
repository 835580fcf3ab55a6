"""Hugging Face directory (config.json + safetensors, local or gs://) -> (ModelConfig, Flax params).

No torch: safetensors are memory-mapped and read tensor by tensor; each converted parameter
is handed to `put` (e.g. a sharded `jax.device_put`) as soon as it is complete, so the host
holds one tensor (one stacked layer group with `scan_layers`) at a time, not the model.
"""
import collections
import json
import tempfile
from typing import Any, Callable, Optional

import jax.numpy as jnp
import numpy as np
from etils import epath

from mmembed_jax.convert.mapping import TensorMap, canonical_hf_name, tensor_maps
from mmembed_jax.models.config import ModelConfig, from_hf_config

PutFn = Callable[[tuple[str, ...], np.ndarray], Any]


def read_hf_config(model_dir: str) -> Any:
  """The transformers config object of a local or gs:// model directory (no download)."""
  import transformers  # pylint: disable=g-import-not-at-top
  path = epath.Path(model_dir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: a Hugging Face model directory needs config.json")
  try:
    raw = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: invalid JSON ({e})") from e
  model_type = raw.pop("model_type", None)
  if model_type is None:
    raise ValueError(f"{path}: no 'model_type' field")
  if model_type not in transformers.CONFIG_MAPPING:
    raise ValueError(f"{path}: unknown model_type '{model_type}'")
  return transformers.AutoConfig.for_model(model_type, **raw)


def model_config(model_dir: str, **run_options: Any) -> ModelConfig:
  """ModelConfig of an HF directory, with run-time options (attention, dtype, scan_layers...)."""
  try:
    return from_hf_config(read_hf_config(model_dir), **run_options)
  except ValueError as e:
    raise ValueError(f"{model_dir}/config.json: {e}") from e


def safetensors_files(model_dir: str) -> list[epath.Path]:
  """The checkpoint's files: those listed by model.safetensors.index.json, or model.safetensors.

  A directory holding both (an earlier sharded export under a newer single file, or the
  reverse) is refused: transformers would read one and this reader the other.
  """
  root = epath.Path(model_dir)
  index = root / "model.safetensors.index.json"
  single = root / "model.safetensors"
  if index.exists() and single.exists():
    raise ValueError(f"{model_dir} holds both model.safetensors and model.safetensors.index.json "
                     f"(two exports mixed); export again into an empty directory")
  if index.exists():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ValueError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
    files = [root / name for name in sorted(set(weight_map.values()))]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
      raise FileNotFoundError(f"{index} lists {len(missing)} file(s) that do not exist, first "
                              f"{missing[0]}")
    return files
  if single.exists():
    return [single]
  raise FileNotFoundError(f"{model_dir}: neither model.safetensors nor model.safetensors.index.json")


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def import_hf(model_dir: str, *, param_dtype: Optional[str] = None, put: Optional[PutFn] = None,
              **run_options: Any) -> tuple[ModelConfig, dict]:
  """Reads an HF Qwen2(.5)-VL directory into (config, params); errors name the offending tensor.

  param_dtype: dtype of the returned parameters (default: the config's param_dtype);
  put: called as put(path, array) on every finished parameter; its result is stored instead.
  """
  if param_dtype is not None:
    run_options["param_dtype"] = param_dtype
  config = model_config(model_dir, **run_options)
  dtype = jnp.dtype(config.param_dtype)
  layer_counts = collections.Counter(m.path for m in tensor_maps(config) if m.layer is not None)
  maps: dict[str, TensorMap] = {m.hf_name: m for m in tensor_maps(config)}
  put = put or (lambda path, array: array)
  from safetensors import SafetensorError, safe_open  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory(prefix="mmembed_import_") as scratch:
    # Where each tensor is, checked in full before any tensor is read.
    location: dict[str, tuple[str, str, epath.Path]] = {}  # name -> (local file, raw name, file)
    for file in safetensors_files(model_dir):
      local = _local_copy(file, scratch)
      try:
        with safe_open(local, framework="np") as reader:
          raw_names = list(reader.keys())
      except SafetensorError as e:  # truncated or not a safetensors file at all
        raise ValueError(f"{file}: cannot read it as safetensors ({e})") from None
      for raw_name in raw_names:
        name = canonical_hf_name(raw_name)
        if name not in maps:
          if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied head saved explicitly: the embedding is the source of truth
          raise ValueError(f"{file}: unexpected tensor '{raw_name}' for a {config.family} model "
                           f"with this config.json")
        if name in location:
          raise ValueError(f"{file}: tensor '{raw_name}' appears twice in the checkpoint")
        location[name] = (local, raw_name, file)
    missing = [name for name in maps if name not in location]
    if missing:
      raise ValueError(f"{model_dir}: checkpoint is missing {len(missing)} tensor(s), first "
                       f"'{missing[0]}'")

    # Read parameter by parameter (a stacked one layer after layer), so that at most one
    # parameter is being assembled on the host whatever the order of tensors in the files.
    order = {path: i for i, path in enumerate(dict.fromkeys(m.path for m in maps.values()))}
    params: dict = {}
    stack, stack_path = None, None
    for m in sorted(maps.values(), key=lambda m: (order[m.path], m.layer or 0)):
      value = _read(safe_open, m, *location[m.hf_name]).astype(dtype, copy=False)
      if m.layer is None:
        _set(params, m.path, put(m.path, value))
      else:
        if stack_path != m.path:
          stack_path = m.path
          stack = np.empty((layer_counts[m.path],) + m.flax_shape, dtype)
        stack[m.layer] = value
        if m.layer == layer_counts[m.path] - 1:
          _set(params, m.path, put(m.path, stack))
          stack, stack_path = None, None
      del value  # when `put` moves it off the host, no host copy lingers while the next is read
  return config, params


def _read(safe_open, m: TensorMap, local: str, raw_name: str, file: epath.Path) -> np.ndarray:
  """One tensor, converted to its Flax layout.

  Opened per tensor: safe_open mmaps the whole file and every page read stays resident
  (counted in RSS) until it is closed, i.e. a whole shard on top of the params.
  """
  with safe_open(local, framework="np") as reader:
    shape = tuple(reader.get_slice(raw_name).get_shape())
    if shape != m.hf_shape:
      raise ValueError(f"{file}: tensor '{raw_name}' has shape {shape}, expected {m.hf_shape} "
                       f"from config.json")
    tensor = reader.get_tensor(raw_name)
  return m.to_flax(tensor)


def _local_copy(path: epath.Path, scratch: str) -> str:
  """A local filename for safe_open: gs:// files are copied into `scratch` (deleted after import)."""
  if not str(path).startswith("gs://"):
    return str(path)
  local = epath.Path(scratch) / path.name
  path.copy(local)
  return str(local)
