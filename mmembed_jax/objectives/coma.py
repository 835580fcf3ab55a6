"""CoMa stage 1: compression pre-training, next-token loss on a dialogue behind compression tokens.

The batch (data/coma_pipeline.py) is a packed causal-LM batch plus
  attention_regions int32 [batch, length]  0 image + prompt, 1 compression tokens, 2 the first
                                           user turn, 3 from the first assistant turn on
  answer_mask       int32 [batch, length]  1 on each answer's tokens and its <|im_end|>

Loss: shifted next-token cross-entropy (position i predicts token i + 1 of the same example),
averaged over each example's target tokens, then over the examples (the released code's
per-example mean: one example per micro-batch, 256 accumulated). Targets by `loss_on`:
"after_ctokens" (released code: every token from the first user turn on, questions and chat
template included, so the last compression token predicts `<|im_start|>`) or "answers" (the
paper's P(A | I, C(X), Q)).

Attention: causal, and with `split_layer` >= 0 the compression mask (layers counted from 0;
"row r loses c" means tokens of region r do not attend to tokens of region c):
  mask="code" (the released `_update_causal_mask_by_sep_indices`; its masks accumulate):
    split_layer > 0: layers < split_layer: region 3 loses 0 and 1 (from the first assistant
      turn on, nothing sees the image, prompt or compression tokens); layers >= split_layer:
      also regions 1, 2 and 3 lose 0 (the compression tokens and the first question lose the
      image and prompt).
    split_layer = 0: every layer: regions 1, 2 and 3 lose 0 (only the layer-0 branch fires).
  mask="paper": layers < split_layer plain causal; layers >= split_layer: regions 2 and 3 lose 0
    (after the compression tokens only the compression tokens and the dialogue are seen).
  split_layer < 0: plain causal in both modes. The released configs never set split_layer
    (`config.split_layer` is absent from Qwen's config.json, so the code takes -1): the released
    model trained with plain causal attention.
"""
import dataclasses
from typing import ClassVar, Optional, Tuple

import jax
import jax.numpy as jnp

from mmembed_jax.models.region_mask import RegionMask
from mmembed_jax.models.vlm import VisionLanguageModel
from mmembed_jax.objectives.base import Objective
from mmembed_jax.objectives.lm_loss import chunked_cross_entropy
from mmembed_jax.models.config import ModelConfig

LOSS_ON = ("after_ctokens", "answers")
MASKS = ("code", "paper")
FIRST_QUESTION = 2  # data/coma_pipeline.py's regions: 0 prefix, 1 ctokens, 2, 3 dialogue


def _table(lost: Tuple[Tuple[int, int], ...]) -> Tuple[Tuple[bool, ...], ...]:
  """4 x 4 visibility table: everything visible but the (row region, column region) pairs."""
  return tuple(tuple((r, c) not in lost for c in range(4)) for r in range(4))


def compression_mask(mask: str, split_layer: int) -> Optional[RegionMask]:
  """The RegionMask of a `mask` mode and `split_layer` (None: plain causal; module docstring)."""
  if mask not in MASKS:
    raise ValueError(f"objective.mask must be one of {MASKS}, got '{mask}'")
  if split_layer < 0:
    return None
  if mask == "paper":
    return RegionMask(_table(()), _table(((2, 0), (3, 0))), split_layer)
  if split_layer == 0:
    lost = _table(((1, 0), (2, 0), (3, 0)))
    return RegionMask(lost, lost, 0)
  return RegionMask(_table(((3, 0), (3, 1))),
                    _table(((3, 0), (3, 1), (1, 0), (2, 0))), split_layer)


def per_example_weights(targets: jax.Array, segment_ids: jax.Array) -> jax.Array:
  """float32 [batch, length]: 1 / (targets of the token's example) on targets, 0 elsewhere."""
  batch, length = segment_ids.shape
  ids = (jnp.arange(batch)[:, None] * (length + 1) + segment_ids).reshape(-1)
  counts = jax.ops.segment_sum(targets.reshape(-1).astype(jnp.float32), ids,
                               num_segments=batch * (length + 1))
  return jnp.where(targets, 1.0 / jnp.maximum(counts[ids].reshape(batch, length), 1.0), 0.0)


@dataclasses.dataclass(frozen=True)
class ComaCompression(Objective):
  """The objective: fn(params, batch, rng) -> (loss, metrics)."""
  name: ClassVar[str] = "coma_compression"
  inputs: ClassVar[Tuple[str, ...]] = ("coma_dialogues",)

  config: ModelConfig
  loss_on: str = "after_ctokens"
  mask: str = "code"
  split_layer: int = -1  # the released code's value (module docstring)
  logits_chunk: int = 512

  def __post_init__(self):
    if self.loss_on not in LOSS_ON:
      raise ValueError(f"objective.loss_on must be one of {LOSS_ON}, got '{self.loss_on}'")
    if self.split_layer >= self.config.text.num_layers:
      raise ValueError(f"objective.split_layer {self.split_layer} is not below the model's "
                       f"{self.config.text.num_layers} layers")
    if self.config.attention != "causal":
      raise ValueError("coma_compression trains a causal model: set model.attention='causal'")
    compression_mask(self.mask, self.split_layer)  # checks `mask`

  @property
  def model_config(self) -> ModelConfig:
    """The run's model with the compression mask on."""
    return self.config.replace(region_mask=compression_mask(self.mask, self.split_layer))

  def targets(self, batch) -> jax.Array:
    """bool [batch, length]: the tokens `loss_on` predicts."""
    if self.loss_on == "answers":
      return batch["answer_mask"].astype(bool) & (batch["segment_ids"] > 0)
    return (batch["attention_regions"] >= FIRST_QUESTION) & (batch["segment_ids"] > 0)

  def __call__(self, params, batch, rng):
    model = VisionLanguageModel(self.model_config)
    segment_ids = batch["segment_ids"]  # [batch, length]
    hidden = model.apply({"params": params}, batch, rngs={"dropout": rng})  # [batch, length, embed]
    # Position i predicts token i + 1 of the same example.
    targets = self.targets(batch)[:, 1:] & (segment_ids[:, 1:] == segment_ids[:, :-1])
    weights = per_example_weights(targets, segment_ids[:, 1:])
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 1)) + ((0, 0),) * (x.ndim - 2))  # keep the length
    loss_sum, correct_sum = chunked_cross_entropy(
        model, params, pad(hidden[:, :-1]), pad(batch["input_ids"][:, 1:]), pad(weights),
        self.logits_chunk)
    examples = jnp.sum(weights)  # each example's weights sum to 1
    loss = loss_sum / jnp.maximum(examples, 1.0)
    return loss, {"lm_loss": loss, "token_accuracy": correct_sum / jnp.maximum(examples, 1.0),
                  "target_tokens": jnp.sum(targets).astype(jnp.float32), "examples": examples}
