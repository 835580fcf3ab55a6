"""Tests of the contrastive input pipeline (mmembed_jax.data.cl_pipeline) on small demo pairs."""
import functools
import json
import logging
import os
import shutil

import numpy as np
import pytest

from mmembed_jax.data import bad_records, cl_pipeline, images, mixture, mrope, rows
from mmembed_jax.demo import records as demo_records
from mmembed_jax.models import inputs

from pipeline_checks import assert_same, take

SMALL_PAIRS = {"num_scenes": 8, "num_documents": 4, "num_passages": 8}
OPTIONS = dict(num_negatives=2, query_length=96, target_length=160, query_max_patches=64,
               target_max_patches=64, max_images=1, min_pixels=4 * 28 * 28,
               max_pixels=16 * 28 * 28)
IMAGE_CONFIG = images.ImageProcessingConfig(min_pixels=OPTIONS["min_pixels"],
                                            max_pixels=OPTIONS["max_pixels"])
SIDES = ("query", "positive")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  """{"train": {dataset: jsonl}, "eval": {dataset: jsonl}} of small demo pairs (eval: seed 1)."""
  root = str(tmp_path_factory.mktemp("cl_demo"))
  return {"train": demo_records.write_demo_pairs(root, **SMALL_PAIRS),
          "eval": demo_records.write_demo_pairs(root, seed=1, name="pairs_eval", **SMALL_PAIRS)}


def _sources(paths):
  """Source specs over the demo datasets, with templates on one of them."""
  sources = {name: dict(path=path, kind="jsonl", weight=1.0) for name, path in paths.items()}
  sources["question_passage"].update(query_template="Question: {text}",
                                     target_template="Passage: {text}")
  sources["caption_scene"].update(target_modal=3)
  return sources


def _dataset(sources, tokenizer_dir, global_batch_size=4, seed=5, **overrides):
  options = dict(OPTIONS, **{"process_index": 0, "process_count": 1, **overrides})
  return cl_pipeline.cl_dataset(sources, tokenizer_dir, global_batch_size, seed, **options)


@functools.lru_cache(maxsize=None)
def _processed(path):
  """(patches, grid_thw) of an image file, as the pipeline should make them."""
  return images.preprocess_image(images.load_image(path), IMAGE_CONFIG)


def _check_sequence(sequence, side, tokenizer, length, what):
  """A collated sequence holds exactly the side's text and images, right padded."""
  pad_id = tokenizer.convert_tokens_to_ids(tokenizer.pad_token or "<|endoftext|>")
  processed = [_processed(p) for p in side["images"]]
  grid_thw = np.stack([g for _, g in processed]) if processed else np.zeros((0, 3), np.int32)
  expected = rows.tokenize_with_images(side["text"], grid_thw, tokenizer)[:length]
  n = expected.shape[0]
  np.testing.assert_array_equal(sequence["input_ids"][:n], expected, err_msg=what)
  assert (sequence["input_ids"][n:] == pad_id).all(), what
  assert sequence["segment_ids"][:n].all() and not sequence["segment_ids"][n:].any(), what
  image_token = tokenizer.convert_tokens_to_ids(rows.IMAGE_PAD)
  np.testing.assert_array_equal(sequence["positions"][:, :n],
                                mrope.mrope_positions(expected, grid_thw, image_token))
  p = sum(patches.shape[0] for patches, _ in processed)
  if processed:
    np.testing.assert_array_equal(sequence["pixel_patches"][:p],
                                  np.concatenate([patches for patches, _ in processed]))
    np.testing.assert_array_equal(sequence["image_grid_thw"][:len(processed)], grid_thw)
  assert not sequence["pixel_patches"][p:].any() and (sequence["patch_image_ids"][:p] == 1).all()
  assert not sequence["patch_image_ids"][p:].any(), what
  if not side["images"] and n < length:  # text-only and not cut: decodes back to the text
    assert tokenizer.decode(sequence["input_ids"][:n]) == side["text"], what


def _holds(sequence, side, tokenizer, length):
  """Whether a collated sequence holds exactly the side's text and images."""
  try:
    _check_sequence(sequence, side, tokenizer, length, "")
  except AssertionError:
    return False
  return True


