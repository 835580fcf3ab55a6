"""A run's LoRA / DoRA adapters as a PEFT adapter directory that peft loads onto its base model.

  base = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(BASE_DIR)
  model = peft.PeftModel.from_pretrained(base, ADAPTER_DIR)

The directory holds `adapter_config.json` (peft_type LORA, r, lora_alpha, lora_dropout,
use_dora, init_lora_weights, target_modules, modules_to_save) and `adapter_model.safetensors`
with the tensors named as peft 0.21.2 saves them for a `Qwen2(_5)VLForConditionalGeneration`
(the class transformers builds from our exports): `base_model.model.<module>.lora_A.weight`
[rank, in], `.lora_B.weight` [out, rank] and, for DoRA, `.lora_magnitude_vector` [out], in
float32; base modules trained in full (`adapters.trainable_extra`, CoMa's token embeddings) as
peft's `modules_to_save`: `base_model.model.<module>.weight` in the HF layout.
"""
import json
import re
from typing import Any, Iterator, Mapping, Optional

import numpy as np
from etils import epath

from mmembed_jax.convert import hf_export
from mmembed_jax.convert.mapping import TensorMap, tensor_maps
from mmembed_jax.models.adapters import AdapterSpec
from mmembed_jax.models.config import ModelConfig

PEFT_VERSION = "0.21.2"  # the version whose layout and semantics we match
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
# Our leaf -> peft's tensor suffix.
SUFFIXES = {"lora_a": "lora_A.weight", "lora_b": "lora_B.weight",
            "lora_magnitude": "lora_magnitude_vector"}


def adapted_modules(config: ModelConfig, params: Mapping
                    ) -> Iterator[tuple[str, TensorMap, Mapping]]:
  """(HF module name, its kernel's TensorMap, its parameters) of every linear layer that holds
  an adapter."""
  for m in tensor_maps(config):
    if m.path[-1] != "kernel":
      continue
    module = hf_export._get(params, m.path[:-1])  # pylint: disable=protected-access
    if "lora_a" not in module:
      continue
    if m.kind != "linear":
      raise ValueError(f"{'/'.join(m.path[:-1])}: peft has no adapter for a {m.kind} layer; "
                       f"leave it out of adapters.targets")
    yield m.hf_name[:-len(".weight")], m, module


def to_peft(leaf: str, array: np.ndarray) -> np.ndarray:
  """One layer's adapter array in our layout -> peft's tensor (A [in, r] -> [r, in];
  B [r, *out] -> [out, r]; magnitude [*out] -> [out])."""
  if leaf == "lora_a":
    return np.ascontiguousarray(array.T)
  if leaf == "lora_b":
    return np.ascontiguousarray(array.reshape(array.shape[0], -1).T)
  return array.reshape(-1)


def peft_tensors(config: ModelConfig, params: Mapping) -> dict[str, np.ndarray]:
  """{peft tensor name: float32 array} of every adapter in `params` (gathered to the host)."""
  out = {}
  for module, m, layer in adapted_modules(config, params):
    for leaf, suffix in SUFFIXES.items():
      if leaf in layer:
        host = hf_export._to_host(layer[leaf], m.layer)  # pylint: disable=protected-access
        out[f"{PREFIX}{module}.{suffix}"] = to_peft(leaf, host.astype(np.float32))
  return out


def saved_modules(config: ModelConfig, trainable_extra: str) -> list[TensorMap]:
  """The HF tensors of the base parameters `trainable_extra` trains, as whole modules peft can
  name in `modules_to_save` (it matches modules by their last name); ValueError otherwise."""
  if not trainable_extra:
    return []
  pattern = re.compile(trainable_extra)
  maps = list(tensor_maps(config))
  module = lambda m: m.hf_name.rsplit(".", 1)[0]  # pylint: disable=unnecessary-lambda-assignment
  matched = [m for m in maps if pattern.search("/".join(m.path))]
  names = {module(m).rsplit(".", 1)[-1] for m in matched}
  reached = [m for m in maps if module(m).rsplit(".", 1)[-1] in names]
  if len(reached) != len(matched):
    missing = sorted({m.hf_name for m in reached} - {m.hf_name for m in matched})
    raise ValueError(f"adapters.trainable_extra={trainable_extra!r} trains part of what peft's "
                     f"modules_to_save={sorted(names)} would save (not {missing[:3]}); peft saves "
                     f"whole modules by name")
  return matched


def adapter_config(spec: AdapterSpec, modules: list[str], base_model: Optional[str],
                   saved: Optional[list[str]] = None) -> dict:
  """adapter_config.json: the fields peft reads, for exactly the adapted modules (and the
  modules `saved` in full)."""
  return {
      "peft_type": "LORA", "peft_version": PEFT_VERSION, "task_type": None,
      "base_model_name_or_path": base_model or None,
      "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
      "use_dora": spec.kind == "dora", "use_rslora": False,
      "init_lora_weights": "gaussian" if spec.init == "gaussian" else True,
      # Module names without the leading "model.", matched by suffix: the same file serves
      # Qwen2(_5)VLForConditionalGeneration and Qwen2(_5)VLModel module trees.
      "target_modules": sorted(name.removeprefix("model.") for name in modules),
      "bias": "none", "lora_bias": False, "fan_in_fan_out": False,
      "modules_to_save": saved or None,
      "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {},
  }


def export_peft(config: ModelConfig, params: Mapping, spec: AdapterSpec, out_dir: str, *,
                base_model: Optional[str] = None, overwrite: bool = False,
                trainable_extra: str = "", **side_files: Any) -> epath.Path:
  """Writes `params`' adapters (and the base modules `trainable_extra` trains, as peft's
  modules_to_save) as a peft adapter directory (all processes gather, process 0 writes; the
  directory is staged and renamed into place like an HF export). `side_files`: source_dir,
  embedding, preprocessor, written as `hf_export.write_side_files` does, so `torch_embed.load`
  embeds with the directory alone."""
  import jax  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  hf_export.check_target(out_dir, overwrite)
  modules = [module for module, _, _ in adapted_modules(config, params)]
  if not modules:
    raise ValueError("the run has no adapters to export (adapters.kind is 'none')")
  tensors = peft_tensors(config, params)
  saved = saved_modules(config, trainable_extra)
  for m in saved:
    host = hf_export._to_host(hf_export._get(params, m.path), m.layer)  # pylint: disable=protected-access
    tensors[PREFIX + m.hf_name] = m.to_hf(host)
  saved_names = sorted({m.hf_name.rsplit(".", 1)[0].rsplit(".", 1)[-1] for m in saved})
  target = epath.Path(out_dir)
  if jax.process_index():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  staging = target.parent / f".{target.name}.tmp-peft"
  if staging.exists():
    hf_export._remove(staging)  # pylint: disable=protected-access
  staging.mkdir()
  save_file(tensors, str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
  (staging / ADAPTER_CONFIG).write_text(
      json.dumps(adapter_config(spec, modules, base_model, saved_names), indent=2))
  hf_export.write_side_files(staging, config, **{
      k: side_files.get(k) for k in ("source_dir", "embedding", "preprocessor")})
  hf_export._swap_in(staging, target)  # pylint: disable=protected-access
  return target


def is_adapter_dir(path: str) -> bool:
  """Whether `path` is a peft adapter directory (adapter_config.json, no config.json)."""
  root = epath.Path(path)
  return (root / ADAPTER_CONFIG).exists() and not (root / "config.json").exists()


def read_adapter_config(path: str) -> dict[str, Any]:
  """A peft adapter directory's adapter_config.json."""
  return json.loads((epath.Path(path) / ADAPTER_CONFIG).read_text())
