"""UNITE: modality-aware masked contrastive learning (MAMCL) on Qwen2-VL, in two stages (METHODS.md §3).

  python launch/tpu_train.py --config configs/unite.py:stage=1 --workdir runs/unite1_demo  # demo, CPU
  python launch/tpu_train.py --config configs/unite.py:stage=2 --workdir runs/unite2_demo \\
      --config.init_from=runs/unite1_demo
  python launch/tpu_train.py --config configs/unite.py:size=7b,stage=2 --workdir gs://b/unite7b \\
      --config.init_from=gs://b/unite7b_stage1 --config.input.sources.mmeb_ImageNet_1K.path=...

Argument: `size=demo|2b|7b` (default demo), `stage=1|2` (default 2), `adapters=lora|none`
(default: lora at 2b and 7b, as the released code trains; none for the demo, which trains a tiny
model from scratch), `loss=code|paper` (default code).

Causal Qwen2-VL, last-token pooling, tau 0.03, mixed batches. Stage 1 (retrieval adaptation):
text-text, text-image and text-video pairs, lr 1e-4; stage 2 (instruction tuning): MMEB-train
and others, lr 2e-5. MAMCL: positive j competes for query i only when both positives have the
same modality set (`target_modal`, text=1, image=2, video=4), query->candidate only. The
released scripts (`scripts/*/stage{1,2}_*.sh`) train both stages with MAMCL on, one direction
(TARGET_MODAL_MASK=True, DUAL_LOSS=False) and global batches of 128 and 512: `loss=code`. The
paper's stage 1 uses the symmetric loss (q->c + c->q) / 2 without the mask: `loss=paper`.
Prompts are the released ones (`unite/prompt_template.py`, "UNITE"): Qwen's chat turn with the
default system prompt around "{text}\nSummary above {modalities} in one word:", then
`<|endoftext|>`; stage 1's are in the sources' templates, stage 2's rows carry their MMEB
instructions. Videos as the released code samples them (qwen-vl-utils 0.0.8 through
`fetch_video`): 1 fps, 4-12 frames, at most 240 x 320 pixels per frame, then the processor's
bounds 256-1280 x 28**2 (so a 320 x 240 clip's 224 x 308 frames are upscaled to 392 x 532,
as there). Adapters as the released code: plain LoRA, r 8, dropout 0.05, Kaiming init, on the
LLM's q/k/v/o/gate/up/down_proj (the vision tower frozen), alpha 16 in stage 1 and 64 in stage
2; stage 2 starts from stage 1 with its adapters merged (`init_from` merges them) and trains
fresh ones. The demo trains a tiny Qwen2-VL from scratch on the synthetic pairs and, with
sources "demo+video", caption <-> clip pairs, and reports held-out Precision@1 per set
(`eval_precision_at_1/caption_video` for the videos).
"""
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # recipe_common.py, beside this file
import recipe_common  # pylint: disable=wrong-import-position
from mmembed_jax.data.mmeb import MMEB_TRAIN  # pylint: disable=wrong-import-position

_PRESETS = {"2b": "qwen2_vl_2b", "7b": "qwen2_vl_7b"}
_CHAT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{body}"
         "\nSummary above {modalities} in one word:<|im_end|>\n<|im_start|>assistant\n"
         "<|endoftext|>")
# A side's template: its media first (the released code appends the vision tokens to an empty
# text), then its text.
TEXT_PROMPT = _CHAT.format(body="{text}", modalities="sentence")
IMAGE_PROMPT = _CHAT.format(body="<image>{text}", modalities="image")
VIDEO_PROMPT = _CHAT.format(body="<video>{text}", modalities="video")
# The released sampling (unite/dataset/ret_dataset.py, scripts' MAX_FRAMES=12) and processor
# bounds (AutoProcessor min_pixels / max_pixels, one processor for images and videos).
RELEASED_VIDEO = dict(fps=1.0, min_frames=4, max_frames=12, max_pixels=240 * 320,
                      total_pixels=24576 * 28 * 28, processor_min_pixels=256 * 28 * 28,
                      processor_max_pixels=1280 * 28 * 28)
# The demo's 64 x 64 clips, as 56 x 56 frames (4 merged tokens per frame pair).
DEMO_VIDEO = dict(fps=1.0, min_frames=4, max_frames=12, min_pixels=4 * 28 * 28,
                  max_pixels=16 * 28 * 28, processor_min_pixels=4 * 28 * 28,
                  processor_max_pixels=16 * 28 * 28)


def _sources(stage: str) -> dict:
  """Stage 1: retrieval pairs; stage 2: MMEB-train's sets. Paths are left to the user."""
  if stage == "1":
    sources = {"text_text": dict(query_template=TEXT_PROMPT, target_template=TEXT_PROMPT),
               "text_image": dict(query_template=TEXT_PROMPT, target_template=IMAGE_PROMPT),
               "image_text": dict(query_template=IMAGE_PROMPT, target_template=TEXT_PROMPT),
               "text_video": dict(query_template=TEXT_PROMPT, target_template=VIDEO_PROMPT),
               "video_text": dict(query_template=VIDEO_PROMPT, target_template=TEXT_PROMPT)}
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
                                      "adapters": ("lora", "none"), "loss": ("code", "paper")},
                                     {"size": "demo", "stage": "2", "adapters": "",
                                      "loss": "code"})
  size, stage = options["size"], options["stage"]
  adapters = options["adapters"] or ("none" if size == "demo" else "lora")
  paper_stage1 = options["loss"] == "paper" and stage == "1"
  config = recipe_common.contrastive_config(pooling="last", temperature=0.03, negatives="own",
                                            symmetric=paper_stage1,
                                            modality_mask=not paper_stage1)
  config.model.attention = "causal"
  if size == "demo":
    config.input = recipe_common.demo_pairs_input(num_negatives=0, task_batching=False)
    config.input.update(sources="demo+video", video=DEMO_VIDEO)
    config = recipe_common.demo_contrastive(config, "tiny_qwen2_vl")  # lr 3e-4, both stages
    config.eval.sources = "demo+video"
  else:
    config = recipe_common.pod_contrastive(config, _PRESETS[size], _sources(stage),
                                           global_batch_size=128 if stage == "1" else 512,
                                           num_negatives=0, task_batching=False, length=1024,
                                           lr=1e-4 if stage == "1" else 2e-5, total_steps=2000)
    config.input.video = RELEASED_VIDEO
  if adapters == "lora":
    config.adapters.update(recipe_common.ADAPTERS[f"unite_stage{stage}"])
  return config
