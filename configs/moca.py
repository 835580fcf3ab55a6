"""MoCa (modality-aware continual pre-training, then heterogeneous contrastive learning).

  python launch/tpu_train.py --config configs/moca.py --workdir runs/demo              # CPT demo, CPU
  python launch/tpu_train.py --config configs/moca.py:stage=cl --workdir runs/demo_cl \
      --config.init_from=runs/demo                                                  # CL demo, CPU
  python launch/tpu_train.py --config configs/moca.py:size=3b --workdir gs://b/moca3b \
      --config.init_from=/ckpt/Qwen2.5-VL-3B-Instruct --config.input.sources.dclm.path=...
  python launch/tpu_train.py --config configs/moca.py:size=3b,stage=cl --workdir gs://b/moca3b_cl \
      --config.init_from=gs://b/moca3b --config.input.sources.mmeb_ImageNet_1K.path=...

Argument (comma-separated): `size=demo|3b|7b` (default demo), `stage=cpt|cl` (default cpt),
`lr=paper|code` (stage cl only: 1e-5 or 2e-5).

Stage 1 (cpt), paper values for 3b/7b (../shared/METHODS.md §1): AdamW lr 2e-6, 10% warm-up,
linear decay, max grad norm 5, sequence 2048, text/image mask probability 0.4/0.5 (3b) and
0.6/0.6 (7b), MAE weight w = 0.5 (released code: 0.1), labels shifted (released code: not),
images of 256-1024 merged tokens, 500K samples per source. The MAE head's Linear(d, 4 x 1176)
output is read as the released code reads it (value d of patch p at d * 4 + p:
`mae_head_layout="interleaved"`), so its heads load here unchanged. The paper's token-budget batch
(12,800 cost units per device, cost = text tokens + 4 x image tokens + 2 x images) becomes
static TPU shapes: packed rows of 2048 tokens with a per-row patch budget, 4 rows per chip.
Videos (rows with "video" / "videos", data/sources.py; the paper trains on none) are sampled
and processed as Qwen's pipeline does (`input.video`, data/video.py) and their patches share the
row's patch budget. MAE masks them as it masks images: whole merged tokens, each 2 x 2 patches
across a temporal pair of frames (one 1176-value patch holds both frames), reconstructed from
the video token's hidden state; `--config.input.mae_on_video=false` never masks video patches
(MLM on the row's text is unchanged). The demo trains a tiny model from scratch on the package's
synthetic data in minutes.

Stage 2 (cl, METHODS.md §2): full fine-tuning from the stage-1 run (`init_from` its workdir;
its MAE decoder is left behind), bidirectional attention, mean pooling, InfoNCE with tau 0.03
over all-gathered in-batch positives plus K = 2 hard negatives per query, every query scoring
all hard negatives (`objective.negatives=global`, the paper; `own` is the released code),
task-aware batching (each global batch from one dataset), global batch 2048 (GradCache chunks
of 4 rows per chip), lr 1e-5 (paper) / 2e-5 (code), 5% warm-up, linear decay, one epoch of
about 2M pairs (<= 50K per dataset), length 1280. Prompts live in the data rows and in each
source's `query_template` / `target_template`. The demo fine-tunes on the synthetic pairs
(caption <-> scene, question -> document page, question -> passage) and reports held-out
Precision@1 before training and every 100 steps.
"""
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # recipe_common.py, beside this file
import recipe_common  # pylint: disable=wrong-import-position
from mmembed_jax.data.mmeb import MMEB_TRAIN  # pylint: disable=wrong-import-position

_SIZES = {
    # size: (preset, text mask probability, image mask probability)
    "3b": ("qwen2_5_vl_3b", 0.4, 0.5),
    "7b": ("qwen2_5_vl_7b", 0.6, 0.6),
}
# The paper's stage-1 mixture; set each path (local or gs://) on the command line or here.
PAPER_SOURCES = ("dclm", "pixelprose", "mammoth_vl", "mmeb_train", "docmatix", "visrag", "colpali")
# Stage 2's data (METHODS.md §2): MMEB-train's 20 sets, one source each so that a task-aware batch
# comes from one set, then the other corpora. Set each path; remove the sources you lack.
DOCUMENT_QUERY = "Find a document image that matches the given query: {text}"
DOCUMENT_TARGET = "<image>\nRepresent the given document image."


