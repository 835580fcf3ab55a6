"""The TPU attention kernel: Pallas splash attention with segment ids, sharded with shard_map.

`splash_attention` computes what `layers.dot_product_attention` computes for a segment mask (same
segment, causal if asked: the language model's packed sequences, the vision tower's frames and
windows) without ever forming the [length, length] scores: the kernel walks the blocks and skips
those the causal mask rules out. Grouped-query heads run as the kernel's multi-query form, one
call per kv head. A mask that segment ids cannot say (CoMa's compression mask,
models/region_mask.py) is given whole, bool [length, length] per row: the kernel's dynamic-mask
form, which still skips the blocks the mask empties. Under a mesh the call is wrapped in
`shard_map` over the batch (data x fsdp) and kv-head (tensor) axes the logical rules give, so each
device runs the kernel on its own rows and heads with no communication.
"""
import functools
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
from jax.sharding import PartitionSpec

from mmembed_jax.models import packed_attention
from mmembed_jax.models.layers import dot_product_attention

IMPLEMENTATIONS = ("auto", "xla", "splash", "splash_interpret")
_BLOCKS = (512, 256, 128)  # tried in order: the largest that divides the length


def block_size(length: int) -> Optional[int]:
  """The kernel's tile along the sequence for `length`, or None where the kernel cannot run it."""
  return next((b for b in _BLOCKS if length % b == 0), None)


def resolve(impl: str, length: int, platform: Optional[str] = None) -> str:
  """'xla', 'splash' or 'splash_interpret' for a sequence of `length` on `platform` (default: the
  backend this process runs on). 'auto' is the kernel on TPU; lengths the kernel cannot tile
  (not a multiple of 128) always take the XLA path."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"model.attention_impl '{impl}': expected one of {IMPLEMENTATIONS}")
  if impl == "xla" or block_size(length) is None:
    return "xla"
  if impl == "auto":
    return "splash" if (platform or jax.default_backend()) == "tpu" else "xla"
  return impl


def _kernel(length: int, groups: int, causal: bool, interpret: bool):
  """The multi-query splash kernel for one kv head: q [groups, length, head_dim]. Built anew in
  every trace (the kernel library memoises the mask's processing): a kernel cached across
  traces would hand a later trace the mask tables another trace staged."""
  one_head = mask_lib.CausalMask((length, length)) if causal else mask_lib.FullMask((length, length))
  return kernel_lib.make_splash_mqa(mask_lib.MultiHeadMask((one_head,) * groups),
                                    block_sizes=_block_sizes(length), head_shards=1,
                                    q_seq_shards=1, interpret=interpret)


def _block_sizes(length: int):
  """The kernel's tiles for `length`: one square block size everywhere."""
  block = block_size(length)
  return kernel_lib.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                               block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                               block_q_dq=block, block_kv_dq=block)


def _masked_attention(query, key, value, mask, interpret: bool):
  """query [batch, length, heads, head_dim], key/value [batch, length, kv_heads, head_dim], mask
  bool [batch, length, length] -> [batch, length, heads, head_dim]: a dynamic-mask kernel per row,
  its one mask shared by every head."""
  batch, length, heads, head_dim = query.shape
  kv_heads = key.shape[2]
  q = query.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
  q = jnp.transpose(q, (0, 2, 3, 1, 4))  # [batch, kv_heads, groups, length, head_dim]
  k = jnp.transpose(key, (0, 2, 1, 3))  # [batch, kv_heads, length, head_dim]
  v = jnp.transpose(value, (0, 2, 1, 3))

  def one_row(q_row, k_row, v_row, mask_row):
    kernel = kernel_lib.make_splash_mqa(mask_row[None], block_sizes=_block_sizes(length),
                                        head_shards=1, q_seq_shards=1, interpret=interpret)
    # The kernel branches on `is_dynamic_mask` in Python; built under jit it holds a traced
    # jnp.array(True) there, so it is set back to the Python bool.
    for name in ("fwd_mask_info", "dq_mask_info", "dkv_mask_info"):
      if getattr(kernel, name) is not None:
        setattr(kernel, name, getattr(kernel, name)._replace(is_dynamic_mask=True))
    return jax.vmap(kernel)(q_row, k_row, v_row)

  out = jax.vmap(one_row)(q, k, v, mask)  # [batch, kv_heads, groups, length, head_dim]
  return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(batch, length, heads, head_dim)


