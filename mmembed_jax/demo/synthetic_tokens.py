"""A deterministic Grain pipeline of synthetic text-only rows, for engine tests and smoke runs.

Each example is a function of (seed, index) only: a few repeated random "phrases", so a
masked-LM objective has something learnable. Rows follow the batch contract of
`models/inputs.py` with an empty patch buffer.
"""
import dataclasses
from typing import ClassVar

import grain
import jax
import numpy as np

from mmembed_jax.data.input_specs import InputSpec, with_leading_axis
from mmembed_jax.models.inputs import PATCH_DIM


def synthetic_example(seed: int, index: int, length: int, vocab_size: int) -> dict:
  """One text-only example: tokens [length] drawn from 4 phrases of 8 tokens, random real length."""
  rng = np.random.default_rng([seed, index])
  phrases = rng.integers(16, vocab_size, size=(4, 8))
  tokens = phrases[rng.integers(0, 4, size=length // 8 + 1)].reshape(-1)[:length]
  real = int(rng.integers(length // 2, length + 1))
  segment_ids = (np.arange(length) < real).astype(np.int32)
  positions = np.where(segment_ids > 0, np.arange(length), 0).astype(np.int32)
  return {
      "input_ids": np.where(segment_ids > 0, tokens, 0).astype(np.int32),
      "segment_ids": segment_ids,
      "positions": np.tile(positions, (3, 1)),
      "pixel_patches": np.zeros((0, PATCH_DIM), np.float32),
      "patch_image_ids": np.zeros((0,), np.int32),
      "image_grid_thw": np.zeros((0, 3), np.int32),
  }


def synthetic_token_dataset(global_batch_size: int, length: int, vocab_size: int, seed: int,
                            num_examples: int = 1 << 20) -> grain.IterDataset:
  """This process's share of the global batches: examples i with i % process_count == process_index."""
  process_count, process_index = jax.process_count(), jax.process_index()
  if global_batch_size % process_count:
    raise ValueError(f"global batch {global_batch_size} is not divisible by {process_count} processes")
  dataset = grain.MapDataset.range(num_examples)
  dataset = dataset.shuffle(seed=seed)[process_index::process_count]
  dataset = dataset.map(lambda i: synthetic_example(seed, int(i), length, vocab_size))
  dataset = dataset.repeat().batch(global_batch_size // process_count, drop_remainder=True)
  return dataset.to_iter_dataset()


@dataclasses.dataclass(frozen=True)
class SyntheticTokens(InputSpec):
  """`input.name = "synthetic_tokens"`: the engine's demo input (no tokenizer, no data)."""
  name: ClassVar[str] = "synthetic_tokens"
  needs_tokenizer: ClassVar[bool] = False

  global_batch_size: int
  length: int

  def dataset(self, model_config, seed, tokenizer_dir):
    return synthetic_token_dataset(self.global_batch_size, self.length,
                                   model_config.text.vocab_size - 16, seed)

  def batch_unit(self, model_config):
    return with_leading_axis(synthetic_example(0, 0, self.length,
                                               model_config.text.vocab_size - 16))
