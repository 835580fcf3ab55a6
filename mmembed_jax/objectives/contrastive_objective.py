"""Contrastive fine-tuning: embed queries, positives and hard negatives, InfoNCE across devices.

MoCa stage 2, VLM2Vec, UNITE and mmE5 are this objective with different fields (METHODS.md
§2-§4, §6). The batch (`data/cl_pipeline.py`) holds three sub-batches of the model's contract
(`models/inputs.py`) and per-pair fields:

  query      sequences [batch, Lq]       positive   sequences [batch, Lt]
  negative   sequences [batch, K, Lt]    (absent when K = 0)
  negative_mask int32 [batch, K]   valid int32 [batch]   target_modal int32 [batch]

The loss is `contrastive.sharded_info_nce`: each device scores its local queries against the
all-gathered candidates. The temperature is fixed, or learned as `logit_scale` = log(1/tau)
(a top-level parameter beside the backbone's, clipped at log 100 as in CLIP).

GradCache (`grad_cache_chunk` = c > 0 rows per device): each side is embedded c rows per device
at a time in a `lax.scan` whose body is `jax.checkpoint`-ed. The forward keeps only the
embeddings; the loss sees the whole global batch; the backward re-encodes chunk by chunk and
back-propagates each chunk's embedding gradient. Activations of one chunk live at a time, for
one extra forward. The re-encoding is the same computation on the same inputs, so it is
identical (the encoder draws no random numbers).

Under FSDP every chunk of both passes gathers the weights it uses again: collective bytes grow
with the number of chunks. `gather_weights_once` gathers every parameter whole on every chip
once per step instead (its gradient, summed over the chunks, is reduce-scattered once): bytes of
one FSDP step, for the memory of a whole copy of the parameters and of their gradient on each
chip (a 7B model's need more than a v5p chip's 95.7 GB; README, "Collective traffic").
"""
import dataclasses
import math
from typing import Any, ClassVar, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from mmembed_jax.models.config import ModelConfig
from mmembed_jax.models.pooling import POOLINGS, pool
from mmembed_jax.models.vlm import VisionLanguageModel
from mmembed_jax.objectives.base import Objective
from mmembed_jax.objectives.contrastive import sharded_info_nce
from mmembed_jax.parallel.sharding import merge_rows, split_batch

LOGIT_SCALE = "logit_scale"  # top-level parameter: log(1 / temperature), when learned
MAX_LOGIT_SCALE = math.log(100.0)
BATCH_AXES = ("data", "fsdp")


