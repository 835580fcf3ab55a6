"""Shared test setup: 8 fake CPU devices (set before jax is imported) and tiny local HF models.

The tiny models are transformers' own Qwen2-VL / Qwen2.5-VL classes with random weights,
norms and biases (so a swapped or missing scale/bias shows), saved as sharded safetensors
next to a tokenizer trained on the spot. Nothing is downloaded.
"""
import json
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

FAMILIES = ("qwen2_5_vl", "qwen2_vl")
# Small images keep the suite fast: at most 64 merged tokens per image.
TEST_PIXELS = {"min_pixels": 4 * 28 * 28, "max_pixels": 64 * 28 * 28}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
  """The demo tokenizer (vocab <= 512), trained once per session."""
  from mmembed_jax.demo import tokenizer as tokenizer_lib
  return tokenizer_lib.build_tokenizer(str(tmp_path_factory.mktemp("tokenizer")), vocab_size=512)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
  """The demo tokenizer loaded with transformers.AutoTokenizer."""
  import transformers
  return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


def randomize_norms_and_biases(model, seed: int = 0) -> None:
  """Gives every norm weight and bias a non-trivial random value (HF inits them to 1 and 0)."""
  import torch
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      is_norm = "norm" in name or "ln_q" in name
      if name.endswith("bias") or is_norm:
        noise = torch.randn(param.shape, generator=generator) * 0.5
        param.copy_(noise + (1.0 if is_norm and name.endswith("weight") else 0.0))


def build_tiny_hf_model(out_dir: str, family: str, tokenizer_dir: str, tie: bool = False,
                        seed: int = 0) -> str:
  """Saves a random tiny transformers model (sharded) with tokenizer and preprocessor files."""
  import shutil
  import torch
  import transformers
  from mmembed_jax.data.images import ImageProcessingConfig
  from mmembed_jax.demo.tiny_model import tiny_config
  from mmembed_jax.demo.tokenizer import special_token_ids
  from mmembed_jax.models.config import hf_config_object

  tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  ids = special_token_ids(tokenizer)
  config = tiny_config(family, tie_word_embeddings=tie,
                       **{k: v for k, v in ids.items() if k not in ("pad_token_id", "eos_token_id")})
  hf_config = hf_config_object(config)
  torch.manual_seed(seed)
  cls = {"qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
         "qwen2_vl": transformers.Qwen2VLForConditionalGeneration}[family]
  model = cls(hf_config).eval()
  randomize_norms_and_biases(model, seed)
  model.save_pretrained(out_dir, max_shard_size="300KB")
  for name in os.listdir(tokenizer_dir):
    shutil.copy(os.path.join(tokenizer_dir, name), out_dir)
  with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
    json.dump(ImageProcessingConfig(**TEST_PIXELS).to_preprocessor_config(), f)
  return out_dir


@pytest.fixture(scope="session")
def tiny_hf_dirs(tmp_path_factory, tokenizer_dir):
  """{family: directory} of the tiny transformers models, built once per session."""
  return {family: build_tiny_hf_model(str(tmp_path_factory.mktemp(family)), family, tokenizer_dir)
          for family in FAMILIES}


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory):
  """PNG images of odd sizes and aspect ratios, with relative names for JSONL rows."""
  import numpy as np
  from PIL import Image
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  for name, (height, width) in {"wide.png": (90, 230), "tall.png": (301, 97),
                                "square.png": (150, 150), "small.png": (33, 47)}.items():
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / name)
  return str(root)
