"""InfoNCE on L2-normalised embeddings: a one-device reference and the sharded production path.

For query i with positive i, over its candidate set C(i):

  loss_i = -log( exp(q_i . p_i / tau) / sum_{c in C(i)} exp(q_i . c / tau) )
  loss   = sum_{i valid} loss_i / #valid          (0 when no pair is valid)

Candidates C(i):
  in-batch   every positive p_j of the global batch (label: j = i);
  hard       negatives="global": all n*k hard negatives of the batch (MoCa paper);
             negatives="own": only query i's own k (MoCa's released code, mmE5).
Masks (a masked candidate gets logit -inf; each row keeps its own positive, so no NaN):
  positive_modal  int [n], bitmask text=1 image=2 video=4: p_j is a candidate for q_i only if
                  positive_modal[j] == positive_modal[i] (UNITE's MAMCL); hard negatives are
                  never masked by modality.
  negative_mask   [n, k], 0 = padding slot (fewer than k negatives exist): no candidate.
  valid           [n], 0 = padding / bad pair: its query is not counted, its positive and
                  its negatives are no candidate for anyone.
symmetric=True averages the above with the positive->query direction (positive j against all
valid queries of its modality, label j; hard negatives are not used that way round).

Memory: `sharded_info_nce` keeps each device's n_local = n / (data * fsdp) queries and
all-gathers only the candidates, so a device holds [n_local, n(1 + k)] logits ("global") or
[n_local, n + k] ("own"), never the full [n, n(1 + k)].
"""
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

NEGATIVES = ("global", "own")


def _check_inputs(query, positive, negative, negatives, positive_modal):
  """Raise if shapes or the `negatives` option do not fit together."""
  if negatives not in NEGATIVES:
    raise ValueError(f"info_nce: negatives must be one of {NEGATIVES}, got {negatives!r}")
  if query.ndim != 2 or query.shape != positive.shape:
    raise ValueError(f"info_nce: query and positive must both be [n, d], got {query.shape} "
                     f"and {positive.shape}")
  if negative is not None and (negative.ndim != 3 or negative.shape[0] != query.shape[0]
                               or negative.shape[2] != query.shape[1]):
    raise ValueError(f"info_nce: negative must be [n, k, d] = [{query.shape[0]}, k, "
                     f"{query.shape[1]}], got {negative.shape}")
  if positive_modal is not None and tuple(positive_modal.shape) != query.shape[:1]:
    raise ValueError(f"info_nce: positive_modal must be [n] = [{query.shape[0]}], "
                     f"got {positive_modal.shape}")


