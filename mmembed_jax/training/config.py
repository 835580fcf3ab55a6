"""Every field a training config may hold, with defaults, and its validation before anything compiles.

Recipes (configs/*.py) start from `default_config()` and override fields. The `objective` and
`input` sections hold `name` and the fields of the class registered under that name
(training/registry.py checks them: unknown or misspelt fields, wrong types).
"""
import math
import re
from typing import Any, Optional

import ml_collections

from mmembed_jax.models.adapters import AdapterSpec
from mmembed_jax.parallel.mesh import MESH_AXES, resolve_axis_sizes, num_slices
from mmembed_jax.parallel.sharding import DEFAULT_RULES
from mmembed_jax.training import registry

TYPED_BY_REGISTRY = ("objective", "input")  # checked against their registered classes


def default_config() -> ml_collections.ConfigDict:
  """The schema: all known fields with their defaults."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 100
  c.init_from = ""  # "" (random), an HF model directory, or another run's workdir
  # "": the source HF directory's tokenizer (init_from and its chain), else the demo's for demo data
  c.tokenizer_dir = ""
  c.log_every = 10
  c.model = dict(preset="tiny_qwen2_5_vl", attention="bidirectional", dtype="float32",
                 param_dtype="float32", scan_layers=False, remat_policy="none",
                 attention_impl="auto")
  c.objective = dict(name="masked_lm")
  c.input = dict(name="synthetic_tokens", global_batch_size=16, length=64)
  # num_devices: 0 spans all devices; N > 0 only the first N (single-process runs, e.g. tests).
  c.mesh = dict(ici=dict(data=-1, fsdp=1, tensor=1), dcn=dict(data=-1, fsdp=1, tensor=1),
                num_devices=0)
  c.sharding = dict(rules=[list(rule) for rule in DEFAULT_RULES], max_replicated_share=0.6,
                    min_replicated_size=2**20)
  c.optimizer = dict(lr=1e-4, warmup_ratio=0.1, decay="linear", end_lr_ratio=0.0, b1=0.9, b2=0.999,
                     eps=1e-8, weight_decay=0.01, max_grad_norm=1.0, freeze="",
                     lr_multipliers=[])  # [[regex, factor], ...]: the first match scales its lr
  # LoRA / DoRA adapters (models/adapters.py, PEFT's semantics); kind "none" trains every
  # parameter. targets: regex searched in each linear layer's module path, e.g.
  # 'language_model/layers_0/self_attn/q_proj'; trainable_extra: regex of base parameter paths
  # that train in full beside the adapters (e.g. '^embed_tokens/').
  c.adapters = dict(kind="none", rank=8, alpha=16.0, dropout=0.0, targets="", init="kaiming",
                    trainable_extra="")
  c.grad_accum_steps = 1
  # Held-out retrieval Precision@1 every `every` steps (0 = off), contrastive runs only.
  c.eval = dict(every=0, sources="demo", max_rows_per_dataset=64)
  c.checkpoint = dict(every=50, keep=3, keep_period=0, use_async=True)
  return c


def _unknown_fields(config: Any, schema: Any, prefix: str = "") -> list[str]:
  unknown = []
  for key in config.keys():
    name = prefix + key
    if key not in schema:
      unknown.append(name)
    elif name not in TYPED_BY_REGISTRY + ("mesh.ici", "mesh.dcn") and isinstance(
        schema[key], ml_collections.ConfigDict):
      unknown += _unknown_fields(config[key], schema[key], name + ".")
  return unknown


def mesh_devices(config: ml_collections.ConfigDict, devices: list) -> list:
  """The devices the mesh spans: all of `devices`, or the first `mesh.num_devices` of them."""
  count = config.mesh.num_devices
  if count == 0:
    return list(devices)
  if not 0 < count <= len(devices):
    raise ValueError(f"mesh.num_devices={count} must be 0 (all) or between 1 and {len(devices)}")
  if len({d.process_index for d in devices}) > 1:
    raise ValueError(f"mesh.num_devices={count} is for single-process runs; use 0 (all devices)")
  return list(devices[:count])


# field -> (what it must be, test): numbers a run cannot train with are refused before it starts.
_RANGES = {
    "total_steps": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "log_every": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "grad_accum_steps": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "checkpoint.every": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "checkpoint.keep": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "checkpoint.keep_period": ("an integer >= 0 (0: none)", lambda v: _is_int(v) and v >= 0),
    "eval.every": ("an integer >= 0 (0: off)", lambda v: _is_int(v) and v >= 0),
    "optimizer.lr": ("a number >= 0", lambda v: _is_number(v) and v >= 0),
    "optimizer.warmup_ratio": ("a number in [0, 1]", lambda v: _is_number(v) and 0 <= v <= 1),
    "optimizer.end_lr_ratio": ("a number >= 0", lambda v: _is_number(v) and v >= 0),
    "optimizer.b1": ("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1),
    "optimizer.b2": ("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1),
    "optimizer.eps": ("a number > 0", lambda v: _is_number(v) and v > 0),
    "optimizer.weight_decay": ("a number >= 0", lambda v: _is_number(v) and v >= 0),
    "optimizer.max_grad_norm": ("a number >= 0 (0: no clipping)",
                                lambda v: _is_number(v) and v >= 0),
    "optimizer.decay": ("one of 'linear', 'cosine', 'constant'",
                        lambda v: v in ("linear", "cosine", "constant")),
    "sharding.max_replicated_share": ("a number in [0, 1]",
                                      lambda v: _is_number(v) and 0 <= v <= 1),
}


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def _check_ranges(config: ml_collections.ConfigDict) -> None:
  """ValueError naming the first field outside its range (_RANGES), or a freeze regex that
  does not compile."""
  for name, (expected, ok) in _RANGES.items():
    value = config
    for key in name.split("."):
      value = value[key]
    if not ok(value):
      raise ValueError(f"{name}={value!r}: expected {expected}")
  try:
    re.compile(config.optimizer.freeze)
  except re.error as e:
    raise ValueError(f"optimizer.freeze={config.optimizer.freeze!r} is not a valid regular "
                     f"expression ({e})") from None
  adapter_spec(config)  # kind, rank, alpha, dropout, targets, init
  try:
    re.compile(config.adapters.trainable_extra)
  except re.error as e:
    raise ValueError(f"adapters.trainable_extra={config.adapters.trainable_extra!r} is not a valid "
                     f"regular expression ({e})") from None
  for entry in config.optimizer.lr_multipliers:
    try:
      regex, factor = entry
      re.compile(regex)
      valid = _is_number(factor) and factor >= 0
    except (re.error, TypeError, ValueError):
      valid = False
    if not valid:
      raise ValueError(f"optimizer.lr_multipliers entry {entry!r}: expected [regex, factor >= 0]")


def adapter_spec(config: ml_collections.ConfigDict) -> Optional[AdapterSpec]:
  """The run's adapters (config section `adapters`), None for kind 'none'; ValueError naming a
  field out of range."""
  section = config.get("adapters") or {"kind": "none"}
  if section["kind"] == "none":
    return None
  if not section.get("targets"):
    raise ValueError(f"adapters.kind={section['kind']!r} needs adapters.targets, a regex over "
                     f"linear-layer paths such as 'language_model/layers_0/self_attn/q_proj'")
  alpha = section["alpha"]
  return AdapterSpec(kind=section["kind"], rank=section["rank"],
                     alpha=float(alpha) if _is_number(alpha) else alpha,
                     dropout=section["dropout"], targets=section["targets"], init=section["init"])


def validate(config: ml_collections.ConfigDict, devices: list) -> None:
  """Raises ValueError (one line) on unknown fields, values out of range, a mesh that doesn't
  fit, a bad batch size."""
  unknown = _unknown_fields(config, default_config())
  if unknown:
    raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
  _check_ranges(config)
  devices = mesh_devices(config, devices)
  slices = num_slices(devices)
  dcn = resolve_axis_sizes(config.mesh.dcn, slices, "mesh.dcn")
  ici = resolve_axis_sizes(config.mesh.ici, len(devices) // slices, "mesh.ici")
  sizes = dict(zip(MESH_AXES, (a * b for a, b in zip(ici, dcn))))
  data_parallel = sizes["data"] * sizes["fsdp"]
  if "global_batch_size" not in config.input:
    raise ValueError(f"input '{config.input.get('name')}' has no global_batch_size")
  batch = config.input.global_batch_size
  if batch % data_parallel:
    raise ValueError(f"input.global_batch_size={batch} is not divisible by the data-parallel size "
                     f"{data_parallel} (mesh data={sizes['data']} x fsdp={sizes['fsdp']})")
  accum = config.grad_accum_steps
  if accum < 1 or batch % (accum * data_parallel):
    raise ValueError(f"grad_accum_steps={accum}: global batch {batch} must split into {accum} "
                     f"micro-batches divisible by the data-parallel size {data_parallel}")
  if math.prod(sizes.values()) != len(devices):
    raise ValueError(f"mesh {sizes} does not match the {len(devices)} devices")
  registry.check_sections(config)
