"""LoRA and DoRA on the Flax model equal transformers + peft (the oracle) on the same weights.

Tiny Qwen2.5-VL and Qwen2-VL with random adapters (B and DoRA's magnitude moved off their
initial values) on the LLM's attention projections and down_proj and on the vision tower's
fused qkv (a [in, 3, width] kernel) and MLP output; the token embedding trained in full beside
them (`trainable_extra`, peft's modules_to_save, as CoMa trains it) and moved off the base's;
the adapters go to peft through our PEFT export, so the export's layout is checked too. fp32,
bidirectional attention, padded rows with images of odd sizes (test_parity.ROWS).
"""
import functools
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

from mmembed_jax.convert import peft_export
from mmembed_jax.convert.hf_import import import_hf
from mmembed_jax.convert.torch_embed import forward_hidden
from mmembed_jax.models.adapters import AdapterSpec, merge
from mmembed_jax.models.embedder import add_adapters
from mmembed_jax.models.pooling import pool
from mmembed_jax.models.vlm import VisionLanguageModel

from test_parity import _encode, _hf_model


TOLERANCE = 1e-4
TARGETS = r"self_attn/(q|k|v|o)_proj|mlp/(down_proj|fc2)|attn/qkv"
EXTRA = r"^embed_tokens/"


def _random_adapters(config, base, seed=0):
  """`base` with the config's adapters added, then B and the magnitude randomised."""
  params = add_adapters(config, base, jax.random.key(seed))
  rng = np.random.default_rng(seed)

  def perturb(path, leaf):
    name = str(path[-1].key)
    if name == "lora_b":
      return jnp.asarray(0.2 * rng.standard_normal(leaf.shape), leaf.dtype)
    if name == "lora_magnitude":
      return leaf * jnp.asarray(1 + 0.2 * rng.standard_normal(leaf.shape), leaf.dtype)
    if name == "embedding":  # trained in full (EXTRA)
      return leaf + jnp.asarray(0.2 * rng.standard_normal(leaf.shape), leaf.dtype)
    return leaf
  return jax.tree_util.tree_map_with_path(perturb, params)


@pytest.fixture(scope="module")
def encoded_batch(tokenizer, image_dir):
  return _encode(tokenizer, image_dir)


@pytest.mark.parametrize("kind", ["lora", "dora"])
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_forward_and_gradients_equal_peft(family, kind, tiny_hf_dirs, encoded_batch, tmp_path):
  encoded, batch = encoded_batch
  spec = AdapterSpec(kind=kind, rank=4, alpha=12.0, dropout=0.0, targets=TARGETS,
                     init="gaussian")
  config, base = import_hf(tiny_hf_dirs[family], attention="bidirectional")
  config = config.replace(adapter=spec)
  params = _random_adapters(config, base)
  peft_export.export_peft(config, params, spec, str(tmp_path / "adapter"), trainable_extra=EXTRA)
  model = peft.PeftModel.from_pretrained(_hf_model(tiny_hf_dirs[family]), str(tmp_path / "adapter"),
                                         is_trainable=True)
  model.eval()
  adapted = [name for name, _ in model.named_modules() if name.endswith("lora_A")]
  # LLM q, k, v, o and the MLP output per layer; vision qkv and the MLP output per block.
  assert len(adapted) == 5 * config.text.num_layers + 2 * config.vision.depth, adapted

  valid = batch["segment_ids"] > 0
  grids = np.concatenate([row.grid_thw for row in encoded if row.num_images])
  pixels = np.concatenate([row.patches for row in encoded if row.num_images])
  direction = np.random.default_rng(1).standard_normal((valid.shape[0], config.text.hidden_size))

  hidden_torch = forward_hidden(model.base_model.model, batch["input_ids"], valid,
                                batch["positions"], pixels, grids, "bidirectional", grad=True)
  weights = torch.as_tensor(valid, dtype=torch.float32)[..., None]
  pooled = (hidden_torch * weights).sum(1) / weights.sum(1)
  pooled = torch.nn.functional.normalize(pooled, dim=-1)
  (pooled * torch.as_tensor(direction, dtype=torch.float32)).sum().backward()

  def scalar(params):
    hidden = VisionLanguageModel(config).apply({"params": params}, batch)
    return jnp.sum(pool(hidden, batch["segment_ids"], "mean") * direction), hidden

  (_, hidden), grads = jax.jit(jax.value_and_grad(scalar, has_aux=True))(params)
  error = np.abs(np.asarray(hidden) - hidden_torch.detach().numpy())[valid].max()
  print(f"{family} {kind}: hidden max abs diff {error:.2e}")
  assert error <= TOLERANCE

  torch_grads = {name: p.grad.numpy() for name, p in model.named_parameters() if p.grad is not None}
  ours = peft_export.peft_tensors(config, grads)
  for m in peft_export.saved_modules(config, EXTRA):  # the embedding's gradient, as peft names it
    module, leaf = m.hf_name.rsplit(".", 1)
    grad = grads
    for key in m.path:
      grad = grad[key]
    ours[f"{peft_export.PREFIX}{module}.modules_to_save.default.{leaf}"] = m.to_hf(np.asarray(grad))
  assert ours and len(ours) == len(torch_grads)
  worst = 0.0
  for name, ours_grad in ours.items():
    theirs = torch_grads[name.replace(".lora_A.weight", ".lora_A.default.weight")
                         .replace(".lora_B.weight", ".lora_B.default.weight")
                         .replace(".lora_magnitude_vector", ".lora_magnitude_vector.default.weight")]
    relative = np.linalg.norm(ours_grad - theirs) / max(np.linalg.norm(theirs), 1e-12)
    worst = max(worst, relative)
  print(f"{family} {kind}: gradient max relative diff {worst:.2e} over {len(ours)} tensors")
  assert worst <= TOLERANCE

  # Merged (PEFT's merge_and_unload) equals the unmerged model.
  merged = VisionLanguageModel(config.replace(adapter=None)).apply(
      {"params": merge(params, spec)}, batch)
  assert np.abs(np.asarray(merged) - np.asarray(hidden))[valid].max() <= TOLERANCE


