"""Masked attention's hand-written gradient equals autodiff through a plain softmax."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmembed_jax.models.layers import dot_product_attention


def _autodiff_reference(query, key, value, mask):
  """The textbook formula: repeat kv heads, jax.nn.softmax over masked scores."""
  groups = query.shape[2] // key.shape[2]
  key, value = jnp.repeat(key, groups, axis=2), jnp.repeat(value, groups, axis=2)
  scores = jnp.einsum("bqhd,bkhd->bhqk", query, key) / np.sqrt(query.shape[-1])
  scores = jnp.where(mask[:, None], scores, -1e30)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), value)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_values_and_gradients_match_autodiff(heads, kv_heads):
  rng = np.random.default_rng(heads)
  batch, q_len, kv_len, dim = 3, 9, 13, 8
  query = jnp.asarray(rng.normal(size=(batch, q_len, heads, dim)), jnp.float32)
  key = jnp.asarray(rng.normal(size=(batch, kv_len, kv_heads, dim)), jnp.float32)
  value = jnp.asarray(rng.normal(size=(batch, kv_len, kv_heads, dim)), jnp.float32)
  segments_q = rng.integers(1, 3, size=(batch, q_len))
  segments_k = rng.integers(1, 3, size=(batch, kv_len))
  segments_k[0, 5:] = 0  # padding keys
  segments_q[1, 4] = 7  # a query with no key to attend: its output is ignored below
  mask = jnp.asarray(segments_q[:, :, None] == segments_k[:, None, :])
  has_key = np.asarray(mask).any(-1)
  assert not has_key.all()
  weight = jnp.asarray(rng.normal(size=(batch, q_len, heads, dim)) * has_key[:, :, None, None],
                       jnp.float32)  # a loss that ignores rows with nothing to attend

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v) * weight)

  ours = lambda q, k, v: dot_product_attention(q, k, v, mask, jnp.float32)
  theirs = lambda q, k, v: _autodiff_reference(q, k, v, mask)
  np.testing.assert_allclose(np.asarray(ours(query, key, value)) * has_key[:, :, None, None],
                             np.asarray(theirs(query, key, value)) * has_key[:, :, None, None],
                             atol=1e-5)
  grads = jax.grad(lambda *x: loss(ours, *x), argnums=(0, 1, 2))(query, key, value)
  expected = jax.grad(lambda *x: loss(theirs, *x), argnums=(0, 1, 2))(query, key, value)
  for name, got, want in zip(("query", "key", "value"), grads, expected):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, err_msg=name)


def test_row_with_nothing_to_attend_sends_no_gradient():
  """A fully masked row averages every value (finite) but passes no gradient to keys/queries."""
  rng = np.random.default_rng(0)
  query, key, value = (jnp.asarray(rng.normal(size=(1, 2, 2, 4)), jnp.float32) for _ in range(3))
  mask = jnp.asarray([[[True, False], [False, False]]])
  out = dot_product_attention(query, key, value, mask, jnp.float32)
  assert np.isfinite(np.asarray(out)).all()
  d_query, d_key = jax.grad(
      lambda q, k: dot_product_attention(q, k, value, mask, jnp.float32)[:, 1].sum(),
      argnums=(0, 1))(query, key)
  assert not np.asarray(d_query).any() and not np.asarray(d_key).any()
