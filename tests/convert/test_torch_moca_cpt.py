"""The PyTorch MoCa CPT loss (transformers' model, what launch/benchmark.py times) equals the JAX
objective on a real packed demo batch (several sequences and images per row, padding), with
every parameter perturbed so zero biases or unit norms cannot hide a mistake."""
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


@pytest.mark.parametrize("noise", ["shared", "per_patch"])
def test_torch_loss_and_gradients_equal_the_jax_objective(noise):
  config = _demo_config()
  config.objective.noise = noise
  config.input.update(length=256, max_patches=512, global_batch_size=4)  # rows pack 2-3 records
  config.mesh.num_devices = 1
  run = build_run(config, jax.devices())
  model_config, objective = run.model_config, run.objective
  batch = next(iter(run.dataset()))
  for key in HOST_ONLY:
    batch.pop(key)
  assert (batch["segment_ids"].max(axis=1) > 1).any() and (batch["segment_ids"] == 0).any()
  assert (batch["patch_image_ids"].max(axis=1) > 1).any()  # a row with several images

  params = init_params(model_config, jax.random.key(0))
  params = objective.init_extra(jax.random.key(1), params) | params
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                                     for x, k in zip(leaves, keys)])
  rng = jax.random.key(3)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(params, batch, rng)
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
