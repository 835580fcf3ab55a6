"""A config's `input` section, typed: one frozen dataclass per input pipeline.

Each class's fields are the section's fields (checked by training/registry.py), and it makes
this process's Grain dataset of batches (`dataset`) and one unit of those batches without reading
data (`batch_unit`, for the compile proof: a batch is `global_batch_size / rows_per_unit` units
concatenated along the leading axis). `sources` is a mapping of source specs, or "demo",
which the run builder replaces with the demo's own files before `dataset` is called.
"""
import abc
import dataclasses
from typing import Any, ClassVar, Dict, Tuple

import numpy as np

from mmembed_jax.models.config import ModelConfig


def source_specs(sources: Any, what: str) -> Dict[str, Dict[str, Any]]:
  """{name: plain dict} of a config's sources; ValueError naming those without a path."""
  if not hasattr(sources, "items"):
    raise ValueError(f"{what}: expected a mapping {{name: dict(path=..., ...)}} or 'demo', found "
                     f"{sources!r:.60}")
  specs = {name: dict(source) for name, source in sources.items()}
  unset = [name for name, source in specs.items() if not source.get("path")]
  if unset:
    raise ValueError(f"{what}: no path set for {unset}; set --config.input.sources.{unset[0]}"
                     f".path=... (local or gs://) or remove the source")
  return specs


def is_demo(sources: Any) -> bool:
  """Whether a `sources` value asks for the demo's files ("demo", or "demo+video" for the pairs
  with the demo's video clips)."""
  return isinstance(sources, str) and sources in ("demo", "demo+video")


class InputSpec(abc.ABC):
  """Base of every input (subclasses are frozen dataclasses, see the module docstring)."""
  name: ClassVar[str]  # `input.name` in configs
  needs_tokenizer: ClassVar[bool] = True

  global_batch_size: int

  @property
  def rows_per_unit(self) -> int:
    """Batch rows in one `batch_unit` (the rows that share a patch buffer)."""
    return 1

  @classmethod
  def section_fields(cls) -> Dict[str, dataclasses.Field]:
    """{name: field} of the config section."""
    return {f.name: f for f in dataclasses.fields(cls)}

  @property
  def uses_demo_data(self) -> bool:
    """Whether `sources` is "demo" or "demo+video" (the run builder then supplies the demo's
    files)."""
    return "sources" in self.section_fields() and is_demo(self.sources)

  @abc.abstractmethod
  def dataset(self, model_config: ModelConfig, seed: int, tokenizer_dir: str) -> Any:
    """This process's endless Grain IterDataset of batches."""

  def video_settings(self, model_config: ModelConfig) -> Any:
    """The `video` field (frame sampling and processor bounds, data/video.py) with the model's
    M-RoPE time scale."""
    from mmembed_jax.data.video import VideoSettings  # pylint: disable=g-import-not-at-top
    return VideoSettings.from_spec(getattr(self, "video", None),
                                   model_config.video_tokens_per_second)

  def max_frame_patches(self, model_config: ModelConfig) -> int:
    """The largest image or video frame the pipeline can give, in patches (the model's
    `max_frame_patches`, which lets the vision tower attend by blocks); 0 = unknown."""
    if "max_pixels" not in self.section_fields():
      return 0
    from mmembed_jax.data.images import max_resized_pixels  # pylint: disable=g-import-not-at-top
    video = self.video_settings(model_config)
    pixels = max(max_resized_pixels(self.min_pixels, self.max_pixels),
                 max_resized_pixels(video.processor_min_pixels, video.processor_max_pixels))
    return pixels // model_config.vision.patch_size**2

  @abc.abstractmethod
  def batch_unit(self, model_config: ModelConfig) -> Dict[str, Any]:
    """One unit of the batches (host arrays with their leading axis, host-only keys included),
    read from no data."""


@dataclasses.dataclass(frozen=True)
class PackedInput(InputSpec):
  """The fields of the packed pipelines (records mixed, encoded and packed into rows)."""
  sources: Any
  global_batch_size: int
  length: int
  max_patches: int
  max_images: int
  min_pixels: int
  max_pixels: int
  num_workers: int = 0
  max_segments: int = 64
  packing_bins: int = 0  # 0: twice the rows per data shard
  read_threads: int = 4
  read_buffer: int = 16
  worker_buffer: int = 2
  data_shards: int = 0  # 0: one per process
  video: Any = None  # {fps, min_frames, max_frames, ...}: data/video.py SETTING_FIELDS
  # Rows sharing one patch buffer of rows_per_patch_buffer x max_patches slots (and x max_images
  # images): max_patches is then the rows' average, not each row's worst case. 0: the rows of one
  # device's (micro-)batch, set by the run builder.
  rows_per_patch_buffer: int = 1

  @property
  def rows_per_unit(self) -> int:
    return self.rows_per_patch_buffer

  def pipeline_fields(self, model_config: ModelConfig) -> Dict[str, Any]:
    """The fields as the pipeline's keyword arguments (all but `sources`)."""
    fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "sources"}
    fields["packing_bins"] = fields["packing_bins"] or None
    fields["video"] = self.video_settings(model_config)
    return fields