def test_batches_have_the_documented_keys_shapes_and_dtypes(demo, tokenizer_dir):
  batch = next(iter(_dataset(_sources(demo["train"]), tokenizer_dir)))
  side = {"input_ids": (96,), "segment_ids": (96,), "positions": (3, 96),
          "pixel_patches": (64, inputs.PATCH_DIM), "patch_image_ids": (64,),
          "image_grid_thw": (1, 3)}
  target = dict(side, input_ids=(160,), segment_ids=(160,), positions=(3, 160))
  expected = {"query": {k: (4,) + v for k, v in side.items()},
              "positive": {k: (4,) + v for k, v in target.items()},
              "negative": {k: (4, 2) + v for k, v in target.items()},
              "negative_mask": (4, 2), "valid": (4,), "target_modal": (4,), "dataset_index": (4,),
              "example_ids": (4,), "bad_records": (4,), "bad_messages": (4,)}
  shapes = {k: ({kk: vv.shape for kk, vv in v.items()} if isinstance(v, dict) else v.shape)
            for k, v in batch.items()}
  assert shapes == expected
  for key, value in batch.items():
    for name, array in (value.items() if isinstance(value, dict) else [(key, value)]):
      expected_dtype = {"pixel_patches": np.float32, "bad_messages": np.dtype("<U1")}
      assert array.dtype == expected_dtype.get(name, np.int32), (key, name)
  inputs.check_batch(batch["query"])
  inputs.check_batch(batch["positive"])
  inputs.check_batch({k: v.reshape((8,) + v.shape[2:]) for k, v in batch["negative"].items()})
  assert batch["valid"].all() and not batch["bad_records"].any()


def test_contents_are_the_templated_texts_and_their_images(demo, tokenizer_dir, tokenizer):
  sources = _sources(demo["train"])
  opened, _ = cl_pipeline.open_pair_sources(sources)
  names = list(sources)
  _, batches = take(iter(_dataset(sources, tokenizer_dir)), 8)
  seen = set()
  for b, batch in enumerate(batches):
    assert len(set(batch["dataset_index"].tolist())) == 1  # task-aware: one dataset per batch
    for row in range(4):
      i, r = mixture.split_example_id(batch["example_ids"][row])
      assert i == batch["dataset_index"][row]
      seen.add(names[i])
      record = opened[i][r]
      for side, length in zip(SIDES, (96, 160)):
        sequence = {k: v[row] for k, v in batch[side].items()}
        _check_sequence(sequence, record[side], tokenizer, length, f"batch {b} row {row} {side}")
      assert batch["negative_mask"][row].tolist() == [1, 1]  # demo rows have 2 negatives
      found = []
      for k in range(2):
        sequence = {key: v[row, k] for key, v in batch["negative"].items()}
        found += [j for j, negative in enumerate(record["negatives"])
                  if _holds(sequence, negative, tokenizer, 160)]
      assert sorted(found) == [0, 1], (b, row, found)  # both negatives, each once
      modal = 3 if names[i] == "caption_scene" else (2 if record["positive"]["images"] else 1)
      assert batch["target_modal"][row] == modal
  assert {"question_passage", "caption_scene"} <= seen
  # The templates reach the sequences: a question_passage query starts with "Question: ".
  qp = [b for b in batches if names[b["dataset_index"][0]] == "question_passage"][0]
  n = int(qp["query"]["segment_ids"][0].sum())
  assert tokenizer.decode(qp["query"]["input_ids"][0][:n]).startswith("Question: Given a question")


def test_missing_negatives_are_masked_and_padded(demo, tokenizer_dir, tokenizer):
  sources = _sources(demo["train"])
  batch = next(iter(_dataset(sources, tokenizer_dir, num_negatives=3)))
  assert batch["negative_mask"].tolist() == [[1, 1, 0]] * 4  # 2 negatives per demo row
  pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
  third = {k: v[:, 2] for k, v in batch["negative"].items()}
  assert (third["input_ids"] == pad_id).all()
  assert not any(third[k].any() for k in third if k != "input_ids")
  no_negatives = next(iter(_dataset(sources, tokenizer_dir, num_negatives=0)))
  assert "negative" not in no_negatives and "negative_mask" not in no_negatives
  # One of two negatives: seeded by (seed, example id, epoch), not always the same one.
  opened, _ = cl_pipeline.open_pair_sources(sources)
  shape = cl_pipeline.SideShape(160, 64, 1)
  encoder = cl_pipeline.PairEncoder(opened, tokenizer_dir, IMAGE_CONFIG, shape, shape,
                                    num_negatives=1, seed=5, pad_id=0)
  picks = [encoder.pick_negatives(2, example_id, epoch) for example_id in range(20)
           for epoch in range(2)]
  assert picks == [encoder.pick_negatives(2, example_id, epoch) for example_id in range(20)
                   for epoch in range(2)]
  assert {tuple(p) for p in picks} == {(0,), (1,)}


