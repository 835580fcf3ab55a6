"""CoMa: compression pre-training, then contrastive matching, on Qwen2.5-VL (METHODS.md §5).

  python launch/tpu_train.py --config configs/coma.py:stage=1 --workdir runs/coma1      # demo, CPU
  python launch/tpu_train.py --config configs/coma.py:stage=2 --workdir runs/coma2 \\
      --config.init_from=runs/coma1                                                 # demo, CPU
  python launch/tpu_train.py --config configs/coma.py:size=7b,stage=1 --workdir gs://b/coma7b_1 \\
      --config.init_from=/ckpt/Qwen2.5-VL-7B-Instruct --config.input.sources.dialogues.path=...
  python launch/tpu_train.py --config configs/coma.py:size=7b,stage=2 --workdir gs://b/coma7b_2 \\
      --config.init_from=gs://b/coma7b_1 --config.input.sources.mmeb_ImageNet_1K.path=...

Argument (comma-separated): `size=demo|3b|7b` (default demo), `stage=1|2` (default 1),
`mask=code|paper`, `split_layer=N` (default -1, the released code's), `loss_on=after_ctokens|answers`
(stage 1; default after_ctokens, the released code's), `adapters=dora|none` (default: dora at
3b and 7b, as the released code trains; none for the demo, a tiny model from scratch).

The released code's values (scripts/train-qwen2_5vl-{3B,7B}_{qa,ret}.sh), and where the paper
differs:
- 32 compression tokens `<|ctoken_pad_i|>` in Qwen's spare vocabulary rows, no resize; the token
  embedding trains in full (peft `modules_to_save`), the vision tower is frozen.
- DoRA r 16, alpha 64, dropout 0.1, Gaussian init, on the LLM's q/k/v/o_proj, in both stages;
  stage 2 starts from stage 1 with its DoRA merged (`init_from` merges it) and trains a fresh one.
- Stage 1 (objectives/coma.py): image, "\\nSummarize above image and text in a few words.", the 32
  tokens, then the dialogue in Qwen's chat format (no system turn); next-token loss on every
  token after the compression tokens (the paper: the answers only, `loss_on=answers`), each
  example's tokens averaged, then the examples; causal attention. The compression mask, over
  four token regions (0 image and prompt, 1 compression tokens, 2 the first user turn, 3 from
  the first assistant turn on; layers counted from 0), who attends to whom beyond causality:
    mask=code, split_layer > 0 (the released `_update_causal_mask_by_sep_indices`): layers below
      it: region 3 sees neither 0 nor 1 (so the answers see the compressed image only through
      the first question); from it on, additionally regions 1, 2 and 3 do not see 0.
    mask=code, split_layer = 0: every layer: regions 1, 2 and 3 do not see 0.
    mask=paper: layers below split_layer plain causal; from it on regions 2 and 3 do not see 0
      (after the compression tokens only they and the dialogue are seen).
    split_layer < 0, either mode: plain causal.
  The released scripts never set `split_layer` (the model reads `config.split_layer`, absent
  from Qwen's config.json, default -1), so the released model trained with plain causal
  attention; the paper describes the masked reading without giving a split layer. lr 5e-5 cosine, 5% warm-up, weight decay 0, one epoch (12 MMEB-train image sets, <= 30K
  images each, 3-5 generated questions per image), sequences of up to 8192 tokens, images of
  256-1024 merged tokens. The released global batch is 256 examples of one sequence each; here
  examples are packed into rows of 8192 tokens, 32 rows per step (one per chip of a v5p-64):
  9.3 examples a row measured with COCO-sized images and the demo tokenizer (which spells text
  about 3 times longer than Qwen's), so about 300 examples a step; 1,100 steps make the epoch.
- Stage 2: InfoNCE over all-gathered in-batch targets (the released collator sends no hard
  negatives), tau 0.03, pooling = mean of the 32 compression tokens appended to every query and
  target (`ctoken`, after the final norm), plain causal attention (the released code skips the
  mask for retrieval), no chat template; global batch 1024 through GradCache (chunks of 8 rows
  per chip for 3b, 4 for 7b), same-dataset batches (released: runs of 64 from one subset),
  lr 5e-5 cosine, 5% warm-up, 1500 steps on MMEB-train's 20 sets. The released evaluation pools
  the last token (`scripts/eval.sh --pooling eos`), not the training's mean.
The demo trains a tiny Qwen2.5-VL from scratch on the package's synthetic dialogues (stage 1:
counts, colours, cells and positions of shapes; page questions) and pairs (stage 2), reporting
held-out Precision@1.
"""
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # recipe_common.py, beside this file
import recipe_common  # pylint: disable=wrong-import-position
from mmembed_jax.data.mmeb import MMEB_TRAIN  # pylint: disable=wrong-import-position

