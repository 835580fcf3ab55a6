"""Tests of JaxEmbedder (mmembed_jax.embedding): the model's vectors, whatever the batch size.

The reference is computed without the embedder: rows encoded with encode_row, collated into one
batch with bucket_sizes' shapes, and run through make_embed_fn. The embedder pads batches to
other (bucketed) shapes and fills the last batch with dummy rows, none of which may change a
row's vector.
"""
import json
import os

import numpy as np
import pytest

from mmembed_jax import embedding
from mmembed_jax.convert.hf_import import import_hf
from mmembed_jax.data import collate as collate_lib
from mmembed_jax.data import rows as rows_lib
from mmembed_jax.data.images import ImageProcessingConfig
from mmembed_jax.models.embedder import make_embed_fn

from tiny_models import TEST_PIXELS

TOLERANCE = 1e-5
# Text-only, one-image and two-image rows, chosen so that batches of 1, 3 and 8 rows compile
# few programs: rows 3 and 5 fall in one bucket, so batches [1, 2, 3] and [4, 5, dummy] do too.
ROWS = [
    {"text": "a small plain text row about red circles"},
    {"text": "<image> a wide picture", "image": "wide.png"},
    {"text": "left <image> and right <image> compared", "images": ["tall.png", "small.png"]},
    {"text": "Where is the green triangle?"},
    {"text": "two pictures in the other order", "images": ["small.png", "tall.png"]},  # prepended
]


def _write_jsonl(path, lines):
  """Writes lines (dicts JSON-encoded, strings verbatim) to path; returns str(path)."""
  with open(path, "w", encoding="utf-8") as f:
    for line in lines:
      f.write((json.dumps(line) if not isinstance(line, str) else line) + "\n")
  return str(path)


def _reference(model_dir, tokenizer, image_dir, attention, pooling):
  """Embeddings [rows, embed] of ROWS by hand: encode_row + collate + make_embed_fn, one batch."""
  config, params = import_hf(model_dir, attention=attention)
  image_config = ImageProcessingConfig(**TEST_PIXELS)
  encoded = [rows_lib.encode_row(row, tokenizer, image_config, 512, image_dir) for row in ROWS]
  batch = collate_lib.collate(encoded, tokenizer.pad_token_id, *collate_lib.bucket_sizes(encoded))
  return np.asarray(make_embed_fn(config, pooling)(params, batch))


@pytest.fixture(scope="module")
def embedder(tiny_hf_dirs):
  """The Qwen2.5-VL embedder (bidirectional, mean) whose batch size the tests change."""
  return embedding.JaxEmbedder.from_pretrained(
      tiny_hf_dirs["qwen2_5_vl"], attention="bidirectional", pooling="mean", batch_size=8)


@pytest.mark.parametrize("family,attention,pooling", [("qwen2_5_vl", "bidirectional", "mean"),
                                                      ("qwen2_vl", "causal", "last")])
def test_matches_direct_computation(tiny_hf_dirs, tokenizer, image_dir, embedder, family,
                                    attention, pooling):
  model_dir = tiny_hf_dirs[family]
  if family == "qwen2_5_vl":
    jax_embedder = embedder
  else:
    jax_embedder = embedding.JaxEmbedder.from_pretrained(model_dir, attention=attention,
                                                         pooling=pooling, batch_size=8)
  assert jax_embedder.config.attention == attention and jax_embedder.pooling == pooling
  got = jax_embedder.embed_rows(ROWS, base_dir=image_dir)
  want = _reference(model_dir, tokenizer, image_dir, attention, pooling)
  assert got.shape == (len(ROWS), 64) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=TOLERANCE, rtol=0)
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)
  # 5 rows, batch_size 8: one batch of 8 rows (3 of them dummy rows) with bucketed sizes.
  (shape,) = jax_embedder.batch_shapes
  assert shape[0] == 8 and shape[3] == 2
  assert [embedding.bucket(x, 32) for x in shape[1:3]] == list(shape[1:3])


def test_batch_size_invariance_and_padded_last_batch(embedder, image_dir, tmp_path):
  want = embedder.embed_rows(ROWS, base_dir=image_dir)  # batch_size 8 (compiled above)
  for batch_size, programs in ((1, 3), (3, 1)):  # batch_size 3: the last batch has a dummy row
    embedder.batch_size = batch_size
    try:
      got = embedder.embed_rows(ROWS, base_dir=image_dir)
    finally:
      embedder.batch_size = 8
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=TOLERANCE, rtol=0,
                               err_msg=f"batch_size {batch_size}")
    assert len({shape for shape in embedder.batch_shapes if shape[0] == batch_size}) == programs
  # Absolute image paths in a JSONL file elsewhere; blank lines are skipped.
  lines = [dict(row) for row in ROWS]
  for row in lines:
    for key in ("image", "images"):
      if key in row:
        row[key] = (os.path.join(image_dir, row[key]) if isinstance(row[key], str)
                    else [os.path.join(image_dir, p) for p in row[key]])
  path = _write_jsonl(tmp_path / "rows.jsonl", lines[:2] + [""] + lines[2:])
  np.testing.assert_allclose(embedder.embed_jsonl(path, progress=False), want, atol=TOLERANCE,
                             rtol=0)


def test_empty_input(embedder, tmp_path):
  assert embedder.embed_rows([]).shape == (0, 64)
  empty = _write_jsonl(tmp_path / "empty.jsonl", [""])
  assert embedder.embed_jsonl(empty, progress=False).shape == (0, 64)


