"""Attention by blocks equals masked attention over the whole buffer (values and gradients)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmembed_jax.models import block_attention
from mmembed_jax.demo.tiny_model import tiny_config
from mmembed_jax.models.layers import dot_product_attention
from mmembed_jax.models.vision import (PACKED, STATIC_SHARE, VisionTower, attention_inputs,
                                       patch_layout)


def _segments(rng, n, max_segment, fill):
  """int32 [n]: contiguous runs of 1..max_segment (many of exactly max_segment, which cross
  block boundaries), ids increasing, then padding (0) after `fill` positions."""
  ids, next_id, at = np.zeros(n, np.int32), 1, 0
  while at < fill:
    size = max_segment if rng.random() < 0.5 else int(rng.integers(1, max_segment + 1))
    size = min(size, fill - at)
    ids[at:at + size] = next_id
    next_id, at = next_id + 1, at + size
  return ids


def _dense(query, key, value, segment_ids):
  mask = segment_ids[:, :, None] == segment_ids[:, None, :]
  return dot_product_attention(query, key, value, mask, jnp.float32)


CASES = [  # (n, max_segment, fills): n not a multiple of the block, a fully padded row, ...
    (300, 64, (300, 251, 0)),
    (1000, 200, (1000, 17, 641)),
]


@pytest.mark.parametrize("n,max_segment,fills", CASES)
def test_blocks_equal_masked_attention(n, max_segment, fills):
  rng = np.random.default_rng(n)
  assert block_attention.score_share(n, max_segment) < 0.5
  ids = jnp.asarray(np.stack([_segments(rng, n, max_segment, fill) for fill in fills]))
  shape = (len(fills), n, 3, 8)
  query, key, value = (jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(3))
  weights = jnp.asarray(rng.normal(size=shape), jnp.float32) * (ids > 0)[..., None, None]
  plan = block_attention.plan(ids, max_segment)
  assert not plan.overflow.any()

  def blocks(q, k, v):
    return block_attention.attend(q, k, v, plan, max_segment, jnp.float32)

  def dense(q, k, v):
    return _dense(q, k, v, ids)

  valid = np.asarray(ids > 0)
  blocks, dense = jax.jit(blocks), jax.jit(dense)
  ours, theirs = np.asarray(blocks(query, key, value)), np.asarray(dense(query, key, value))
  assert np.abs(ours - theirs)[valid].max() <= 1e-5
  assert not ours[~valid].any()  # padding attends to nothing
  grads = [jax.jit(jax.grad(lambda *x, f=f: jnp.sum(f(*x) * weights), argnums=(0, 1, 2)))(
               query, key, value)
           for f in (blocks, dense)]
  for ours, theirs in zip(*grads):
    assert np.abs(np.asarray(ours) - np.asarray(theirs)).max() <= 1e-5


def test_pair_budget_is_tight_and_never_exceeded():
  # Every segment as long as promised and as misaligned as possible: the budget holds exactly
  # the pairs needed (the count the bound in the module docstring gives).
  block, max_segment, n = 32, 100, 32 * 40
  ids = np.zeros(n, np.int32)
  ids[:] = np.arange(n) // max_segment + 1
  ids[-(n % max_segment):] = 0
  query_block, key_block, used, overflow = block_attention.block_pairs(
      jnp.asarray(ids), block, block_attention.pair_budget(n // block, block, max_segment))
  needed = {(q // block, k // block) for q in range(n) for k in range(n)
            if ids[q] and ids[q] == ids[k]}
  got = set(zip(np.asarray(query_block)[used].tolist(), np.asarray(key_block)[used].tolist()))
  assert needed <= got and not overflow
  assert len(got) <= block_attention.pair_budget(n // block, block, max_segment)


def test_a_segment_longer_than_promised_gives_nan_not_a_wrong_answer():
  n, max_segment = 512, 64
  ids = np.repeat(np.arange(1, 9, dtype=np.int32), 64)[None].repeat(2, axis=0)
  ids[1, :200] = 1  # a run of 200 in the second row
  ids = jnp.asarray(ids)
  x = jnp.ones((2, n, 2, 4), jnp.float32)
  out = block_attention.attend(x, x, x, block_attention.plan(ids, max_segment), max_segment,
                               jnp.float32)
  assert np.isfinite(np.asarray(out[0])).all() and np.isnan(np.asarray(out[1])).all()


def test_blocks_are_chosen_only_where_cheaper():
  assert block_attention.score_share(64, 64) == 1.0  # one window fills the buffer
  assert block_attention.score_share(8192, 64) < 0.02
  assert block_attention.score_share(8192, 4096) == 0.625
  assert block_attention.score_share(4096, 4096) == 1.0
  # Keys per query at the paper's sizes: windows 96 of 8192, 1024-token frames 4224 of 8192.
  assert block_attention.keys_per_query(block_attention.choose_block(8192, 64), 64) <= 128


def _tower_batch(rng, grids_per_row, patches):
  """Random patches of images with the given (t, h, w) grids, rows padded to `patches`."""
  ids = np.zeros((len(grids_per_row), patches), np.int32)
  grid = np.zeros((len(grids_per_row), max(map(len, grids_per_row)), 3), np.int32)
  for row, grids in enumerate(grids_per_row):
    at = 0
    for image, (t, h, w) in enumerate(grids):
      ids[row, at:at + t * h * w] = image + 1
      grid[row, image] = (t, h, w)
      at += t * h * w
  pixels = rng.normal(size=(len(grids_per_row), patches, 1176)).astype(np.float32)
  return jnp.asarray(pixels * (ids > 0)[..., None]), jnp.asarray(ids), jnp.asarray(grid)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_tower_by_blocks_equals_masked_tower_unrolled_and_scanned(family):
  """The whole tower, values and gradients: blocks for full and windowed layers (frames of a
  video, partial windows, a text-only row) against masked attention, planned ahead (unrolled
  layers) and full layers' blocks met at run time (scanned and rematerialised layers, where the
  two kinds of layer attend in different ways)."""
  rng = np.random.default_rng(0)
  # (t, h, w) in patches: odd block counts, partial windows, a 2-frame video, an empty row.
  pixels, ids, grid = _tower_batch(rng, [[(1, 10, 14), (2, 6, 8), (1, 22, 4)], [(1, 16, 16)], []],
                                   patches=600)
  frame = int((grid[..., 1] * grid[..., 2]).max())
  base = tiny_config(family).replace(max_frame_patches=frame, attention_impl="xla")
  layout = patch_layout(ids, grid, base.vision)
  windowed = family == "qwen2_5_vl"
  assert attention_inputs(layout, base, "xla")[0] == (
      frame, base.vision.window_patches if windowed else frame)
  run_time = base.replace(attention_impl="auto", scan_layers=True, remat_policy="full")
  assert block_attention.score_share(600, frame) > STATIC_SHARE  # big frames: met at run time
  assert attention_inputs(layout, run_time, "xla")[0] == (
      PACKED, base.vision.window_patches if windowed else PACKED)
  real = np.asarray(ids[:, ::4] > 0)
  probe = jnp.asarray(rng.normal(size=real.shape + (base.vision.out_hidden_size,)),
                      jnp.float32) * real[..., None]
  params = nn.meta.unbox(VisionTower(base).init(jax.random.key(0), pixels, ids, grid))
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params)

  def run(config):
    model = VisionTower(config)
    if config.scan_layers:  # the same parameters, stacked along the layers
      blocks = [params["params"].pop(f"blocks_{i}") for i in range(config.vision.depth)]
      run_params = {"params": dict(params["params"], blocks=jax.tree.map(
          lambda *layers: jnp.stack(layers), *blocks))}
      for i, b in enumerate(blocks):
        params["params"][f"blocks_{i}"] = b
    else:
      run_params = params
    def loss(p):
      out = model.apply(p, pixels, ids, grid)
      return (out * probe).sum(), out
    grads, out = jax.jit(jax.grad(loss, has_aux=True))(run_params)
    if config.scan_layers:
      stacked = grads["params"].pop("blocks")
      for i in range(config.vision.depth):
        grads["params"][f"blocks_{i}"] = jax.tree.map(lambda g, i=i: g[i], stacked)
    return np.asarray(out), grads

  reference, reference_grads = run(base.replace(max_frame_patches=0))
  for config in (base, run_time):
    out, grads = run(config)
    assert np.abs(out - reference)[real].max() <= 1e-5
    for (path, g), r in zip(jax.tree.leaves_with_path(grads), jax.tree.leaves(reference_grads)):
      assert np.abs(np.asarray(g) - np.asarray(r)).max() <= 1e-5 * max(np.abs(r).max(), 1.0), \
          jax.tree_util.keystr(path)
