"""Tests of the numpy M-RoPE positions against transformers' get_rope_index on tiny random models."""
import numpy as np
import pytest

from mmembed_jax.data import mrope

IMAGE, VIDEO, VSTART, VEND, PAD = 60, 61, 62, 63, 0  # token ids of the tiny HF configs (vocab 64)

_TEXT = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
             num_attention_heads=2, num_key_value_heads=1, bos_token_id=1, eos_token_id=2,
             pad_token_id=PAD, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
_IDS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART,
            vision_end_token_id=VEND)


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen2_vl"])
def hf_model(request):
  """Returns a tiny random HF Qwen2.5-VL / Qwen2-VL base model (only its get_rope_index is used)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  if request.param == "qwen2_5_vl":
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16,
                  fullatt_block_indexes=[0])
    config = transformers.Qwen2_5_VLConfig(text_config=_TEXT, vision_config=vision, **_IDS)
    model = transformers.Qwen2_5_VLModel(config)
  else:
    vision = dict(depth=1, embed_dim=16, hidden_size=16, mlp_ratio=2, num_heads=2)
    config = transformers.Qwen2VLConfig(text_config=_TEXT, vision_config=vision, **_IDS)
    model = transformers.Qwen2VLModel(config)
  assert config.vision_config.spatial_merge_size == 2
  return model.eval()


def _image(grid):
  """Returns the tokens of one image: vision_start, t*h*w/4 image tokens, vision_end."""
  t, h, w = grid
  return [VSTART] + [IMAGE] * (t * h * w // 4) + [VEND]


def _text(n, start=3):
  """Returns n text token ids."""
  return [start + (i % 50) for i in range(n)]


def _hf_positions(model, batch_ids, grids, attention_mask=None):
  """Returns HF get_rope_index positions as int numpy [batch, 3, length]."""
  import torch

  ids = torch.tensor(batch_ids, dtype=torch.long)
  kwargs = dict(mm_token_type_ids=(ids == IMAGE).int())
  if grids:
    kwargs["image_grid_thw"] = torch.tensor(grids, dtype=torch.long)
  if attention_mask is not None:
    kwargs["attention_mask"] = torch.tensor(attention_mask, dtype=torch.long)
  with torch.no_grad():
    positions, _ = model.get_rope_index(ids, **kwargs)
  return positions.numpy().transpose(1, 0, 2)


# name -> (token ids, grids of its images)
CASES = {
    "text_only": (_text(9), []),
    "one_image_middle": (_text(3) + _image((1, 4, 6)) + _text(5), [[1, 4, 6]]),
    "image_at_start": (_image((1, 6, 4)) + _text(4), [[1, 6, 4]]),
    "image_at_end": (_text(4) + _image((1, 2, 2)), [[1, 2, 2]]),
    "image_tokens_only": ([IMAGE] * 6, [[1, 4, 6]]),
    "two_images": (_text(2) + _image((1, 4, 8)) + _text(3) + _image((1, 6, 2)) + _text(2),
                   [[1, 4, 8], [1, 6, 2]]),
    "three_images_back_to_back": (_image((1, 2, 4)) + _image((1, 4, 4)) + _image((1, 8, 2)) + _text(1),
                                  [[1, 2, 4], [1, 4, 4], [1, 8, 2]]),
    "large_grid": (_text(7) + _image((1, 20, 14)) + _text(11), [[1, 20, 14]]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_hf(hf_model, name):
  ids, grids = CASES[name]
  expected = _hf_positions(hf_model, [ids], grids)[0]
  got = mrope.mrope_positions(np.array(ids, np.int32), np.array(grids, np.int32).reshape(-1, 3), IMAGE)
  assert got.dtype == np.int32 and got.shape == (3, len(ids))
  np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("side", ["left", "right"])
def test_matches_hf_with_padding(hf_model, side):
  seqs = [CASES["two_images"], CASES["one_image_middle"], CASES["text_only"]]
  length = max(len(ids) for ids, _ in seqs) + 3
  batch, masks, grids = [], [], []
  for ids, g in seqs:
    pad = [PAD] * (length - len(ids))
    batch.append(pad + ids if side == "left" else ids + pad)
    mask = [0] * len(pad) + [1] * len(ids) if side == "left" else [1] * len(ids) + [0] * len(pad)
    masks.append(mask)
    grids += g
  expected = _hf_positions(hf_model, batch, grids, masks)
  for i, (ids, g) in enumerate(seqs):
    got = mrope.mrope_positions(np.array(batch[i]), np.array(g).reshape(-1, 3), IMAGE,
                                attention_mask=np.array(masks[i]))
    np.testing.assert_array_equal(got, expected[i], err_msg=f"sequence {i}, {side} padding")


def test_matches_hf_random(hf_model):
  rng = np.random.default_rng(0)
  for _ in range(10):
    ids, grids = [], []
    for _ in range(rng.integers(0, 4)):
      ids += _text(int(rng.integers(0, 5)))
      grid = [1, 2 * int(rng.integers(1, 6)), 2 * int(rng.integers(1, 6))]
      ids += _image(grid)
      grids.append(grid)
    ids += _text(int(rng.integers(1, 5)))
    np.testing.assert_array_equal(
        mrope.mrope_positions(np.array(ids), np.array(grids).reshape(-1, 3), IMAGE),
        _hf_positions(hf_model, [ids], grids)[0], err_msg=f"ids={ids} grids={grids}")


def test_layout_by_hand():
  ids = [5, VSTART, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, VEND, 7]
  got = mrope.mrope_positions(np.array(ids), [[1, 4, 6]], IMAGE)
  # The image is a 2 x 3 grid of merged tokens starting at position 2; text resumes at 2 + 3.
  np.testing.assert_array_equal(got, [
      [0, 1, 2, 2, 2, 2, 2, 2, 5, 6],
      [0, 1, 2, 2, 2, 3, 3, 3, 5, 6],
      [0, 1, 2, 3, 4, 2, 3, 4, 5, 6],
  ])


def test_mismatched_image_tokens():
  with pytest.raises(ValueError, match=r"image 0 with grid_thw \[1, 4, 4\] needs 4 consecutive image "
                                       r"tokens from index 1, found 3"):
    mrope.mrope_positions(np.array([5, IMAGE, IMAGE, IMAGE, 6]), [[1, 4, 4]], IMAGE)
  with pytest.raises(ValueError, match="input_ids has 8 image tokens .* accounts for only 4"):
    mrope.mrope_positions(np.array([IMAGE] * 8), [[1, 4, 4]], IMAGE)
  with pytest.raises(ValueError, match="grid_thw has 2 images but input_ids has image tokens"):
    mrope.mrope_positions(np.array([IMAGE] * 4), [[1, 4, 4], [1, 2, 2]], IMAGE)
  with pytest.raises(ValueError, match="divisible by spatial_merge_size 2"):
    mrope.mrope_positions(np.array([IMAGE] * 4), [[1, 3, 4]], IMAGE)


def _video(grid):
  """The tokens of one video: vision_start, t*h*w/4 video tokens, vision_end."""
  t, h, w = grid
  return [VSTART] + [VIDEO] * (t * h * w // 4) + [VEND]


@pytest.mark.parametrize("seed", range(6))
def test_videos_and_images_match_hf(hf_model, seed):
  """Rows mixing images and videos of several frame counts and sample rates (the time axis of
  Qwen2.5-VL scales by tokens_per_second * 2 / sample_fps), left-padded in a batch of 2."""
  import torch  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  tokens_per_second = (hf_model.config.vision_config.tokens_per_second
                       if hf_model.config.model_type == "qwen2_5_vl" else None)
  rows = []
  for _ in range(2):
    ids, grids, kinds, fps = [], [], [], []
    for _ in range(int(rng.integers(1, 4))):
      ids += _text(int(rng.integers(0, 4)))
      is_video = bool(rng.integers(0, 2)) or not kinds
      grid = [int(rng.integers(1, 7)) if is_video else 1, 2 * int(rng.integers(1, 4)),
              2 * int(rng.integers(1, 4))]
      ids += _video(grid) if is_video else _image(grid)
      grids.append(grid)
      kinds.append(is_video)
      fps.append(float(rng.choice([2.0, 1.0, 0.37, 29.97 / 14, 5.5])) if is_video else None)
    ids += _text(int(rng.integers(1, 4)))
    rows.append((ids, grids, kinds, fps))
  length = max(len(r[0]) for r in rows) + 2
  batch = [[PAD] * (length - len(r[0])) + r[0] for r in rows]
  masks = [[0] * (length - len(r[0])) + [1] * len(r[0]) for r in rows]
  ids_t = torch.tensor(batch)
  all_grids = [g for r in rows for g in r[1]]
  all_kinds = [k for r in rows for k in r[2]]
  kwargs = dict(mm_token_type_ids=(ids_t == IMAGE).int() + 2 * (ids_t == VIDEO).int(),
                attention_mask=torch.tensor(masks))
  images = [g for g, k in zip(all_grids, all_kinds) if not k]
  videos = [g for g, k in zip(all_grids, all_kinds) if k]
  if images:
    kwargs["image_grid_thw"] = torch.tensor(images)
  if videos:
    kwargs["video_grid_thw"] = torch.tensor(videos)
    if tokens_per_second is not None:  # the processor's second_per_grid_ts: 2 / sample_fps
      kwargs["second_per_grid_ts"] = torch.tensor(
          [2 / f for r in rows for f, k in zip(r[3], r[2]) if k])
  with torch.no_grad():
    expected, _ = hf_model.get_rope_index(ids_t, **kwargs)
  expected = expected.numpy().transpose(1, 0, 2)
  for i, (ids, grids, kinds, fps) in enumerate(rows):
    intervals = [mrope.video_time_interval(tokens_per_second, f) if k else None
                 for f, k in zip(fps, kinds)]
    got = mrope.mrope_positions(np.array(batch[i]), np.array(grids), IMAGE,
                                attention_mask=np.array(masks[i]), video_token_id=VIDEO,
                                time_intervals=intervals)
    np.testing.assert_array_equal(got, expected[i], err_msg=f"row {i}: {grids} {kinds} {fps}")