def test_bucket():
  assert [embedding.bucket(x, 32) for x in (1, 32, 33, 49, 65, 97, 129, 200)] == [
      32, 32, 48, 64, 96, 128, 192, 256]
  assert [embedding.bucket(x) for x in (0, 1, 2, 3, 5, 7)] == [0, 1, 2, 3, 6, 8]


def test_errors_name_file_line_row_and_path(embedder, image_dir, tmp_path):
  bad_json = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, '{"text": "broken'])
  with pytest.raises(ValueError, match=r"bad\.jsonl: line 2: malformed JSON"):
    embedder.embed_jsonl(bad_json, progress=False)
  bad_field = _write_jsonl(tmp_path / "field.jsonl", [{"text": "ok"}, {"text": 3}])
  with pytest.raises(ValueError, match=r"field\.jsonl: line 2: field 'text' must be a string"):
    embedder.embed_jsonl(bad_field, progress=False)
  missing = _write_jsonl(tmp_path / "missing.jsonl",
                         [{"text": "ok"}, {"text": "x", "image": "nope.png"}])
  with pytest.raises(ValueError,
                     match=r"row 2 \(line 2\) of .*missing\.jsonl: image 0 file .*nope\.png"):
    embedder.embed_jsonl(missing, progress=False)
  with pytest.raises(ValueError, match=r"row 2: image 0 file .*nope\.png"):
    embedder.embed_rows([{"text": "ok"}, {"text": "x", "image": "nope.png"}], base_dir=image_dir)
  embedder.max_length = 8
  try:
    with pytest.raises(ValueError, match=r"row 1: has \d+ tokens, more than max_length 8"):
      embedder.embed_rows(ROWS[:1])
  finally:
    embedder.max_length = embedding.DEFAULT_MAX_LENGTH
  with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
    embedder.embed_jsonl(str(tmp_path / "nothing.jsonl"))


def test_from_pretrained_defaults_and_checks(tiny_hf_dirs, tmp_path):
  import shutil
  model_dir = shutil.copytree(tiny_hf_dirs["qwen2_vl"], tmp_path / "model")
  loaded = embedding.JaxEmbedder.from_pretrained(str(model_dir))
  assert (loaded.config.attention, loaded.pooling) == ("causal", "last")  # no mmembed.json
  assert loaded.image_config == ImageProcessingConfig(**TEST_PIXELS)
  with open(model_dir / "mmembed.json", "w") as f:
    json.dump({"attention": "bidirectional", "pooling": "mean"}, f)
  loaded = embedding.JaxEmbedder.from_pretrained(str(model_dir))
  assert (loaded.config.attention, loaded.pooling) == ("bidirectional", "mean")
  loaded = embedding.JaxEmbedder.from_pretrained(str(model_dir), attention="causal", pooling="last")
  assert (loaded.config.attention, loaded.pooling) == ("causal", "last")  # the caller wins
  with open(model_dir / "mmembed.json", "w") as f:
    json.dump({"pooling": "max"}, f)
  with pytest.raises(ValueError, match=r"mmembed\.json: field 'pooling' must be one of .*'ctoken'"):
    embedding.JaxEmbedder.from_pretrained(str(model_dir))
  with open(model_dir / "mmembed.json", "w") as f:
    json.dump({"pooling": "ctoken"}, f)  # no compression_tokens to pool
  with pytest.raises(ValueError, match=r"pooling 'ctoken' with 0 compression tokens"):
    embedding.JaxEmbedder.from_pretrained(str(model_dir))
  with open(model_dir / "mmembed.json", "w") as f:
    json.dump({"pooling": "ctoken", "compression_tokens": "32"}, f)
  with pytest.raises(ValueError, match=r"mmembed\.json: field 'compression_tokens' is '32'"):
    embedding.JaxEmbedder.from_pretrained(str(model_dir))
  with pytest.raises(ValueError, match=r"dtype must be one of"):
    embedding.JaxEmbedder.from_pretrained(str(model_dir), pooling="mean", dtype="float16")


def test_save_npy_is_atomic(tmp_path):
  path = str(tmp_path / "sub" / "emb.npy")
  embedding.save_npy(path, np.eye(3, dtype=np.float32))
  np.testing.assert_array_equal(np.load(path), np.eye(3))
  assert os.listdir(tmp_path / "sub") == ["emb.npy"]  # no temporary file left behind


def test_try_embed_rows_skips_and_names_rows_that_cannot_be_embedded(embedder, image_dir,
                                                                     tmp_path):
  """The evaluators' embed function: a truncated image, a lone surrogate and an empty row come
  back as errors naming the row (its "where" when it has one) and NaN vectors; the other rows
  get the embeddings they get on their own."""
  import shutil
  truncated = tmp_path / "truncated.png"
  shutil.copy(os.path.join(image_dir, "wide.png"), truncated)
  truncated.write_bytes(truncated.read_bytes()[:300])
  good = [{"text": "a red circle"}, {"text": "<image> a photo", "images": ["square.png"]}]
  rows = [good[0],
          {"text": "<image> broken", "images": [str(truncated)], "where": "pages.jsonl:7"},
          {"text": "lone \ud800 surrogate"}, {"text": ""}, good[1]]
  vectors, errors = embedder.try_embed_rows(rows, base_dir=image_dir)
  assert sorted(errors) == [1, 2, 3]
  assert errors[1].startswith("pages.jsonl:7: cannot read image 0") and "truncated.png" in errors[1]
  assert errors[2].startswith("row 3: the tokenizer rejects the text (TypeError")
  assert errors[3].startswith("row 4: empty: no text and no image")
  assert np.isnan(vectors[[1, 2, 3]]).all()
  np.testing.assert_allclose(vectors[[0, 4]], embedder.embed_rows(good, base_dir=image_dir),
                             atol=1e-5, rtol=0)
