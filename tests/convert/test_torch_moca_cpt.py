"""The PyTorch MoCa CPT loss (transformers' model, what launch/benchmark.py times) equals the JAX
objective on a real packed demo batch (several sequences and images per row, padding), with
every parameter perturbed so zero biases or unit norms cannot hide a mistake."""
import functools
import importlib.util
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mmembed_jax.convert import torch_moca_cpt  # noqa: E402  pylint: disable=wrong-import-position
from mmembed_jax.models.embedder import init_params  # noqa: E402  pylint: disable=wrong-import-position
from mmembed_jax.training.run import HOST_ONLY, build_run  # noqa: E402  pylint: disable=wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _demo_config():
  spec = importlib.util.spec_from_file_location("recipe", os.path.join(ROOT, "configs", "moca.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("")


@functools.lru_cache(maxsize=None)
def _setup(noise, rows_per_patch_buffer):
  """(run, packed demo batch, perturbed parameters, ((loss, metrics), grads) of the JAX
  objective at rng key 3) with 4 rows of 2-3 records each; made once per argument pair."""
  config = _demo_config()
  config.objective.noise = noise
  config.input.update(length=256, max_patches=512, global_batch_size=4,
                      rows_per_patch_buffer=rows_per_patch_buffer)
  config.mesh.num_devices = 1
  run = build_run(config, jax.devices())
  batch = next(iter(run.dataset()))
  for key in HOST_ONLY:
    batch.pop(key)
  assert (batch["segment_ids"].max(axis=1) > 1).any() and (batch["segment_ids"] == 0).any()
  params = init_params(run.model_config, jax.random.key(0))
  params = run.objective.init_extra(jax.random.key(1), params) | params
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                                     for x, k in zip(leaves, keys)])
  step = jax.jit(jax.value_and_grad(run.objective, has_aux=True))
  return run, batch, params, step, step(params, batch, jax.random.key(3))


def _one_buffer(batch):
  """The same rows with one patch buffer for them all: their real patches back to back."""
  real = batch["patch_image_ids"] > 0  # [rows, patches]
  ids, images = [], 0
  for row in batch["patch_image_ids"]:
    ids.append(row[row > 0] + images)
    images += int(row.max())
  grids = batch["image_grid_thw"].reshape(-1, 3)
  return dict(batch, pixel_patches=batch["pixel_patches"][real][None],
              mae_mask=batch["mae_mask"][real][None], patch_image_ids=np.concatenate(ids)[None],
              image_grid_thw=grids[grids.prod(-1) > 0][None])


def test_rows_sharing_one_patch_buffer_give_the_loss_and_gradients_of_a_buffer_per_row():
  _, batch, params, step, ((loss, metrics), grads) = _setup("shared", 1)
  shared = _one_buffer(batch)
  assert shared["pixel_patches"].shape[1] < 0.7 * batch["pixel_patches"].size // 1176
  (shared_loss, shared_metrics), shared_grads = step(params, shared, jax.random.key(3))
  for name in ("mlm_loss", "mae_loss", "masked_patches"):
    assert float(shared_metrics[name]) == pytest.approx(float(metrics[name]), rel=1e-6), name
  assert float(shared_loss) == pytest.approx(float(loss), rel=1e-6)
  # Every parameter's gradient, on its own scale (the vision tower's sums run in another order).
  errors = jax.tree.map(lambda got, want: float(np.abs(np.asarray(got) - np.asarray(want)).max()
                                                / np.abs(np.asarray(want)).max()),
                        shared_grads, grads)
  assert max(jax.tree.leaves(errors)) <= 1e-5, errors


@pytest.mark.parametrize("noise,rows_per_patch_buffer", [("shared", 1), ("per_patch", 0)])
def test_torch_loss_and_gradients_equal_the_jax_objective(noise, rows_per_patch_buffer):
  """A buffer per row, and one buffer for the 4 rows (rows_per_patch_buffer 0 on 1 device)."""
  run, batch, params, _, ((loss, metrics), grads) = _setup(noise, rows_per_patch_buffer)
  model_config, objective = run.model_config, run.objective
  assert batch["pixel_patches"].shape[0] == (4 if rows_per_patch_buffer else 1)
  assert (batch["patch_image_ids"].max(axis=1) > 1).any()  # a buffer with several images
  rng = jax.random.key(3)
  noise_shape = ((1, 1, batch["pixel_patches"].shape[-1]) if noise == "shared"
                 else batch["pixel_patches"].shape)
  noise_values = np.asarray(jax.random.normal(rng, noise_shape, np.float32))

  module = torch_moca_cpt.build(objective, params)
  torch_loss, torch_metrics = module(torch_moca_cpt.torch_batch(batch, model_config),
                                     torch.as_tensor(noise_values))
  torch_loss.backward()
  # Losses of a few units summed over ~10^3 terms in another order: fp32 rounding, ~1e-7.
  for name, value in (("loss", loss), ("mlm_loss", metrics["mlm_loss"]),
                      ("mae_loss", metrics["mae_loss"])):
    got = float((torch_loss if name == "loss" else torch_metrics[name]).detach())
    assert got == pytest.approx(float(value), rel=1e-5), name
  # Gradients at both ends of the network, on each tensor's own scale.
  pairs = [(module.model.lm_head.weight.grad.numpy().T, grads["lm_head"]),
           (module.head.weight.grad.numpy().T, grads["mae_decoder"]["head"]["kernel"]),
           (module.model.model.visual.patch_embed.proj.weight.grad.numpy().reshape(
               model_config.vision.hidden_size, -1).T, grads["visual"]["patch_embed"]["kernel"])]
  for got, expected in pairs:
    expected = np.asarray(expected)
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
