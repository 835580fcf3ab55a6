"""The contrastive objective on a tiny model, 8 devices: GradCache equals one pass; the loss is
InfoNCE of the model's pooled embeddings; a learned temperature gets its gradient."""
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from mmembed_jax.data import collate as collate_lib
from mmembed_jax.data import mrope
from mmembed_jax.data.rows import EncodedRow
from mmembed_jax.demo.tiny_model import tiny_config
from mmembed_jax.models.embedder import boxed_param_shapes, init_params, make_embed_fn
from mmembed_jax.objectives.contrastive import info_nce
from mmembed_jax.objectives.contrastive_objective import LOGIT_SCALE, Contrastive
from mmembed_jax.parallel import sharding as sharding_lib
from mmembed_jax.parallel.mesh import make_mesh
from mmembed_jax.training import hlo_collectives

PAIRS, NEGATIVES = 16, 2
IMAGE_TOKEN = 500


def _row(rng, with_image: bool) -> EncodedRow:
  """Random text (3-20 tokens), optionally after one 1x4x6-patch image (6 merged tokens)."""
  text = rng.integers(10, 400, size=int(rng.integers(3, 21))).astype(np.int32)
  grid = np.array([[1, 4, 6]], np.int32) if with_image else np.zeros((0, 3), np.int32)
  image_tokens = np.full(int(grid.prod(axis=-1).sum()) // 4, IMAGE_TOKEN, np.int32)
  ids = np.concatenate([image_tokens, text])
  patches = rng.normal(size=(int(grid.prod(axis=-1).sum()), 1176)).astype(np.float32)
  return EncodedRow(ids, patches, grid, mrope.mrope_positions(ids, grid, IMAGE_TOKEN, 2))


def _side(rows):
  """Collated sequences of a list of rows (fixed shapes: 32 tokens, 24 patches, 1 image)."""
  return collate_lib.collate(rows, 0, 32, 24, 1)


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  config = tiny_config(attention="bidirectional", image_token_id=IMAGE_TOKEN)
  params = init_params(config, jax.random.key(0))
  negatives = _side([_row(rng, rng.random() < 0.5) for _ in range(PAIRS * NEGATIVES)])
  batch = {
      "query": _side([_row(rng, i % 3 == 0) for i in range(PAIRS)]),
      "positive": _side([_row(rng, i % 2 == 0) for i in range(PAIRS)]),
      "negative": {k: v.reshape((PAIRS, NEGATIVES) + v.shape[1:]) for k, v in negatives.items()},
      "negative_mask": (rng.random((PAIRS, NEGATIVES)) < 0.8).astype(np.int32),
      "valid": np.array([1] * (PAIRS - 1) + [0], np.int32),
      "target_modal": np.array([2 if i % 2 == 0 else 1 for i in range(PAIRS)], np.int32),
  }
  return config, params, batch


def _grads(objective, params, batch, mesh):
  """(loss, metrics, grads) of the objective under jit on `mesh`, batch sharded over data x fsdp."""
  sharded = jax.device_put(batch, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
  with jax.set_mesh(mesh):
    fn = jax.jit(jax.value_and_grad(objective, has_aux=True))
    (loss, metrics), grads = fn(params, sharded, jax.random.key(0))
  return float(loss), jax.device_get(metrics), jax.device_get(grads)


def _max_relative_difference(a, b):
  """Largest |a - b| / (max |b| + tiny) over the leaves of two trees."""
  return max(float(np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-12))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _compiled_grads(objective, params, batch, mesh, shardings):
  """(loss, grads, optimised HLO text) of the objective's value and gradient compiled on `mesh`,
  the parameters placed by `shardings`, the batch sharded over data x fsdp."""
  params = jax.device_put(params, shardings)
  inputs = jax.device_put(batch, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
  with jax.set_mesh(mesh):
    step = jax.jit(jax.value_and_grad(objective, has_aux=True), out_shardings=(None, shardings))
    compiled = step.lower(params, inputs, jax.random.key(0)).compile()
    (loss, _), grads = compiled(params, inputs, jax.random.key(0))
  return float(loss), jax.device_get(grads), compiled.as_text()


def test_grad_cache_equals_one_pass_and_can_gather_the_weights_once(setup):
  """On a (2,2,2) mesh with the parameters sharded by the default rules, chunks of 2 rows per
  device (2 chunks of the 16 queries, 6 of the 48 targets) give the loss and gradients of one
  pass over the batch (fp32: rtol 1e-5 of each leaf's largest gradient), with the weights
  gathered in every chunk or once per step; once all-gathers fewer bytes."""
  config, params, batch = setup
  mesh = make_mesh(dict(data=2, fsdp=2, tensor=2))
  shardings = sharding_lib.logical_shardings(boxed_param_shapes(config), mesh,
                                             sharding_lib.DEFAULT_RULES)
  loss, grads, _ = _compiled_grads(Contrastive(config, pooling="mean", temperature=0.05), params,
                                   batch, mesh, shardings)
  assert max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads)) > 0
  gathered = {}
  for once in (False, True):
    cached = Contrastive(config, pooling="mean", temperature=0.05, grad_cache_chunk=2,
                         gather_weights_once=once)
    cached_loss, cached_grads, hlo = _compiled_grads(cached, params, batch, mesh, shardings)
    assert abs(cached_loss - loss) <= 1e-5 * abs(loss), once
    assert _max_relative_difference(cached_grads, grads) <= 1e-5, once
    gathered[once] = hlo_collectives.collective_bytes(hlo).get("all-gather", 0)
  assert 0 < gathered[True] < 0.5 * gathered[False], gathered


def test_loss_is_info_nce_of_pooled_embeddings(setup):
  """The objective's loss (learned temperature, modality mask, global negatives, one invalid
  pair) equals `info_nce` of embeddings from the plain embed function; logit_scale starts at
  log(1/tau) and gets a gradient."""
  config, params, batch = setup
  objective = Contrastive(config, pooling="last", temperature=0.05, learn_temperature=True,
                          negatives="global", modality_mask=True)
  assert list(objective.extra_param_shapes()) == [LOGIT_SCALE]
  assert Contrastive(config).extra_param_shapes() == {}
  params = dict(params, **objective.init_extra(jax.random.key(0), params))
  np.testing.assert_allclose(params[LOGIT_SCALE], np.log(20.0), rtol=1e-6)
  loss, metrics, grads = _grads(objective, params, batch, make_mesh(dict(data=4, fsdp=2, tensor=1)))
  embed = make_embed_fn(config, "last")
  flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch["negative"].items()}
  expected = info_nce(embed(params, batch["query"]), embed(params, batch["positive"]),
                      embed(params, flat).reshape(PAIRS, NEGATIVES, -1), temperature=0.05,
                      negatives="global", positive_modal=batch["target_modal"],
                      negative_mask=batch["negative_mask"], valid=batch["valid"])
  np.testing.assert_allclose(loss, float(expected), rtol=1e-5)
  np.testing.assert_allclose(metrics["temperature"], 0.05, rtol=1e-6)
  assert metrics["valid_pairs"] == PAIRS - 1
  assert abs(float(grads[LOGIT_SCALE])) > 0


