"""InfoNCE: the reference against hand-computed numbers, the sharded path against the reference.

Parity tolerance (fp32): rtol 1e-5, atol 1e-6, for the loss and for the gradients with respect
to query, positive, negative and the (learned) temperature.
"""
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mmembed_jax.objectives.contrastive import info_nce, sharded_info_nce
from mmembed_jax.parallel.mesh import make_mesh

RTOL, ATOL = 1e-5, 1e-6
BATCH, NUM_NEGATIVES, WIDTH = 16, 2, 8
MESH_SHAPES = ((8, 1, 1), (2, 2, 2))


def lse(*values):
  """log(sum(exp(values))) of plain Python numbers."""
  return math.log(sum(math.exp(v) for v in values))


# Tiny hand case, d=2: q0=(1,0) q1=(0,1); p0=(1,0) p1=(0.6,0.8)  ->  q.p = [[1, 0.6], [0, 0.8]].
TINY_QUERY = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
TINY_POSITIVE = np.array([[1.0, 0.0], [0.6, 0.8]], np.float32)
# One hard negative each: n0=(0,-1) n1=(-0.6,0.8)  ->  q.n = [[0, -0.6], [-1, 0.8]].
TINY_NEGATIVE = np.array([[[0.0, -1.0]], [[-0.6, 0.8]]], np.float32)


def test_reference_plain_matches_hand_formula():
  # tau = 0.5 doubles every logit.
  expected = 0.5 * ((lse(2.0, 1.2) - 2.0) + (lse(0.0, 1.6) - 1.6))
  loss = info_nce(TINY_QUERY, TINY_POSITIVE, temperature=0.5)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_reference_global_and_own_negatives_match_hand_formula():
  # global: each query also scores both negatives; own: only its own one.
  expected_global = 0.5 * ((lse(1.0, 0.6, 0.0, -0.6) - 1.0) + (lse(0.0, 0.8, -1.0, 0.8) - 0.8))
  expected_own = 0.5 * ((lse(1.0, 0.6, 0.0) - 1.0) + (lse(0.0, 0.8, 0.8) - 0.8))
  loss_global = info_nce(TINY_QUERY, TINY_POSITIVE, TINY_NEGATIVE, temperature=1.0,
                         negatives="global")
  loss_own = info_nce(TINY_QUERY, TINY_POSITIVE, TINY_NEGATIVE, temperature=1.0, negatives="own")
  np.testing.assert_allclose(loss_global, expected_global, rtol=1e-6)
  np.testing.assert_allclose(loss_own, expected_own, rtol=1e-6)
  assert abs(expected_global - expected_own) > 0.05


def test_reference_modality_mask_matches_hand_formula():
  # q = (1,0) (0,1) (.6,.8); p = (1,0) (.6,.8) (0,1)  ->  q.p rows [1,.6,0] [0,.8,1] [.6,1,.8].
  query = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], np.float32)
  positive = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], np.float32)
  modal = np.array([1, 2, 1])  # pair 1 is alone in its modality: only its own positive is left
  expected = ((lse(1.0, 0.0) - 1.0) + 0.0 + (lse(0.6, 0.8) - 0.8)) / 3
  unmasked = ((lse(1.0, 0.6, 0.0) - 1.0) + (lse(0.0, 0.8, 1.0) - 0.8)
              + (lse(0.6, 1.0, 0.8) - 0.8)) / 3
  np.testing.assert_allclose(info_nce(query, positive, temperature=1.0, positive_modal=modal),
                             expected, rtol=1e-6)
  np.testing.assert_allclose(info_nce(query, positive, temperature=1.0), unmasked, rtol=1e-6)


