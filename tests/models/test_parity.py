"""The Flax backbone equals transformers' PyTorch model (the oracle), fp32, max abs diff <= 1e-4.

Inputs that would expose a mistake: a text-only row, rows with one or two images of odd
sizes and aspect ratios (several attention windows, partial windows), right padding.
Bidirectional mode is made honestly on the PyTorch side: a padding-only 4-D mask given to
transformers' own layers, with positions from transformers' own get_rope_index.
"""
import numpy as np
import pytest
import torch
import transformers

from mmembed_jax.convert.hf_import import import_hf
from mmembed_jax.data import collate as collate_lib
from mmembed_jax.data import rows as rows_lib
from mmembed_jax.data.images import ImageProcessingConfig
from mmembed_jax.models.pooling import pool
from mmembed_jax.models.vision import PACKED, attention_inputs, patch_layout
from mmembed_jax.models.vlm import VisionLanguageModel
from mmembed_jax.convert.torch_embed import forward_hidden

from tiny_models import TEST_PIXELS, VIDEO_FPS, VIDEO_ROWS, VIDEO_SETTINGS

TOLERANCE = 1e-4
ROWS = [
    {"text": "a small plain text row about red circles"},
    {"text": "<image> a wide picture of a blue square", "image": "wide.png"},
    {"text": "left <image> and right <image> compared", "images": ["tall.png", "small.png"]},
    {"text": "a square page", "image": "square.png"},
]


def _hf_model(model_dir):
  config = transformers.AutoConfig.from_pretrained(model_dir)
  cls = {"qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
         "qwen2_vl": transformers.Qwen2VLForConditionalGeneration}[config.model_type]
  return cls.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32).eval()


def _encode(tokenizer, image_dir):
  image_config = ImageProcessingConfig(**TEST_PIXELS)
  encoded = [rows_lib.encode_row(row, tokenizer, image_config, 512, image_dir) for row in ROWS]
  length, patches, images = collate_lib.bucket_sizes(encoded)
  # Padding in the patch buffer too, 3 x 4 patches more than a multiple of 16.
  return encoded, collate_lib.collate(encoded, tokenizer.pad_token_id, length + 5, patches + 76,
                                      images)


def _torch_reference(model, batch, encoded, attention):
  """transformers' hidden states [batch, length, embed], positions from its own get_rope_index."""
  input_ids = torch.as_tensor(batch["input_ids"]).long()
  valid = batch["segment_ids"] > 0
  grids = np.concatenate([row.grid_thw for row in encoded if row.num_images])
  pixels = np.concatenate([row.patches for row in encoded if row.num_images])
  image_token = model.config.image_token_id
  positions, _ = model.model.get_rope_index(
      input_ids, mm_token_type_ids=(input_ids == image_token).long(),
      image_grid_thw=torch.as_tensor(grids), attention_mask=torch.as_tensor(valid).long())
  positions = positions.permute(1, 0, 2).numpy() * valid[:, None, :]
  np.testing.assert_array_equal(positions, batch["positions"])  # our M-RoPE positions agree
  hidden = forward_hidden(model, batch["input_ids"], valid, positions, pixels, grids, attention)
  return hidden


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_hidden_states_and_embeddings_match_transformers(family, attention, tiny_hf_dirs, tokenizer,
                                                         image_dir):
  model = _hf_model(tiny_hf_dirs[family])
  encoded, batch = _encode(tokenizer, image_dir)
  reference = _torch_reference(model, batch, encoded, attention)
  config, params = import_hf(tiny_hf_dirs[family], attention=attention)
  # The largest frame as the frame bound: full layers (frames over a quarter of the buffer), and
  # windows in this small buffer, by blocks met at run time (the video rows below take
  # attention_impl="xla" with no bound, so masked attention is checked there).
  grids = batch["image_grid_thw"]
  config = config.replace(max_frame_patches=int((grids[..., 1] * grids[..., 2]).max()))
  kinds = attention_inputs(patch_layout(batch["patch_image_ids"], batch["image_grid_thw"],
                                        config.vision), config, "xla")[0]
  assert kinds == (PACKED, PACKED)
  hidden = np.asarray(VisionLanguageModel(config).apply({"params": params}, batch))
  valid = batch["segment_ids"] > 0
  hidden_error = np.abs(hidden - reference.numpy())[valid].max()
  print(f"{family} {attention}: hidden max abs diff {hidden_error:.2e}")
  assert hidden_error <= TOLERANCE
  for pooling in ("mean", "last"):
    ours = np.asarray(pool(hidden, batch["segment_ids"], pooling))
    theirs = _pool_torch(reference, valid, pooling)
    assert np.abs(ours - theirs).max() <= TOLERANCE, pooling


