"""The jitted embedding function, parameter init and the smallest valid batch."""
from typing import Callable, Mapping

import flax.linen as nn
import jax
import numpy as np

from mmembed_jax.models.config import ModelConfig
from mmembed_jax.models.pooling import POOLINGS, pool
from mmembed_jax.models.vlm import VisionLanguageModel


def make_embed_fn(config: ModelConfig, pooling: str, num_ctokens: int = 0) -> Callable[..., jax.Array]:
  """A jitted fn(params, batch) -> L2-normalised embeddings [batch, embed] (num_ctokens: the
  compression tokens 'ctoken' pooling averages)."""
  if pooling not in POOLINGS:
    raise ValueError(f"unknown pooling '{pooling}', expected one of {POOLINGS}")
  model = VisionLanguageModel(config)

  @jax.jit
  def embed(params, batch: Mapping[str, jax.Array]) -> jax.Array:
    hidden = model.apply({"params": params}, batch)
    return pool(hidden, batch["segment_ids"], pooling, num_ctokens)

  return embed


def boxed_param_shapes(config: ModelConfig) -> dict:
  """The model's parameters as ShapeDtypeStructs in nn.Partitioned boxes (logical axis names)."""
  return jax.eval_shape(VisionLanguageModel(config).init, jax.random.key(0),
                        dummy_batch(config))["params"]


def init_params(config: ModelConfig, rng: jax.Array) -> dict:
  """Random parameters, unboxed (no logical-axis metadata), from a one-image dummy batch."""
  variables = VisionLanguageModel(config).init(rng, dummy_batch(config))
  return nn.meta.unbox(variables["params"])


def add_adapters(config: ModelConfig, params: dict, rng: jax.Array) -> dict:
  """The backbone `params` with `config.adapter`'s parameters added (lora_b zero, DoRA's
  magnitude the norm of the kernel it adapts): the model's own initialisers, run on a dummy
  batch with the existing parameters read-only."""
  _, variables = VisionLanguageModel(config).apply(
      {"params": params}, dummy_batch(config), rngs={"params": rng}, mutable=["params"])
  return nn.meta.unbox(variables["params"])


def dummy_batch(config: ModelConfig, batch: int = 1, length: int = 16) -> dict:
  """A smallest valid batch holding one 2x2-merged-token image per row (for init and shape checks)."""
  merge = config.vision.spatial_merge_size
  grid = np.array([1, 2 * merge, 2 * merge], np.int32)
  patches = int(np.prod(grid))
  merged = patches // merge**2
  input_ids = np.zeros((batch, length), np.int32)
  input_ids[:, 1:1 + merged] = config.image_token_id
  return {
      "input_ids": input_ids,
      "segment_ids": np.ones((batch, length), np.int32),
      "positions": np.tile(np.arange(length, dtype=np.int32), (batch, 3, 1)),
      "pixel_patches": np.zeros((batch, patches, config.vision.patch_dim), np.float32),
      "patch_image_ids": np.ones((batch, patches), np.int32),
      "image_grid_thw": np.tile(grid, (batch, 1, 1)),
  }
