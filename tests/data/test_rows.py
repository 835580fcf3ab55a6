"""Tests of the demo tokenizer and the JSONL row convention (mmembed_jax.data.rows)."""
import json
import os

import numpy as np
import pytest

from mmembed_jax.data import mrope
from mmembed_jax.data import rows
from mmembed_jax.data import special_tokens
from mmembed_jax.demo import tokenizer as tokenizer_lib
from mmembed_jax.models import inputs


def _write_jsonl(path, lines):
  """Writes lines (dicts are JSON-encoded, strings written verbatim) to path; returns str(path)."""
  with open(path, "w", encoding="utf-8") as f:
    for line in lines:
      f.write((json.dumps(line) if not isinstance(line, str) else line) + "\n")
  return str(path)


def _ids(tokenizer, text):
  """Returns the plain token ids of text, as rows encodes it."""
  return tokenizer.encode(text, add_special_tokens=False)


# --- tokenizer -----------------------------------------------------------------------------------


def test_tokenizer_round_trip(tokenizer, tokenizer_dir):
  import transformers

  assert len(tokenizer) <= 512
  for token in tokenizer_lib.SPECIAL_TOKENS:
    ids = _ids(tokenizer, f"a {token} b")
    assert ids.count(tokenizer.convert_tokens_to_ids(token)) == 1, token
    assert _ids(tokenizer, token) == [tokenizer.convert_tokens_to_ids(token)], token
  text = "The invoice shows a red circle, 12 items; héllo wörld 😀\n  end."
  assert tokenizer.decode(_ids(tokenizer, text)) == text
  # Offline reload gives the same ids.
  again = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  assert _ids(again, text) == _ids(tokenizer, text)
  ids = special_tokens.special_token_ids(tokenizer)
  assert set(ids) == {"image_token_id", "video_token_id", "vision_start_token_id",
                      "vision_end_token_id", "pad_token_id", "eos_token_id"}
  assert ids["image_token_id"] == tokenizer.convert_tokens_to_ids("<|image_pad|>")
  assert ids["pad_token_id"] == ids["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|endoftext|>")
  assert max(ids.values()) < 512
  assert tokenizer.pad_token == tokenizer.eos_token == tokenizer.unk_token == "<|endoftext|>"


def test_tokenizer_is_deterministic(tokenizer_dir, tmp_path):
  other = tokenizer_lib.build_tokenizer(str(tmp_path / "again"), vocab_size=512)
  with open(os.path.join(tokenizer_dir, "tokenizer.json"), "rb") as a:
    with open(os.path.join(other, "tokenizer.json"), "rb") as b:
      assert a.read() == b.read()


def test_tokenizer_small_vocab(tmp_path):
  import transformers

  tok = transformers.AutoTokenizer.from_pretrained(
      tokenizer_lib.build_tokenizer(str(tmp_path / "small"), vocab_size=300))
  assert len(tok) <= 300
  with pytest.raises(ValueError, match="vocab_size=100 is too small"):
    tokenizer_lib.build_tokenizer(str(tmp_path / "tiny"), vocab_size=100)


# --- <image> expansion ----------------------------------------------------------------------------


def test_marker_expansion_counts(tokenizer):
  special = rows.vision_token_ids(tokenizer)
  vs, ve, pad = special["<|vision_start|>"], special["<|vision_end|>"], special["<|image_pad|>"]
  grids = [[1, 4, 6], [1, 2, 2]]  # 6 and 1 merged tokens
  ids = rows.tokenize_with_images("Left <image> and right <image>.", grids, tokenizer)
  expected = (_ids(tokenizer, "Left ") + [vs] + [pad] * 6 + [ve] + _ids(tokenizer, " and right ")
              + [vs] + [pad] + [ve] + _ids(tokenizer, "."))
  assert ids.dtype == np.int32
  assert ids.tolist() == expected


