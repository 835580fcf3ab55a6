"""The run builder: a config -> everything a run is made of, built once, in one order.

  run = build_run(config, jax.devices())
  state = run.initial_state()                      # random, an HF directory or another run
  step = run.jit_step(batch)                       # the jitted, sharded, donating update
  for batch in run.dataset(): ...                  # this process's input

The trainer runs it, `launch/aot_compile.py` compiles `run.jit_step` against `run.batch_spec()`
for TPU devices without any data, and `launch/benchmark.py` times it on one real batch: the
three can never set a run up differently. The order: check the config -> resolve the lineage
(tokenizer, source HF directory, `init_from` chain) -> mesh and logical rules -> architecture
-> objective -> input -> sharded state layout.
"""
import dataclasses
import os
from typing import Any, Callable, Dict, Optional, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from mmembed_jax.data.input_specs import InputSpec, PairInput, eval_batches, is_demo
from mmembed_jax.models import adapters
from mmembed_jax.models.config import ModelConfig
from mmembed_jax.models.embedder import add_adapters, dummy_batch
from mmembed_jax.models.presets import PRESETS, preset_config
from mmembed_jax.models.vlm import VisionLanguageModel
from mmembed_jax.objectives.base import Objective
from mmembed_jax.parallel import sharding as sharding_lib
from mmembed_jax.parallel.mesh import make_mesh
from mmembed_jax.training import checkpoint, demo_entry, flops, lineage, registry
from mmembed_jax.training.config import adapter_spec, mesh_devices, validate
from mmembed_jax.training.sharded_state import StateLayout, abstract_params, state_layout
from mmembed_jax.training.train_step import TrainState, create_state, make_update_fn

# Keys the input adds for the host only; the trainer drops them before the step.
HOST_ONLY = ("bad_records", "bad_messages", "example_ids")


def model_config(config: ml_collections.ConfigDict, resolved: lineage.Resolved) -> ModelConfig:
  """The run's architecture: its source HF directory's, else `model.preset`'s (a demo preset
  through the demo entry), with the vision token ids of the run's tokenizer."""
  options = dict(attention=config.model.attention, dtype=config.model.dtype,
                 param_dtype=config.model.param_dtype, scan_layers=config.model.scan_layers,
                 remat_policy=config.model.remat_policy,
                 attention_impl=config.model.attention_impl, adapter=adapter_spec(config))
  if resolved.source_hf_dir:
    from mmembed_jax.convert.hf_import import model_config as hf_model_config  # pylint: disable=g-import-not-at-top
    return hf_model_config(resolved.source_hf_dir, **options)
  name = config.model.preset
  if name in PRESETS:
    architecture = preset_config(name, **options)
  elif name in demo_entry.demo().PRESETS:
    architecture = demo_entry.demo().preset_config(name, **options)
  else:
    raise ValueError(f"model.preset '{name}': expected one of {sorted(PRESETS)} or the demo's "
                     f"{sorted(demo_entry.demo().PRESETS)}")
  if not resolved.tokenizer_dir:
    return architecture
  # The vision token ids are the tokenizer's: a mismatch would silently drop every image.
  import transformers  # pylint: disable=g-import-not-at-top
  from mmembed_jax.data.special_tokens import vision_config_ids  # pylint: disable=g-import-not-at-top
  tokenizer = transformers.AutoTokenizer.from_pretrained(resolved.tokenizer_dir)
  return architecture.replace(**vision_config_ids(tokenizer))


def resolve(config: ml_collections.ConfigDict, spec: InputSpec,
            allow_demo_tokenizer: bool = False) -> lineage.Resolved:
  """The run's lineage; the demo tokenizer when the run reads demo data (or `allow_demo_tokenizer`:
  a compile proof of a pod config, whose token ids do not change the program); ValueError when
  the input needs a tokenizer and none is named."""
  demo = spec.uses_demo_data or allow_demo_tokenizer
  resolved = lineage.resolve(config, demo_entry.demo().tokenizer_dir if demo else None)
  if spec.needs_tokenizer and not resolved.tokenizer_dir:
    raise ValueError("no tokenizer: set tokenizer_dir, or init_from an HF model directory (or a "
                     "run that started from one)")
  return resolved