def _pool_torch(hidden, valid, pooling):
  """Pooling written independently of ours, in torch, from the definitions."""
  rows = []
  for i in range(hidden.shape[0]):
    tokens = hidden[i][torch.as_tensor(valid[i])]
    vector = tokens.mean(0) if pooling == "mean" else tokens[-1]
    rows.append(vector / vector.norm())
  return torch.stack(rows).numpy()


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_causal_lm_logits_match_transformers(family, tiny_hf_dirs, tokenizer, image_dir):
  model = _hf_model(tiny_hf_dirs[family])
  encoded, batch = _encode(tokenizer, image_dir)
  hidden = _torch_reference(model, batch, encoded, "causal")
  with torch.no_grad():
    reference = model.lm_head(hidden).numpy()
  config, params = import_hf(tiny_hf_dirs[family], attention="causal")
  logits = np.asarray(VisionLanguageModel(config).apply({"params": params}, batch, method="logits"))
  valid = batch["segment_ids"] > 0
  assert np.abs(logits - reference)[valid].max() <= TOLERANCE


def test_scanned_layers_equal_unrolled(tiny_hf_dirs, tokenizer, image_dir):
  _, batch = _encode(tokenizer, image_dir)
  outputs = []
  for scan in (False, True):
    config, params = import_hf(tiny_hf_dirs["qwen2_5_vl"], attention="bidirectional",
                               scan_layers=scan)
    outputs.append(np.asarray(VisionLanguageModel(config).apply({"params": params}, batch)))
  valid = batch["segment_ids"] > 0
  assert np.abs(outputs[0] - outputs[1])[valid].max() <= 1e-5


def test_attention_mode_changes_outputs(tiny_hf_dirs, tokenizer, image_dir):
  """Guards the parity test: the two modes must differ, so each comparison proves its mask."""
  _, batch = _encode(tokenizer, image_dir)
  hidden = {}
  for attention in ("causal", "bidirectional"):
    config, params = import_hf(tiny_hf_dirs["qwen2_5_vl"], attention=attention)
    hidden[attention] = np.asarray(VisionLanguageModel(config).apply({"params": params}, batch))
  valid = batch["segment_ids"] > 0
  assert np.abs(hidden["causal"] - hidden["bidirectional"])[valid].max() > 1e-2


def test_padding_does_not_change_real_tokens(tiny_hf_dirs, tokenizer, image_dir):
  """More padding (tokens and patches) leaves every real position unchanged."""
  encoded, batch = _encode(tokenizer, image_dir)
  length, patches, images = batch["input_ids"].shape[1], batch["pixel_patches"].shape[1], 2
  wider = collate_lib.collate(encoded, tokenizer.pad_token_id, length + 16, patches + 64, images + 1)
  config, params = import_hf(tiny_hf_dirs["qwen2_5_vl"], attention="bidirectional")
  model = VisionLanguageModel(config)
  base = np.asarray(model.apply({"params": params}, batch))
  padded = np.asarray(model.apply({"params": params}, wider))[:, :length]
  valid = batch["segment_ids"] > 0
  assert np.abs(base - padded)[valid].max() <= 1e-5


