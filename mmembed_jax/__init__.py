"""mmembed_jax: JAX/Flax multimodal embedding models (Qwen2-VL / Qwen2.5-VL) for TPU pods."""
import os

# transformers serves tokenizers, configs and the image processor here; without torch (optional
# for this package) it would announce "PyTorch was not found" at every import.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
