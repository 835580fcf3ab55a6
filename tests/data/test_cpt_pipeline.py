"""Tests of the MoCa CPT input pipeline (mmembed_jax.data.cpt_pipeline), on small files made here."""
import json
import os
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from mmembed_jax.data import bad_records, cpt_pipeline, images, mrope, packing, rows
from mmembed_jax.demo import tokenizer as tokenizer_lib
from mmembed_jax.models import inputs

from pipeline_checks import assert_same, take, write_jsonl

# Images are 4..64 merged tokens; a row holds 160 tokens and 160 patches (40 merged tokens), so
# square.png (100 patches) + wide.png (96) never share an example and big.png (196) never fits.
OPTIONS = dict(length=160, max_patches=160, max_images=3, min_pixels=4 * 28 * 28,
               max_pixels=64 * 28 * 28, text_mask_prob=0.4, image_mask_prob=0.5)
SENTENCES = tokenizer_lib.demo_corpus()


def _text(i, n):
  """n sentences of the demo corpus starting at i."""
  return " ".join(SENTENCES[(i + k) % len(SENTENCES)] for k in range(n))


@pytest.fixture(scope="module")
def data(tmp_path_factory, image_dir):
  """{name: path}: text-only, image, document (Parquet), ArrayRecord and bad-record files."""
  root = tmp_path_factory.mktemp("cpt_data")
  shutil.copytree(image_dir, root / "img")
  Image.fromarray(np.random.default_rng(1).integers(0, 256, (600, 600, 3), np.uint8)).save(
      root / "img" / "big.png")
  (root / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  names = ["img/wide.png", "img/tall.png", "img/square.png", "img/small.png"]
  paths = {}
  paths["text"] = write_jsonl(root / "text.jsonl", [{"text": _text(i, 1 + i % 6)} for i in range(60)]
                         + [{"text": _text(0, 300)}])
  paths["images"] = write_jsonl(root / "images.jsonl", [
      {"text": _text(i, 1 + i % 3), "images": [names[i % 4]]} if i % 3 else
      {"text": f"{_text(i, 1)} <image> {_text(i + 1, 1)} <image> end",
       "images": [names[i % 4], "img/small.png"]} for i in range(40)])
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  docs = [{"text": f"page <image> {_text(i, 2)} <image> more <image> tail",
           "images": ["img/square.png", "img/wide.png", "img/small.png"]} for i in range(10)]
  docs += [{"text": _text(i, 2), "images": [names[i % 4]]} for i in range(10)]
  paths["docs"] = str(root / "docs.parquet")
  pq.write_table(pa.table({"text": [d["text"] for d in docs], "images": [d["images"] for d in docs]}),
                 paths["docs"], row_group_size=5)
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  paths["records"] = str(root / "records.array_record")
  writer = array_record_module.ArrayRecordWriter(paths["records"], "group_size:1")
  for i in range(20):
    writer.write(json.dumps({"text": _text(i, 2), "image": names[i % 4]}).encode())
  writer.close()
  paths["bad"] = write_jsonl(root / "bad.jsonl", [
      {"text": _text(0, 2)},
      "{malformed json",  # line 2
      {"caption": "no text field"},  # line 3
      {"text": "missing image", "images": ["img/missing.png"]},  # line 4
      {"text": "corrupt image", "images": ["img/corrupt.png"]},  # line 5
      {"text": "too large", "images": ["img/big.png"]},  # line 6
      {"text": "<image> <image> two markers", "images": ["img/small.png"]},  # line 7
      {"text": _text(3, 2), "images": ["img/small.png"]},
      {"text": "a lone surrogate \ud800 (legal JSON)"},  # line 9
  ])
  paths["root"] = str(root)
  return paths


@pytest.fixture(scope="module")
def mixed(data):
  """Source dicts: text-only, image rows and documents, in three formats."""
  return [dict(name="text", path=data["text"], kind="jsonl", weight=1.0),
          dict(name="images", path=data["images"], kind="jsonl", weight=1.0, cap=30),
          dict(name="docs", path=data["docs"], kind="parquet", weight=0.5),
          dict(name="records", path=data["records"], kind="array_record", weight=0.5)]


def _dataset(sources, tokenizer_dir, global_batch_size=4, num_workers=0, process_index=0,
             process_count=1, **overrides):
  options = dict(OPTIONS, **overrides)
  return cpt_pipeline.cpt_dataset(sources, tokenizer_dir, global_batch_size, seed=7,
                                  num_workers=num_workers, process_index=process_index,
                                  process_count=process_count, **options)


def _encoder(tokenizer_dir, **overrides):
  """A CptEncoder with the test budget."""
  options = dict(OPTIONS, **overrides)
  config = images.ImageProcessingConfig(min_pixels=options["min_pixels"],
                                        max_pixels=options["max_pixels"])
  budget = packing.PackingBudget(options["length"], options["max_patches"], options["max_images"])
  return cpt_pipeline.CptEncoder(tokenizer_dir, budget, config, 0.4, 0.5, mask_seed=7)


def _record(text, image_paths, where="test.jsonl:1"):
  return {"text": text, "images": image_paths, "source": "test", "where": where, "error": None,
          "example_id": 5}


def test_batches_follow_the_contract_with_masks_and_bookkeeping(mixed, tokenizer_dir):
  iterator = iter(_dataset(mixed, tokenizer_dir))
  batch = next(iterator)
  inputs.check_batch(batch)
  expected = {"input_ids": (4, 160), "segment_ids": (4, 160), "positions": (4, 3, 160),
              "mlm_mask": (4, 160), "pixel_patches": (4, 160, inputs.PATCH_DIM),
              "patch_image_ids": (4, 160), "mae_mask": (4, 160), "image_grid_thw": (4, 3, 3),
              "example_ids": (4, 64), "bad_records": (4,), "bad_messages": (4,)}
  assert {k: v.shape for k, v in batch.items()} == expected
  dtypes = {k: v.dtype.kind for k, v in batch.items()}
  assert dtypes == {k: "f" if k == "pixel_patches" else "U" if k == "bad_messages" else "i"
                    for k in batch} and batch["input_ids"].dtype == np.int32
  assert not batch["mlm_mask"][batch["segment_ids"] == 0].any()
  assert not batch["mae_mask"][batch["patch_image_ids"] == 0].any()
  assert (batch["segment_ids"].max(-1) == (batch["example_ids"] >= 0).sum(-1)).all()


def test_pipeline_is_deterministic(mixed, tokenizer_dir):
  dataset = _dataset(mixed, tokenizer_dir)
  _, first = take(iter(dataset), 4)
  _, second = take(iter(_dataset(mixed, tokenizer_dir)), 4)
  for i, (a, b) in enumerate(zip(first, second)):
    assert_same(a, b, f"batch {i}")
  other = cpt_pipeline.cpt_dataset(mixed, tokenizer_dir, 4, seed=8, process_index=0,
                                   process_count=1, **OPTIONS)
  _, other_seed = take(iter(other), 1)
  assert not np.array_equal(other_seed[0]["example_ids"], first[0]["example_ids"])


def test_resume_from_state_is_exact_at_several_points(mixed, tokenizer_dir):
  dataset = _dataset(mixed, tokenizer_dir)
  states, batches = take(iter(dataset), 9)
  for k in (1, 4, 7):
    state = json.loads(json.dumps(states[k]))  # the trainer stores it as JSON
    resumed = iter(_dataset(mixed, tokenizer_dir))
    resumed.set_state(state)
    for i in range(k, 9):
      assert_same(batches[i], next(resumed), f"batch {i} resumed at {k}")


def test_rows_sharing_patch_buffers_follow_the_contract_and_resume_exactly(mixed, tokenizer_dir):
  """Buffers of 2 rows with 2 x 96 patch slots: fewer slots than 160 per row, more of them real."""
  shared = dict(rows_per_patch_buffer=2, max_patches=96, max_images=3)
  states, batches = take(iter(_dataset(mixed, tokenizer_dir, **shared)), 6)
  shapes = {k: v.shape for k, v in batches[0].items()}
  assert shapes["input_ids"] == (4, 160) and shapes["example_ids"] == (4, 64)
  assert shapes["pixel_patches"] == (2, 192, inputs.PATCH_DIM)
  assert shapes["mae_mask"] == shapes["patch_image_ids"] == (2, 192)
  assert shapes["image_grid_thw"] == (2, 6, 3) and shapes["bad_records"] == (2,)
  for batch in batches:
    inputs.check_batch(batch)
    assert not batch["mae_mask"][batch["patch_image_ids"] == 0].any()
  _, alone = take(iter(_dataset(mixed, tokenizer_dir)), 6)
  fill = lambda bs, key: np.mean([packing.packing_efficiency(b)[key] for b in bs])
  assert fill(batches, "patch_fill") > fill(alone, "patch_fill")
  resumed = iter(_dataset(mixed, tokenizer_dir, **shared))
  resumed.set_state(json.loads(json.dumps(states[2])))
  for i in range(2, 6):
    assert_same(batches[i], next(resumed), f"batch {i} resumed at 2")


def test_resume_from_state_is_exact_with_worker_processes(mixed, tokenizer_dir):
  iterator = iter(_dataset(mixed, tokenizer_dir, num_workers=2))
  try:
    states, batches = take(iterator, 7)
  finally:
    iterator.close()
  for k in (2, 5):
    resumed = iter(_dataset(mixed, tokenizer_dir, num_workers=2))
    try:
      resumed.set_state(json.loads(json.dumps(states[k])))
      for i in range(k, 7):
        assert_same(batches[i], next(resumed), f"batch {i} resumed at {k} with 2 workers")
    finally:
      resumed.close()


def test_processes_read_disjoint_examples(mixed, tokenizer_dir):
  ids = []
  for process_index in range(2):
    _, batches = take(iter(_dataset(mixed, tokenizer_dir, global_batch_size=4,
                                     process_index=process_index, process_count=2)), 2)
    assert batches[0]["input_ids"].shape == (2, 160)  # the local share of the global batch
    ids.append({int(i) for b in batches for i in b["example_ids"].ravel() if i >= 0})
  assert ids[0] and ids[1] and not ids[0] & ids[1]
  with pytest.raises(ValueError, match="not divisible by 3 data shards"):
    _dataset(mixed, tokenizer_dir, global_batch_size=4, process_index=0, process_count=3)


def test_sources_may_be_a_mapping_and_bad_specs_are_named(mixed, tokenizer_dir):
  by_name = {s["name"]: {k: v for k, v in s.items() if k != "name"} for s in mixed}
  _, from_list = take(iter(_dataset(mixed, tokenizer_dir)), 1)
  _, from_mapping = take(iter(_dataset(by_name, tokenizer_dir)), 1)
  assert_same(from_list[0], from_mapping[0], "sources as a mapping")
  with pytest.raises(ValueError, match="source 'dclm' has an empty path"):
    cpt_pipeline.open_sources({"dclm": dict(path="", kind="jsonl")})
  with pytest.raises(ValueError, match=r"sources\[0\] \(x\): unknown fields \['wieght'\]"):
    cpt_pipeline.open_sources([dict(name="x", path="a.jsonl", kind="jsonl", wieght=2)])


def test_bad_records_are_skipped_counted_and_named(data, tokenizer_dir):
  """Every kind of bad record (any exception while encoding it, the tokenizer's TypeError on a
  lone surrogate included) is skipped, counted and named in the batch that counts it."""
  sources = [dict(name="bad", path=data["bad"], kind="jsonl")]
  _, batches = take(iter(_dataset(sources, tokenizer_dir, global_batch_size=2)), 6)
  named = bad_records.split_messages(np.array([b[bad_records.MESSAGES] for b in batches]))
  assert sum(int(b["bad_records"].sum()) for b in batches) == len(named) > 0
  path = data["bad"]
  expected = {2: "malformed JSON", 3: "missing field 'text'", 4: "missing.png",
              5: "corrupt.png", 6: "does not fit the budget", 7: "2 '<image>' markers",
              9: "TypeError"}
  for line, reason in expected.items():
    lines = [w for w in named if w.startswith(f"{path}:{line}: ")]
    assert lines and all(reason in w for w in lines), (line, reason, named)
  packed = {int(i) for b in batches for i in b["example_ids"].ravel() if i >= 0}
  assert packed == {0, 7}  # only the good lines 1 and 8 (record indices 0 and 7)


def test_truncation_never_cuts_an_image(data, tokenizer_dir):
  encoder = _encoder(tokenizer_dir)
  img = os.path.join(data["root"], "img")
  vision = encoder.sequences.vision_ids
  # square (100 patches) fits, wide (96 more) would pass max_patches 160: cut before it.
  example = encoder(_record(f"a <image> {_text(0, 1)} <image> b <image> c",
                            [f"{img}/square.png", f"{img}/wide.png", f"{img}/small.png"]))
  np.testing.assert_array_equal(example["image_grid_thw"], [[1, 10, 10]])
  ids = example["input_ids"]
  assert (ids == vision[rows.VISION_START]).sum() == (ids == vision[rows.VISION_END]).sum() == 1
  assert (ids == vision[rows.IMAGE_PAD]).sum() == 25 and example["pixel_patches"].shape[0] == 100
  text_ids = encoder.sequences.text_ids
  kept = (text_ids("a ") + [vision[rows.VISION_START]] + [vision[rows.IMAGE_PAD]] * 25
          + [vision[rows.VISION_END]] + text_ids(f" {_text(0, 1)} "))
  np.testing.assert_array_equal(ids, kept)  # the text before the cut image stays, the image goes
  # Text before the second image fills the row: the text is cut at `length`, the image dropped.
  example = encoder(_record(f"<image> {_text(0, 60)} <image>",
                            [f"{img}/small.png", f"{img}/tall.png"]))
  assert example["input_ids"].shape == (160,) and example["image_grid_thw"].shape == (1, 3)
  # A text-only record longer than the row is cut at `length`, with no image.
  example = encoder(_record(_text(0, 300), []))
  assert example["input_ids"].shape == (160,) and example["pixel_patches"].shape == (0, 1176)
  # A first image that does not fit is a bad record, never a text-only remnant.
  bad = encoder(_record(f"{_text(0, 60)} <image>", [f"{img}/small.png"], where="doc.jsonl:9"))
  assert bad[packing.BAD_RECORD].startswith("doc.jsonl:9: image 0 ")


def test_packed_rows_hold_whole_images_only(mixed, tokenizer_dir):
  _, batches = take(iter(_dataset(mixed, tokenizer_dir)), 6)
  vision = _encoder(tokenizer_dir).sequences.vision_ids
  start, end, pad = (vision[t] for t in (rows.VISION_START, rows.VISION_END, rows.IMAGE_PAD))
  for batch in batches:
    for row in range(batch["input_ids"].shape[0]):
      ids, segments = batch["input_ids"][row], batch["segment_ids"][row]
      assert (ids == pad).sum() * 4 == (batch["patch_image_ids"][row] > 0).sum()
      for s in range(1, segments.max() + 1):
        seg = ids[segments == s]
        assert (seg == start).sum() == (seg == end).sum()
        assert seg[-1] not in (start, pad)


def test_encoding_matches_rows_py_and_the_image_processor(data, tokenizer_dir, tokenizer):
  encoder = _encoder(tokenizer_dir)
  img = os.path.join(data["root"], "img")
  text = f"{_text(2, 1)} <image> middle <image> end"
  example = encoder(_record(text, [f"{img}/wide.png", f"{img}/small.png"]))
  config = images.ImageProcessingConfig(min_pixels=OPTIONS["min_pixels"],
                                        max_pixels=OPTIONS["max_pixels"])
  processed = [images.preprocess_image(images.load_image(f"{img}/{n}"), config)
               for n in ("wide.png", "small.png")]
  grid_thw = np.stack([g for _, g in processed])
  np.testing.assert_array_equal(example["image_grid_thw"], grid_thw)
  np.testing.assert_array_equal(example["pixel_patches"], np.concatenate([p for p, _ in processed]))
  expected_ids = rows.tokenize_with_images(text, grid_thw, tokenizer)
  np.testing.assert_array_equal(example["input_ids"], expected_ids)
  image_token = tokenizer.convert_tokens_to_ids(rows.IMAGE_PAD)
  np.testing.assert_array_equal(example["positions"],
                                mrope.mrope_positions(expected_ids, grid_thw, image_token))
  # Prepend rule: an image record without markers gets its images first.
  prepended = encoder(_record("caption", [f"{img}/small.png"]))
  expected_prepended = rows.tokenize_with_images("caption", processed[1][1][None], tokenizer)
  np.testing.assert_array_equal(prepended["input_ids"], expected_prepended)


def test_text_only_data_needs_no_image(data, tokenizer_dir):
  sources = [dict(name="text", path=data["text"], kind="jsonl")]
  _, batches = take(iter(_dataset(sources, tokenizer_dir, max_patches=0, max_images=0)), 2)
  assert batches[0]["pixel_patches"].shape == (4, 0, inputs.PATCH_DIM)
  assert batches[0]["image_grid_thw"].shape == (4, 0, 3)
  inputs.check_batch(batches[0])


def test_throughput_and_packing_efficiency(mixed, tokenizer_dir):
  """Prints examples/s with 0 and 2 worker processes and the fill of tokens and patches."""
  report = {}
  for num_workers in (0, 2):
    iterator = iter(_dataset(mixed, tokenizer_dir, global_batch_size=8, num_workers=num_workers))
    try:
      next(iterator)  # start-up (worker processes, tokenizer) is not counted
      start = time.perf_counter()
      _, batches = take(iterator, 8)
      seconds = time.perf_counter() - start
    finally:
      if num_workers:
        iterator.close()
    examples = sum(int((b["example_ids"] >= 0).sum()) for b in batches)
    fill = [packing.packing_efficiency(b) for b in batches]
    report[num_workers] = (examples / seconds, np.mean([f["token_fill"] for f in fill]),
                           np.mean([f["patch_fill"] for f in fill]),
                           np.mean([f["examples_per_row"] for f in fill]))
    assert examples > 0
  for num_workers, (rate, token_fill, patch_fill, per_row) in report.items():
    print(f"cpt pipeline, {num_workers} workers: {rate:.0f} examples/s, token fill {token_fill:.2f}, "
          f"patch fill {patch_fill:.2f}, {per_row:.1f} examples per row")
  assert report[0][1] > 0.5


def test_mask_token_has_the_objectives_id_and_is_never_masked(tokenizer_dir):
  """`<|mask|>` is added to the pipeline's tokenizer as the objective adds it to its own (the
  same id), so a literal `<|mask|>` in a record is that token and never chosen for masking."""
  import transformers
  from mmembed_jax.data.special_tokens import MASK_TOKEN, mask_token_id
  encoder = _encoder(tokenizer_dir)
  expected = mask_token_id(transformers.AutoTokenizer.from_pretrained(tokenizer_dir), 576)
  assert encoder.sequences.token_id(MASK_TOKEN) == expected
  example = encoder(_record(f"one {MASK_TOKEN} two " * 20, []))
  at_mask = example["input_ids"] == expected
  assert at_mask.sum() == 20
  assert example["mlm_mask"].sum() > 0 and not example["mlm_mask"][at_mask].any()