def cl_sources() -> dict:
  """The stage-2 sources with their formats and prompts; paths are left to the user."""
  sources = {f"mmeb_{name}": dict(path="", kind="jsonl", format="mmeb") for name in MMEB_TRAIN}
  sources["mme5_synthetic"] = dict(path="", kind="jsonl", format="mmE5")
  for name in ("visrag", "colpali", "tat_dqa", "arxivqa"):
    sources[name] = dict(path="", kind="jsonl", format="mmeb", query_template=DOCUMENT_QUERY,
                         target_template=DOCUMENT_TARGET)
  sources["infoseek"] = dict(path="", kind="jsonl", format="mmeb")
  sources["e5_text"] = dict(path="", kind="jsonl", format="mmeb")
  for source in sources.values():
    source.update(weight=1.0, cap=50_000)
  return sources


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """MoCa config for `size` and `stage`."""
  options = recipe_common.parse_args(
      arg, "configs/moca.py", {"size": ("demo", "3b", "7b"), "stage": ("cpt", "cl"),
                               "lr": ("paper", "code")},
      {"size": "demo", "stage": "cpt", "lr": "paper"})
  size, stage = options["size"], options["stage"]
  if stage == "cl":
    return _contrastive(size, options["lr"])
  config = recipe_common.default_config()
  config.model.attention = "bidirectional"
  config.optimizer.update(decay="linear", warmup_ratio=0.1, end_lr_ratio=0.0, weight_decay=0.0)
  config.objective = dict(name="moca_cpt", mae_weight=0.5, mlm_shift_labels=True, noise="shared",
                          logits_chunk=512, mae_head_layout="interleaved")
  if size == "demo":
    return _demo(config)
  preset, text_mask, image_mask = _SIZES[size]
  config.model.update(preset=preset, dtype="bfloat16", param_dtype="float32", scan_layers=True,
                      remat_policy="full")
  config.total_steps = 3300
  config.optimizer.update(lr=2e-6, max_grad_norm=5.0)
  config.input = dict(
      name="moca_cpt",
      sources={name: dict(path="", kind="jsonl", weight=1.0, cap=500_000) for name in PAPER_SOURCES},
      global_batch_size=128, length=2048, min_pixels=256 * 28 * 28, max_pixels=1024 * 28 * 28,
      # The rows of a device share one patch buffer of rows x max_patches slots, filled jointly
      # with their tokens: 2 x length on average (the paper's data fills 41-44% of 4 x length
      # slots in every row, the worst case of two 1024-token images).
      rows_per_patch_buffer=0, max_patches=2 * 2048, max_images=8,
      text_mask_prob=text_mask, image_mask_prob=image_mask, num_workers=8, data_shards=0)
  config.mesh.ici = dict(data=1, fsdp=-1, tensor=1)
  config.checkpoint.update(every=200, keep=3, keep_period=1000)
  return config


def _demo(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A tiny model from scratch on the synthetic demo data: minutes on a 2-core CPU.

  lr 5e-4: at 2e-3 the stage-1 model's pooled embeddings came out nearly collinear (held-out
  captions at mean cosine 0.94) and stage 2 from it left two image sets at chance (README,
  "MoCa's ablation in miniature")."""
  config.model.preset = "tiny_qwen2_5_vl"
  config.total_steps = 300
  config.log_every = 10
  config.optimizer.update(lr=5e-4, max_grad_norm=5.0, warmup_ratio=0.05)
  config.objective.logits_chunk = 0
  config.input = dict(
      name="moca_cpt", sources="demo", global_batch_size=8, length=128, max_images=4,
      min_pixels=16 * 28 * 28, max_pixels=48 * 28 * 28,
      rows_per_patch_buffer=0, max_patches=128,  # one buffer per device: 94% of its slots real
      # Video frames bounded as the images are: the vision tower's full layers then attend by
      # blocks of at most 192 patches (the video processor's own bound is 3,072).
      video=dict(processor_min_pixels=16 * 28 * 28, processor_max_pixels=48 * 28 * 28),
      text_mask_prob=0.4, image_mask_prob=0.5, num_workers=0, data_shards=0)
  config.checkpoint.update(every=100, keep=2)
  return config


def _contrastive(size: str, lr: str) -> ml_collections.ConfigDict:
  """Stage 2: heterogeneous contrastive fine-tuning from the stage-1 run."""
  config = recipe_common.contrastive_config(pooling="mean", temperature=0.03, negatives="global")
  config.model.attention = "bidirectional"
  if size == "demo":
    config.input = recipe_common.demo_pairs_input(num_negatives=2, task_batching=True)
    return recipe_common.demo_contrastive(config, "tiny_qwen2_5_vl")
  # One epoch: about 2M pairs / 2048.
  return recipe_common.pod_contrastive(config, _SIZES[size][0], cl_sources(),
                                       global_batch_size=2048, num_negatives=2, task_batching=True,
                                       length=1280, lr=1e-5 if lr == "paper" else 2e-5,
                                       total_steps=1000)
