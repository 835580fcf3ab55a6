"""Tests of pair records (mmembed_jax.data.pairs): MMEB and mmE5 rows, settings, bad rows."""
import os
import shutil

import numpy as np
import pytest

from mmembed_jax.data import images, pairs, rows, sequences

from pipeline_checks import write_jsonl

IMAGE_CONFIG = images.ImageProcessingConfig(min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28)
QUERY_INSTRUCTION = "<|image_1|> Represent the given image with the following question: "


@pytest.fixture(scope="module")
def data(tmp_path_factory, image_dir):
  """Pair files in both formats; images in the data directory and in two extra roots."""
  root = tmp_path_factory.mktemp("pairs")
  shutil.copytree(image_dir, root / "img")
  for extra, name in (("root_a", "wide.png"), ("root_b", "tall.png")):
    os.makedirs(root / extra / "sub")
    shutil.copy(os.path.join(image_dir, name), root / extra / "sub" / name)
  paths = {"root": str(root)}
  paths["mmeb"] = write_jsonl(root / "mmeb.jsonl", [
      {"qry": QUERY_INSTRUCTION + "what is drawn?", "qry_image_path": "img/wide.png",
       "pos_text": "a wide picture", "pos_image_path": "", "neg_text": ["tall", "square"],
       "neg_image_path": ["", ""]},
      {"qry": "Find a tall picture.", "qry_image_path": "", "pos_text": "<|image_1|>\nRepresent "
       "the given image.", "pos_image_path": "img/tall.png", "neg_text": "<image> Represent it.",
       "neg_image_path": "img/square.png"},
      {"qry": "no marker", "qry_image_path": "img/small.png", "pos_text": "text only",
       "pos_image_path": None, "neg_text": "['not', 'parsed in mmeb']", "neg_image_path": None},
      "{malformed json",  # line 4
      {"qry": "<|image_1|> <|image_2|> two markers", "qry_image_path": "img/small.png",
       "pos_text": "x"},  # line 5
      {"caption": "no pair fields"},  # line 6
      {"qry": "q", "pos_text": "p", "neg_text": ["a", "b", "c"], "neg_image_path": ["", ""]},  # 7
      {"qry": 5, "pos_text": "p"},  # line 8
  ])
  paths["mme5"] = write_jsonl(root / "mme5.jsonl", [
      {"qry": "<|image_1|> Find the matching text.", "qry_image_path": "sub/wide.png",
       "pos_text": "a caption", "pos_image_path": "",
       "neg_text": "['first negative', 'second negative']",
       "neg_image_path": "['', 'sub/tall.png']"},
      {"qry": "q", "qry_image_path": "", "pos_text": "<|image_1|>",
       "pos_image_path": "img/small.png", "neg_text": "['unterminated', ",
       "neg_image_path": ""},  # line 2
      {"qry": "text negatives as a list", "pos_text": "p", "neg_text": ["x", "", "y"],
       "neg_image_path": ""},
  ])
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  paths["parquet"] = str(root / "pairs.parquet")
  pq.write_table(pa.table({"qry": ["q0", "q1", None], "qry_image_path": ["", "img/wide.png", ""],
                           "pos_text": ["p0", "p1", None], "pos_image_path": ["", "", ""],
                           "neg_text": [["n0"], [], ["n2"]], "neg_image_path": [[""], [], [""]]}),
                 paths["parquet"], row_group_size=2)
  return paths


def _source(path, kind="jsonl", **spec):
  return pairs.PairSource(kind, path, "test", pairs.settings_from_spec("test", spec))


def test_mmeb_rows_become_pair_records(data):
  source = _source(data["mmeb"])
  assert len(source) == 8
  first = source[0]
  assert first["error"] is None and first["where"] == f"{data['mmeb']}:1"
  assert first["query"] == {"text": "<image> Represent the given image with the following "
                                    "question: what is drawn?",
                            "images": [os.path.join(data["root"], "img/wide.png")]}
  assert first["positive"] == {"text": "a wide picture", "images": []}
  assert first["negatives"] == [{"text": "tall", "images": []}, {"text": "square", "images": []}]
  assert first["target_modal"] == pairs.TEXT_MODALITY
  second = source[1]  # single-value negatives; an image target
  assert second["positive"]["text"] == "<image>\nRepresent the given image."
  assert second["negatives"] == [{"text": "<image> Represent it.",
                                  "images": [os.path.join(data["root"], "img/square.png")]}]
  assert second["target_modal"] == pairs.IMAGE_MODALITY
  third = source[2]  # no marker: the image is prepended; mmeb does not parse list literals
  assert third["query"]["text"] == "<image>no marker"
  assert third["negatives"] == [{"text": "['not', 'parsed in mmeb']", "images": []}]


def test_bad_rows_are_named_by_file_and_line(data):
  source = _source(data["mmeb"])
  expected = {4: "malformed JSON",
              5: "field 'qry' has 2 image markers after templating but 1 images",
              6: "the query is empty", 7: "'neg_text' has 3 entries but 'neg_image_path' has 2",
              8: "field 'qry' must be a string or null, found number"}
  for line, reason in expected.items():
    record = source[line - 1]
    assert record["where"] == f"{data['mmeb']}:{line}"
    assert record["query"] is None and reason in record["error"], (line, record["error"])
  record = _source(data["mme5"], format="mmE5", image_root=data["root"])[1]
  assert record["where"] == f"{data['mme5']}:2" and "looks like a list literal" in record["error"]