def test_reference_symmetric_matches_hand_formula():
  # positive -> query uses the transpose [[1, 0], [.6, .8]], label on the diagonal.
  forward = 0.5 * ((lse(1.0, 0.6) - 1.0) + (lse(0.0, 0.8) - 0.8))
  backward = 0.5 * ((lse(1.0, 0.0) - 1.0) + (lse(0.6, 0.8) - 0.8))
  loss = info_nce(TINY_QUERY, TINY_POSITIVE, temperature=1.0, symmetric=True)
  np.testing.assert_allclose(loss, 0.5 * (forward + backward), rtol=1e-6)


def test_reference_masks_remove_pairs_and_negatives():
  # A third, invalid pair whose positive (3,4) and negative (0,9) would dominate every row
  # changes nothing, and the count is 2; pair 1's masked negative is no candidate either.
  query = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], np.float32)
  positive = np.array([[1.0, 0.0], [0.6, 0.8], [3.0, 4.0]], np.float32)
  negative = np.array([[[0.0, -1.0]], [[-0.6, 0.8]], [[0.0, 9.0]]], np.float32)
  loss = info_nce(query, positive, negative, temperature=1.0,
                  negative_mask=np.array([[1], [0], [1]]), valid=np.array([1, 1, 0]))
  expected = 0.5 * ((lse(1.0, 0.6, 0.0) - 1.0) + (lse(0.0, 0.8, -1.0) - 0.8))
  np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_no_valid_pair_gives_zero_loss_and_finite_gradients():
  def all_losses(query, positive, negative, temperature):
    kwargs = dict(temperature=temperature, valid=np.zeros(2, bool), positive_modal=np.array([1, 2]))
    losses = [info_nce(query, positive, negative, symmetric=symmetric, **kwargs)
              for symmetric in (False, True)]
    losses += [sharded_info_nce(query, positive, negative, symmetric=symmetric, **kwargs)[0]
               for symmetric in (False, True)]
    return sum(losses), losses  # a NaN in any gradient would show in the sum's

  (_, losses), grads = jax.jit(jax.value_and_grad(all_losses, (0, 1, 2, 3), has_aux=True))(
      TINY_QUERY, TINY_POSITIVE, TINY_NEGATIVE, 0.1)
  assert [float(loss) for loss in losses] == [0.0] * 4
  assert all(np.isfinite(grad).all() for grad in grads)


