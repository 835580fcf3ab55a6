"""Tiny random transformers models for the tests (built locally; nothing is downloaded)."""
import json
import os

FAMILIES = ("qwen2_5_vl", "qwen2_vl")
# Small images keep the suite fast: at most 64 merged tokens per image.
TEST_PIXELS = {"min_pixels": 4 * 28 * 28, "max_pixels": 64 * 28 * 28}


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
  from mmembed_jax.data.special_tokens import special_token_ids
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


# (frames, fps, height, width, keyframe interval): lengths, rates and sizes that differ.
TEST_VIDEOS = [(9, 5, 64, 96, 4), (31, 12, 90, 120, 8), (50, 24, 144, 176, 12),
               (75, 30, 120, 64, 30), (121, 29.97, 72, 128, 50)]


def video_frames(n, height, width, seed):
  """uint8 [n, height, width, 3]: moving gradients plus noise (codec-friendly, never static)."""
  import numpy as np
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[:height, :width]
  out = []
  for k in range(n):
    base = np.stack([(x * 2 + k * 5) % 256, (y * 3 + k * 7) % 256, ((x + y) + k * 11) % 256], -1)
    out.append(np.clip(base + rng.normal(0, 6, base.shape), 0, 255))
  return np.asarray(out, np.uint8)


def write_test_videos(root: str):
  """Encodes TEST_VIDEOS as clip{k}.mp4 (libx264) under root; returns [(path, n, fps, h, w)]."""
  import os
  from mmembed_jax.data import video
  out = []
  for k, (n, fps, h, w, gop) in enumerate(TEST_VIDEOS):
    path = os.path.join(root, f"clip{k}.mp4")
    video.write_video(path, video_frames(n, h, w, k), fps=fps, keyframe_interval=gop)
    out.append((path, n, fps, h, w))
  return out


# Rows with videos (files in video_row_dir, conftest.py), encoded with small frame budgets.
VIDEO_FPS = 1.5  # frames sampled per second of the test clips
# Small frame budgets: 2-12 frames of 4-16 merged tokens.
VIDEO_SETTINGS = dict(fps=VIDEO_FPS, max_frames=12, min_pixels=4 * 28 * 28,
                      frame_max_pixels=16 * 28 * 28, processor_min_pixels=4 * 28 * 28,
                      processor_max_pixels=24 * 28 * 28)
VIDEO_ROWS = [
    {"text": "<video> a clip of moving stripes", "video": "clip1.mp4"},
    {"text": "first <image> then <video> and the end", "image": "wide.png", "video": "clip0.mp4"},
    {"text": "three frames <video>", "video": ["f0.png", "f1.png", "f2.png"], "fps": 1.0},
    {"text": "a text row between videos"},
    {"text": "<video> two clips <video>", "videos": ["clip3.mp4", "clip4.mp4"]},
]