def _encode_videos(tokenizer, row_dir, hf_config):
  """The VIDEO_ROWS encoded with small frame budgets (2-12 frames of 4-16 merged tokens)."""
  from mmembed_jax.data import sequences, video  # pylint: disable=g-import-not-at-top
  tokens_per_second = (hf_config.vision_config.tokens_per_second
                       if hf_config.model_type == "qwen2_5_vl" else None)
  encoder = sequences.SequenceEncoder(tokenizer, ImageProcessingConfig(**TEST_PIXELS),
                                      video=video.VideoSettings.from_spec(
                                          VIDEO_SETTINGS, tokens_per_second))
  encoded = [rows_lib.encode_row(row, encoder, None, 1024, row_dir) for row in VIDEO_ROWS]
  length, patches, images = collate_lib.bucket_sizes(encoded)
  return encoded, collate_lib.collate(encoded, tokenizer.pad_token_id, length + 3, patches, images)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_video_rows_match_transformers(family, attention, tiny_hf_dirs, tokenizer, video_row_dir):
  """Rows with videos (files of several lengths and rates, a frame list, two videos in a row),
  an image and a video mixed, and a text row, padded: M-RoPE positions equal transformers'
  get_rope_index (given each video's second_per_grid_ts) and hidden states and pooled
  embeddings equal transformers' model fed pixel_values_videos, <= 1e-4."""
  model = _hf_model(tiny_hf_dirs[family])
  encoded, batch = _encode_videos(tokenizer, video_row_dir, model.config)
  assert sum(int((row.grid_thw[:, 0] > 1).sum()) for row in encoded) >= 4  # several frame pairs
  input_ids = torch.as_tensor(batch["input_ids"]).long()
  valid = batch["segment_ids"] > 0
  grids = np.concatenate([row.grid_thw for row in encoded if row.num_images])
  video_id, image_id = model.config.video_token_id, model.config.image_token_id
  from mmembed_jax.convert.torch_embed import _video_items  # pylint: disable=g-import-not-at-top
  is_video = _video_items(batch["input_ids"], valid, grids, image_id, video_id, 2)
  fps = [f for row in VIDEO_ROWS for f in _row_sample_fps(row, video_row_dir)]
  kwargs = dict(mm_token_type_ids=(input_ids == image_id).long() + 2 * (input_ids == video_id).long(),
                image_grid_thw=torch.as_tensor(grids[~is_video]),
                video_grid_thw=torch.as_tensor(grids[is_video]),
                attention_mask=torch.as_tensor(valid).long())
  if family == "qwen2_5_vl":
    kwargs["second_per_grid_ts"] = torch.tensor([2 / f for f in fps])
  positions, _ = model.model.get_rope_index(input_ids, **kwargs)
  positions = positions.permute(1, 0, 2).numpy() * valid[:, None, :]
  np.testing.assert_array_equal(positions, batch["positions"])
  pixels = np.concatenate([row.patches for row in encoded if row.num_images])
  reference = forward_hidden(model, batch["input_ids"], valid, positions, pixels, grids, attention)
  config, params = import_hf(tiny_hf_dirs[family], attention=attention)
  config = config.replace(attention_impl="xla")  # masked attention (vision and LLM)
  hidden = np.asarray(VisionLanguageModel(config).apply({"params": params}, batch))
  hidden_error = np.abs(hidden - reference.numpy())[valid].max()
  print(f"{family} {attention} videos: hidden max abs diff {hidden_error:.2e}")
  assert hidden_error <= TOLERANCE
  for pooling in ("mean", "last"):
    ours = np.asarray(pool(hidden, batch["segment_ids"], pooling))
    assert np.abs(ours - _pool_torch(reference, valid, pooling)).max() <= TOLERANCE, pooling


def _row_sample_fps(row, row_dir):
  """The sample fps of the row's videos (qwen-vl-utils' rule): a frame list's is the row's
  fps; a file's is n / T * its rate, n from qwen-vl-utils' smart_nframes."""
  import os  # pylint: disable=g-import-not-at-top
  import av  # pylint: disable=g-import-not-at-top
  from qwen_vl_utils import vision_process  # pylint: disable=g-import-not-at-top
  videos = [row["video"]] if "video" in row else row.get("videos", [])
  out = []
  for item in videos:
    if isinstance(item, list):
      out.append(row.get("fps", 2.0))
      continue
    with av.open(os.path.join(row_dir, item)) as container:
      stream = container.streams.video[0]
      total = sum(1 for _ in container.decode(stream))
      rate = float(stream.average_rate)
    n = vision_process.smart_nframes({"fps": VIDEO_FPS, "max_frames": 12}, total, rate)
    out.append(n / total * rate)
  return out