def random_batch(seed=0):
  """Normalised embeddings (positives near their queries), modalities {1,2,3}, masks with zeros."""
  rng = np.random.default_rng(seed)

  def normalise(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

  query = normalise(rng.normal(size=(BATCH, WIDTH)))  # [batch, embed]
  positive = normalise(query + 0.8 * rng.normal(size=(BATCH, WIDTH)))  # [batch, embed]
  negative = normalise(rng.normal(size=(BATCH, NUM_NEGATIVES, WIDTH)))  # [batch, k, embed]
  modal = rng.integers(1, 4, size=BATCH)  # [batch]
  negative_mask = rng.random((BATCH, NUM_NEGATIVES)) > 0.3  # [batch, k]
  valid = np.ones(BATCH, bool)
  valid[[3, 10]] = False  # one padding pair on two different shards
  return dict(query=query, positive=positive, negative=negative, modal=modal,
              negative_mask=negative_mask, valid=valid)


def numpy_accuracy(batch, negatives, use_modal, use_negatives):
  """Share of valid queries whose best allowed candidate is their positive, in plain numpy."""
  query, positive, valid = batch["query"], batch["positive"], batch["valid"]
  same = batch["modal"][:, None] == batch["modal"][None, :] if use_modal else True
  allowed = (valid[:, None] & valid[None, :] & same) | np.eye(BATCH, dtype=bool)
  scores = [np.where(allowed, query @ positive.T, -np.inf)]
  if use_negatives:
    negative_ok = batch["negative_mask"] & valid[:, None]
    if negatives == "global":
      hard = query @ batch["negative"].reshape(-1, WIDTH).T
      scores.append(np.where(negative_ok.reshape(1, -1), hard, -np.inf))
    else:
      scores.append(np.where(negative_ok, np.einsum("nd,nkd->nk", query, batch["negative"]),
                             -np.inf))
  best = np.concatenate(scores, 1).argmax(1)  # [batch]; the temperature cannot change it
  return ((best == np.arange(BATCH)) & valid).sum() / valid.sum()


VARIANTS = [(negatives, use_modal, symmetric, True) for negatives, use_modal, symmetric
            in itertools.product(["global", "own"], [False, True], [False, True])]
VARIANTS.append(("global", True, True, False))  # no hard negatives at all
VARIANT_IDS = ["{}-{}-{}-{}".format(negatives, "modal" if use_modal else "nomodal",
                                    "symmetric" if symmetric else "oneway",
                                    "negatives" if use_negatives else "nonegatives")
               for negatives, use_modal, symmetric, use_negatives in VARIANTS]


def variant_call(batch, negatives, use_modal, symmetric, use_negatives):
  """(embedding arguments, keyword arguments) shared by both losses for one variant."""
  embeddings = (batch["query"], batch["positive"]) + ((batch["negative"],) if use_negatives else ())
  kwargs = dict(negatives=negatives, symmetric=symmetric, valid=batch["valid"],
                negative_mask=batch["negative_mask"] if use_negatives else None,
                positive_modal=batch["modal"] if use_modal else None)
  return embeddings, kwargs


def every_variant(loss_fn, batch, temperature):
  """{variant: ((loss, metrics), grads)}: all variants traced into one program, so one compile."""
  results = {}
  for variant in VARIANTS:
    embeddings, kwargs = variant_call(batch, *variant)

    def loss(*args, kwargs=kwargs):
      return loss_fn(*args[:-1], temperature=args[-1], **kwargs)

    argnums = tuple(range(len(embeddings) + 1))  # the embeddings and the temperature
    results[variant] = jax.value_and_grad(loss, argnums, has_aux=True)(*embeddings, temperature)
  return results


def reference_with_metrics(*args, **kwargs):
  """info_nce with an empty metrics dict, to be called like sharded_info_nce."""
  return info_nce(*args, **kwargs), {}


@pytest.fixture(scope="module")
def meshes():
  """{(data, fsdp, tensor): Mesh} over the 8 fake CPU devices."""
  return {shape: make_mesh(dict(zip(("data", "fsdp", "tensor"), shape))) for shape in MESH_SHAPES}


@pytest.fixture(scope="module")
def parity(meshes):
  """(batch, reference results, {mesh shape: sharded results}) with a learned temperature."""
  batch = random_batch()
  temperature = jnp.float32(0.05)  # an argument: differentiated like any parameter
  reference = jax.jit(functools.partial(every_variant, reference_with_metrics))(batch, temperature)
  sharded = {}
  for shape, mesh in meshes.items():
    with jax.set_mesh(mesh):
      placed = jax.device_put(batch, NamedSharding(mesh, P(("data", "fsdp"))))
      sharded[shape] = jax.jit(functools.partial(every_variant, sharded_info_nce))(
          placed, temperature)
  return batch, reference, sharded


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_sharded_matches_reference_in_value_and_gradients(parity, variant):
  batch, reference, sharded = parity
  (want_loss, _), want_grads = reference[variant]
  negatives, use_modal, _, use_negatives = variant
  want_accuracy = numpy_accuracy(batch, negatives, use_modal, use_negatives)
  names = ["query", "positive"] + (["negative"] if use_negatives else []) + ["temperature"]
  for shape, results in sharded.items():
    (loss, metrics), grads = results[variant]
    np.testing.assert_allclose(loss, want_loss, rtol=RTOL, atol=ATOL, err_msg=f"mesh {shape}")
    np.testing.assert_allclose(metrics["accuracy"], want_accuracy, rtol=RTOL,
                               err_msg=f"accuracy, mesh {shape}")
    for name, got, want in zip(names, grads, want_grads, strict=True):
      np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL,
                                 err_msg=f"d/d{name}, mesh {shape}")


