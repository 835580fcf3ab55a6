"""Architectures by name: the published Qwen-VL sizes (for compile proofs without weights).

The demo's tiny and small architectures are in demo/tiny_model.py.
"""
from mmembed_jax.models.config import ModelConfig, TextConfig, VisionConfig

_QWEN2_5_VISION = dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420,
                       hidden_act="silu", window_size=112, fullatt_block_indexes=(7, 15, 23, 31))
_QWEN2_VISION = dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=5120,
                     hidden_act="quick_gelu", window_size=0)

# (family, vision, text, tied)
_PRESETS = {
    "qwen2_5_vl_3b": ("qwen2_5_vl", dict(_QWEN2_5_VISION, out_hidden_size=2048),
                      dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                           num_layers=36, num_heads=16, num_kv_heads=2), True),
    "qwen2_5_vl_7b": ("qwen2_5_vl", dict(_QWEN2_5_VISION, out_hidden_size=3584),
                      dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                           num_layers=28, num_heads=28, num_kv_heads=4), False),
    "qwen2_vl_2b": ("qwen2_vl", dict(_QWEN2_VISION, out_hidden_size=1536),
                    dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_layers=28, num_heads=12, num_kv_heads=2), True),
    "qwen2_vl_7b": ("qwen2_vl", dict(_QWEN2_VISION, out_hidden_size=3584),
                    dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                         num_layers=28, num_heads=28, num_kv_heads=4), False),
}
PRESETS = tuple(_PRESETS)


def preset_config(name: str, **options) -> ModelConfig:
  """ModelConfig of a named architecture; options are run-time switches (attention, dtype, ...)."""
  if name not in _PRESETS:
    raise ValueError(f"unknown model preset '{name}', expected one of {PRESETS}")
  family, vision, text, tied = _PRESETS[name]
  return ModelConfig(family=family, vision=VisionConfig(**vision), text=TextConfig(**text),
                     tie_word_embeddings=tied, **options)