@dataclasses.dataclass(frozen=True, kw_only=True)
class CptInput(PackedInput):
  """MoCa stage 1: mixed records, encoded, masked and packed (data/cpt_pipeline.py)."""
  name: ClassVar[str] = "moca_cpt"

  text_mask_prob: float
  image_mask_prob: float
  extra_never_mask: Tuple[int, ...] = ()
  mae_on_video: bool = True  # video patches masked for MAE like image patches (else never)

  def dataset(self, model_config, seed, tokenizer_dir):
    from mmembed_jax.data.cpt_pipeline import cpt_dataset  # pylint: disable=g-import-not-at-top
    return cpt_dataset(source_specs(self.sources, "input.sources"), tokenizer_dir, seed=seed,
                       **self.pipeline_fields(model_config))

  def batch_unit(self, model_config):
    from mmembed_jax.data.cpt_pipeline import batch_unit  # pylint: disable=g-import-not-at-top
    return batch_unit(self.length, self.max_patches, self.max_images, self.max_segments,
                      self.rows_per_patch_buffer)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ComaInput(PackedInput):
  """CoMa stage 1: image + prompt + compression tokens + dialogue, packed (coma_pipeline.py)."""
  name: ClassVar[str] = "coma_dialogues"

  num_ctokens: int = 32

  def dataset(self, model_config, seed, tokenizer_dir):
    from mmembed_jax.data.coma_pipeline import coma_dataset  # pylint: disable=g-import-not-at-top
    return coma_dataset(source_specs(self.sources, "input.sources"), tokenizer_dir, seed=seed,
                        vocab_size=model_config.text.vocab_size,
                        **self.pipeline_fields(model_config))

  def batch_unit(self, model_config):
    from mmembed_jax.data.coma_pipeline import batch_unit  # pylint: disable=g-import-not-at-top
    return batch_unit(self.length, self.max_patches, self.max_images, self.max_segments,
                      self.rows_per_patch_buffer)


@dataclasses.dataclass(frozen=True)
class PairInput(InputSpec):
  """Contrastive pairs with hard negatives, task-aware batches (data/cl_pipeline.py)."""
  name: ClassVar[str] = "contrastive_pairs"

  sources: Any
  global_batch_size: int
  num_negatives: int
  query_length: int
  target_length: int
  query_max_patches: int
  target_max_patches: int
  min_pixels: int
  max_pixels: int
  max_images: int = 1
  num_ctokens: int = 0  # compression tokens ending every query and target (CoMa)
  task_batching: bool = True
  num_workers: int = 0
  read_threads: int = 4
  read_buffer: int = 0  # 0: read_threads
  worker_buffer: int = 2
  video: Any = None  # {fps, min_frames, max_frames, ...}: data/video.py SETTING_FIELDS

  def encoding(self, model_config: ModelConfig) -> Dict[str, Any]:
    """The fields that say how pairs are encoded; held-out evaluation encodes the same way."""
    return dict(num_negatives=self.num_negatives, query_length=self.query_length,
                target_length=self.target_length, query_max_patches=self.query_max_patches,
                target_max_patches=self.target_max_patches, max_images=self.max_images,
                min_pixels=self.min_pixels, max_pixels=self.max_pixels,
                num_ctokens=self.num_ctokens, video=self.video_settings(model_config))

  def dataset(self, model_config, seed, tokenizer_dir):
    from mmembed_jax.data.cl_pipeline import cl_dataset  # pylint: disable=g-import-not-at-top
    return cl_dataset(source_specs(self.sources, "input.sources"), tokenizer_dir,
                      self.global_batch_size, seed, **self.encoding(model_config),
                      vocab_size=model_config.text.vocab_size,
                      task_batching=self.task_batching, num_workers=self.num_workers,
                      read_threads=self.read_threads, read_buffer=self.read_buffer or None,
                      worker_buffer=self.worker_buffer)

  def batch_unit(self, model_config):
    from mmembed_jax.data.cl_pipeline import batch_row  # pylint: disable=g-import-not-at-top
    row = batch_row(self.num_negatives, self.query_length, self.target_length,
                    self.query_max_patches, self.target_max_patches, self.max_images)
    return with_leading_axis(row)


def with_leading_axis(tree: Any) -> Any:
  """Every array of a (nested) dict given a leading axis of 1: one row as a `batch_unit`."""
  if isinstance(tree, dict):
    return {key: with_leading_axis(value) for key, value in tree.items()}
  return np.asarray(tree)[None]


def eval_batches(spec: PairInput, model_config: ModelConfig, sources: Any, tokenizer_dir: str,
                 max_rows_per_dataset: int) -> Any:
  """Held-out batches of `sources`, encoded as `spec` encodes training pairs."""
  from mmembed_jax.data.cl_pipeline import cl_eval_batches  # pylint: disable=g-import-not-at-top
  return cl_eval_batches(source_specs(sources, "eval.sources"), tokenizer_dir,
                         spec.global_batch_size, max_rows_per_dataset=max_rows_per_dataset,
                         **spec.encoding(model_config))