_PRESETS = {"3b": "qwen2_5_vl_3b", "7b": "qwen2_5_vl_7b"}
NUM_CTOKENS = 32
# The 12 MMEB-train image sets of the released stage-1 data (one JSONL of dialogues in the
# released code; one source each here, so a mixture can weigh them).
# Stage 2's per-set caps: the released scripts/train_ret.yaml's num_sample_per_subset.
STAGE2_CAPS = {"ImageNet_1K": 100_000, "N24News": 50_000, "HatefulMemes": 10_000,
               "VOC2007": 10_000, "SUN397": 20_000, "OK-VQA": 10_000, "A-OKVQA": 20_000,
               "DocVQA": 40_000, "InfographicsVQA": 25_000, "ChartQA": 28_000,
               "Visual7W": 70_000, "VisDial": 130_000, "CIRR": 30_000,
               "VisualNews_t2i": 100_000, "VisualNews_i2t": 100_000, "MSCOCO_t2i": 100_000,
               "MSCOCO_i2t": 120_000, "NIGHTS": 20_000, "WebQA": 20_000, "MSCOCO": 100_000}
STAGE1_SETS = ("N24News", "HatefulMemes", "VOC2007", "SUN397", "Visual7W", "MSCOCO", "VisDial",
               "CIRR", "MSCOCO_i2t", "MSCOCO_t2i", "NIGHTS", "WebQA")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """CoMa config for `size` and `stage`."""
  options = recipe_common.parse_args(
      arg, "configs/coma.py",
      {"size": ("demo", "3b", "7b"), "stage": ("1", "2"), "mask": ("code", "paper"),
       "split_layer": int, "loss_on": ("after_ctokens", "answers"), "adapters": ("dora", "none")},
      {"size": "demo", "stage": "1", "mask": "code", "split_layer": -1,
       "loss_on": "after_ctokens", "adapters": ""})
  size, stage = options["size"], options["stage"]
  adapters = options["adapters"] or ("none" if size == "demo" else "dora")
  config = _stage1(size, options) if stage == "1" else _stage2(size)
  config.model.attention = "causal"
  config.optimizer.update(decay="cosine", warmup_ratio=0.05, end_lr_ratio=0.0, weight_decay=0.0)
  if adapters == "dora":
    config.adapters.update(recipe_common.ADAPTERS["coma"])
  return config


def _stage1(size: str, options: dict) -> ml_collections.ConfigDict:
  """Compression pre-training on image dialogues."""
  config = recipe_common.default_config()
  config.objective = dict(name="coma_compression", loss_on=options["loss_on"],
                          mask=options["mask"], split_layer=options["split_layer"],
                          logits_chunk=512)
  if size == "demo":
    config.model.preset = "tiny_qwen2_5_vl"
    config.total_steps = 300
    config.log_every = 10
    config.optimizer.update(lr=5e-4, max_grad_norm=1.0)
    config.objective.logits_chunk = 0
    config.input = dict(name="coma_dialogues", sources="demo", global_batch_size=8, length=256,
                        max_patches=256, max_images=2, min_pixels=16 * 28 * 28,
                        max_pixels=32 * 28 * 28, num_ctokens=NUM_CTOKENS, num_workers=0)
    config.checkpoint.update(every=100, keep=2)
    return config
  config.model.update(preset=_PRESETS[size], dtype="bfloat16", param_dtype="float32",
                      scan_layers=True, remat_policy="full")
  config.total_steps = 1100
  config.optimizer.update(lr=5e-5, max_grad_norm=1.0)
  config.input = dict(
      name="coma_dialogues",
      sources={name: dict(path="", kind="jsonl", weight=1.0, cap=30_000) for name in STAGE1_SETS},
      global_batch_size=32, length=8192, max_patches=4 * 8192, max_images=16,
      min_pixels=256 * 28 * 28, max_pixels=1024 * 28 * 28, num_ctokens=NUM_CTOKENS,
      num_workers=8)
  config.mesh.ici = dict(data=1, fsdp=-1, tensor=1)
  config.checkpoint.update(every=200, keep=3)
  return config


def _stage2(size: str) -> ml_collections.ConfigDict:
  """Contrastive matching from the stage-1 run, pooled over the compression tokens."""
  config = recipe_common.contrastive_config(pooling="ctoken", temperature=0.03, negatives="own",
                                            num_ctokens=NUM_CTOKENS)
  if size == "demo":
    config.input = recipe_common.demo_pairs_input(num_negatives=0, task_batching=True)
    config.input.update(num_ctokens=NUM_CTOKENS, query_length=96 + NUM_CTOKENS,
                        target_length=112 + NUM_CTOKENS)
    return recipe_common.demo_contrastive(config, "tiny_qwen2_5_vl")
  config = recipe_common.pod_contrastive(
      config, _PRESETS[size], {f"mmeb_{name}": dict(path="", kind="jsonl", format="mmeb",
                                                    weight=1.0, cap=STAGE2_CAPS[name])
                             for name in MMEB_TRAIN},
      global_batch_size=1024, num_negatives=0, task_batching=True, length=1280, lr=5e-5,
      total_steps=1500)
  config.input.num_ctokens = NUM_CTOKENS
  config.objective.grad_cache_chunk = 8 if size == "3b" else 4
  return config