def _batch_parallelism() -> int:
  """Devices the batch is split over in the current mesh (1 outside a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  return math.prod(mesh.shape.get(axis, 1) for axis in BATCH_AXES) if mesh.shape else 1


@dataclasses.dataclass(frozen=True)
class Contrastive(Objective):
  """The objective: fn(params, batch, rng) -> (loss, metrics)."""
  name: ClassVar[str] = "contrastive"
  inputs: ClassVar[Tuple[str, ...]] = ("contrastive_pairs",)
  uses_lm_head: ClassVar[bool] = False
  embeds: ClassVar[bool] = True

  config: ModelConfig
  pooling: str = "mean"
  temperature: float = 0.03  # fixed, or the initial value when learned
  learn_temperature: bool = False
  negatives: str = "global"  # "global" (MoCa paper) | "own" (MoCa code, mmE5)
  modality_mask: bool = False  # UNITE's MAMCL
  symmetric: bool = False  # (q->c + c->q) / 2
  grad_cache_chunk: int = 0  # rows per device per chunk; 0 = embed the batch in one pass
  gather_weights_once: bool = False  # GradCache under FSDP: whole weights once, not per chunk
  num_ctokens: int = 0  # 'ctoken' pooling: the compression tokens ending every sequence (CoMa)

  @property
  def forwards_per_step(self) -> int:
    """Forward passes per step: GradCache encodes twice."""
    return 2 if self.grad_cache_chunk else 1

  def __post_init__(self):
    if self.pooling not in POOLINGS:
      raise ValueError(f"objective.pooling '{self.pooling}' is not one of {POOLINGS}")
    if self.negatives not in ("global", "own"):
      raise ValueError(f"objective.negatives must be 'global' or 'own', got '{self.negatives}'")
    if not self.temperature > 0:
      raise ValueError(f"objective.temperature must be positive, got {self.temperature}")
    if self.grad_cache_chunk < 0:
      raise ValueError(f"objective.grad_cache_chunk must be >= 0, got {self.grad_cache_chunk}")
    if self.pooling == "ctoken" and self.num_ctokens < 1:
      raise ValueError(f"objective.pooling 'ctoken' with num_ctokens {self.num_ctokens}: it "
                       f"averages the compression tokens, set num_ctokens >= 1")

  @classmethod
  def check_run(cls, config) -> None:
    """Every candidate of the global batch must be in one loss: no gradient accumulation."""
    if config.grad_accum_steps != 1:
      raise ValueError(f"grad_accum_steps={config.grad_accum_steps}: a contrastive loss needs "
                       f"every candidate of the global batch at once; use "
                       f"objective.grad_cache_chunk for large batches")
    pooled, appended = config.objective.get("num_ctokens", 0), config.input.get("num_ctokens", 0)
    if pooled != appended:
      raise ValueError(f"objective.num_ctokens={pooled} but input.num_ctokens={appended}: the "
                       f"pooled compression tokens must be those the input appends")

  def extra_param_shapes(self) -> dict:
    """{LOGIT_SCALE: scalar} when the temperature is learned (replicated), else nothing."""
    if not self.learn_temperature:
      return {}
    return {LOGIT_SCALE: jax.ShapeDtypeStruct((), jnp.float32)}

  def init_extra(self, rng: jax.Array, params: Mapping[str, Any]) -> dict:
    """The learned temperature's initial value, log(1 / temperature)."""
    del rng, params
    if not self.learn_temperature:
      return {}
    return {LOGIT_SCALE: jnp.asarray(math.log(1.0 / self.temperature), jnp.float32)}

  def embed(self, params: Any, sequences: Mapping[str, jax.Array],
            dropout_rng: Optional[jax.Array] = None) -> jax.Array:
    """Sequences [n, ...] -> L2-normalised embeddings [n, embed], in chunks under GradCache;
    adapter dropout (training) when `dropout_rng` is given."""
    model = VisionLanguageModel(self.config)

    def encode(sub, index=0):
      rngs = {} if dropout_rng is None else {"dropout": jax.random.fold_in(dropout_rng, index)}
      return pool(model.apply({"params": params}, sub, rngs=rngs), sub["segment_ids"],
                  self.pooling, self.num_ctokens)

    n = sequences["input_ids"].shape[0]
    per_step = self.grad_cache_chunk * _batch_parallelism()
    if self.grad_cache_chunk == 0 or per_step >= n:
      return encode(sequences)
    if n % per_step:
      raise ValueError(f"objective.grad_cache_chunk={self.grad_cache_chunk}: {n} rows do not split "
                       f"into chunks of {self.grad_cache_chunk} rows on each of "
                       f"{per_step // self.grad_cache_chunk} data-parallel devices")
    steps = n // per_step
    chunks = split_batch(sequences, steps)
    _, out = jax.lax.scan(lambda carry, xs: (carry, jax.checkpoint(encode)(*xs)), None,
                          (chunks, jnp.arange(steps)))
    return merge_rows(out, n // sequences["pixel_patches"].shape[0])  # [n, embed]

  def current_temperature(self, params: Mapping[str, Any]) -> jax.Array:
    """tau: fixed, or exp(-logit_scale) with logit_scale clipped at log 100."""
    if not self.learn_temperature:
      return jnp.asarray(self.temperature, jnp.float32)
    return jnp.exp(-jnp.minimum(params[LOGIT_SCALE], MAX_LOGIT_SCALE))

  def embed_targets(self, params: Any, batch: Mapping[str, Any],
                    dropout_rng: Optional[jax.Array] = None) -> tuple[jax.Array, Any]:
    """(positive [n, embed], negative [n, K, embed] or None) from one encoder call.

    Each device's positives and its queries' negatives are concatenated on that device, so
    the target side is a single [n * (1 + K), Lt] batch without moving rows between devices.
    """
    if "negative" not in batch:
      return self.embed(params, batch["positive"], dropout_rng), None
    n, k = batch["negative_mask"].shape
    shards = _batch_parallelism()

    def join(positive, negative):  # [n, ...], [n, K, ...] -> [shards * (n/shards) * (1+K), ...]
      rest = positive.shape[1:]
      per_shard = [positive.reshape((shards, n // shards, 1) + rest),
                   negative.reshape((shards, n // shards, k) + rest)]
      return jnp.concatenate(per_shard, axis=2).reshape((n * (1 + k),) + rest)

    targets = jax.tree.map(join, dict(batch["positive"]), dict(batch["negative"]))
    out = self.embed(params, targets, dropout_rng).reshape(shards, n // shards, 1 + k, -1)
    return out[:, :, 0].reshape(n, -1), out[:, :, 1:].reshape(n, k, -1)

  def weights_for_chunks(self, params: Any) -> Any:
    """`params` gathered whole on every device of the mesh when `gather_weights_once` applies
    (GradCache in a mesh), else unchanged."""
    if not (self.gather_weights_once and self.grad_cache_chunk
            and jax.sharding.get_abstract_mesh().shape):
      return params
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, PartitionSpec()), params)

  def __call__(self, params, batch, rng):
    params = self.weights_for_chunks(params)
    query_rng, target_rng = jax.random.split(rng)  # adapter dropout
    query = self.embed(params, batch["query"], query_rng)  # [n, embed]
    positive, negative = self.embed_targets(params, batch, target_rng)  # [n, embed], [n, K, embed]
    negative_mask = batch.get("negative_mask")
    temperature = self.current_temperature(params)
    loss, metrics = sharded_info_nce(
        query, positive, negative, temperature=temperature, negatives=self.negatives,
        positive_modal=batch["target_modal"] if self.modality_mask else None,
        symmetric=self.symmetric, negative_mask=negative_mask, valid=batch["valid"],
        batch_axes=BATCH_AXES)
    metrics = dict(metrics, temperature=temperature,
                   valid_pairs=jnp.sum(batch["valid"]).astype(jnp.float32))
    return loss, metrics