def test_bad_rows_stay_in_the_batch_marked_and_named(demo, tokenizer_dir, tmp_path, caplog):
  pairs_dir = os.path.dirname(demo["train"]["caption_scene"])
  image = os.path.join(pairs_dir, "images/scenes/scene_00000.png")
  shutil.copy(image, tmp_path / "scene.png")
  path = tmp_path / "bad.jsonl"
  lines = [json.dumps({"qry": "a good row", "pos_text": "<|image_1|> an image",
                       "pos_image_path": "scene.png"}),
           json.dumps({"qry": "missing image", "pos_text": "x", "pos_image_path": "nope.png"}),
           "{malformed json",
           json.dumps({"qry": "long " * 100 + "<image>", "qry_image_path": "scene.png",
                       "pos_text": "x"}),  # the image does not fit after the text
           json.dumps({"qry": "negative missing", "pos_text": "x", "neg_text": ["n"],
                       "neg_image_path": ["gone.png"]}),
           json.dumps({"qry": "a lone surrogate \ud800", "pos_text": "x"})]  # legal JSON
  path.write_text("\n".join(lines) + "\n")
  sources = {"bad": dict(path=str(path))}
  with caplog.at_level(logging.WARNING, logger="mmembed_jax.data.cl_pipeline"):
    batch = next(iter(_dataset(sources, tokenizer_dir, global_batch_size=6)))
  assert not caplog.records  # named in the batch, for the trainer to log once it is used
  by_line = {int(e) + 1: row for row, e in enumerate(batch["example_ids"])}  # dataset 0: id = row
  assert sorted(by_line) == [1, 2, 3, 4, 5, 6]  # a batch never holds a row twice
  assert [batch["valid"][by_line[line]] for line in range(1, 7)] == [1, 0, 0, 0, 0, 0]
  assert [batch["bad_records"][by_line[line]] for line in range(1, 7)] == [0, 1, 1, 1, 1, 1]
  assert batch["bad_messages"][by_line[1]] == ""
  reasons = {2: "positive: image 0 file", 3: "malformed JSON",
             4: "does not fit the budget (length 96", 5: "negative 0: image 0 file",
             6: "TypeError"}
  for line, reason in reasons.items():
    row = by_line[line]
    named = str(batch["bad_messages"][row])
    assert named.startswith(f"{path}:{line}: ") and reason in named, (line, named)
    for side in ("query", "positive", "negative"):
      assert not batch[side]["segment_ids"][row].any()
      assert not batch[side]["pixel_patches"][row].any()
    assert batch["target_modal"][row] == 0 and not batch["negative_mask"][row].any()
  good = by_line[1]
  assert batch["positive"]["segment_ids"][good].sum() > 0 and batch["target_modal"][good] == 2


def test_a_source_whose_every_row_is_bad_stops_the_run_naming_it(demo, tokenizer_dir, tmp_path):
  """Beside a good source, a source of only bad rows stops the stream with one DataError line
  naming it (task-aware batches: its batches are all bad, the good source's all good)."""
  path = tmp_path / "broken.jsonl"
  path.write_text("".join(json.dumps({"qry": f"q{i}", "pos_text": "x", "pos_image_path": "gone.png"})
                          + "\n" for i in range(8)))
  sources = dict(_sources(demo["train"]), broken=dict(path=str(path)))
  iterator = iter(_dataset(sources, tokenizer_dir, global_batch_size=4, max_consecutive_bad=12))
  with pytest.raises(bad_records.DataError) as error:
    for _ in range(200):
      next(iterator)
  message = str(error.value)
  assert message.startswith("source 'broken': the last 12 records read from it were all bad")
  assert f"{path}:" in message and "positive: image 0 file" in message


