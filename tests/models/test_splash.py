"""The splash attention kernel, run by the Pallas interpreter on CPU, against the XLA path: the
attention function alone (values and gradients, causal and bidirectional, packed segments,
padding, grouped-query heads) and the whole model sharded over 8 devices (shard_map path)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from mmembed_jax.demo.tiny_model import tiny_config
from mmembed_jax.models import splash
from mmembed_jax.models.embedder import dummy_batch
from mmembed_jax.models.layers import dot_product_attention
from mmembed_jax.models.llm import attention_mask
from mmembed_jax.models.vlm import VisionLanguageModel

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


def test_sharded_model_with_the_kernel_matches_xla():
  """The tiny model on a (data 2, fsdp 2, tensor 2) mesh: the kernel runs per device under
  shard_map (kv heads split over tensor); hidden states and parameter gradients equal XLA's."""
  config = tiny_config(attention="causal")
  batch = dummy_batch(config, batch=4, length=LENGTH)
  segments = np.concatenate([_segments(3, LENGTH), np.zeros((1, LENGTH), np.int32)])
  segments[3, :128] = 1  # a half-padded row
  rng = np.random.default_rng(1)
  batch["segment_ids"] = segments
  batch["input_ids"] = np.where(batch["input_ids"] == config.image_token_id, config.image_token_id,
                                rng.integers(0, 500, size=(4, LENGTH))).astype(np.int32)
  batch["positions"] = np.broadcast_to(np.arange(LENGTH, dtype=np.int32), (4, 3, LENGTH)).copy()
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
    loss = lambda p: (model.apply({"params": p}, sharded_batch) * probe).sum()  # pylint: disable=unnecessary-lambda-assignment
    with nn.logical_axis_rules(rules), jax.set_mesh(mesh):
      hidden = jax.jit(lambda p: model.apply({"params": p}, sharded_batch))(sharded)
      grads = jax.jit(jax.grad(loss))(sharded)
    return np.asarray(hidden), jax.tree.map(np.asarray, grads)

  hidden, grads = run("xla")
  kernel_hidden, kernel_grads = run("splash_interpret")
  assert np.abs(kernel_hidden - hidden).max() <= 1e-5
  for (path, g), k in zip(jax.tree.leaves_with_path(grads), jax.tree.leaves(kernel_grads)):
    assert np.abs(k - g).max() <= 1e-5 * max(np.abs(g).max(), 1.0), jax.tree_util.keystr(path)