def _flags(mask, shape, name) -> jax.Array:
  """A bool/int mask as bool of `shape`; None means all True."""
  if mask is None:
    return jnp.ones(shape, bool)
  if tuple(mask.shape) != tuple(shape):
    raise ValueError(f"info_nce: {name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
  return jnp.asarray(mask).astype(bool)


def _pair_allowed(row_valid, col_valid, row_ids, col_ids, row_modal=None, col_modal=None):
  """Bool [rows, cols]: both pairs valid and of one modality; a row's own positive always stays."""
  allowed = row_valid[:, None] & col_valid[None, :]
  if row_modal is not None:
    allowed &= row_modal[:, None] == col_modal[None, :]
  return allowed | (row_ids[:, None] == col_ids[None, :])


def _masked_logsumexp(logits, allowed) -> jax.Array:
  """logsumexp over the allowed entries of each row: [rows, cols] -> [rows]."""
  return jax.nn.logsumexp(jnp.where(allowed, logits, -jnp.inf), axis=-1)


def info_nce(query: jax.Array, positive: jax.Array, negative: Optional[jax.Array] = None, *,
             temperature, negatives: str = "global", positive_modal: Optional[jax.Array] = None,
             symmetric: bool = False, negative_mask: Optional[jax.Array] = None,
             valid: Optional[jax.Array] = None) -> jax.Array:
  """The reference InfoNCE on one device: float32 mean over valid queries (see module doc)."""
  _check_inputs(query, positive, negative, negatives, positive_modal)
  n = query.shape[0]
  query = query.astype(jnp.float32)  # [n, d]
  positive = positive.astype(jnp.float32)  # [n, d]
  valid = _flags(valid, (n,), "valid")
  ids = jnp.arange(n)
  pair_allowed = _pair_allowed(valid, valid, ids, ids, positive_modal, positive_modal)  # [n, n]

  in_batch = query @ positive.T / temperature  # [n, n], row i: q_i against every positive
  logits, allowed = [in_batch], [pair_allowed]
  if negative is not None:
    k = negative.shape[1]
    negative = negative.astype(jnp.float32)  # [n, k, d]
    negative_ok = _flags(negative_mask, (n, k), "negative_mask") & valid[:, None]  # [n, k]
    if negatives == "global":
      logits.append(query @ negative.reshape(n * k, -1).T / temperature)  # [n, n * k]
      allowed.append(jnp.broadcast_to(negative_ok.reshape(1, n * k), (n, n * k)))
    else:
      logits.append(jnp.einsum("nd,nkd->nk", query, negative) / temperature)  # [n, k]
      allowed.append(negative_ok)
  positive_logit = jnp.diagonal(in_batch)  # [n]
  losses = _masked_logsumexp(jnp.concatenate(logits, 1),
                             jnp.concatenate(allowed, 1)) - positive_logit  # [n]
  if symmetric:
    # Row j of the transpose: positive j against every query; the mask is symmetric.
    reverse = _masked_logsumexp(in_batch.T, pair_allowed.T) - positive_logit  # [n]
    losses = 0.5 * (losses + reverse)
  weights = valid.astype(jnp.float32)
  return (losses * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def _local_info_nce(inputs, temperature, *, axes, negatives, symmetric):
  """One device's share: local queries against all-gathered candidates -> (loss, accuracy)."""
  def gather(x):
    return jax.lax.all_gather(x, axes, tiled=True) if axes else x

  def total(x):
    return jax.lax.psum(x, axes) if axes else x

  query = inputs["query"].astype(jnp.float32)  # [local, d]
  positive = inputs["positive"].astype(jnp.float32)  # [local, d]
  valid = inputs["valid"]  # [local]
  modal = inputs.get("modal")  # [local] or None
  local = query.shape[0]
  offset = jax.lax.axis_index(axes) * local if axes else 0
  local_ids = offset + jnp.arange(local)  # global index of each local pair
  global_valid = gather(valid)  # [n]
  n = global_valid.shape[0]
  pair_allowed = _pair_allowed(valid, global_valid, local_ids, jnp.arange(n),
                               modal, None if modal is None else gather(modal))  # [local, n]

  all_positives = gather(positive)  # [n, d]
  logits = [query @ all_positives.T / temperature]  # [local, n]
  allowed = [pair_allowed]
  if "negative" in inputs:
    negative = inputs["negative"].astype(jnp.float32)  # [local, k, d]
    negative_ok = inputs["negative_mask"] & valid[:, None]  # [local, k]
    if negatives == "global":
      all_negatives = gather(negative).reshape(-1, negative.shape[-1])  # [n * k, d]
      all_ok = gather(negative_ok).reshape(1, -1)  # [1, n * k]
      logits.append(query @ all_negatives.T / temperature)  # [local, n * k]
      allowed.append(jnp.broadcast_to(all_ok, logits[-1].shape))
    else:
      logits.append(jnp.einsum("nd,nkd->nk", query, negative) / temperature)  # [local, k]
      allowed.append(negative_ok)
  logits = jnp.concatenate(logits, 1)  # [local, n + candidates]
  allowed = jnp.concatenate(allowed, 1)
  positive_logit = jnp.sum(query * positive, -1) / temperature  # [local]
  losses = _masked_logsumexp(logits, allowed) - positive_logit  # [local]
  if symmetric:
    all_queries = gather(query)  # [n, d]
    reverse_logits = positive @ all_queries.T / temperature  # [local, n]
    losses = 0.5 * (losses + _masked_logsumexp(reverse_logits, pair_allowed) - positive_logit)
  correct = jnp.argmax(jnp.where(allowed, logits, -jnp.inf), axis=-1) == local_ids  # [local]
  weights = valid.astype(jnp.float32)
  count = jnp.maximum(total(weights.sum()), 1.0)
  loss = total((losses * weights).sum()) / count
  accuracy = total((correct * weights).sum()) / count
  return loss, accuracy


def sharded_info_nce(query: jax.Array, positive: jax.Array, negative: Optional[jax.Array] = None,
                     *, temperature, negatives: str = "global",
                     positive_modal: Optional[jax.Array] = None, symmetric: bool = False,
                     negative_mask: Optional[jax.Array] = None, valid: Optional[jax.Array] = None,
                     batch_axes: Sequence[str] = ("data", "fsdp")) -> tuple[jax.Array, dict]:
  """InfoNCE with axis 0 sharded over `batch_axes` of the current mesh -> (loss, {"accuracy"})."""
  _check_inputs(query, positive, negative, negatives, positive_modal)
  n = query.shape[0]
  inputs = {"query": query, "positive": positive, "valid": _flags(valid, (n,), "valid")}
  if positive_modal is not None:
    inputs["modal"] = jnp.asarray(positive_modal)
  if negative is not None:
    inputs["negative"] = negative
    inputs["negative_mask"] = _flags(negative_mask, negative.shape[:2], "negative_mask")
  temperature = jnp.asarray(temperature, jnp.float32)

  mesh = jax.sharding.get_abstract_mesh()
  axes = tuple(axis for axis in batch_axes if axis in mesh.axis_names)
  body = functools.partial(_local_info_nce, axes=axes, negatives=negatives, symmetric=symmetric)
  if not axes:  # no mesh (or none of the batch axes in it): one program sees the whole batch
    loss, accuracy = body(inputs, temperature)
  else:
    shards = 1
    for axis in axes:
      shards *= mesh.shape[axis]
    if n % shards:
      raise ValueError(f"sharded_info_nce: batch {n} is not divisible by the {shards} shards of "
                       f"mesh axes {axes}")
    # Manual over every mesh axis: the other axes (e.g. "tensor") repeat the same work.
    loss, accuracy = jax.shard_map(body, mesh=mesh, in_specs=(P(axes), P()),
                                   out_specs=(P(), P()))(inputs, temperature)
  return loss, {"accuracy": accuracy}
