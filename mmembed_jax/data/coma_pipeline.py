"""CoMa stage 1 input: image(s) + prompt + compression tokens + a Q/A dialogue -> packed rows.

A record is {"image" | "images", "text" (optional prompt), "dialogue": [{"q": str, "a": str},
...]} (JSONL or Parquet, sources.py). Its sequence is built as the released code builds it
(METHODS.md §5), with no system turn:

  <image>... ["\n" + text] "\nSummarize above image and text in a few words."   region 0
  <|ctoken_pad_0|> ... <|ctoken_pad_{n-1}|>                                    region 1
  <|im_start|>user\nQ1<|im_end|>\n                                              region 2
  <|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n ...   region 3

(a text-only record says "above text"; text with its own `<image>` markers is used as is). The
regions drive the compression mask (objectives/coma.py); `answer_mask` flags each answer's
tokens and its `<|im_end|>` (the paper's P(A | I, C(X), Q) loss). Each turn's pieces (the user
turn, the assistant header, the answer, the newline) are tokenised apart, which equals
tokenising the whole string unless an answer or question starts with whitespace.

One packed row (packing.py, as MoCa's stage 1 without its masks):
  input_ids, segment_ids, attention_regions, answer_mask  int32 [local_batch, length]
  positions int32 [local_batch, 3, length]; pixel_patches, patch_image_ids, image_grid_thw,
  example_ids, bad_records, bad_messages as cpt_pipeline.py's.

Truncation: the dialogue is cut at `length` (as the released code truncates at max_len); a
record whose prefix (images, prompt, compression tokens) or first answer token does not fit, or
that cannot be read (no or malformed dialogue, a bad image, ...), is a bad record: skipped,
counted and named by FILE:LINE.
"""
import dataclasses
from typing import Any, Dict, List, Mapping, Optional

import grain
import numpy as np

from mmembed_jax.data import images as images_lib
from mmembed_jax.data import packing
from mmembed_jax.data import video as video_lib
from mmembed_jax.data.bad_records import BadRecord
from mmembed_jax.data.cpt_pipeline import cpt_budget, open_sources, packed_dataset
from mmembed_jax.data.sequences import (IMAGE_MARKER, VIDEO_MARKER, SequenceEncoder,
                                        tokenizer_pad_id)
from mmembed_jax.data.special_tokens import check_ctoken_ids, compression_tokens

PREFIX, CTOKENS, FIRST_QUESTION, DIALOGUE = 0, 1, 2, 3  # attention regions
IMAGE_PROMPT = "\nSummarize above image and text in a few words."
TEXT_PROMPT = "\nSummarize above text in a few words."
TOKEN_FIELDS = ("attention_regions", "answer_mask")


def check_dialogue(dialogue: Any) -> List[Dict[str, str]]:
  """The dialogue as [{"q", "a"}, ...]; BadRecord naming the field that breaks it."""
  if not isinstance(dialogue, (list, tuple)) or not dialogue:
    raise BadRecord(f"field 'dialogue' must be a non-empty array of {{\"q\", \"a\"}} objects, "
                    f"found {type(dialogue).__name__ if dialogue is not None else 'nothing'}")
  for i, turn in enumerate(dialogue):
    if not isinstance(turn, Mapping) or not all(isinstance(turn.get(k), str) for k in "qa"):
      raise BadRecord(f"dialogue[{i}] must be an object with string fields 'q' and 'a', found "
                      f"{turn!r:.80}")
  return [{"q": turn["q"], "a": turn["a"]} for turn in dialogue]


def prefix_text(text: str, num_images: int, num_videos: int = 0) -> str:
  """The text before the compression tokens: images (then videos) first, then "\n" + text, then
  the prompt (the image prompt for videos too: CoMa trains on no video)."""
  if IMAGE_MARKER in text or VIDEO_MARKER in text:
    return text + IMAGE_PROMPT
  markers = IMAGE_MARKER * num_images + VIDEO_MARKER * num_videos
  return markers + ("\n" + text if text else "") + (IMAGE_PROMPT if markers else TEXT_PROMPT)


