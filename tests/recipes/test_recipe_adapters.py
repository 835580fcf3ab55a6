"""The recipes' adapters are the released code's: which layers, rank, alpha, dropout, init."""
import os
import runpy

import flax.linen as nn
import jax
import pytest

from mmembed_jax.models.embedder import boxed_param_shapes
from mmembed_jax.training import lineage
from mmembed_jax.training import run as run_lib
from mmembed_jax.training.optimizer import path_name

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(recipe, arg):
  return runpy.run_path(os.path.join(REPO, "configs", recipe))["get_config"](arg)


def _adapted_modules(config):
  """Module paths (layer index dropped) that hold lora_a in the recipe's model."""
  params = nn.meta.unbox(boxed_param_shapes(run_lib.model_config(config, lineage.Resolved())))
  return sorted({path_name(path).rsplit("/", 1)[0] for path, _ in jax.tree.leaves_with_path(params)
                 if path_name(path).endswith("lora_a")})


@pytest.mark.parametrize("recipe, arg, kind, rank, alpha, dropout, init, modules", [
    ("vlm2vec.py", "size=7b", "dora", 16, 64.0, 0.1, "gaussian",
     ["mlp/down_proj", "self_attn/k_proj", "self_attn/o_proj", "self_attn/q_proj",
      "self_attn/v_proj"]),
    ("unite.py", "size=7b,stage=1", "lora", 8, 16.0, 0.05, "kaiming",
     ["mlp/down_proj", "mlp/gate_proj", "mlp/up_proj", "self_attn/k_proj", "self_attn/o_proj",
      "self_attn/q_proj", "self_attn/v_proj"]),
    ("unite.py", "size=7b,stage=2", "lora", 8, 64.0, 0.05, "kaiming", None),
    # CoMa (Qwen2.5-VL): its vision attention is qkv / proj, so q/k/v/o_proj name the LLM's only.
    ("coma.py", "size=7b,stage=1", "dora", 16, 64.0, 0.1, "gaussian",
     ["self_attn/k_proj", "self_attn/o_proj", "self_attn/q_proj", "self_attn/v_proj"]),
    ("coma.py", "size=3b,stage=2", "dora", 16, 64.0, 0.1, "gaussian", None),
])
def test_pod_recipes_train_the_released_adapters(recipe, arg, kind, rank, alpha, dropout, init,
                                                 modules):
  config = _config(recipe, arg)
  section = config.adapters
  assert (section.kind, section.rank, section.alpha, section.dropout, section.init) == (
      kind, rank, alpha, dropout, init)
  if modules is None:
    return
  adapted = _adapted_modules(config)
  # Qwen2-VL's vision MLP is fc1 / fc2: the released target lists reach the LLM only.
  assert adapted == [f"language_model/layers/{m}" for m in modules]


def test_coma_trains_its_token_embeddings_beside_the_adapters():
  """peft's modules_to_save=["embed_tokens"]: the whole table trains (the compression tokens'
  rows with it), nothing else of the base."""
  from mmembed_jax.training.trainable import trainable_mask
  config = _config("coma.py", "size=3b,stage=1")
  params = nn.meta.unbox(boxed_param_shapes(run_lib.model_config(config, lineage.Resolved())))
  mask = trainable_mask(params, adapters=True, trainable_extra=config.adapters.trainable_extra)
  base = {path_name(p) for p, trains in jax.tree.leaves_with_path(mask)
          if trains and "lora_" not in path_name(p)}
  assert base == {"embed_tokens/embedding"}


def test_demos_train_everything_unless_asked():
  assert _config("vlm2vec.py", "").adapters.kind == "none"
  assert _config("unite.py", "stage=1").adapters.kind == "none"
  assert _config("vlm2vec.py", "adapters=dora").adapters.kind == "dora"
  assert _config("unite.py", "size=2b,adapters=none").adapters.kind == "none"
  assert _config("coma.py", "stage=1").adapters.kind == "none"
  assert _config("coma.py", "stage=2,adapters=dora").adapters.kind == "dora"
