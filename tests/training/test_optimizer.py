"""The optimizer and update step: schedule, decay mask, freezing, accumulation, replication."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from engine_runs import flat, relative_error
from mmembed_jax.models.embedder import dummy_batch
from mmembed_jax.models.vlm import VisionLanguageModel
from mmembed_jax.parallel import sharding as sharding_lib
from mmembed_jax.parallel.mesh import make_mesh
from mmembed_jax.training import lineage, registry
from mmembed_jax.training import run as run_lib
from mmembed_jax.training.config import default_config, validate
from mmembed_jax.training.optimizer import (learning_rate_schedule, make_optimizer,
                                            weight_decay_mask)
from mmembed_jax.training.train_step import create_state, make_update_fn
from mmembed_jax.training.trainable import select, trainable_mask
from mmembed_jax.training.trainer import train


def _optimizer(**fields):
  opt = default_config().optimizer
  opt.update(fields)
  return opt


@pytest.fixture(scope="module")
def model_config():
  """The demo recipe's tiny Qwen2.5-VL."""
  return run_lib.model_config(default_config(), lineage.Resolved())


@pytest.fixture(scope="module")
def boxed_params(model_config):
  """Abstract parameters with their logical axes (eval_shape: nothing is compiled)."""
  return jax.eval_shape(VisionLanguageModel(model_config).init, jax.random.key(0),
                        dummy_batch(model_config))["params"]


@pytest.fixture(scope="module")
def params(boxed_params):
  """Random values for every parameter of the model (0.02 x normal, like the initialiser)."""
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape), s.dtype),
                      nn.meta.unbox(boxed_params))


@pytest.mark.parametrize("decay, at_40, at_55", [("linear", 0.7, 0.55), ("cosine", 0.775, 0.55)])
def test_schedule_warms_up_linearly_then_decays_to_the_end_value(decay, at_40, at_55):
  # 100 steps, warm-up 10; decay over 90 steps from 1 to 0.1.
  schedule = learning_rate_schedule(_optimizer(lr=1.0, warmup_ratio=0.1, decay=decay,
                                               end_lr_ratio=0.1), 100)
  expected = {0: 0.0, 5: 0.5, 10: 1.0, 40: at_40, 55: at_55, 100: 0.1}
  for step, value in expected.items():
    assert float(schedule(step)) == pytest.approx(value, abs=1e-6), step


def test_constant_schedule_without_warmup_is_the_learning_rate_and_unknown_decay_is_refused():
  schedule = learning_rate_schedule(_optimizer(lr=3e-4, warmup_ratio=0.0, decay="constant"), 50)
  assert [float(schedule(s)) for s in (0, 25, 50)] == pytest.approx([3e-4] * 3)
  with pytest.raises(ValueError, match="optimizer.decay must be linear, cosine or constant"):
    learning_rate_schedule(_optimizer(decay="exponential"), 50)


def test_weight_decay_skips_norm_scales_and_biases(params):
  mask = flat(weight_decay_mask(params))
  no_decay = sorted(name for name, decays in mask.items() if not decays)
  assert no_decay == sorted(n for n in mask if n.rsplit("/", 1)[-1] in ("scale", "bias"))
  assert len(no_decay) > 20 and mask["embed_tokens/embedding"] and mask["lm_head"]
  # One AdamW step with zero gradients: only weight decay moves parameters, and only decayed ones.
  lr, weight_decay = 0.1, 0.5
  small = {"mlp": {"kernel": jnp.full((3, 2), 2.0), "bias": jnp.ones(2)},
           "norm": {"scale": jnp.ones(3)}, "embed_tokens": {"embedding": jnp.full((4, 3), -1.0)}}
  tx, _ = make_optimizer(_optimizer(lr=lr, weight_decay=weight_decay, warmup_ratio=0.0,
                                    decay="constant"), 10, small)
  zeros = jax.tree.map(jnp.zeros_like, small)
  updates = flat(tx.update(zeros, tx.init(small), small)[0])
  np.testing.assert_allclose(updates["mlp/kernel"], np.full((3, 2), -lr * weight_decay * 2.0))
  np.testing.assert_allclose(updates["embed_tokens/embedding"], np.full((4, 3), lr * weight_decay))
  assert not np.any(updates["mlp/bias"]) and not np.any(updates["norm/scale"])


def _sum_of_sines(params, batch, rng):  # pylint: disable=unused-argument
  """A loss whose gradient (cos) is non-zero for every parameter value."""
  loss = sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(params))
  return loss, {}


