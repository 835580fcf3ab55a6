"""The objective interface: everything the trainer, the compile proof, the benchmark and the
held-out evaluator may ask of an objective, declared here and nowhere else.

An objective is a frozen dataclass: `config` (the model's architecture), then the fields of the
config's `objective` section with their types and defaults (`section_fields`), then any field
`from_config` derives (`derived`, e.g. a token id read from the tokenizer). Calling it is the
loss: `objective(params, batch, rng) -> (loss, metrics)`, with `batch` as the inputs named in
`inputs` make it. Adding one (see README, "Adding an objective"): subclass, declare the class
attributes that differ from the defaults, register it in `objectives/registry.py`.
"""
import abc
import dataclasses
from typing import Any, ClassVar, Dict, Mapping, Tuple

import jax
import ml_collections

from mmembed_jax.models.config import ModelConfig


class Objective(abc.ABC):
  """Base of every objective (subclasses are frozen dataclasses, see the module docstring)."""
  name: ClassVar[str]  # `objective.name` in configs
  inputs: ClassVar[Tuple[str, ...]]  # `input.name`s whose batches it consumes
  uses_lm_head: ClassVar[bool] = True  # the FLOP count includes the [embed, vocab] head
  embeds: ClassVar[bool] = False  # `embed` exists: held-out retrieval can score it
  derived: ClassVar[Tuple[str, ...]] = ()  # fields `from_config` makes, never set in configs

  config: ModelConfig

  @property
  def forwards_per_step(self) -> int:
    """Encoder forward passes per training step (GradCache encodes twice), for the FLOP count."""
    return 1

  def extra_param_shapes(self) -> Dict[str, Any]:
    """{top-level key: abstract params with logical axis names} the objective owns beside the
    backbone (MoCa's MAE decoder, a learned temperature); {} when none."""
    return {}

  def init_extra(self, rng: jax.Array, params: Mapping[str, Any]) -> Dict[str, Any]:
    """Initial values of `extra_param_shapes()` (may read the backbone's `params`)."""
    del rng, params
    return {}

  def embed(self, params: Any, sequences: Mapping[str, jax.Array]) -> jax.Array:
    """Sequences [n, ...] -> L2-normalised embeddings [n, embed] (objectives with `embeds`)."""
    raise NotImplementedError(f"objective '{self.name}' does not embed sequences")

  @classmethod
  def check_run(cls, config: ml_collections.ConfigDict) -> None:
    """Raises ValueError (one line) when the run's config cannot train this objective."""
    del config

  @classmethod
  def section_fields(cls) -> Dict[str, dataclasses.Field]:
    """{name: field} of the config section: every dataclass field but `config` and `derived`."""
    return {f.name: f for f in dataclasses.fields(cls)
            if f.name != "config" and f.name not in cls.derived}

  @classmethod
  def from_config(cls, model_config: ModelConfig, fields: Mapping[str, Any],
                  tokenizer_dir: str) -> "Objective":
    """The objective of a checked config section (`fields`: its entries but `name`)."""
    del tokenizer_dir
    return cls(model_config, **fields)

  @abc.abstractmethod
  def __call__(self, params: Any, batch: Mapping[str, Any],
               rng: jax.Array) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """(scalar loss, {metric name: scalar}) of one (micro-)batch."""
