"""Public PyTorch-side entry point: `mmembed_jax.torch_embed.load(export_dir)` (see convert/torch_embed)."""
from mmembed_jax.convert.torch_embed import TorchEmbedder, forward_hidden, load

__all__ = ["TorchEmbedder", "forward_hidden", "load"]
