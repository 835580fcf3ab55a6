"""Tiny Qwen2-VL / Qwen2.5-VL architectures for tests and the laptop demo (random weights, no hub).

Presets `tiny_qwen2_5_vl`, `tiny_qwen2_vl` (the demos) and `small_qwen2_5_vl`, `small_qwen2_vl`
(launch/benchmark.py), reached from configs' `model.preset` through the demo entry.
"""
from mmembed_jax.models.config import ModelConfig, TextConfig, VisionConfig


def tiny_config(family: str = "qwen2_5_vl", vocab_size: int = 576, tie_word_embeddings: bool = False,
                **options) -> ModelConfig:
  """A few-layer model with every architectural feature of the real one (GQA, windows, M-RoPE).

  The vocabulary (576) is the 512-token demo tokenizer plus spare rows, as Qwen pads its own,
  so `<|mask|>` or compression tokens get ids without resizing the embedding.
  """
  if family == "qwen2_5_vl":
    # 3 blocks, block 1 full attention, the others windowed (window = 4x4 merged tokens).
    vision = VisionConfig(depth=3, hidden_size=32, num_heads=2, intermediate_size=48,
                          out_hidden_size=64, hidden_act="silu", window_size=112,
                          fullatt_block_indexes=(1,))
  else:
    vision = VisionConfig(depth=2, hidden_size=32, num_heads=2, intermediate_size=64,
                          out_hidden_size=64, hidden_act="quick_gelu", window_size=0)
  text = TextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_layers=3,
                    num_heads=4, num_kv_heads=2, mrope_section=(2, 3, 3))
  return ModelConfig(family=family, vision=vision, text=text,
                     tie_word_embeddings=tie_word_embeddings, **options)


def small_config(family: str = "qwen2_5_vl", **options) -> ModelConfig:
  """A ~50M-parameter model on the demo vocabulary: big enough that a CPU step is matmul-bound
  (launch/benchmark.py), small enough to train on a laptop."""
  if family == "qwen2_5_vl":
    vision = VisionConfig(depth=4, hidden_size=256, num_heads=4, intermediate_size=512,
                          out_hidden_size=768, hidden_act="silu", window_size=112,
                          fullatt_block_indexes=(1, 3))
  else:
    vision = VisionConfig(depth=4, hidden_size=256, num_heads=4, intermediate_size=1024,
                          out_hidden_size=768, hidden_act="quick_gelu", window_size=0)
  text = TextConfig(vocab_size=576, hidden_size=768, intermediate_size=2048, num_layers=8,
                    num_heads=12, num_kv_heads=2, mrope_section=(8, 12, 12))
  return ModelConfig(family=family, vision=vision, text=text, **options)


PRESETS = ("tiny_qwen2_5_vl", "tiny_qwen2_vl", "small_qwen2_5_vl", "small_qwen2_vl")


def preset_config(name: str, **options) -> ModelConfig:
  """ModelConfig of a demo preset; options are run-time switches (attention, dtype, ...)."""
  if name not in PRESETS:
    raise ValueError(f"unknown demo preset '{name}', expected one of {PRESETS}")
  size, family = name.split("_", 1)
  return (tiny_config if size == "tiny" else small_config)(family, **options)