def test_prepend_rule(tokenizer):
  special = rows.vision_token_ids(tokenizer)
  vs, ve, pad = special["<|vision_start|>"], special["<|vision_end|>"], special["<|image_pad|>"]
  ids = rows.tokenize_with_images("Two shapes.", [[1, 2, 4], [1, 4, 4]], tokenizer)
  expected = [vs] + [pad] * 2 + [ve] + [vs] + [pad] * 4 + [ve] + _ids(tokenizer, "Two shapes.")
  assert ids.tolist() == expected
  # Same as writing the markers directly in front of the text.
  assert rows.tokenize_with_images("<image><image>Two shapes.", [[1, 2, 4], [1, 4, 4]],
                                   tokenizer).tolist() == expected


def test_marker_count_mismatch(tokenizer):
  with pytest.raises(ValueError, match="row 3: text has 2 '<image>' markers but the row has 1 images"):
    rows.tokenize_with_images("<image> a <image> b", [[1, 2, 2]], tokenizer, where="row 3")
  with pytest.raises(ValueError, match="1 '<image>' markers but the row has 0 images"):
    rows.tokenize_with_images("<image> a", [], tokenizer)


def test_reserved_token_in_text(tokenizer):
  with pytest.raises(ValueError, match=r"reserved token\(s\) \['<\|image_pad\|>'\]"):
    rows.tokenize_with_images("a <|image_pad|> b", [], tokenizer)


def test_text_only_row(tokenizer):
  enc = rows.encode_row({"text": "A blue square."}, tokenizer, None, max_length=64)
  n = len(_ids(tokenizer, "A blue square."))
  assert enc.input_ids.tolist() == _ids(tokenizer, "A blue square.")
  assert enc.patches.shape == (0, inputs.PATCH_DIM) and enc.patches.dtype == np.float32
  assert enc.grid_thw.shape == (0, 3) and enc.grid_thw.dtype == np.int32
  np.testing.assert_array_equal(enc.positions, np.tile(np.arange(n, dtype=np.int32), (3, 1)))


# --- reading JSONL --------------------------------------------------------------------------------


def test_read_jsonl_rows_skips_blank_lines(tmp_path):
  path = _write_jsonl(tmp_path / "ok.jsonl", [{"text": "a"}, "", {"text": "b", "image": None},
                                              {"text": "c", "images": ["x.png"], "id": 7}])
  assert [r["text"] for r in rows.read_jsonl_rows(path)] == ["a", "b", "c"]


def test_malformed_json_names_line(tmp_path):
  path = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}, "", '{"text": "b",'])
  with pytest.raises(ValueError, match=r"bad\.jsonl: line 3: malformed JSON"):
    rows.read_jsonl_rows(path)


@pytest.mark.parametrize("row, field, found", [
    ({"image": "a.png"}, "missing field 'text'", "found fields"),
    ({"text": 3}, "field 'text' must be a string", "found number"),
    ({"text": "a", "image": ["a.png"]}, "field 'image' must be a path string or null", "found array"),
    ({"text": "a", "images": "a.png"}, "field 'images' must be an array", "found string"),
    ({"text": "a", "images": ["a.png", 2]}, r"field 'images\[1\]' must be a path", "found number"),
    ({"text": "a", "image": "a.png", "images": ["b.png"]}, "fields 'image' and 'images' are both set",
     "expected at most one"),
    (["text"], "expected a JSON object", "found array"),
])
def test_bad_row_names_file_line_field(tmp_path, row, field, found):
  path = _write_jsonl(tmp_path / "rows.jsonl", [{"text": "fine"}, row])
  with pytest.raises(ValueError, match=rf"rows\.jsonl: line 2: {field}.*{found}"):
    rows.read_jsonl_rows(path)


def test_resolve_image_paths():
  row = {"text": "", "images": ["a.png", "sub/b.png", "/abs/c.png", "gs://bucket/d.png"]}
  assert rows.resolve_image_paths(row, "/data") == [
      "/data/a.png", "/data/sub/b.png", "/abs/c.png", "gs://bucket/d.png"]
  assert rows.resolve_image_paths({"text": "", "image": "a.png"}, "/d") == ["/d/a.png"]
  assert rows.resolve_image_paths({"text": "", "image": None}, "/d") == []
  assert rows.resolve_image_paths({"text": ""}) == []