def _local_attention(query, key, value, segment_ids, causal: bool, interpret: bool):
  """query [batch, length, heads, head_dim], key/value [batch, length, kv_heads, head_dim],
  segment_ids [batch, length] -> [batch, length, heads, head_dim] (on one device's shard)."""
  batch, length, heads, head_dim = query.shape
  kv_heads = key.shape[2]
  kernel = _kernel(length, heads // kv_heads, causal, interpret)
  # Head h uses kv head h // groups, as transformers' repeat_kv does.
  q = query.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
  q = jnp.transpose(q, (0, 2, 3, 1, 4))  # [batch, kv_heads, groups, length, head_dim]
  k = jnp.transpose(key, (0, 2, 1, 3))  # [batch, kv_heads, length, head_dim]
  v = jnp.transpose(value, (0, 2, 1, 3))

  def one_row(q_row, k_row, v_row, ids):
    segments = kernel_lib.SegmentIds(q=ids, kv=ids)
    return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=segments))(q_row, k_row, v_row)

  out = jax.vmap(one_row)(q, k, v, segment_ids)  # [batch, kv_heads, groups, length, head_dim]
  return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(batch, length, heads, head_dim)


def _mesh_axes(logical: str, mesh, size: int):
  """The mesh axes the rules give a logical axis, or None where they do not divide `size`."""
  axes = nn.logical_to_mesh_axes((logical,))[0]
  if axes is None:
    return None
  names = axes if isinstance(axes, tuple) else (axes,)
  shards = math.prod(mesh.shape[name] for name in names)
  return axes if shards > 1 and size % shards == 0 else None


def splash_attention(query: jax.Array, key: jax.Array, value: jax.Array, segment_ids: jax.Array,
                     causal: bool, dtype, interpret: bool = False,
                     mask: Optional[jax.Array] = None) -> jax.Array:
  """Segment-masked (and causal if asked) softmax attention by the splash kernel.

  query [batch, length, heads, head_dim]; key, value [batch, length, kv_heads, head_dim];
  segment_ids int [batch, length] (tokens attend within their segment; padding, 0, to padding);
  mask: bool [batch, length, length] (True = may attend) given whole instead, which then alone
  decides (segments and causality included). Returns [batch, length, heads, head_dim] in
  `dtype`. The kernel does not scale the scores, so the query is scaled by 1/sqrt(head_dim)
  first, in float32.
  """
  head_dim = query.shape[-1]
  query = (query.astype(jnp.float32) * head_dim**-0.5).astype(dtype)
  key, value = key.astype(dtype), value.astype(dtype)
  if mask is None:
    attend = functools.partial(_local_attention, causal=causal, interpret=interpret)
    where = segment_ids.astype(jnp.int32)  # [batch, length]
  else:
    attend = functools.partial(_masked_attention, interpret=interpret)
    where = mask  # [batch, length, length]
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    out = attend(query, key, value, where)
  else:
    batch_axes = _mesh_axes("batch", mesh, query.shape[0])
    head_axes = _mesh_axes("kv_heads", mesh, key.shape[2])
    heads = PartitionSpec(batch_axes, None, head_axes, None)
    rows = PartitionSpec(batch_axes, *([None] * (where.ndim - 1)))
    out = jax.shard_map(attend, in_specs=(heads, heads, heads, rows), out_specs=heads,
                        check_vma=False)(query, key, value, where)
  return checkpoint_name(out, "attention_out")


def attend(query: jax.Array, key: jax.Array, value: jax.Array, mask: Optional[jax.Array],
           segment_ids: Optional[jax.Array], causal: bool, dtype, impl: str) -> jax.Array:
  """The layers' attention: XLA's masked softmax of `mask` [batch, length, length] where `impl`
  resolves to XLA (by blocks within `segment_ids`, models/packed_attention.py, when no mask is
  given); else the splash kernel (interpreted for 'splash_interpret') on `segment_ids`
  [batch, length], or on `mask` when one is given (a region mask)."""
  path = resolve(impl, query.shape[1])
  if path == "xla" and mask is None:
    return packed_attention.attend(query, key, value, segment_ids, causal, dtype)
  if path == "xla":
    return dot_product_attention(query, key, value, mask, dtype)
  return splash_attention(query, key, value, segment_ids, causal=causal, dtype=dtype,
                          interpret=path == "splash_interpret", mask=mask)