def test_frozen_parameters_stay_bit_identical_while_the_others_train(params):
  opt = _optimizer(lr=1e-2, warmup_ratio=0.0, decay="constant")
  mask = trainable_mask(params, freeze=r"^visual/|^embed_tokens/")
  tx, schedule = make_optimizer(opt, 10, select(params, mask))
  update = jax.jit(make_update_fn(_sum_of_sines, tx, schedule, trainable=mask))
  state = create_state(params, tx, seed=0, trainable=mask)
  for _ in range(2):
    state, _ = update(state, {})
  before, after = flat(params), flat(state.params)
  frozen = sorted(n for n in before if n.startswith(("visual/", "embed_tokens/")))
  assert len(frozen) > 30 and "embed_tokens/embedding" in frozen
  for name in before:
    if name in frozen:
      assert np.array_equal(after[name], before[name]), name
    else:
      assert np.all(np.asarray(after[name]) != np.asarray(before[name])), name
  # The optimiser state holds the trainable parameters only.
  state_names = [name for name, leaf in flat(state.opt_state).items() if np.ndim(leaf)]
  assert len(state_names) == 2 * (len(before) - len(frozen))  # Adam's mu and nu
  assert not any(name.endswith("/" + f) for name in state_names for f in frozen)
  with pytest.raises(ValueError, match="freezes every parameter"):
    trainable_mask(params, freeze=".")


