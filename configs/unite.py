"""UNITE: modality-aware masked contrastive learning (MAMCL) on Qwen2-VL, in two stages (METHODS.md §3).

  python launch/tpu_train.py --config configs/unite.py:stage=1 --workdir runs/unite1_demo  # demo, CPU
  python launch/tpu_train.py --config configs/unite.py:stage=2 --workdir runs/unite2_demo \\
      --config.init_from=runs/unite1_demo
  python launch/tpu_train.py --config configs/unite.py:size=7b,stage=2 --workdir gs://b/unite7b \\
      --config.init_from=gs://b/unite7b_stage1 --config.input.sources.mmeb_ImageNet_1K.path=...

Argument: `size=demo|2b|7b` (default demo), `stage=1|2` (default 2), `adapters=lora|none`
(default: lora at 2b and 7b, as the released code trains; none for the demo, which trains a tiny
model from scratch).

Causal Qwen2-VL, last-token pooling, tau 0.03, mixed batches. Stage 1 (retrieval adaptation):
text-text, text-image (and text-video) pairs, lr 1e-4, the symmetric loss (q->c + c->q) / 2
without the modality mask. Stage 2 (instruction tuning): MMEB-train and others, lr 2e-5, MAMCL:
positive j competes for query i only when both positives have the same modality set
(`target_modal`, text=1, image=2, video=4), query->candidate only. Prompts end in "... in one
word:" and live in each source's templates. Adapters as the released code: plain LoRA, r 8,
dropout 0.05, Kaiming init, on the LLM's q/k/v/o/gate/up/down_proj (the vision tower frozen),
alpha 16 in stage 1 and 64 in stage 2; stage 2 starts from stage 1 with its adapters merged
(`init_from` merges them) and trains fresh ones.
"""
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # recipe_common.py, beside this file
import recipe_common  # pylint: disable=wrong-import-position
from mmembed_jax.data.mmeb import MMEB_TRAIN  # pylint: disable=wrong-import-position

_PRESETS = {"2b": "qwen2_vl_2b", "7b": "qwen2_vl_7b"}
TEXT_PROMPT = "{text}\nSummarize above sentence in one word:"
IMAGE_PROMPT = "{text}\nSummarize above image in one word:"


def _sources(stage: str) -> dict:
  """Stage 1: retrieval pairs; stage 2: MMEB-train's sets. Paths are left to the user."""
  if stage == "1":
    sources = {"text_text": dict(query_template=TEXT_PROMPT, target_template=TEXT_PROMPT),
               "text_image": dict(query_template=TEXT_PROMPT, target_template=IMAGE_PROMPT),
               "image_text": dict(query_template=IMAGE_PROMPT, target_template=TEXT_PROMPT)}
  else:
    sources = {f"mmeb_{name}": dict(query_template="{text} in one word:",
                                    target_template="{text} in one word:") for name in MMEB_TRAIN}
  for source in sources.values():
    source.update(path="", kind="jsonl", format="mmeb", weight=1.0, cap=50_000)
  return sources


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """UNITE config for `size` and `stage`."""
  options = recipe_common.parse_args(arg, "configs/unite.py",
                                     {"size": ("demo", "2b", "7b"), "stage": ("1", "2"),
                                      "adapters": ("lora", "none")},
                                     {"size": "demo", "stage": "2", "adapters": ""})
  size, stage = options["size"], options["stage"]
  adapters = options["adapters"] or ("none" if size == "demo" else "lora")
  config = recipe_common.contrastive_config(pooling="last", temperature=0.03, negatives="own",
                                            symmetric=stage == "1", modality_mask=stage == "2")
  config.model.attention = "causal"
  lr = 1e-4 if stage == "1" else 2e-5
  if size == "demo":
    config.input = recipe_common.demo_pairs_input(num_negatives=0, task_batching=False)
    config = recipe_common.demo_contrastive(config, "tiny_qwen2_vl")
    config.optimizer.lr = lr * 10  # a tiny model from scratch learns at a larger rate
  else:
    config = recipe_common.pod_contrastive(config, _PRESETS[size], _sources(stage),
                                           global_batch_size=1024, num_negatives=0,
                                           task_batching=False, length=1024, lr=lr,
                                           total_steps=2000)
  if adapters == "lora":
    config.adapters.update(recipe_common.ADAPTERS[f"unite_stage{stage}"])
  return config
