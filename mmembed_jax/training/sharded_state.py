"""The train state's shapes and shardings for a config: what the trainer creates and restores,
and what launch/aot_compile.py compiles against, without allocating anything."""
import contextlib
import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmembed_jax.models import adapters
from mmembed_jax.models.config import ModelConfig
from mmembed_jax.models.embedder import boxed_param_shapes
from mmembed_jax.objectives.base import Objective
from mmembed_jax.parallel import sharding as sharding_lib
from mmembed_jax.training import trainable
from mmembed_jax.training.optimizer import make_optimizer
from mmembed_jax.training.train_step import TrainState, create_state


@dataclasses.dataclass
class StateLayout:
  """Abstract state (ShapeDtypeStructs carrying shardings), its shardings and the optimiser."""
  abstract_state: TrainState
  state_shardings: TrainState
  param_shardings: Any
  tx: Any
  schedule: Callable
  mesh: Mesh
  rules: sharding_lib.Rules
  trainable: Any  # bools shaped like the params, True where one trains; None: all train

  def context(self) -> contextlib.ExitStack:
    """Mesh and logical rules for tracing (activation sharding constraints resolve in it)."""
    stack = contextlib.ExitStack()
    stack.enter_context(nn.logical_axis_rules(self.rules))
    stack.enter_context(jax.set_mesh(self.mesh))
    return stack

  def jit_step(self, update: Callable, batch: Any) -> Callable:
    """update(state, batch) jitted with explicit shardings: the state as laid out (donated),
    every leaf of a batch shaped like `batch` split along its leading axis over data x fsdp."""
    batch_shardings = jax.tree.map(lambda _: sharding_lib.batch_sharding(self.mesh), batch)
    return jax.jit(update, in_shardings=(self.state_shardings, batch_shardings),
                   out_shardings=(self.state_shardings, None), donate_argnums=(0,))


def abstract_params(model_config: ModelConfig, objective: Objective, mesh: Mesh,
                    rules: sharding_lib.Rules) -> tuple[Any, Any]:
  """(parameters as ShapeDtypeStructs, their shardings): the model's (with its adapters) and the
  objective's own, from their logical axis names and `rules`."""
  boxed = dict(boxed_param_shapes(model_config), **objective.extra_param_shapes())
  shardings = sharding_lib.logical_shardings(boxed, mesh, rules)
  return nn.meta.unbox(boxed), shardings


def state_layout(config: ml_collections.ConfigDict, model_config: ModelConfig, objective: Objective,
                 mesh: Mesh, rules: sharding_lib.Rules) -> StateLayout:
  """Shapes from eval_shape, shardings from the parameters' logical axis names and `rules`;
  raises when too much of the model would be replicated (config.sharding), or when adapters
  target no layer. The optimiser state covers the trainable parameters only."""
  params, param_shardings = abstract_params(model_config, objective, mesh, rules)
  sharding_lib.check_replicated(params, param_shardings, mesh,
                                config.sharding.max_replicated_share,
                                config.sharding.min_replicated_size)
  spec = model_config.adapter
  if spec is not None and not adapters.has_adapters(params):
    raise ValueError(f"adapters.targets={spec.targets!r} matches no linear layer of the model "
                     f"(module paths look like 'language_model/layers_0/self_attn/q_proj', "
                     f"'visual/blocks_0/mlp/down_proj')")
  mask = trainable.trainable_mask(params, config.optimizer.freeze, spec is not None,
                                  config.adapters.trainable_extra,
                                  tuple(objective.extra_param_shapes()))
  trained = trainable.select(params, mask)
  tx, schedule = make_optimizer(config.optimizer, config.total_steps, trained)
  abstract_opt_state = jax.eval_shape(tx.init, trained)
  replicated = NamedSharding(mesh, PartitionSpec())
  state_shardings = TrainState(
      step=replicated, params=param_shardings, rng=replicated,
      opt_state=sharding_lib.optimizer_state_shardings(abstract_opt_state, params,
                                                       param_shardings, mesh))
  abstract_state = jax.tree.map(
      lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
      jax.eval_shape(lambda p: create_state(p, tx, config.seed, mask), params), state_shardings)
  return StateLayout(abstract_state, state_shardings, param_shardings, tx, schedule, mesh, rules,
                     mask)