def _gradient_keeper() -> optax.GradientTransformation:
  """An 'optimizer' that leaves the parameters alone and keeps the last gradients as its state."""
  return optax.GradientTransformation(
      init=lambda params: jax.tree.map(jnp.zeros_like, params),
      update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def test_two_micro_batches_give_the_gradient_of_the_whole_batch(model_config, params):
  # The masked-LM loss averages over each micro-batch's own masked tokens (and draws another
  # mask per micro-batch), so its mean over micro-batches is not the whole batch's loss. This
  # loss is: per-token mean squared hidden state of real tokens over a fixed rows x length.
  model = VisionLanguageModel(model_config)

  def hidden_energy(params, batch, rng):  # pylint: disable=unused-argument
    hidden = model.apply({"params": params}, batch)
    real = (batch["segment_ids"] > 0).astype(jnp.float32)
    loss = jnp.sum(jnp.mean(jnp.square(hidden), axis=-1) * real) / real.size
    return loss, {"energy": loss}

  batch = next(iter(registry.build_input_spec(default_config()).dataset(model_config, 0, "")))
  assert batch["input_ids"].shape[0] == 16
  results = {}
  for steps in (1, 2):
    update = jax.jit(make_update_fn(hidden_energy, _gradient_keeper(), optax.constant_schedule(0.0),
                                    grad_accum_steps=steps))
    state, metrics = update(create_state(params, _gradient_keeper(), seed=0), batch)
    results[steps] = (flat(state.opt_state), metrics)
  (whole, whole_metrics), (accumulated, accumulated_metrics) = results[1], results[2]
  assert float(accumulated_metrics["loss"]) == pytest.approx(float(whole_metrics["loss"]), rel=1e-6)
  assert float(accumulated_metrics["grad_norm"]) == pytest.approx(float(whole_metrics["grad_norm"]),
                                                                  rel=1e-5)
  trained = [n for n in whole if np.any(np.asarray(whole[n]) != 0)]
  assert len(trained) > 30  # the language model's parameters all get gradients
  worst = max((relative_error(accumulated[n], whole[n]), n) for n in trained)
  assert worst[0] <= 1e-5, worst
  print(f"largest relative gradient difference, 2 micro-batches vs whole batch: {worst}")
  assert all(np.array_equal(accumulated[n], whole[n]) for n in whole if n not in trained)


def _shardings(boxed_params, mesh, rules):
  return sharding_lib.logical_shardings(boxed_params, mesh, rules)


def test_replicated_parameter_check_refuses_rules_that_shard_nothing(boxed_params):
  abstract = nn.meta.unbox(boxed_params)
  fsdp_mesh = make_mesh(dict(data=2, fsdp=4, tensor=1))
  with pytest.raises(ValueError, match=r"100\.0% of parameter values are replicated"):
    sharding_lib.check_replicated(abstract, _shardings(boxed_params, fsdp_mesh, []), fsdp_mesh,
                                  max_share=0.1, min_size=0)
  # The default rules shard most values; pure data parallelism replicates by design.
  shardings = _shardings(boxed_params, fsdp_mesh, sharding_lib.DEFAULT_RULES)
  share, _ = sharding_lib.replicated_report(abstract, shardings)
  assert share < 0.1
  sharding_lib.check_replicated(abstract, shardings, fsdp_mesh, max_share=0.1)
  data_mesh = make_mesh(dict(data=8, fsdp=1, tensor=1))
  assert sharding_lib.check_replicated(abstract, _shardings(boxed_params, data_mesh, []),
                                       data_mesh, max_share=0.1) == []


def test_trainer_refuses_replicating_rules_before_compiling(tmp_path):
  config = default_config()
  config.mesh.ici = dict(data=2, fsdp=4, tensor=1)
  config.sharding.rules = []
  config.sharding.max_replicated_share = 0.1
  with pytest.raises(ValueError, match="add logical axis rules that shard them"):
    train(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


def test_lr_multipliers_scale_their_groups_learning_rate(params):
  """A group at 10x the learning rate moves 10x as far on the first Adam step (whose update is
  lr * sign(g) up to eps), the other parameters as with no multipliers; bad entries are one
  config error line."""
  grads = jax.tree.map(jnp.ones_like, params)
  plain = _optimizer(lr=1e-3, warmup_ratio=0.0, decay="constant", weight_decay=0.0)
  scaled = _optimizer(lr=1e-3, warmup_ratio=0.0, decay="constant", weight_decay=0.0,
                      lr_multipliers=[[r"^visual/", 10.0]])
  updates = {}
  for name, opt in (("plain", plain), ("scaled", scaled)):
    tx, _ = make_optimizer(opt, 10, params)
    updates[name] = flat(tx.update(grads, tx.init(params), params)[0])
  for key, value in updates["plain"].items():
    factor = 10.0 if key.startswith("visual/") else 1.0
    np.testing.assert_allclose(updates["scaled"][key], factor * value, rtol=1e-6, err_msg=key)
  config = default_config()
  config.optimizer.lr_multipliers = [["(", 2.0]]
  with pytest.raises(ValueError, match=r"lr_multipliers entry .*expected \[regex, factor >= 0\]"):
    validate(config, jax.devices())


def test_with_adapters_only_adapters_extras_and_objective_parameters_train():
  params = {"embed_tokens": {"embedding": jnp.ones((4, 3))},
            "language_model": {"layers_0": {"q_proj": {"kernel": jnp.ones((3, 3)),
                                                       "lora_a": jnp.ones((3, 2)),
                                                       "lora_b": jnp.zeros((2, 3))},
                                            "norm": {"scale": jnp.ones(3)}}},
            "mae_decoder": {"head": {"kernel": jnp.ones((3, 5))}}}
  mask = flat(trainable_mask(params, adapters=True, trainable_extra=r"^embed_tokens/",
                             objective_keys=("mae_decoder",)))
  assert sorted(name for name, trains in mask.items() if trains) == [
      "embed_tokens/embedding", "language_model/layers_0/q_proj/lora_a",
      "language_model/layers_0/q_proj/lora_b", "mae_decoder/head/kernel"]
  frozen = flat(trainable_mask(params, freeze=r"lora_b", adapters=True))
  assert [name for name, trains in frozen.items() if trains] == [
      "language_model/layers_0/q_proj/lora_a"]
  assert trainable_mask(params) is None  # no adapters, no freeze: everything trains


def test_micro_batches_keep_each_patch_buffer_with_the_rows_it_serves():
  rows, buffers, steps = 12, 3, 3  # 4 rows per buffer; each step takes one buffer
  row_buffer = np.repeat(np.arange(buffers), rows // buffers)  # [rows]
  batch = {"input_ids": np.tile(row_buffer[:, None], (1, 5)),  # [rows, length]: a row's buffer
           "positions": np.tile(row_buffer[:, None, None], (1, 3, 5)),
           "pixel_patches": np.tile(np.arange(buffers)[:, None, None], (1, 8, 2)),  # [buffers, ...]
           "image_grid_thw": np.tile(np.arange(buffers)[:, None, None], (1, 2, 3))}
  micro = sharding_lib.split_batch(batch, steps)
  assert micro["input_ids"].shape == (steps, rows // steps, 5)
  assert micro["pixel_patches"].shape == (steps, buffers // steps, 8, 2)
  for s in range(steps):
    served = np.repeat(micro["pixel_patches"][s, :, 0, 0], rows // buffers)
    np.testing.assert_array_equal(micro["input_ids"][s, :, 0], served)
    np.testing.assert_array_equal(micro["positions"][s, :, 0, 0], served)
  # Outputs per row of the micro-batches go back to the batch's row order.
  np.testing.assert_array_equal(
      sharding_lib.merge_rows(micro["input_ids"], rows // buffers), batch["input_ids"])
  one_per_row = dict(batch, pixel_patches=np.zeros((rows, 8, 2)), image_grid_thw=np.zeros((rows, 2, 3)))
  np.testing.assert_array_equal(
      sharding_lib.merge_rows(sharding_lib.split_batch(one_per_row, 2)["input_ids"]),
      batch["input_ids"])