def test_missing_image_names_path_and_row(tmp_path, tokenizer):
  path = _write_jsonl(tmp_path / "data.jsonl", [{"text": "a"}, {"text": "b", "image": "nope.png"}])
  missing = os.path.join(str(tmp_path), "nope.png")
  with pytest.raises(ValueError) as e:
    rows.encode_jsonl(path, tokenizer, None, max_length=64)
  assert "row 2 (line 2) of" in str(e.value) and "data.jsonl" in str(e.value)
  assert repr(missing) in str(e.value) and "does not exist" in str(e.value)


def test_too_long_row_is_an_error(tmp_path, tokenizer):
  text = "The invoice has a red circle and a blue square at the top of the page."
  n = len(_ids(tokenizer, text))
  path = _write_jsonl(tmp_path / "long.jsonl", [{"text": "ok"}, "", {"text": text}])
  with pytest.raises(ValueError, match=rf"row 2 \(line 3\) of .*long\.jsonl: has {n} tokens, "
                                       rf"more than max_length {n - 1}"):
    rows.encode_jsonl(path, tokenizer, None, max_length=n - 1)
  assert rows.encode_jsonl(path, tokenizer, None, max_length=n)[1].num_tokens == n


# --- with real images -----------------------------------------------------------------------------


def test_encode_jsonl_with_images(tmp_path, tokenizer, monkeypatch):
  images = pytest.importorskip("mmembed_jax.data.images")
  from PIL import Image

  data_dir = tmp_path / "data"
  (data_dir / "imgs").mkdir(parents=True)
  rng = np.random.default_rng(0)
  for name, (w, h) in {"wide.png": (112, 56), "tall.png": (56, 84)}.items():
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(data_dir / "imgs" / name)
  path = _write_jsonl(data_dir / "d.jsonl", [
      {"text": "Compare <image> with <image>.", "images": ["imgs/wide.png", "imgs/tall.png"]},
      {"text": "A shape.", "image": str(data_dir / "imgs" / "tall.png")},  # absolute path
      {"text": "No image here."},
  ])
  config = images.ImageProcessingConfig(min_pixels=28 * 28, max_pixels=112 * 112)
  monkeypatch.chdir(tmp_path)  # relative paths resolve against the JSONL file, not the cwd
  encoded = rows.encode_jsonl(os.path.relpath(path), tokenizer, config, max_length=128)
  assert [e.num_images for e in encoded] == [2, 1, 0]
  image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
  wide_p, wide_g = images.preprocess_image(images.load_image(data_dir / "imgs" / "wide.png"), config)
  tall_p, tall_g = images.preprocess_image(images.load_image(data_dir / "imgs" / "tall.png"), config)

  first = encoded[0]
  np.testing.assert_array_equal(first.grid_thw, np.stack([wide_g, tall_g]))
  np.testing.assert_array_equal(first.patches, np.concatenate([wide_p, tall_p]))
  assert first.patches.dtype == np.float32 and first.grid_thw.dtype == np.int32
  assert int((first.input_ids == image_pad).sum()) == (
      images.num_merged_tokens(wide_g) + images.num_merged_tokens(tall_g))
  np.testing.assert_array_equal(first.positions,
                                mrope.mrope_positions(first.input_ids, first.grid_thw, image_pad))
  assert first.positions.dtype == np.int32 and first.positions.shape == (3, first.num_tokens)
  # The prepend rule for the single-image row, whose image path is absolute.
  second = encoded[1]
  assert second.input_ids[0] == tokenizer.convert_tokens_to_ids("<|vision_start|>")
  assert int((second.input_ids == image_pad).sum()) == images.num_merged_tokens(tall_g)
  assert second.source.startswith("row 2 (line 2) of")


def test_unreadable_image_names_path_and_row(tmp_path, tokenizer):
  pytest.importorskip("mmembed_jax.data.images")
  (tmp_path / "broken.png").write_bytes(b"not a png")
  path = _write_jsonl(tmp_path / "d.jsonl", [{"text": "<image> x", "image": "broken.png"}])
  with pytest.raises(ValueError, match=r"row 1 \(line 1\) of .*d\.jsonl: cannot read image 0 \("
                                       r".*broken\.png\): UnidentifiedImageError"):
    rows.encode_jsonl(path, tokenizer, None, max_length=64)
