"""Videos through the training pipelines: MoCa stage 1 (packed, MAE on video merged tokens or
not), contrastive pairs (UNITE's video bit), and bad videos skipped, counted and named."""
import os
import shutil

import numpy as np
import pytest

from mmembed_jax.data import cl_pipeline, cpt_pipeline, packing, pairs, sequences, video
from mmembed_jax.data import images as images_lib

from pipeline_checks import take, write_jsonl
from tiny_models import video_frames

# 2-12 frames of 4-16 merged tokens (data/video.py SETTING_FIELDS).
VIDEO = dict(fps=2.0, max_frames=12, min_pixels=4 * 28 * 28, frame_max_pixels=16 * 28 * 28,
             processor_min_pixels=4 * 28 * 28, processor_max_pixels=16 * 28 * 28)
IMAGE_PIXELS = dict(min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28)


@pytest.fixture(scope="module")
def data(tmp_path_factory, test_videos, image_dir):
  """Rows with videos (files, a frame list, mixed with an image) and bad videos, in one dir."""
  root = tmp_path_factory.mktemp("video_rows")
  for k, (path, *_) in enumerate(test_videos):
    shutil.copy(path, root / f"clip{k}.mp4")
  shutil.copy(os.path.join(image_dir, "wide.png"), root / "wide.png")
  for k, frame in enumerate(video_frames(3, 60, 90, 3)):
    images_lib.PIL.Image.fromarray(frame).save(root / f"f{k}.png")
  good = (root / "clip2.mp4").read_bytes()
  (root / "garbage.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom not a video at all" * 20)
  (root / "truncated.mp4").write_bytes(good[:len(good) // 3])
  video.write_video(str(root / "empty.mp4"), np.zeros((0, 64, 64, 3), np.uint8))
  video.write_video(str(root / "one_frame.mp4"), video_frames(1, 64, 96, 5), fps=10)
  rows = [{"text": f"clip {k} moves <video> left", "video": f"clip{k}.mp4"} for k in range(5)]
  rows += [{"text": "an image <image> then a clip <video>", "image": "wide.png",
            "video": "clip1.mp4"},
           {"text": "frames", "video": ["f0.png", "f1.png", "f2.png"], "fps": 1.0}]
  paths = {"good": write_jsonl(root / "videos.jsonl", rows)}
  paths["bad"] = write_jsonl(root / "bad.jsonl", [
      {"text": "a good one", "video": "clip0.mp4"},
      {"text": "garbage", "video": "garbage.mp4"},  # line 2
      {"text": "truncated", "video": "truncated.mp4"},  # line 3
      {"text": "no frames", "video": "empty.mp4"},  # line 4
      {"text": "missing", "video": "missing.mp4"},  # line 5
      {"text": "one frame, shown twice", "video": "one_frame.mp4"},
      {"text": "two videos, one marker <video>", "videos": ["clip0.mp4", "clip1.mp4"]},  # line 7
  ])
  paths["pairs"] = write_jsonl(root / "pairs.jsonl", [
      {"qry": f"the caption of clip {k}", "pos_text": "<video> Represent the given video.",
       "pos_video_path": f"clip{k}.mp4",
       "neg_text": ["<video> Represent the given video."], "neg_video_path": [f"clip{(k + 1) % 5}.mp4"]}
      for k in range(5)] + [
      {"qry": "three frames", "pos_video_path": [["f0.png", "f1.png", "f2.png"]], "fps": 1.0,
       "neg_video_path": [["f2.png", "f1.png", "f0.png"]]}])
  return paths


def _settings():
  return video.VideoSettings.from_spec(VIDEO, tokens_per_second=2)


@pytest.mark.parametrize("mae_on_video", [True, False])
def test_stage1_packs_video_patches_and_masks_them_for_mae(data, tokenizer_dir, mae_on_video):
  """Packed stage-1 batches hold the videos' patches in the shared patch buffer, their positions
  as the encoder makes them (time axis scaled), and MAE masks their merged tokens only when
  input.mae_on_video."""
  ds = cpt_pipeline.cpt_dataset(
      [dict(name="videos", path=data["good"], kind="jsonl")], tokenizer_dir, 2, seed=3,
      length=256, max_patches=512, max_images=4, text_mask_prob=0.3, image_mask_prob=0.5,
      process_index=0, process_count=1, video=_settings(), mae_on_video=mae_on_video,
      **IMAGE_PIXELS)
  _, batches = take(iter(ds), 3)
  encoder = sequences.SequenceEncoder(tokenizer_dir, images_lib.ImageProcessingConfig(**IMAGE_PIXELS),
                                      video=_settings())
  video_id = encoder.vision_ids[sequences.VIDEO_PAD]
  seen_video = 0
  for batch in batches:
    assert batch["bad_records"].sum() == 0, batch["bad_messages"]
    for row in range(batch["input_ids"].shape[0]):
      grids = batch["image_grid_thw"][row]
      real = batch["patch_image_ids"][row] > 0
      assert real.sum() == grids.prod(-1).sum()  # the budget counts every video patch
      seen_video += int((batch["input_ids"][row] == video_id).sum())
      # Video patches are those of items whose tokens are <|video_pad|>: masked iff mae_on_video.
      tokens = batch["input_ids"][row][batch["segment_ids"][row] > 0]
      vision = tokens[np.isin(tokens, list(encoder.vision_ids.values())[2:])]
      per_item = grids[grids.prod(-1) > 0].prod(-1) // 4
      kinds = np.split(vision, np.cumsum(per_item)[:-1])
      is_video = np.repeat([k[0] == video_id for k in kinds], grids[grids.prod(-1) > 0].prod(-1))
      mae = batch["mae_mask"][row][real].astype(bool)
      assert not mae[is_video].any() if not mae_on_video else True
      if mae_on_video and is_video.any():
        assert mae[is_video].any()
  assert seen_video > 0
  # One example encoded by the pipeline's own encoder has the expected time axis.
  record = {"text": "clip 2 moves <video> left", "images": [],
            "videos": [os.path.join(os.path.dirname(data["good"]), "clip2.mp4")]}
  row = encoder.encode(record["text"], [], videos=record["videos"], length=256)
  t = int(row.grid_thw[0, 0])
  sample_fps = video.read_video(record["videos"][0], _settings().sampling).sample_fps
  temporal = row.positions[0][row.input_ids == video_id].reshape(t, -1)[:, 0]
  expected = (np.arange(t, dtype=np.float32) * np.float32(2 * 2 / sample_fps)).astype(int)
  np.testing.assert_array_equal(temporal - temporal[0], expected)


def test_pairs_with_videos_train_with_the_video_bit(data, tokenizer_dir):
  """Caption -> video pairs: target_modal inferred as 4, the videos' patches in the target
  batch."""
  source = pairs.PairSource("jsonl", data["pairs"], "clips")
  assert source[0]["target_modal"] == pairs.VIDEO_MODALITY
  root = os.path.dirname(data["pairs"])
  assert source[0]["positive"]["videos"] == [os.path.join(root, "clip0.mp4")]
  frames = source[5]  # a frame list is one video, on either side
  assert frames["positive"]["videos"] == [[os.path.join(root, f"f{k}.png") for k in range(3)]]
  assert frames["negatives"][0]["videos"] == [[os.path.join(root, f"f{k}.png") for k in (2, 1, 0)]]
  assert frames["positive"]["fps"] == 1.0 and frames["error"] is None
  ds = cl_pipeline.cl_dataset({"clips": dict(path=data["pairs"], kind="jsonl")}, tokenizer_dir,
                              4, seed=0, num_negatives=1, query_length=32, target_length=96,
                              query_max_patches=64, target_max_patches=256, max_images=1,
                              video=_settings(), task_batching=False, process_index=0,
                              process_count=1, **IMAGE_PIXELS)
  batch = next(iter(ds))
  assert (batch["target_modal"] == pairs.VIDEO_MODALITY).all()
  assert (batch["bad_records"] == 0).all(), batch["bad_messages"]
  for targets in (batch["positive"], batch["negative"]):
    assert (targets["image_grid_thw"][..., 0] > 1).any()  # several frame pairs
    assert (targets["patch_image_ids"] > 0).sum() == targets["image_grid_thw"].prod(-1).sum()


def test_bad_videos_are_skipped_counted_and_named(data, tokenizer_dir):
  """Unreadable, truncated, frameless and missing videos (and a marker count that does not
  match) each skip their record with FILE:LINE and why; a 1-frame video is shown twice."""
  budget = packing.PackingBudget(256, 512, 4)
  encoder = cpt_pipeline.CptEncoder(tokenizer_dir, budget,
                                    images_lib.ImageProcessingConfig(**IMAGE_PIXELS), 0.3, 0.5,
                                    mask_seed=1, video=_settings())
  from mmembed_jax.data import sources  # pylint: disable=g-import-not-at-top
  source = sources.JsonlSource(data["bad"], "bad")
  out = [encoder(dict(source[i], example_id=i)) for i in range(len(source))]
  expected = {2: "cannot read video 0 (", 3: "cannot read video 0 (", 4: "no video stream",
              5: "video 0 file", 7: "1 '<video>' markers but the row has 2 videos"}
  for line, reason in expected.items():
    message = out[line - 1].get(packing.BAD_RECORD, "")
    assert message.startswith(f"{data['bad']}:{line}: ") and reason in message, (line, message)
  assert packing.BAD_RECORD not in out[0] and packing.BAD_RECORD not in out[5]
  assert out[5]["image_grid_thw"].tolist()[0][0] == 1  # 2 frames (the one repeated): t = 1
