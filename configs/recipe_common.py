"""What the recipes share: the argument parser, the contrastive base config, the demo and pod sizes.

Imported by the recipes beside it (`sys.path` gets this directory; configs are files, not a
package). Only `mmembed_jax.training.config.default_config` (the schema) comes from the package.
"""
from typing import Any, Dict

import ml_collections

from mmembed_jax.training.config import default_config


def parse_args(arg: str, recipe: str, choices: Dict[str, Any],
               defaults: Dict[str, Any]) -> Dict[str, Any]:
  """`"key=value,key=value"` (a recipe's argument) -> {key: value}. `choices[key]` is the tuple
  of allowed values, or a function that converts the string (ValueError: not allowed). Anything
  else is one ValueError line naming the recipe."""
  options = dict(defaults)
  for item in filter(None, arg.split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in choices:
      raise ValueError(f"{recipe}: unknown argument '{item}'; use "
                       f"{', '.join(f'{k}=' for k in choices)}")
    allowed = choices[key]
    if isinstance(allowed, tuple):
      if value not in allowed:
        raise ValueError(f"{recipe}: {key} must be {', '.join(allowed[:-1])} or {allowed[-1]}, "
                         f"got '{value}'")
      options[key] = value
    else:
      try:
        options[key] = allowed(value)
      except ValueError as e:
        raise ValueError(f"{recipe}: {key}={value} is not allowed ({e})") from None
  return options


def contrastive_config(**objective: Any) -> ml_collections.ConfigDict:
  """default_config() for contrastive fine-tuning on pairs; recipes override sizes and data."""
  c = default_config()
  c.objective = dict(name="contrastive", pooling="mean", temperature=0.03, learn_temperature=False,
                     negatives="global", modality_mask=False, symmetric=False, grad_cache_chunk=0,
                     gather_weights_once=False)
  c.objective.update(objective)
  c.optimizer.update(decay="linear", warmup_ratio=0.05, end_lr_ratio=0.0, weight_decay=0.0)
  return c


def demo_pairs_input(num_negatives: int, task_batching: bool) -> dict:
  """The input section of a contrastive demo: the package's synthetic pairs, tiny images."""
  return dict(name="contrastive_pairs", sources="demo", global_batch_size=32,
              num_negatives=num_negatives, task_batching=task_batching, query_length=96,
              target_length=112, query_max_patches=128, target_max_patches=128, max_images=1,
              min_pixels=16 * 28 * 28, max_pixels=32 * 28 * 28, num_workers=0)


def pod_contrastive(config: ml_collections.ConfigDict, preset: str, sources: dict,
                    global_batch_size: int, num_negatives: int, task_batching: bool, length: int,
                    lr: float, total_steps: int) -> ml_collections.ConfigDict:
  """Pod sizes of a contrastive recipe: bf16 compute, scanned and rematerialised layers, FSDP,
  GradCache chunks of 4 rows per chip, images of 256-1024 merged tokens."""
  config.model.update(preset=preset, dtype="bfloat16", param_dtype="float32", scan_layers=True,
                      remat_policy="full")
  config.objective.grad_cache_chunk = 4
  config.total_steps = total_steps
  config.optimizer.update(lr=lr, max_grad_norm=1.0)
  config.input = dict(
      name="contrastive_pairs", sources=sources, global_batch_size=global_batch_size,
      num_negatives=num_negatives, task_batching=task_batching, query_length=length,
      target_length=length, query_max_patches=4 * 1024, target_max_patches=4 * 1024, max_images=1,
      min_pixels=256 * 28 * 28, max_pixels=1024 * 28 * 28, num_workers=8)
  config.mesh.ici = dict(data=1, fsdp=-1, tensor=1)
  config.checkpoint.update(every=200, keep=3)
  return config


def demo_contrastive(config: ml_collections.ConfigDict, preset: str) -> ml_collections.ConfigDict:
  """Demo sizes of a contrastive recipe: a tiny model, minutes on a 2-core CPU, held-out P@1.

  lr 3e-4: at 1e-3 the image embeddings of the from-scratch vision tower stay collapsed (cosine
  0.99 between any two scenes) and the image sets' loss stays at chance for 100+ steps (README,
  "Contrastive demos")."""
  config.model.update(preset=preset, dtype="float32", param_dtype="float32", scan_layers=False,
                      remat_policy="none")
  config.total_steps = 300
  config.log_every = 10
  config.optimizer.update(lr=3e-4, max_grad_norm=1.0)
  config.eval.update(every=100, sources="demo", max_rows_per_dataset=64)
  config.checkpoint.update(every=100, keep=2)
  return config


# The adapters of the released code (METHODS.md §7), as `adapters` config sections.
# VLM2Vec: PEFT target list qkv_proj,o_proj,gate_up_proj,down_proj,k_proj,q_proj,out_proj,v_proj
# matched by suffix: the LLM's q/k/v/o_proj and down_proj, and on Qwen2.5-VL the vision MLP's
# down_proj (qkv_proj, gate_up_proj and out_proj name no Qwen module).
# UNITE: plain LoRA (peft's default Kaiming init) on every nn.Linear name outside the vision
# tower but lm_head (its `find_all_linear_names`), a suffix list that on Qwen2-VL names the LLM's
# q/k/v/o/gate/up/down_proj; alpha 16 in stage 1 and 64 in stage 2.
ADAPTERS = {
    "vlm2vec": dict(kind="dora", rank=16, alpha=64.0, dropout=0.1, init="gaussian",
                    targets=r"/(q|k|v|o|down)_proj$", trainable_extra=""),
    "unite_stage1": dict(kind="lora", rank=8, alpha=16.0, dropout=0.05, init="kaiming",
                         targets=r"/(q|k|v|o|gate|up|down)_proj$", trainable_extra=""),
    "unite_stage2": dict(kind="lora", rank=8, alpha=64.0, dropout=0.05, init="kaiming",
                         targets=r"/(q|k|v|o|gate|up|down)_proj$", trainable_extra=""),
    "coma": dict(kind="dora", rank=16, alpha=64.0, dropout=0.1, init="gaussian",
                 targets=r"/(q|k|v|o)_proj$", trainable_extra="^embed_tokens/"),
}

