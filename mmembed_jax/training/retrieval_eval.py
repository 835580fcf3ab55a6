"""Held-out Precision@1 during contrastive training.

For each held-out dataset, query i's candidates are the distinct positives of all that dataset's
held-out pairs plus query i's own hard negatives; a hit is its own positive scoring highest
(positives with the same input, e.g. one page asked about twice, count as one candidate). Chance is
1 / (candidates) per query. Reported per dataset and as the mean over datasets (MMEB averages
per dataset). Embeddings come from the objective's own `embed` (same pooling, same model), on the
training mesh; the held-out batches are the same on every process and sharded like training
batches.
"""
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

SIDES = ("query", "positive", "negative")


def content_keys(sequences: Mapping[str, np.ndarray]) -> np.ndarray:
  """One hash per row of a side's sequences (token ids and pixels): equal inputs, equal keys."""
  rows = len(sequences["input_ids"])
  return np.array([hash(tuple(np.asarray(sequences[k])[i].tobytes()
                              for k in ("input_ids", "pixel_patches"))) for i in range(rows)])


def precision_at_1(query: np.ndarray, positive: np.ndarray, negative: np.ndarray,
                   negative_mask: np.ndarray, positive_key: np.ndarray) -> tuple[float, float]:
  """(P@1, chance) of one dataset: query [m, d], positive [m, d], negative [m, K, d], mask [m, K];
  positive_key [m] names each positive's content (equal keys = one candidate)."""
  in_batch = query @ positive.T  # [m, m]
  own = np.einsum("md,mkd->mk", query, negative)  # [m, K]
  own = np.where(negative_mask > 0, own, -np.inf)
  # A positive shared by several pairs (one page, several questions) is one candidate.
  same = positive_key[:, None] == positive_key[None, :]  # [m, m]
  others = np.where(same, -np.inf, in_batch)
  best_other = np.maximum(others.max(axis=1, initial=-np.inf), own.max(axis=1, initial=-np.inf))
  hits = np.diagonal(in_batch) > best_other
  chance = 1.0 / (len(np.unique(positive_key)) + negative_mask.sum(axis=1))
  return float(hits.mean()), float(chance.mean())


class RetrievalEval:
  """fn(params) -> {"eval_precision_at_1": ..., "eval_chance": ..., per dataset ...}."""

  def __init__(self, embed: Callable[[Any, Mapping[str, jax.Array]], jax.Array],
               batches: Sequence[Mapping[str, Any]], dataset_names: Sequence[str],
               sharding: NamedSharding):
    self.batches, self.names, self.sharding = list(batches), list(dataset_names), sharding
    self._embed = jax.jit(embed)
    self._positive_keys = [content_keys(batch["positive"]) for batch in self.batches]  # once

  def _put(self, array: np.ndarray) -> jax.Array:
    """A host array held whole by every process -> a global array sharded over the batch axes."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, self.sharding, lambda index: array[index])

  def _embed_side(self, params: Any, sequences: Mapping[str, np.ndarray]) -> np.ndarray:
    """Sequences [rows, ...] -> host embeddings [rows, embed]."""
    out = self._embed(params, jax.tree.map(self._put, dict(sequences)))
    return np.asarray(multihost_utils.process_allgather(out, tiled=True))

  def embeddings(self, params: Any) -> dict:
    """Host arrays of every held-out pair: embeddings, negative_mask, dataset_index, positive_key."""
    parts: dict = {key: [] for key in SIDES + ("negative_mask", "dataset_index", "positive_key")}
    for batch, positive_keys in zip(self.batches, self._positive_keys):
      valid = np.asarray(batch["valid"]) > 0
      parts["query"].append(self._embed_side(params, batch["query"])[valid])
      parts["positive"].append(self._embed_side(params, batch["positive"])[valid])
      if "negative" in batch:
        n, k = np.shape(batch["negative_mask"])
        flat = jax.tree.map(lambda x: np.reshape(x, (n * k,) + np.shape(x)[2:]), batch["negative"])
        negative = self._embed_side(params, flat).reshape(n, k, -1)
        mask = np.asarray(batch["negative_mask"])
      else:
        negative = np.zeros((len(valid), 0, parts["query"][-1].shape[-1]), np.float32)
        mask = np.zeros((len(valid), 0), np.int32)
      parts["negative"].append(negative[valid])
      parts["negative_mask"].append(mask[valid])
      parts["dataset_index"].append(np.asarray(batch["dataset_index"])[valid])
      parts["positive_key"].append(positive_keys[valid])
    return {key: np.concatenate(value) for key, value in parts.items()}

  def __call__(self, params: Any) -> dict:
    """Per-dataset and mean held-out P@1 and chance."""
    e = self.embeddings(params)
    out, hits, chances = {}, [], []
    for index, name in enumerate(self.names):
      rows = e["dataset_index"] == index
      if not rows.any():
        continue
      hit, chance = precision_at_1(e["query"][rows], e["positive"][rows], e["negative"][rows],
                                   e["negative_mask"][rows], e["positive_key"][rows])
      out[f"eval_precision_at_1/{name}"], out[f"eval_chance/{name}"] = hit, chance
      hits.append(hit)
      chances.append(chance)
    out["eval_precision_at_1"] = float(np.mean(hits))
    out["eval_chance"] = float(np.mean(chances))
    return out