class ComaEncoder:
  """Record -> encoded example, or {"bad_record": "FILE:LINE: why"} (picklable, thread-safe)."""

  def __init__(self, tokenizer_dir: str, budget: packing.PackingBudget,
               image_config: images_lib.ImageProcessingConfig, num_ctokens: int,
               video: video_lib.VideoSettings = video_lib.VideoSettings()):
    self.ctokens = compression_tokens(num_ctokens)
    self.sequences = SequenceEncoder(tokenizer_dir, image_config, self.ctokens, video=video)
    self.budget = budget

  def encode(self, record: Mapping[str, Any]) -> Dict[str, Any]:
    """The example of a record; raises BadRecord (see the module docstring)."""
    if record.get("error"):
      raise BadRecord(record["error"])
    dialogue = check_dialogue(record.get("dialogue"))
    budget, sequences = self.budget, self.sequences
    room = budget.length - len(self.ctokens)
    videos = record.get("videos", ())
    prefix = sequences.encode(prefix_text(record["text"] or "", len(record["images"]), len(videos)),
                              record["images"], length=room, max_patches=budget.max_patches,
                              max_images=budget.max_images, videos=videos,
                              video_fps=record.get("fps"))
    ids = [prefix.input_ids, np.asarray(sequences.extra_ids(self.ctokens), np.int32)]
    regions = [np.full(prefix.num_tokens, PREFIX), np.full(len(self.ctokens), CTOKENS)]
    answers = [np.zeros(prefix.num_tokens + len(self.ctokens))]
    for k, turn in enumerate(dialogue):
      pieces = ((f"<|im_start|>user\n{turn['q']}<|im_end|>\n", False),
                ("<|im_start|>assistant\n", False), (turn["a"] + "<|im_end|>", True),
                ("\n", False))
      for j, (piece, is_answer) in enumerate(pieces):
        piece_ids = np.asarray(sequences.text_ids(piece), np.int32)
        ids.append(piece_ids)
        regions.append(np.full(len(piece_ids), FIRST_QUESTION if k == j == 0 else DIALOGUE))
        answers.append(np.full(len(piece_ids), is_answer))
    input_ids = np.concatenate(ids).astype(np.int32)[:budget.length]
    answer_mask = np.concatenate(answers).astype(np.int32)[:budget.length]
    if not answer_mask.any():
      raise BadRecord(f"the first answer does not fit in length {budget.length} after "
                      f"{prefix.num_tokens} prefix and {len(self.ctokens)} compression tokens")
    # The prefix's own positions (its videos' time axis included); the text after it goes on
    # one past its last token, which is text (the prompt).
    rest = np.arange(1, len(input_ids) - prefix.num_tokens + 1, dtype=np.int32)
    positions = np.concatenate([prefix.positions, prefix.positions[:, -1:] + rest[None]], axis=1)
    return {"input_ids": input_ids, "positions": positions, "pixel_patches": prefix.patches,
            "image_grid_thw": prefix.grid_thw,
            "attention_regions": np.concatenate(regions).astype(np.int32)[:budget.length],
            "answer_mask": answer_mask, "example_id": int(record["example_id"]),
            "source": record.get("source", "?")}

  def __call__(self, record: Mapping[str, Any]) -> Dict[str, Any]:
    return packing.encode_or_skip(self.encode, record)


def coma_budget(length: int, max_patches: int, max_images: int, max_segments: int,
                pad_id: int = 0, rows_per_patch_buffer: int = 1) -> packing.PackingBudget:
  """The packed unit's static shape (cpt_pipeline.cpt_budget's), with CoMa's per-token fields."""
  return dataclasses.replace(
      cpt_budget(length, max_patches, max_images, max_segments, pad_id, rows_per_patch_buffer),
      token_fields=TOKEN_FIELDS, patch_fields=())


def coma_dataset(sources: Any, tokenizer_dir: str, global_batch_size: int, length: int,
                 max_patches: int, max_images: int, min_pixels: int, max_pixels: int,
                 num_ctokens: int, seed: int, vocab_size: int, max_segments: int = 64,
                 packing_bins: Optional[int] = None,
                 video: video_lib.VideoSettings = video_lib.VideoSettings(),
                 rows_per_patch_buffer: int = 1, **stream: Any) -> grain.IterDataset:
  """This process's endless dataset of packed CoMa stage-1 batches (see the module docstring);
  `stream`: packed_dataset's keyword arguments (workers, threads, processes, data shards)."""
  image_config = images_lib.ImageProcessingConfig(min_pixels=min_pixels, max_pixels=max_pixels)
  budget = coma_budget(length, max_patches, max_images, max_segments,
                       tokenizer_pad_id(tokenizer_dir), rows_per_patch_buffer)
  encoder = ComaEncoder(tokenizer_dir, budget, image_config, num_ctokens, video)
  check_ctoken_ids(encoder.sequences, num_ctokens, vocab_size)
  return packed_dataset(open_sources(sources), encoder, budget, global_batch_size, seed,
                        packing_bins=packing_bins, **stream)


def batch_unit(length: int, max_patches: int, max_images: int, max_segments: int = 64,
               rows_per_patch_buffer: int = 1, **unused: Any) -> Dict[str, Any]:
  """One patch buffer and its rows, of the shapes `coma_dataset` makes (all padding), for the
  compile proof."""
  del unused
  return packing.layout_unit([], coma_budget(length, max_patches, max_images, max_segments,
                                             rows_per_patch_buffer=rows_per_patch_buffer))