@dataclasses.dataclass
class RunSetup:
  """A run's parts (see the module docstring); built by `build_run`."""
  config: ml_collections.ConfigDict
  resolved: lineage.Resolved
  mesh: Any
  model_config: ModelConfig
  objective: Objective
  input_spec: InputSpec
  layout: StateLayout

  def dataset(self) -> Any:
    """This process's Grain IterDataset of batches (demo sources replaced by the demo's files)."""
    spec = self.input_spec
    if spec.uses_demo_data:
      spec = dataclasses.replace(spec, sources=demo_entry.demo().sources(spec.name, spec.sources))
    return spec.dataset(self.model_config, self.config.seed, self.resolved.tokenizer_dir)

  def batch_spec(self) -> Dict[str, jax.ShapeDtypeStruct]:
    """The global batch the step takes, abstract and sharded over data x fsdp (no data read)."""
    unit = {k: v for k, v in self.input_spec.batch_unit(self.model_config).items()
            if k not in HOST_ONLY}
    sharding = sharding_lib.batch_sharding(self.mesh)
    units = self.config.input.global_batch_size // self.input_spec.rows_per_unit
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        (units * np.shape(x)[0],) + np.shape(x)[1:], np.asarray(x).dtype, sharding=sharding), unit)

  def update_fn(self) -> Callable:
    """update(state, batch) -> (state, metrics), unjitted."""
    return make_update_fn(self.objective, self.layout.tx, self.layout.schedule,
                          self.config.grad_accum_steps, self.layout.trainable)

  def jit_step(self, batch: Any) -> Callable:
    """The update jitted with the layout's shardings for batches shaped like `batch`."""
    return self.layout.jit_step(self.update_fn(), batch)

  def step_flops(self, local_batch: Any) -> float:
    """Analytic FLOPs of one step on a (local) batch, forward and backward."""
    return flops.batch_train_flops(self.model_config, local_batch,
                                   self.objective.forwards_per_step, self.objective.uses_lm_head)

  def evaluator(self) -> Optional[Callable]:
    """fn(params) -> held-out retrieval metrics (`config.eval`), or None when `eval.every` is 0."""
    config = self.config
    if not config.eval.every:
      return None
    if not (self.objective.embeds and isinstance(self.input_spec, PairInput)):
      raise ValueError(f"eval: held-out retrieval needs an objective that embeds and pair input, "
                       f"got '{config.objective.name}' / '{config.input.name}'")
    from mmembed_jax.training.retrieval_eval import RetrievalEval  # pylint: disable=g-import-not-at-top
    sources = config.eval.sources
    if is_demo(sources):
      sources = demo_entry.demo().sources("held_out_pairs", sources)
    batches = eval_batches(self.input_spec, self.model_config, sources,
                           self.resolved.tokenizer_dir, config.eval.max_rows_per_dataset)
    return RetrievalEval(self.objective.embed, batches, list(sources),
                         sharding_lib.batch_sharding(self.mesh))

  def initial_state(self) -> TrainState:
    """State at step 0 (random, from an HF directory or from another run), created sharded:
    parameters never sit whole on one host. A source run's adapters are merged into its
    weights first; this run's adapters are then added fresh (DoRA's magnitudes from the
    weights they adapt)."""
    config, layout, objective = self.config, self.layout, self.objective
    # Objective-owned parameters (MoCa's MAE decoder) are made from the backbone's, unless the
    # source (another run of the same objective) already has them.
    extra_keys = list(objective.extra_param_shapes())
    extra_key = jax.random.fold_in(jax.random.key(config.seed), 1)
    adapter_key = jax.random.fold_in(jax.random.key(config.seed), 2)

    def complete(params):
      if self.model_config.adapter is not None and not adapters.has_adapters(params):
        backbone = {k: v for k, v in params.items() if k not in extra_keys}
        params = dict(params, **add_adapters(self.model_config, backbone, adapter_key))
      if not all(k in params for k in extra_keys):
        params = dict(objective.init_extra(extra_key, params), **params)
      return create_state(params, layout.tx, config.seed, layout.trainable)

    make = jax.jit(complete, out_shardings=layout.state_shardings)
    if lineage.is_hf_dir(config.init_from):
      from mmembed_jax.convert.hf_import import import_hf  # pylint: disable=g-import-not-at-top
      backbone = {k: v for k, v in layout.param_shardings.items() if k not in extra_keys}
      _, params = import_hf(config.init_from, param_dtype=config.model.param_dtype,
                            scan_layers=config.model.scan_layers,
                            put=sharding_lib.put_by_path(backbone))
      with layout.context():
        return make(params)
    if config.init_from:
      params = self._restore_source(extra_keys)
      with layout.context():
        return make(params)

    def init(key):
      params = nn.meta.unbox(VisionLanguageModel(self.model_config).init(
          key, dummy_batch(self.model_config))["params"])
      return complete(params)

    with layout.context():
      return jax.jit(init, out_shardings=layout.state_shardings)(jax.random.key(config.seed))

  def _restore_source(self, extra_keys: Sequence[str]) -> Any:
    """The `init_from` run's parameters on this run's mesh, its adapters merged."""
    config = self.config
    source_adapter = adapter_spec(ml_collections.ConfigDict(
        lineage.run_record(config.init_from) or {}))
    source_config = self.model_config.replace(adapter=source_adapter)
    abstract, shardings = abstract_params(source_config, self.objective, self.mesh,
                                          self.layout.rules)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    params = checkpoint.restore_params(
        os.path.abspath(checkpoint.checkpoint_dir(config.init_from)), abstract)
    missing = sorted(set(abstract) - set(params) - set(extra_keys))
    if missing:
      raise ValueError(f"init_from={config.init_from}: its checkpoint has no {missing}; "
                       f"expected a run of the same model")
    if source_adapter is not None:
      params = jax.jit(lambda p: adapters.merge(p, source_adapter))(params)
    return params


