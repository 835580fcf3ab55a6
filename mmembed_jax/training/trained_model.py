"""A training run's model: a workdir (or one step of it) -> architecture, sharded params, tokenizer.

  model = load_trained("runs/moca_cl")                   # the latest checkpoint
  model = load_trained("runs/moca_cl/checkpoints/400")   # one step
  model.config, model.params, model.tokenizer_dir, model.image_config, model.embedding

The architecture, tokenizer and image settings are the run's own: its config.json and the
lineage the trainer resolved at the start and recorded there (section `resolved`: tokenizer,
source HF directory; runs written before that record are resolved again through `init_from`).
Only the backbone is read from the checkpoint (not the optimiser state, MoCa's MAE decoder or a learned temperature), straight onto
a mesh that spans every device with the run's FSDP rules, so no host ever holds the whole model.
"""
import dataclasses
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import ml_collections
from etils import epath

from mmembed_jax.data import images as images_lib
from mmembed_jax.data import video as video_lib
from mmembed_jax.data.input_specs import is_demo
from mmembed_jax.models import adapters
from mmembed_jax.models.config import ModelConfig
from mmembed_jax.models.embedder import boxed_param_shapes
from mmembed_jax.parallel import sharding as sharding_lib
from mmembed_jax.parallel.mesh import make_mesh
from mmembed_jax.training import checkpoint, demo_entry, lineage
from mmembed_jax.training import run as run_lib

CHECKPOINTS = "checkpoints"


@dataclasses.dataclass
class TrainedModel:
  """What embedding, evaluation and export need from a run."""
  config: ModelConfig
  params: Any  # the backbone's params, sharded over `mesh`
  mesh: Any
  tokenizer_dir: str
  image_config: images_lib.ImageProcessingConfig
  embedding: dict  # mmembed.json: attention, pooling, normalize
  workdir: str
  step: int


def locate(path: str) -> tuple[str, Optional[int]]:
  """(workdir, step or None for the latest) of WORKDIR, WORKDIR/checkpoints or .../checkpoints/STEP."""
  root = epath.Path(path)
  if not root.exists():
    raise FileNotFoundError(f"{path} does not exist")
  if root.name.isdigit() and root.parent.name == CHECKPOINTS:
    return str(root.parent.parent), int(root.name)
  if root.name == CHECKPOINTS and (root.parent / "config.json").exists():
    return str(root.parent), None
  if (root / CHECKPOINTS).is_dir() and (root / "config.json").exists():
    return str(root), None
  raise FileNotFoundError(f"{path}: not a training run (expected a workdir holding config.json "
                          f"and {CHECKPOINTS}/, or WORKDIR/{CHECKPOINTS}/STEP)")


def is_run(path: str) -> bool:
  """Whether `path` names a training run (workdir or checkpoint step), not an HF directory."""
  try:
    locate(path)
  except FileNotFoundError:
    return False
  return True


def run_config(workdir: str) -> tuple[ml_collections.ConfigDict, lineage.Resolved]:
  """(the config a run was trained with, its resolved lineage), from its workdir's config.json."""
  record = lineage.run_record(workdir)
  if record is None:
    raise FileNotFoundError(f"{workdir}/config.json does not exist")
  resolved = record.pop(lineage.RESOLVED, None)
  config = ml_collections.ConfigDict(record)
  if resolved is not None:
    return config, lineage.Resolved.from_json(resolved)
  # Written before runs recorded their lineage: resolve it as such a run did.
  config.tokenizer_dir = (config.get("tokenizer_dir") or config.objective.get("tokenizer_dir")
                          or config.input.get("tokenizer_dir") or "")
  demo = is_demo(config.input.get("sources"))
  return config, lineage.resolve(config, demo_entry.demo().tokenizer_dir if demo else None)


def embedding_record(config: ml_collections.ConfigDict) -> dict:
  """How the run embeds (mmembed.json): its attention, its objective's pooling (else 'ctoken'
  when its input appends compression tokens, mean for bidirectional and last for causal
  models), L2-normalised; `compression_tokens` when there are some."""
  attention = config.model.attention
  num_ctokens = config.input.get("num_ctokens", 0)
  default = "ctoken" if num_ctokens else "mean" if attention == "bidirectional" else "last"
  record = {"attention": attention, "pooling": config.objective.get("pooling", default),
            "normalize": True}
  if num_ctokens:
    record["compression_tokens"] = num_ctokens
  # How videos are sampled and processed (data/video.py), the training input's.
  record["video"] = video_lib.VideoSettings.from_spec(config.input.get("video")).to_record()
  return record


def image_config(config: ml_collections.ConfigDict,
                 resolved: lineage.Resolved) -> images_lib.ImageProcessingConfig:
  """The run's image preprocessing: the source HF directory's, with the input's pixel bounds."""
  hf_dir = resolved.source_hf_dir
  preprocessor = epath.Path(hf_dir) / "preprocessor_config.json" if hf_dir else None
  base = (images_lib.ImageProcessingConfig.from_preprocessor_config(preprocessor)
          if preprocessor is not None and preprocessor.exists()
          else images_lib.ImageProcessingConfig())
  bounds = {k: config.input[k] for k in ("min_pixels", "max_pixels") if k in config.input}
  return dataclasses.replace(base, **bounds)