def test_mme5_list_literals_and_image_roots(data):
  roots = [os.path.join(data["root"], "missing_root"), os.path.join(data["root"], "root_a"),
           os.path.join(data["root"], "root_b")]
  source = _source(data["mme5"], format="mmE5", image_root=roots)
  first = source[0]
  assert first["error"] is None, first["error"]
  assert first["query"]["images"] == [os.path.join(data["root"], "root_a/sub/wide.png")]
  assert first["negatives"] == [
      {"text": "first negative", "images": []},
      {"text": "<image>second negative",
       "images": [os.path.join(data["root"], "root_b/sub/tall.png")]}]  # the first root holding it
  # A path under no root falls back to the data file's directory.
  single_root = _source(data["mme5"], format="mmE5",
                        image_root=os.path.join(data["root"], "root_a"))
  assert single_root[0]["negatives"][1]["images"] == [os.path.join(data["root"], "sub/tall.png")]
  third = source[2]  # an empty text in a list of text negatives is padding: dropped
  assert [n["text"] for n in third["negatives"]] == ["x", "y"]


def test_templates_and_target_modal(data, tmp_path):
  source = _source(data["mmeb"], query_template="Query: {text}", target_template="{text}!",
                   target_modal=3)
  first, second = source[0], source[1]
  assert first["query"]["text"].startswith("Query: <image> Represent the given image")
  assert first["positive"]["text"] == "a wide picture!"
  assert [n["text"] for n in first["negatives"]] == ["tall!", "square!"]
  assert second["query"]["text"] == "Query: Find a tall picture."
  assert second["positive"]["text"] == "<image>\nRepresent the given image.!"
  assert first["target_modal"] == second["target_modal"] == 3  # explicit: never inferred
  # An instruction template holding the placeholder, for image-only targets.
  image = os.path.join(data["root"], "img/small.png")
  path = write_jsonl(tmp_path / "templated.jsonl", [
      {"qry": "q", "pos_text": "", "pos_image_path": image},
      {"qry": "q", "pos_text": "<|image_1|> caption", "pos_image_path": image}])
  templated = _source(path, target_template="<|image_1|>\nRepresent the given image. {text}")
  assert templated[0]["positive"] == {"text": "<image>\nRepresent the given image. ",
                                      "images": [image]}
  assert templated[0]["target_modal"] == pairs.IMAGE_MODALITY
  # The template's placeholder and the row's both count: two markers for one image.
  assert "field 'pos_text' has 2 image markers" in templated[1]["error"]


def test_parquet_pairs(data):
  parquet = _source(data["parquet"], kind="parquet")
  where = [parquet[i]["where"] for i in range(3)]
  assert where == [f"{data['parquet']}:row {i}" for i in (1, 2, 3)]
  assert parquet[0]["negatives"] == [{"text": "n0", "images": []}]
  assert parquet[1]["query"]["images"] == [os.path.join(data["root"], "img/wide.png")]
  assert parquet[1]["negatives"] == [] and "the query is empty" in parquet[2]["error"]


def test_settings_errors_name_the_source_and_field():
  with pytest.raises(ValueError, match="source 'vqa': field 'format' = 'MMEB'"):
    pairs.settings_from_spec("vqa", {"format": "MMEB"})
  with pytest.raises(ValueError, match="source 'vqa': field 'query_template' = '{txt}'"):
    pairs.settings_from_spec("vqa", {"query_template": "{txt}"})
  with pytest.raises(ValueError, match="source 'vqa': field 'target_modal' = 8"):
    pairs.settings_from_spec("vqa", {"target_modal": 8})
  with pytest.raises(ValueError, match="source 'vqa': field 'image_root'"):
    pairs.settings_from_spec("vqa", {"image_root": 5})
  with pytest.raises(ValueError, match="source 'vqa': field 'kind' = 'csv'"):
    pairs.PairSource("csv", "x.csv", "vqa")


def test_converted_placeholders_tokenize_as_vision_tokens(data, tokenizer_dir, tokenizer):
  record = _source(data["mmeb"])[0]
  encoder = sequences.SequenceEncoder(tokenizer_dir, IMAGE_CONFIG)
  query = encoder.encode(record["query"]["text"], record["query"]["images"], length=256,
                         max_patches=256, max_images=1).input_ids
  _, grid = images.preprocess_image(images.load_image(record["query"]["images"][0]), IMAGE_CONFIG)
  expected = rows.tokenize_with_images(record["query"]["text"], grid[None], tokenizer)
  np.testing.assert_array_equal(query, expected)  # tokenizers (training) = transformers (rows)
  pad = tokenizer.convert_tokens_to_ids(rows.IMAGE_PAD)
  text = tokenizer.decode([i for i in query if i != pad])
  assert text == ("<|vision_start|><|vision_end|> Represent the given image with the following "
                  "question: what is drawn?")