def test_bad_chunk_is_named(setup):
  """A chunk size that does not divide the rows per device is one clear error."""
  config, params, batch = setup
  with pytest.raises(ValueError, match="grad_cache_chunk=3"):
    _grads(Contrastive(config, grad_cache_chunk=3), params, batch,
           make_mesh(dict(data=2, fsdp=1, tensor=4)))


def _empty(side, rows):
  """`side` with the given rows (leading index tuples) made all padding, as the pipeline makes
  an absent sequence: pad id 0, segment 0, no patch, no image."""
  side = {k: np.array(v) for k, v in side.items()}
  for row in rows:
    for value in side.values():
      value[row] = 0
  return side


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_masked_slots_give_finite_gradients_and_contribute_nothing(setup, pooling):
  """A bad pair (valid 0: its query, positive and negatives all padding), missing hard negatives
  (negative_mask 0, all padding) and a padding query: the gradient is finite, and filling those
  slots with real sequences instead changes neither the loss nor any gradient (rtol 1e-6).
  Before the fix, mean pooling gave the padding slots a zero vector whose L2 normalisation had a
  NaN gradient."""
  config, params, batch = setup
  mask = np.array(batch["negative_mask"])
  mask[3] = [1, 0]  # one of K present
  mask[5] = [0, 0]  # none
  invalid = PAIRS - 1
  masked_negatives = [(3, 1), (5, 0), (5, 1)] + [(invalid, k) for k in range(NEGATIVES)]
  masked_negatives += [tuple(i) for i in np.argwhere(mask == 0)]
  padded = dict(batch, negative_mask=mask,
                query=_empty(batch["query"], [invalid]),
                positive=_empty(batch["positive"], [invalid]),
                negative=_empty(batch["negative"], masked_negatives))
  objective = Contrastive(config, pooling=pooling, temperature=0.05, negatives="global")
  mesh = make_mesh(dict(data=2, fsdp=2, tensor=2))
  loss, _, grads = _grads(objective, params, padded, mesh)
  assert np.isfinite(loss)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  real_loss, _, real_grads = _grads(objective, params, dict(batch, negative_mask=mask), mesh)
  np.testing.assert_allclose(real_loss, loss, rtol=1e-6)
  assert _max_relative_difference(real_grads, grads) <= 1e-6


def test_l2_normalize_of_a_zero_vector_has_a_zero_gradient():
  """Every pooling of an all-padding sequence (zero pooled vector for mean and ctoken) has a
  finite (zero) gradient through the normalisation."""
  import jax.numpy as jnp
  from mmembed_jax.models.pooling import pool
  hidden = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 8)), jnp.float32)
  segment_ids = jnp.asarray([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], jnp.int32)
  for method in ("mean", "last", "ctoken"):
    grad = jax.grad(lambda h: jnp.sum(pool(h, segment_ids, method, 2) * 3.0))(hidden)
    assert np.all(np.isfinite(grad)), method
    if method != "last":
      np.testing.assert_array_equal(grad[1], 0.0)
