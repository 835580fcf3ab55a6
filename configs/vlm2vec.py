"""VLM2Vec: a causal VLM fine-tuned into an embedder with InfoNCE and GradCache (METHODS.md §4).

  python launch/tpu_train.py --config configs/vlm2vec.py --workdir runs/vlm2vec_demo   # demo, CPU
  python launch/tpu_train.py --config configs/vlm2vec.py:size=7b --workdir gs://b/vlm2vec7b \\
      --config.init_from=/ckpt/Qwen2-VL-7B-Instruct --config.input.sources.mmeb_ImageNet_1K.path=...

Argument: `size=demo|2b|7b` (default demo), `adapters=dora|none` (default: dora at 2b and 7b,
as the released code trains; none for the demo, which trains a tiny model from scratch).

Qwen2-VL with causal attention, last-token pooling, InfoNCE over all-gathered in-batch
positives with tau 0.02 and no hard negatives. Adapters as the released code (its "LoRA" is
DoRA, `use_dora=True`): r 16, alpha 64, dropout 0.1, Gaussian init of A, on the LLM's
q/k/v/o_proj and down_proj (and the vision MLP's down_proj on Qwen2.5-VL), the base frozen;
`adapters=none` fine-tunes everything, as the paper's full-FT rows. Global batch 1024 through GradCache (chunks of 4 rows per chip), lr 2e-5 (V1),
5% warm-up, linear decay, 2K steps on MMEB-train's 20 sets (at most 50K pairs each) whose rows
carry their instructions; mixed batches (V1). The demo fine-tunes a tiny Qwen2-VL from scratch
on the package's synthetic pairs and reports held-out Precision@1.
"""
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # recipe_common.py, beside this file
import recipe_common  # pylint: disable=wrong-import-position
from mmembed_jax.data.mmeb import MMEB_TRAIN  # pylint: disable=wrong-import-position

_PRESETS = {"2b": "qwen2_vl_2b", "7b": "qwen2_vl_7b"}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """VLM2Vec config for `size`."""
  options = recipe_common.parse_args(arg, "configs/vlm2vec.py",
                                     {"size": ("demo", "2b", "7b"), "adapters": ("dora", "none")},
                                     {"size": "demo", "adapters": ""})
  size = options["size"]
  adapters = options["adapters"] or ("none" if size == "demo" else "dora")
  config = recipe_common.contrastive_config(pooling="last", temperature=0.02, negatives="own")
  config.model.attention = "causal"
  if size == "demo":
    config.input = recipe_common.demo_pairs_input(num_negatives=0, task_batching=False)
    config.objective.grad_cache_chunk = 2  # exercised on the demo too: 4 rows per device here
    config = recipe_common.demo_contrastive(config, "tiny_qwen2_vl")
  else:
    config = recipe_common.pod_contrastive(
        config, _PRESETS[size], {f"mmeb_{name}": dict(path="", kind="jsonl", format="mmeb",
                                                      weight=1.0, cap=50_000)
                                 for name in MMEB_TRAIN},
        global_batch_size=1024, num_negatives=0, task_batching=False, length=1024, lr=2e-5,
        total_steps=2000)
  if adapters == "dora":
    config.adapters.update(recipe_common.ADAPTERS["vlm2vec"])
  return config
