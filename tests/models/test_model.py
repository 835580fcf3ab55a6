"""Model behaviour beyond parity: packing, pooling, logical axes and sharding, bf16 compute."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding

from mmembed_jax.convert.hf_import import import_hf
from mmembed_jax.data import collate as collate_lib
from mmembed_jax.data import rows as rows_lib
from mmembed_jax.data.images import ImageProcessingConfig
from mmembed_jax.demo.tiny_model import tiny_config
from mmembed_jax.data.special_tokens import special_token_ids
from mmembed_jax.models import inputs
from mmembed_jax.models.embedder import dummy_batch, make_embed_fn
from mmembed_jax.models.pooling import pool
from mmembed_jax.models.vlm import VisionLanguageModel

from tiny_models import TEST_PIXELS

ROWS = [{"text": "two shapes <image> side by side", "image": "wide.png"},
        {"text": "a text only passage with several words"},
        {"text": "<image><image> compare", "images": ["small.png", "tall.png"]}]


@pytest.fixture(scope="module")
def encoded(tokenizer, image_dir):
  image_config = ImageProcessingConfig(**TEST_PIXELS)
  return [rows_lib.encode_row(row, tokenizer, image_config, 512, image_dir) for row in ROWS]


def _pack(encoded_rows, length, max_patches, max_images):
  """All rows packed into one batch row: segments 1..n, positions restarting per segment."""
  batch = collate_lib.collate(encoded_rows[:1], 0, length, max_patches, max_images)
  start, patch_start, image_slot = 0, 0, 0
  for segment, row in enumerate(encoded_rows, start=1):
    n, p = row.num_tokens, row.num_patches
    batch["input_ids"][0, start:start + n] = row.input_ids
    batch["segment_ids"][0, start:start + n] = segment
    batch["positions"][0, :, start:start + n] = row.positions
    batch["pixel_patches"][0, patch_start:patch_start + p] = row.patches
    sizes = np.prod(row.grid_thw, axis=-1)
    ids = np.repeat(np.arange(image_slot + 1, image_slot + row.num_images + 1), sizes)
    batch["patch_image_ids"][0, patch_start:patch_start + p] = ids
    batch["image_grid_thw"][0, image_slot:image_slot + row.num_images] = row.grid_thw
    start, patch_start, image_slot = start + n, patch_start + p, image_slot + row.num_images
  return batch, start


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_packed_segments_equal_separate_rows(attention, encoded, tiny_hf_dirs):
  config, params = import_hf(tiny_hf_dirs["qwen2_5_vl"], attention=attention)
  apply = jax.jit(lambda batch: VisionLanguageModel(config).apply({"params": params}, batch))
  length, patches, images = collate_lib.bucket_sizes(encoded)
  separate = np.asarray(apply(collate_lib.collate(encoded, 0, length, patches, images)))
  total_patches = sum(row.num_patches for row in encoded) + 8
  packed_batch, used = _pack(encoded, sum(row.num_tokens for row in encoded) + 7, total_patches,
                             sum(row.num_images for row in encoded))
  packed = np.asarray(apply(packed_batch))[0]
  expected = np.concatenate([separate[i, :row.num_tokens] for i, row in enumerate(encoded)])
  assert np.abs(packed[:used] - expected).max() <= 1e-5


def test_pooling_definitions():
  hidden = jnp.asarray(np.random.default_rng(0).standard_normal((3, 6, 4)), jnp.float32)
  segments = jnp.asarray([[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
  h = np.asarray(hidden)
  expected = {
      "mean": [h[0, :3].mean(0), h[1, 2:].mean(0), h[2].mean(0)],
      "last": [h[0, 2], h[1, 5], h[2, 5]],  # right padding, left padding, none
      "ctoken": [h[0, 1:3].mean(0), h[1, 4:].mean(0), h[2, 4:].mean(0)],  # the last 2 tokens
  }
  for method, vectors in expected.items():
    vectors = np.stack(vectors)
    vectors /= np.linalg.norm(vectors, axis=-1, keepdims=True)
    got = np.asarray(pool(hidden, segments, method, num_ctokens=2))
    np.testing.assert_allclose(got, vectors, atol=1e-6, err_msg=method)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-6)
  with pytest.raises(ValueError, match="num_ctokens"):
    pool(hidden, segments, "ctoken")
  with pytest.raises(ValueError, match="unknown pooling"):
    pool(hidden, segments, "max")


@pytest.mark.parametrize("scan", [False, True])
def test_every_parameter_has_logical_axes(scan):
  config = tiny_config(scan_layers=scan)
  boxed = jax.eval_shape(VisionLanguageModel(config).init, jax.random.key(0), dummy_batch(config))
  specs = nn.get_partition_spec(boxed)["params"]
  leaves = jax.tree.leaves_with_path(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  for path, leaf in leaves:
    assert isinstance(leaf, nn.Partitioned), f"{jax.tree_util.keystr(path)} has no logical axes"
    assert len(leaf.names) == leaf.value.ndim
    if scan and ("blocks" in str(path) or "layers" in str(path)) and "norm" not in str(path)[-12:]:
      assert "layers" in leaf.names or leaf.names[0] == "layers"
  assert specs["embed_tokens"]["embedding"] == jax.sharding.PartitionSpec("vocab", "embed")


def test_sharded_forward_matches_single_device(encoded, tokenizer):
  """Parameters sharded by logical rules over 8 devices (fsdp x tensor) give the same embeddings."""
  config = tiny_config(image_token_id=special_token_ids(tokenizer)["image_token_id"])
  model = VisionLanguageModel(config)
  length, patches, images = collate_lib.bucket_sizes(encoded)
  batch = collate_lib.collate(encoded + encoded[:1], 0, length, patches, images)  # 4 rows
  boxed = model.init(jax.random.key(1), dummy_batch(config))
  params = nn.meta.unbox(boxed["params"])
  expected = np.asarray(make_embed_fn(config, "mean")(params, batch))

  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("vocab", "tensor"), ("mlp", "tensor"),
           ("heads", "tensor"), ("kv_heads", "tensor"), ("act_mlp", "tensor"))
  specs = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed)["params"], mesh, rules)
  sharded = jax.device_put(params, specs)
  assert sharded["embed_tokens"]["embedding"].sharding.spec == jax.sharding.PartitionSpec(
      "tensor", "fsdp")
  batch_sharding = NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  sharded_batch = jax.device_put(batch, batch_sharding)
  embed = make_embed_fn(config, "mean")
  with nn.logical_axis_rules(rules), jax.set_mesh(mesh):
    got = np.asarray(embed(sharded, sharded_batch))
  assert np.abs(got - expected).max() <= 1e-5


def test_bfloat16_compute_tracks_float32(encoded, tiny_hf_dirs):
  """bf16 compute over fp32 params: embeddings stay within bf16 rounding of the fp32 ones."""
  length, patches, images = collate_lib.bucket_sizes(encoded)
  batch = collate_lib.collate(encoded, 0, length, patches, images)
  out = {}
  for dtype in ("float32", "bfloat16"):
    config, params = import_hf(tiny_hf_dirs["qwen2_5_vl"], attention="bidirectional", dtype=dtype)
    out[dtype] = np.asarray(make_embed_fn(config, "mean")(params, batch))
  cosine = np.sum(out["float32"] * out["bfloat16"], axis=-1)
  assert cosine.min() > 0.999, cosine
  assert np.abs(out["float32"] - out["bfloat16"]).max() > 0  # bf16 really ran


def test_check_batch_names_the_bad_tensor():
  batch = dummy_batch(tiny_config(), batch=2)
  inputs.check_batch(batch)
  bad = dict(batch, positions=batch["positions"][:, :2])
  with pytest.raises(ValueError, match="'positions' has shape"):
    inputs.check_batch(bad)
  with pytest.raises(ValueError, match="missing tensor 'segment_ids'"):
    inputs.check_batch({k: v for k, v in batch.items() if k != "segment_ids"})