def test_modality_mask_and_own_negatives_change_the_loss(parity):
  _, reference, _ = parity
  plain = reference[("global", False, False, True)][0][0]
  masked = reference[("global", True, False, True)][0][0]
  own = reference[("own", False, False, True)][0][0]
  assert abs(float(plain - masked)) > 1e-2, (plain, masked)
  assert abs(float(plain - own)) > 1e-2, (plain, own)


def test_sharded_runs_without_mesh_and_on_one_device(parity):
  batch, reference, _ = parity
  variant = ("global", True, True, True)
  (want, _), _ = reference[variant]
  args, kwargs = variant_call(batch, *variant)

  def loss_fn(*args):
    return sharded_info_nce(*args, temperature=0.05, **kwargs)[0]

  np.testing.assert_allclose(jax.jit(loss_fn)(*args), want, rtol=RTOL, atol=ATOL)  # no mesh set
  one_device = make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  with jax.set_mesh(one_device):
    np.testing.assert_allclose(jax.jit(loss_fn)(*args), want, rtol=RTOL, atol=ATOL)


def test_sharded_rejects_a_batch_the_shards_do_not_divide(meshes):
  query = np.ones((12, WIDTH), np.float32)
  with jax.set_mesh(meshes[(8, 1, 1)]), pytest.raises(ValueError, match="not divisible"):
    sharded_info_nce(query, query, temperature=0.05)


def temp_bytes(loss_fn, mesh, batch, num_negatives=2, width=64):
  """Per-device temp bytes of jit(value_and_grad(loss_fn)) compiled for batch-sharded inputs."""
  sharding = NamedSharding(mesh, P(("data", "fsdp")))
  args = [jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)
          for shape in ((batch, width), (batch, width), (batch, num_negatives, width))]
  args.append(jax.ShapeDtypeStruct((), jnp.float32))
  with jax.set_mesh(mesh):
    compiled = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3))).lower(*args).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_sharded_logits_scale_with_local_times_global_batch(meshes):
  mesh = meshes[(8, 1, 1)]
  replicated = NamedSharding(mesh, P())

  def sharded(query, positive, negative, temperature):
    return sharded_info_nce(query, positive, negative, temperature=temperature)[0]

  def naive(query, positive, negative, temperature):
    # Same sharded inputs, gathered whole onto every device: the [n, 3n] logits everywhere.
    query, positive, negative = (jax.lax.with_sharding_constraint(x, replicated)
                                 for x in (query, positive, negative))
    return info_nce(query, positive, negative, temperature=temperature)

  measured = {}
  for batch in (1024, 2048):
    measured[batch] = (temp_bytes(sharded, mesh, batch), temp_bytes(naive, mesh, batch))
    print(f"\nn={batch}: temp bytes per device, sharded {measured[batch][0]:,}, "
          f"naive {measured[batch][1]:,}")
  # Per device the sharded program must hold [n/8, 3n] logits, the naive one [n, 3n]: 8x more.
  for batch, (sharded_bytes, naive_bytes) in measured.items():
    local_logits = (batch // 8) * 3 * batch * 4  # [n/8, 3n] float32
    full_logits = batch * 3 * batch * 4  # [n, 3n] float32
    # Sharded scratch = a few local-logit buffers (logits, mask, softmax, its gradient), so
    # well under one full matrix (= 8 local ones); the naive program holds at least the full one.
    assert sharded_bytes < 6 * local_logits, (batch, sharded_bytes, local_logits)
    assert naive_bytes >= full_logits, (batch, naive_bytes, full_logits)
    assert naive_bytes >= 4 * sharded_bytes, (batch, naive_bytes, sharded_bytes)
  # Doubling n doubles both n_local and n_global, so the local logits grow 4x (not more).
  assert 2.0 <= measured[2048][0] / measured[1024][0] <= 4.5
