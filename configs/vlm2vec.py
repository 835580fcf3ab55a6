"""VLM2Vec: a causal VLM fine-tuned into an embedder with InfoNCE and GradCache (METHODS.md §4).

  python launch/tpu_train.py --config configs/vlm2vec.py --workdir runs/vlm2vec_demo   # demo, CPU
  python launch/tpu_train.py --config configs/vlm2vec.py:size=7b --workdir gs://b/vlm2vec7b \\
      --config.init_from=/ckpt/Qwen2-VL-7B-Instruct --config.input.sources.mmeb_ImageNet_1K.path=...

Argument: `size=demo|2b|7b` (default demo).

Qwen2-VL with causal attention, last-token pooling, InfoNCE over all-gathered in-batch
positives with tau 0.02 and no hard negatives, full fine-tuning (the LoRA variant is not
implemented), global batch 1024 through GradCache (chunks of 4 rows per chip), lr 2e-5 (V1),
5% warm-up, linear decay, 2K steps on MMEB-train's 20 sets (at most 50K pairs each) whose rows
carry their instructions; mixed batches (V1). The demo fine-tunes a tiny Qwen2-VL from scratch
on the package's synthetic pairs and reports held-out Precision@1.
"""
import ml_collections

from mmembed_jax.data.mmeb import MMEB_TRAIN
from mmembed_jax.training.config import (contrastive_config, demo_contrastive, demo_pairs_input,
                                           pod_contrastive)

_PRESETS = {"2b": "qwen2_vl_2b", "7b": "qwen2_vl_7b"}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """VLM2Vec config for `size`."""
  options = dict(item.split("=", 1) for item in arg.split(",") if item)
  if set(options) - {"size"}:
    raise ValueError(f"configs/vlm2vec.py: unknown argument(s) {sorted(set(options) - {'size'})}")
  size = options.get("size", "demo")
  if size not in ("demo", "2b", "7b"):
    raise ValueError(f"configs/vlm2vec.py: size must be demo, 2b or 7b, got '{size}'")
  config = contrastive_config(pooling="last", temperature=0.02, negatives="own")
  config.model.attention = "causal"
  if size == "demo":
    config.input = demo_pairs_input(num_negatives=0, task_batching=False)
    config.objective.grad_cache_chunk = 2  # exercised on the demo too: 4 rows per device here
    return demo_contrastive(config, "tiny_qwen2_vl")
  sources = {f"mmeb_{name}": dict(path="", kind="jsonl", format="mmeb", weight=1.0, cap=50_000)
             for name in MMEB_TRAIN}
  return pod_contrastive(config, _PRESETS[size], sources, global_batch_size=1024, num_negatives=0,
                         task_batching=False, length=1024, lr=2e-5, total_steps=2000)
