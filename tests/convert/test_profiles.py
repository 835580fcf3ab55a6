"""The published families' profiles: a model directory with a profile applied embeds a row with an
instruction exactly as it embeds the input that family's released code builds, written here by
hand, for a text, an image and a video row; PyTorch (torch_embed) agrees; and the prompt format
changes the embeddings."""
import json

import numpy as np
import pytest

from mmembed_jax import torch_embed
from mmembed_jax.convert import profiles
from mmembed_jax.convert.hf_export import export_hf
from mmembed_jax.convert.hf_import import import_hf
from mmembed_jax.data.prompts import PromptFormat
from mmembed_jax.training.trained_model import export_mesh

TASKS = ["ImageNet-1K", "MSCOCO_t2i"]  # of the sample set: a classification and a retrieval
FAMILY = {"vlm2vec_v1": "qwen2_vl", "vlm2vec_v2": "qwen2_vl", "unite": "qwen2_vl",
          "moca": "qwen2_5_vl", "coma": "qwen2_5_vl"}
ROWS = [{"text": "a red circle", "instruction": "Find it:"},
        {"text": "a red circle", "instruction": "Find it:", "image": "wide.png"},
        {"text": "a clip", "instruction": "Find it:", "video": "clip1.mp4"}]
CHAT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{}\n"
        "Summary above {} in one word:<|im_end|>\n<|im_start|>assistant\n<|endoftext|>")
# What each family's released code feeds its model for ROWS (as our row text, markers for media).
EXPECTED = {
    "vlm2vec_v1": ["Find it: a red circle", "<image>Find it: a red circle", "<video>Find it: a clip"],
    "vlm2vec_v2": ["Find it: a red circle", "<image> Find it: a red circle",
                   "<video> Find it: a clip"],
    "moca": ["Find it: a red circle", "<image>Find it: a red circle", "<video>Find it: a clip"],
    "unite": [CHAT.format("Find it: a red circle", "sentence"),
              CHAT.format("<image>Find it: a red circle", "sentence and image"),
              CHAT.format("<video>Find it: a clip", "sentence and video")],
    "coma": ["Find it: a red circle", "<image> Find it: a red circle", "<video> Find it: a clip"],
}


def _profiled(name, tiny_hf_dirs, tmp_path):
  """A tiny model of the family exported, then the profile applied (CoMa's export carries its
  compression tokens in the tokenizer, as a CoMa checkpoint does)."""
  source = tiny_hf_dirs[FAMILY[name]]
  config, params = import_hf(source)
  embedding = {"compression_tokens": 32} if name == "coma" else None
  out = str(export_hf(config, params, str(tmp_path / name), source_dir=source,
                      embedding=embedding))
  record = profiles.apply_profile(out, name)
  assert json.loads((tmp_path / name / "mmembed.json").read_text()) == record
  return out


@pytest.mark.parametrize("name", sorted(profiles.PROFILES))
def test_profile_embeds_the_hand_built_input(name, tiny_hf_dirs, video_row_dir, tmp_path):
  from mmembed_jax.embedding import JaxEmbedder  # pylint: disable=g-import-not-at-top
  model_dir = _profiled(name, tiny_hf_dirs, tmp_path)
  embedder = JaxEmbedder.from_pretrained(model_dir, max_length=4096)
  mmembed = profiles.PROFILES[name]["mmembed"]
  assert embedder.prompt == PromptFormat.from_record(mmembed["prompt"])
  assert (embedder.pooling, embedder.config.attention) == (mmembed["pooling"], mmembed["attention"])
  assert embedder.image_config.max_pixels == profiles.PROFILES[name]["image"]["max_pixels"]
  ours = embedder.embed_rows(ROWS, base_dir=video_row_dir)
  embedder.prompt = PromptFormat()  # the hand-built text as it is
  hand_built = [dict(row, text=text, instruction=None) for row, text in zip(ROWS, EXPECTED[name])]
  np.testing.assert_array_equal(embedder.embed_rows(hand_built, base_dir=video_row_dir), ours)
  theirs = torch_embed.load(model_dir, max_length=4096)(ROWS, base_dir=video_row_dir)
  assert np.abs(theirs - ours).max() <= 1e-4, name

  # The MMEB-V2 sample set (instructions in its document task's rows) scores alike.
  from mmembed_jax.demo.eval_sets import write_demo_mmeb_v2  # pylint: disable=g-import-not-at-top
  from mmembed_jax.evaluation import mmeb_v2  # pylint: disable=g-import-not-at-top
  sample = str(tmp_path / "sample")
  write_demo_mmeb_v2(sample, rows_per_dataset=4, num_pages=4)
  embedder.prompt = PromptFormat.from_record(mmembed["prompt"])
  torch_embedder = torch_embed.load(model_dir, max_length=4096)
  jax_result = mmeb_v2.evaluate_mmeb_v2(embedder.try_embed_rows, sample, export_mesh(), TASKS)
  torch_result = mmeb_v2.evaluate_mmeb_v2(lambda rows: (torch_embedder(rows), {}), sample,
                                          export_mesh(), TASKS)
  for task, scores in jax_result["per_task"].items():
    metric = mmeb_v2.TASKS[task].metric
    assert torch_result["per_task"][task][metric] == pytest.approx(scores[metric], abs=1e-9)


def test_prompt_format_changes_the_embeddings(tiny_hf_dirs, image_dir, tmp_path):
  from mmembed_jax.embedding import JaxEmbedder  # pylint: disable=g-import-not-at-top
  embedder = JaxEmbedder.from_pretrained(_profiled("unite", tiny_hf_dirs, tmp_path))
  chat = embedder.embed_rows(ROWS[:2], base_dir=image_dir)
  embedder.prompt = PromptFormat()
  raw = embedder.embed_rows(ROWS[:2], base_dir=image_dir)
  assert np.abs(chat - raw).max() > 1e-2
  with pytest.raises(ValueError, match="unknown profile"):
    profiles.apply_profile(str(tmp_path / "unite"), "vlm2vec_v3")