def test_resume_processes_and_workers_give_the_same_batches(demo, tokenizer_dir):
  sources = _sources(demo["train"])
  states, batches = take(iter(_dataset(sources, tokenizer_dir)), 6)
  resumed = iter(_dataset(sources, tokenizer_dir))
  resumed.set_state(json.loads(json.dumps(states[3])))
  for i in range(3, 6):
    assert_same(batches[i], next(resumed), f"batch {i} resumed at 3")
  for process_index in range(2):
    _, local = take(iter(_dataset(sources, tokenizer_dir, process_index=process_index,
                                   process_count=2)), 3)
    for i in range(3):
      half = {k: (v[2 * process_index:2 * process_index + 2] if not isinstance(v, dict) else
                  {kk: vv[2 * process_index:2 * process_index + 2] for kk, vv in v.items()})
              for k, v in batches[i].items()}
      assert_same(half, local[i], f"process {process_index} batch {i}")
  workers = iter(_dataset(sources, tokenizer_dir, num_workers=2))
  try:
    _, from_workers = take(workers, 4)
  finally:
    workers.close()
  for i in range(4):
    assert_same(batches[i], from_workers[i], f"batch {i} with 2 worker processes")


def test_eval_batches_cover_each_datasets_first_rows_once(demo, tokenizer_dir, tokenizer):
  assert demo["eval"]["caption_scene"] != demo["train"]["caption_scene"]
  with open(demo["eval"]["scene_caption"]) as a, open(demo["train"]["scene_caption"]) as b:
    assert a.read() != b.read()  # another seed, next to the training split
  sources = _sources(demo["eval"])
  batches = cl_pipeline.cl_eval_batches(sources, tokenizer_dir, 6, max_rows_per_dataset=5,
                                        **{k: v for k, v in OPTIONS.items()})
  ids = [int(e) for b in batches for e, v in zip(b["example_ids"], b["valid"]) if v]
  expected = [mixture.example_id(i, r) for i in range(4) for r in range(5)]
  assert ids == expected  # file order, each once
  assert len(batches) == 4 and all(b["query"]["input_ids"].shape == (6, 96) for b in batches)
  last = batches[-1]
  assert last["valid"].tolist() == [1, 1, 0, 0, 0, 0]
  assert last["dataset_index"].tolist()[2:] == [-1] * 4 and not last["bad_records"].any()
  opened, _ = cl_pipeline.open_pair_sources(sources)
  first = {k: v[0] for k, v in batches[0]["query"].items()}
  _check_sequence(first, opened[0][0]["query"], tokenizer, 96, "eval batch 0 row 0")
  again = cl_pipeline.cl_eval_batches(sources, tokenizer_dir, 6, max_rows_per_dataset=5, **OPTIONS)
  assert_same(batches[1], again[1], "eval batches are deterministic")


def test_bad_source_specs_are_named(demo, tokenizer_dir):
  path = demo["train"]["caption_scene"]
  cases = [({"x": dict(path=path, wieght=2)}, r"source 'x': unknown field\(s\) \['wieght'\]"),
           ({"x": dict(path="")}, "source 'x': field 'path' is missing or empty"),
           ({"x": dict(path=path, cap=0)}, "source 'x': field 'cap' = 0"),
           ({"x": dict(path=path, weight=-1)}, "source 'x': field 'weight' = -1"),
           ({"x": dict(path=path, format="vlm2vec")}, "source 'x': field 'format' = 'vlm2vec'"),
           ([dict(path=path)], "expected a mapping")]
  for sources, message in cases:
    with pytest.raises(ValueError, match=message):
      _dataset(sources, tokenizer_dir)
  with pytest.raises(ValueError, match="dataset 'x' has 8 rows .* fewer than global_batch_size 16"):
    _dataset({"x": dict(path=path)}, tokenizer_dir, global_batch_size=16)
  with pytest.raises(ValueError, match="target_max_patches 30 must be a multiple of 4"):
    _dataset({"x": dict(path=path)}, tokenizer_dir, target_max_patches=30)
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict({"x": dict(path=path, image_root=None, cap=None)})
  assert next(iter(_dataset(config, tokenizer_dir)))["valid"].all()
