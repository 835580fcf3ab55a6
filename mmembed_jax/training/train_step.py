"""The train state and the jitted update step around a pluggable objective.

An objective is `fn(params, batch, rng) -> (loss, metrics)`: MoCa's reconstruction,
contrastive fine-tuning or CoMa plug in here without touching the loop.
"""
from typing import Any, Callable, Mapping, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax

from mmembed_jax.parallel.sharding import split_batch
from mmembed_jax.training import trainable as trainable_lib

Objective = Callable[[Any, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, dict]]


class TrainState(flax.struct.PyTreeNode):
  """Everything an update changes: step, fp32 master params, optimiser state, RNG key data."""
  step: jax.Array  # int32 []
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32 [2], raw key data so checkpoints need no typed keys


def create_state(params: Any, tx: optax.GradientTransformation, seed: int,
                 trainable: Optional[Any] = None) -> TrainState:
  """Initial state at step 0 (call inside jit with out_shardings to create it sharded); the
  optimiser state covers the `trainable` parameters only (training/trainable.py)."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(trainable_lib.select(params, trainable)),
                    rng=jax.random.key_data(jax.random.key(seed)))


def _micro_batches(batch: Mapping[str, Any], steps: int) -> dict:
  """Every leaf [batch, ...] -> [steps, batch // steps, ...], each data shard keeping its rows
  (and patch buffers their rows)."""
  return split_batch(batch, steps)


def make_update_fn(objective: Objective, tx: optax.GradientTransformation,
                   schedule: optax.Schedule, grad_accum_steps: int = 1,
                   trainable: Optional[Any] = None) -> Callable:
  """update(state, batch) -> (state, metrics); gradients of the `trainable` parameters only
  (all when None), averaged over `grad_accum_steps` micro-batches."""
  def trained_objective(trained, params, batch, rng):
    return objective(trainable_lib.combine(trained, params), batch, rng)
  grad_fn = jax.value_and_grad(trained_objective, has_aux=True)

  def update(state: TrainState, batch: Mapping[str, jax.Array]):
    rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
    trained = trainable_lib.select(state.params, trainable)
    if grad_accum_steps == 1:
      (loss, metrics), grads = grad_fn(trained, state.params, batch, step_rng)
    else:
      def accumulate(carry, inputs):
        micro, index = inputs
        (loss, metrics), grads = grad_fn(trained, state.params, micro,
                                         jax.random.fold_in(step_rng, index))
        return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None
      zero_metrics = jax.eval_shape(lambda: grad_fn(trained, state.params,
                                                    _first(batch, grad_accum_steps),
                                                    step_rng)[0][1])
      zeros = (jnp.zeros((), jnp.float32), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                                        zero_metrics),
               jax.tree.map(jnp.zeros_like, trained))
      total, _ = jax.lax.scan(accumulate, zeros, (_micro_batches(batch, grad_accum_steps),
                                                  jnp.arange(grad_accum_steps)))
      loss, metrics, grads = jax.tree.map(lambda x: x / grad_accum_steps, total)
    updates, opt_state = tx.update(grads, state.opt_state, trained)
    params = trainable_lib.combine(optax.apply_updates(trained, updates), state.params)
    metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads),
                   update_norm=optax.global_norm(updates), param_norm=optax.global_norm(params),
                   learning_rate=schedule(state.step))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              rng=jax.random.key_data(rng))
    return new_state, metrics

  return update


def _first(batch, steps):
  return jax.tree.map(lambda v: v[:v.shape[0] // steps], dict(batch))