def largest_image_patches(spec: InputSpec, architecture: ModelConfig) -> int:
  """Patches of an image at the input's pixel budget, `max_pixels` (0 when it has none); the
  28-pixel rounding of extreme aspect ratios can exceed it, and such an image is skipped and
  counted like any example that fits no row."""
  if "max_pixels" not in spec.section_fields():
    return 0
  return spec.max_pixels // architecture.vision.patch_size**2


def patch_buffers_per_device(spec: InputSpec, config: ml_collections.ConfigDict, mesh: Any,
                             largest_image: int) -> InputSpec:
  """`spec` with `rows_per_patch_buffer` 0 resolved to the rows of one device's (micro-)batch;
  ValueError when the batch does not split into whole buffers on every device, or a buffer
  cannot hold the largest image the pixel budget allows (`largest_image` patches)."""
  rows = getattr(spec, "rows_per_patch_buffer", None)
  if rows is None:
    return spec
  parts = sharding_lib.data_parallel_size(mesh) * config.grad_accum_steps
  per_device = spec.global_batch_size // parts
  rows = rows or per_device
  if rows < 1 or spec.global_batch_size % parts or per_device % rows:
    raise ValueError(
        f"input.rows_per_patch_buffer={rows}: the {spec.global_batch_size} rows of a batch do not "
        f"split into whole patch buffers on each of {sharding_lib.data_parallel_size(mesh)} "
        f"data-parallel devices x {config.grad_accum_steps} grad_accum_steps")
  if spec.max_patches and rows * spec.max_patches < largest_image:
    raise ValueError(
        f"input.max_patches={spec.max_patches} x rows_per_patch_buffer={rows} patch slots cannot "
        f"hold one image of {largest_image} patches (max_pixels={spec.max_pixels}): raise "
        f"max_patches, or share buffers among more rows")
  return dataclasses.replace(spec, rows_per_patch_buffer=rows)


def build_run(config: ml_collections.ConfigDict, devices: Sequence[Any], *,
              compile_proof: bool = False) -> RunSetup:
  """Checks `config` and builds its run on `devices` (see the module docstring).

  compile_proof: for compiling on compile-only devices (launch/aot_compile.py): without a
  tokenizer of its own the run takes the demo's (token ids do not change the program), and
  `model.attention_impl="auto"` is decided for the target chips (splash on TPU, else XLA).
  """
  validate(config, devices)
  devices = mesh_devices(config, devices)
  spec = registry.build_input_spec(config)
  resolved = resolve(config, spec, allow_demo_tokenizer=compile_proof)
  mesh = make_mesh(config.mesh.ici, config.mesh.dcn, devices=devices)
  rules = sharding_lib.config_rules(config.sharding.rules)
  architecture = model_config(config, resolved)
  architecture = architecture.replace(max_frame_patches=spec.max_frame_patches(architecture))
  spec = patch_buffers_per_device(spec, config, mesh, largest_image_patches(spec, architecture))
  if compile_proof and architecture.attention_impl == "auto":
    architecture = architecture.replace(
        attention_impl="splash" if devices[0].platform == "tpu" else "xla")
  objective = registry.build_objective(config, architecture, resolved.tokenizer_dir)
  layout = state_layout(config, architecture, objective, mesh, rules)
  return RunSetup(config, resolved, mesh, architecture, objective, spec, layout)