def _stacked(params, name, count):
  """Unrolled `name_0 .. name_{count-1}` layers of a params subtree -> one stacked `name`."""
  layers = [params.pop(f"{name}_{i}") for i in range(count)]
  params[name] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)


def test_scanned_rematerialised_and_bfloat16_adapters_equal_unrolled(tiny_hf_dirs, encoded_batch):
  _, batch = encoded_batch
  valid = batch["segment_ids"] > 0
  spec = AdapterSpec(kind="dora", rank=4, alpha=12.0, dropout=0.0, targets=TARGETS)
  config, base = import_hf(tiny_hf_dirs["qwen2_5_vl"], attention="bidirectional")
  config = config.replace(adapter=spec)
  scanned = config.replace(scan_layers=True, remat_policy="full")

  def stack(params):
    params = jax.tree.map(lambda x: x, params)
    _stacked(params["language_model"], "layers", config.text.num_layers)
    _stacked(params["visual"], "blocks", config.vision.depth)
    return params

  def energy(model_config, params):
    hidden = VisionLanguageModel(model_config).apply({"params": params}, batch)
    return jnp.sum(jnp.where(valid[..., None], hidden, 0) ** 2) / 1e3, hidden

  params = _random_adapters(config, base)
  def energy_and_grads(model_config, params):
    return jax.jit(jax.value_and_grad(functools.partial(energy, model_config), has_aux=True))(params)

  (_, reference), grads = energy_and_grads(config, params)
  (_, out), scanned_grads = energy_and_grads(scanned, stack(params))
  assert np.abs(np.asarray(out) - np.asarray(reference))[valid].max() <= 1e-5
  for (path, ours), theirs in zip(jax.tree.leaves_with_path(scanned_grads),
                                  jax.tree.leaves(stack(grads))):
    if "lora" in jax.tree_util.keystr(path):
      error = np.linalg.norm(ours - theirs) / max(np.linalg.norm(theirs), 1e-12)
      assert error <= 1e-5, (jax.tree_util.keystr(path), error)
  bf16 = VisionLanguageModel(scanned.replace(dtype="bfloat16")).apply(
      {"params": stack(params)}, batch)
  relative = np.linalg.norm((np.asarray(bf16, np.float32) - np.asarray(reference))[valid]) / (
      np.linalg.norm(np.asarray(reference)[valid]))
  assert bf16.dtype == jnp.bfloat16 and relative < 2e-2, relative