def export_mesh() -> Any:
  """Every device on the FSDP axis: parameters are split as finely as they go."""
  return make_mesh({"data": 1, "fsdp": -1, "tensor": 1})


def load_trained(path: str, *, dtype: Optional[str] = None, mesh: Any = None,
                 merge_adapters: bool = True) -> TrainedModel:
  """Reads a run's backbone (latest or given step) sharded over `mesh` (default: all devices).

  dtype: compute and parameter dtype (e.g. 'bfloat16'); default, the run's own.
  merge_adapters: fold a run's LoRA / DoRA adapters into its weights (the model is then a plain
  backbone); False keeps them beside the weights, `config.adapter` naming them.
  """
  workdir, step = locate(path)
  config, resolved = run_config(workdir)
  if dtype is not None:
    config.model.update(dtype=dtype, param_dtype=dtype)
  config.model.remat_policy = "none"  # inference; scan_layers stays: it shapes the checkpoint
  model_config = run_lib.model_config(config, resolved)
  mesh = mesh if mesh is not None else export_mesh()
  boxed = boxed_param_shapes(model_config)
  shardings = sharding_lib.logical_shardings(boxed, mesh,
                                             sharding_lib.config_rules(config.sharding.rules))
  abstract = jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
                          nn.meta.unbox(boxed), shardings)
  directory = os.path.abspath(os.path.join(workdir, CHECKPOINTS))
  step = checkpoint.latest_step(directory) if step is None else step
  params = checkpoint.restore_params(directory, abstract, step)
  missing = sorted(set(abstract) - set(params))
  if missing:
    raise ValueError(f"{workdir}: checkpoint step {step} has no {missing}; expected a run of "
                     f"this model")
  if not resolved.tokenizer_dir:
    raise ValueError(f"{workdir}/config.json: the run names no tokenizer (tokenizer_dir or an HF "
                     f"init_from)")
  if merge_adapters and model_config.adapter is not None:
    spec, model_config = model_config.adapter, model_config.replace(adapter=None)
    base_shardings = sharding_lib.logical_shardings(boxed_param_shapes(model_config), mesh,
                                                    sharding_lib.config_rules(config.sharding.rules))
    params = jax.jit(lambda p: adapters.merge(p, spec), out_shardings=base_shardings)(params)
  return TrainedModel(config=model_config, params=params, mesh=mesh,
                      tokenizer_dir=resolved.tokenizer_dir,
                      image_config=image_config(config, resolved),
                      embedding=embedding_record(config), workdir=workdir, step=step)


def export_trained(path: str, out_dir: str, *, dtype: Optional[str] = None,
                   max_shard_bytes: int = 2 * 1024**3, overwrite: bool = False,
                   adapters_only: bool = False) -> TrainedModel:
  """Writes a run's backbone as a Hugging Face directory (safetensors, config.json, tokenizer,
  preprocessor_config.json, mmembed.json), adapters merged; dtype casts on write (default: the
  run's); overwrite replaces a non-empty `out_dir` (checked before the checkpoint is read).
  adapters_only: write the run's adapters as a peft adapter directory instead, for the HF
  directory the run started from (convert/peft_export.py)."""
  from mmembed_jax.convert import hf_export  # pylint: disable=g-import-not-at-top
  hf_export.check_target(out_dir, overwrite)
  if adapters_only:
    return _export_adapters(path, out_dir, overwrite)
  model = load_trained(path)
  hf_export.export_hf(model.config, model.params, out_dir, source_dir=model.tokenizer_dir,
                      embedding=dict(model.embedding, source_run=model.workdir, step=model.step),
                      dtype=dtype, preprocessor=model.image_config.to_preprocessor_config(),
                      max_shard_bytes=max_shard_bytes, overwrite=overwrite)
  return model


def _export_adapters(path: str, out_dir: str, overwrite: bool) -> TrainedModel:
  """The peft adapter directory of a run whose other weights are its source HF directory's."""
  from mmembed_jax.convert import peft_export  # pylint: disable=g-import-not-at-top
  workdir, _ = locate(path)
  config, resolved = run_config(workdir)
  if config.get("adapters", {}).get("kind", "none") == "none":
    raise ValueError(f"{workdir}: the run trained no adapters (adapters.kind 'none'); export the "
                     f"whole model without --adapters_only")
  if not lineage.is_hf_dir(config.init_from):
    raise ValueError(f"{workdir}: --adapters_only needs a run whose frozen weights are those of "
                     f"the HF directory it started from (init_from an HF directory); export the "
                     f"merged model instead")
  model = load_trained(path, merge_adapters=False)
  base = config.init_from if "://" in config.init_from else os.path.abspath(config.init_from)
  peft_export.export_peft(model.config, model.params, model.config.adapter, out_dir,
                          base_model=base, overwrite=overwrite, source_dir=model.tokenizer_dir,
                          trainable_extra=config.adapters.trainable_extra,
                          embedding=dict(model.embedding, source_run=model.workdir,
                                         step=model.step),
                          preprocessor=model.image_config.to_preprocessor_config())
  return model
