"""The splash attention kernel, run by the Pallas interpreter on CPU, against the XLA path: the
attention function alone (values and gradients, causal and bidirectional, packed segments,
padding, grouped-query heads), the whole model sharded over 8 devices (shard_map path) and the
vision tower (frames and windows as segment ids)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from mmembed_jax.data import collate as collate_lib
from mmembed_jax.data import rows as rows_lib
from mmembed_jax.data.images import ImageProcessingConfig
from mmembed_jax.demo.tiny_model import tiny_config
from mmembed_jax.models import splash
from mmembed_jax.models.embedder import dummy_batch
from mmembed_jax.models.layers import dot_product_attention
from mmembed_jax.models.llm import attention_mask
from mmembed_jax.models.vision import VisionTower
from mmembed_jax.models.vlm import VisionLanguageModel
from mmembed_jax.objectives.coma import compression_mask

from tiny_models import TEST_PIXELS

LENGTH = 256  # two kernel tiles of 128


def _segments(batch: int, length: int) -> np.ndarray:
  """Row 0: three packed sequences then padding; row 1: one short sequence at the start, a long
  one after; row 2: a single sequence over the whole row."""
  ids = np.zeros((batch, length), np.int32)
  ids[0, :100], ids[0, 100:130], ids[0, 130:200] = 1, 2, 3
  ids[1, :30], ids[1, 30:] = 1, 2
  ids[2:] = 1
  return ids


@pytest.mark.parametrize("causal", [True, False])
def test_kernel_matches_xla_attention_and_its_gradients(causal):
  rng = np.random.default_rng(0)
  batch, heads, kv_heads, head_dim = 3, 4, 2, 32
  query = jnp.asarray(rng.normal(size=(batch, LENGTH, heads, head_dim)), jnp.float32)
  key = jnp.asarray(rng.normal(size=(batch, LENGTH, kv_heads, head_dim)), jnp.float32)
  value = jnp.asarray(rng.normal(size=(batch, LENGTH, kv_heads, head_dim)), jnp.float32)
  segments = jnp.asarray(_segments(batch, LENGTH))
  weights = jnp.asarray(rng.normal(size=(LENGTH, heads, head_dim)), jnp.float32)

  def xla(q, k, v):
    return dot_product_attention(q, k, v, attention_mask(segments, causal), jnp.float32)

  def kernel(q, k, v):
    return splash.splash_attention(q, k, v, segments, causal, jnp.float32, interpret=True)

  expected, got = xla(query, key, value), kernel(query, key, value)
  assert np.abs(np.asarray(got - expected)).max() <= 1e-5
  loss = lambda attend: lambda *qkv: (attend(*qkv) * weights).sum()  # pylint: disable=unnecessary-lambda-assignment
  expected_grads = jax.grad(loss(xla), argnums=(0, 1, 2))(query, key, value)
  got_grads = jax.grad(loss(kernel), argnums=(0, 1, 2))(query, key, value)
  for name, e, g in zip("qkv", expected_grads, got_grads):
    scale = np.abs(np.asarray(e)).max()
    assert np.abs(np.asarray(g - e)).max() <= 1e-5 * max(scale, 1.0), f"d{name}"


def test_choice_of_implementation():
  assert splash.resolve("auto", 2048, "tpu") == "splash"
  assert splash.resolve("auto", 2048, "cpu") == "xla"
  assert splash.resolve("auto", 1000, "tpu") == "xla"  # not a multiple of the 128 tile
  assert splash.resolve("splash_interpret", 384) == "splash_interpret"
  assert splash.resolve("splash", 100) == "xla"
  assert splash.block_size(384) == 128 and splash.block_size(1024) == 512
  with pytest.raises(ValueError, match="attention_impl 'flash'"):
    splash.resolve("flash", 128)


@pytest.mark.parametrize("regions", [False, True])
def test_sharded_model_with_the_kernel_matches_xla(regions):
  """The tiny model on a (data 2, fsdp 2, tensor 2) mesh: the kernel runs per device under
  shard_map (kv heads split over tensor); hidden states and parameter gradients equal XLA's.
  With regions: CoMa's compression mask (split at layer 1, scanned layers), given to the kernel
  as a dynamic mask per row."""
  config = tiny_config(attention="causal", scan_layers=regions,
                       region_mask=compression_mask("code", 1) if regions else None)
  batch = dummy_batch(config, batch=4, length=LENGTH)
  segments = np.concatenate([_segments(3, LENGTH), np.zeros((1, LENGTH), np.int32)])
  segments[3, :128] = 1  # a half-padded row
  rng = np.random.default_rng(1)
  batch["segment_ids"] = segments
  batch["input_ids"] = np.where(batch["input_ids"] == config.image_token_id, config.image_token_id,
                                rng.integers(0, 500, size=(4, LENGTH))).astype(np.int32)
  batch["positions"] = np.broadcast_to(np.arange(LENGTH, dtype=np.int32), (4, 3, LENGTH)).copy()
  if regions:  # regions 0-3 in runs of 20 tokens, repeating: every table entry is exercised
    batch["attention_regions"] = np.broadcast_to(np.arange(LENGTH) // 20 % 4, (4, LENGTH)).astype(
        np.int32)
  boxed = VisionLanguageModel(config).init(jax.random.key(0), dummy_batch(config))
  params = nn.meta.unbox(boxed["params"])
  probe = jnp.asarray(rng.normal(size=(LENGTH, config.text.hidden_size)), jnp.float32)

  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("vocab", "tensor"), ("mlp", "tensor"),
           ("heads", "tensor"), ("kv_heads", "tensor"), ("act_heads", "tensor"))
  sharded = jax.device_put(params, nn.logical_to_mesh_sharding(
      nn.get_partition_spec(boxed)["params"], mesh, rules))
  sharded_batch = jax.device_put(batch, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))

  def run(impl):
    model = VisionLanguageModel(config.replace(attention_impl=impl))

    def loss(p):
      hidden = model.apply({"params": p}, sharded_batch)
      return (hidden * probe).sum(), hidden

    with nn.logical_axis_rules(rules), jax.set_mesh(mesh):
      (_, hidden), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(sharded)
    return np.asarray(hidden), jax.tree.map(np.asarray, grads)

  hidden, grads = run("xla")
  kernel_hidden, kernel_grads = run("splash_interpret")
  assert np.abs(kernel_hidden - hidden).max() <= 1e-5
  for (path, g), k in zip(jax.tree.leaves_with_path(grads), jax.tree.leaves(kernel_grads)):
    assert np.abs(k - g).max() <= 1e-5 * max(np.abs(g).max(), 1.0), jax.tree_util.keystr(path)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_vision_tower_with_the_kernel_matches_xla(family, tokenizer, image_dir):
  """Frames and windows as segment ids: two rows of odd-sized images (one row with two, partial
  windows), a patch buffer padded to a multiple of the tile; outputs and gradients equal XLA's."""
  rows = [{"text": "<image><image> two", "images": ["wide.png", "tall.png"]},
          {"text": "<image> one", "image": "small.png"}]
  encoded = [rows_lib.encode_row(row, tokenizer, ImageProcessingConfig(**TEST_PIXELS), 512,
                                 image_dir) for row in rows]
  length, patches, images = collate_lib.bucket_sizes(encoded)
  patches = -(-patches // 128) * 128
  batch = collate_lib.collate(encoded, 0, length, patches, images)
  assert (batch["patch_image_ids"] == 0).any()  # padding patches
  config = tiny_config(family)
  tower = VisionTower(config)
  params = tower.init(jax.random.key(0), batch["pixel_patches"], batch["patch_image_ids"],
                      batch["image_grid_thw"])
  # Merged tokens of padding patches are never placed into the text: their values (which the
  # XLA path by blocks and the kernel define differently) are left out of the comparison.
  real = batch["patch_image_ids"][:, ::4] > 0  # [batch, patches // 4]
  probe = jnp.asarray(np.random.default_rng(0).normal(size=(patches // 4, config.vision.out_hidden_size)),
                      jnp.float32) * real[..., None]

  def run(impl):
    model = VisionTower(config.replace(attention_impl=impl))
    def loss(p):
      out = model.apply(p, batch["pixel_patches"], batch["patch_image_ids"], batch["image_grid_thw"])
      return (out * probe).sum(), out
    grads, out = jax.jit(jax.grad(loss, has_aux=True))(params)
    return np.asarray(out), grads

  merged, grads = run("xla")
  kernel_merged, kernel_grads = run("splash_interpret")
  assert np.abs(kernel_merged - merged)[real].max() <= 1e-5
  for (path, g), k in zip(jax.tree.leaves_with_path(grads), jax.tree.leaves(kernel_grads)):
    g, k = np.asarray(g), np.asarray(k)
    assert np.abs(k - g).max() <= 1e-5 * max(np.abs(g).max(), 1.0), jax.tree_util.keystr(path)
