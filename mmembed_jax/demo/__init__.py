"""The demo: a laptop-sized world in which every recipe runs, with nothing downloaded.

  scenes.py, documents.py   synthetic shape scenes, document pages and passages (with hard negatives)
  records.py                their MoCa stage-1 rows and contrastive pairs, written to the demo cache
  eval_sets.py              small MMEB- and ViDoRe-format evaluation sets
  tokenizer.py              a 512-token Qwen-VL-style BPE tokenizer trained on the spot
  tiny_model.py             tiny and small Qwen2(.5)-VL architectures (`model.preset`)
  synthetic_tokens.py       `input.name = "synthetic_tokens"`, the engine's test input
  build.py                  launch/demo.py: a random tiny model embedding a few rows
  ablation.py               launch/ablate.py: MoCa's ablation on the demo, over seeds

The package reaches this one only through `training/demo_entry.py`, when a config asks for the
demo: `sources="demo"`, a demo input or a demo preset. Deleting demo/ loses the demo only.
"""
import os
from typing import Any, Dict

from mmembed_jax.demo.synthetic_tokens import SyntheticTokens
from mmembed_jax.demo.tiny_model import PRESETS, preset_config

INPUTS = {SyntheticTokens.name: SyntheticTokens}
# The synthetic pairs: a training split and a held-out one (another seed). Enough scenes that
# a tiny model cannot learn the training images by heart in a demo's few hundred steps.
TRAIN_PAIRS = dict(num_scenes=768, num_documents=256, num_passages=384, seed=0, name="pairs")
HELD_OUT_PAIRS = dict(num_scenes=64, num_documents=32, num_passages=64, seed=1, name="pairs_eval")
# Caption <-> clip pairs, added by sources="demo+video" (UNITE's demo).
TRAIN_VIDEO_PAIRS = dict(num_clips=384, seed=0, name="video_pairs")
HELD_OUT_VIDEO_PAIRS = dict(num_clips=64, seed=1, name="video_pairs_eval")
DEMO_SOURCES = ("demo", "demo+video")  # the values of `sources` that ask for the demo's files
# Share of training batches per dataset: the image sets learn from pixels through a vision tower
# trained from scratch and need more steps than the text set, which learns from shared words.
PAIR_WEIGHTS = {"caption_scene": 3.0, "scene_caption": 3.0, "query_document": 2.0,
                "question_passage": 1.0, "caption_video": 3.0, "video_caption": 3.0}


def cache_dir() -> str:
  """Where the demo's data and tokenizer are built once: $MMEMBED_DEMO_CACHE, read at each call,
  else ~/.cache/mmembed_jax/demo."""
  return os.environ.get("MMEMBED_DEMO_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "mmembed_jax", "demo")


def tokenizer_dir() -> str:
  """The demo tokenizer, trained into the demo cache on first use."""
  from mmembed_jax.demo.tokenizer import build_tokenizer  # pylint: disable=g-import-not-at-top
  path = os.path.join(cache_dir(), "tokenizer")
  if not os.path.exists(os.path.join(path, "tokenizer.json")):
    build_tokenizer(path)
  return path


def sources(kind: str, variant: str = "demo") -> Dict[str, Dict[str, Any]]:
  """{name: source spec} of the demo's files for `kind`: "moca_cpt" (stage-1 rows),
  "coma_dialogues" (CoMa stage-1 rows),
  "contrastive_pairs" (training pairs) or "held_out_pairs"; written on first use. variant
  "demo+video" adds the caption <-> clip pairs to the pairs."""
  if variant not in DEMO_SOURCES:
    raise ValueError(f"demo sources {variant!r}: expected one of {DEMO_SOURCES}")
  from mmembed_jax.demo import records  # pylint: disable=g-import-not-at-top
  data = os.path.join(cache_dir(), "data")
  if kind == "moca_cpt":
    files = records.write_demo_dataset(data, seed=0)
    return {name: dict(path=path, kind="jsonl", weight=1.0) for name, path in files.items()}
  if kind == "coma_dialogues":
    files = records.write_demo_dialogues(data, seed=0)
    return {name: dict(path=path, kind="jsonl", weight=1.0) for name, path in files.items()}
  if kind in ("contrastive_pairs", "held_out_pairs"):
    train = kind == "contrastive_pairs"
    files = records.write_demo_pairs(data, **(TRAIN_PAIRS if train else HELD_OUT_PAIRS))
    if variant == "demo+video":
      files.update(records.write_demo_video_pairs(
          data, **(TRAIN_VIDEO_PAIRS if train else HELD_OUT_VIDEO_PAIRS)))
    return {name: dict(path=path, kind="jsonl", format="mmeb", weight=PAIR_WEIGHTS[name])
            for name, path in files.items()}
  raise ValueError(f"the demo has no sources for '{kind}'")


__all__ = ["DEMO_SOURCES", "INPUTS", "PRESETS", "cache_dir", "preset_config", "sources",
           "tokenizer_dir"]
