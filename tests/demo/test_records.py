"""Tests of the synthetic demo data (mmembed_jax.demo: scenes.py, documents.py, records.py): determinism, caching, validity."""
import json
import os
import time

import numpy as np
import PIL.Image
import pytest

from mmembed_jax.demo import documents, records, scenes
from mmembed_jax.data import rows

SMALL = {"num_scenes": 24, "num_documents": 15, "num_passages": 12}
SMALL_PAIRS = {"num_scenes": 12, "num_documents": 8, "num_passages": 12}
# The demo's image sizes (mmembed_jax.demo.build.DEMO_PIXELS): at most 64 merged tokens per image.
DEMO_PIXELS = {"min_pixels": 4 * 28 * 28, "max_pixels": 64 * 28 * 28}


def _tree_bytes(directory):
  """Returns {relative path: bytes} of every file under directory."""
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = f.read()
  return out


def _tree_mtimes(directory):
  """Returns {relative path: mtime in ns} of every file under directory."""
  return {os.path.relpath(os.path.join(root, name), directory): os.stat(os.path.join(root, name)).st_mtime_ns
          for root, _, names in os.walk(directory) for name in names}


def _build(directory, seed=0):
  """Writes the small dataset and pairs into directory; returns ({source: jsonl}, {dataset: jsonl})."""
  return (records.write_demo_dataset(str(directory), seed=seed, **SMALL),
          records.write_demo_pairs(str(directory), seed=seed, **SMALL_PAIRS))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """The small dataset and pairs, written once for the module."""
  directory = tmp_path_factory.mktemp("demo_data")
  paths, pairs = _build(directory)
  return str(directory), paths, pairs


def _jsonl(path):
  """Returns the JSON objects of a JSONL file."""
  with open(path, "r", encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


# --- caching and determinism ---------------------------------------------------------------------


def test_same_seed_gives_identical_bytes(built, tmp_path):
  directory, paths, pairs = built
  _build(tmp_path / "again")
  first, second = _tree_bytes(directory), _tree_bytes(tmp_path / "again")
  assert sorted(first) == sorted(second)
  assert all(first[name] == second[name] for name in first)
  assert set(paths) == {"scenes", "documents", "passages"}
  assert set(pairs) == {"caption_scene", "scene_caption", "query_document", "question_passage"}
  other = records.write_demo_dataset(str(tmp_path / "seed1"), seed=1, **SMALL)
  with open(other["scenes"], "rb") as a, open(paths["scenes"], "rb") as b:
    assert a.read() != b.read()


def test_second_call_reuses_the_cache(built, monkeypatch):
  directory, paths, pairs = built
  before = _tree_mtimes(directory)

  def fail(*args, **kwargs):
    raise AssertionError("a finished cache was rebuilt")

  monkeypatch.setattr(records, "render_scene", fail)
  monkeypatch.setattr(records, "render_document", fail)
  assert _build(directory) == (paths, pairs)
  assert _tree_mtimes(directory) == before


def test_partial_cache_is_rebuilt(built, tmp_path):
  reference = _tree_bytes(built[0])
  directory = tmp_path / "partial"
  paths, pairs = _build(directory)
  # An interrupted build: no marker, a truncated JSONL, a missing image.
  os.remove(directory / records.DATA_MARKER)
  with open(paths["scenes"], "w", encoding="utf-8") as f:
    f.write('{"text": "<image> half')
  os.remove(directory / "images" / "scenes" / "scene_00003.png")
  # A finished marker whose files went missing.
  os.remove(directory / "pairs" / "images" / "documents" / "doc_00001_neg0.png")
  # Stale images of another build are cleared.
  with open(directory / "images" / "scenes" / "scene_09999.png", "wb") as f:
    f.write(b"stale")
  assert _build(directory) == (paths, pairs)
  assert _tree_bytes(directory) == reference
  # Other parameters rebuild too.
  smaller = records.write_demo_dataset(str(directory), num_scenes=5, num_documents=2, num_passages=1)
  assert len(_jsonl(smaller["scenes"])) == 5
  assert not os.path.exists(directory / "images" / "scenes" / "scene_00010.png")


def test_default_sizes_generate_fast(tmp_path):
  start = time.perf_counter()
  paths = records.write_demo_dataset(str(tmp_path))
  data_seconds = time.perf_counter() - start
  pairs = records.write_demo_pairs(str(tmp_path))
  pair_seconds = time.perf_counter() - start - data_seconds
  counts = {name: len(_jsonl(path)) for name, path in {**paths, **pairs}.items()}
  assert counts["scenes"] + counts["documents"] + counts["passages"] == 360
  assert min(counts.values()) >= 80, counts
  assert data_seconds < 15 and pair_seconds < 15, (data_seconds, pair_seconds)


# --- stage-1 rows --------------------------------------------------------------------------------


def test_rows_parse_and_images_open(built):
  directory, paths, _ = built
  kinds = {"scenes": set(), "documents": set(), "passages": set()}
  for source, path in paths.items():
    for r, row in enumerate(rows.read_jsonl_rows(path)):
      images = rows.resolve_image_paths(row, directory)
      assert row["text"].count(rows.IMAGE_MARKER) == len(images), (source, r, row["text"])
      assert len(row["meta"]) == max(1, len(images))
      kinds[source].add(len(images))
      for image_path, meta in zip(images, row["meta"]):
        with PIL.Image.open(image_path) as image:
          image.verify()
        with PIL.Image.open(image_path) as image:
          assert image.mode == "RGB" and image.size == (meta["width"], meta["height"])
  assert kinds == {"scenes": {1, 2}, "documents": {1, 2}, "passages": {0}}


def test_rows_encode_with_the_demo_tokenizer(built, tokenizer):
  from mmembed_jax.data.images import ImageProcessingConfig
  _, paths, _ = built
  config = ImageProcessingConfig(**DEMO_PIXELS)
  for path in paths.values():
    for encoded in rows.encode_jsonl(path, tokenizer, config, max_length=512):
      assert 0 < encoded.num_tokens <= 512


def test_scene_sizes_vary(built):
  _, paths, _ = built
  scenes = [meta for row in _jsonl(paths["scenes"]) for meta in row["meta"]]
  sizes = {(s["width"], s["height"]) for s in scenes}
  assert all(112 <= w <= 336 and 112 <= h <= 336 for w, h in sizes)
  assert any(w != h for w, h in sizes) and any(w == h for w, h in sizes)
  assert {len(s["shapes"]) for s in scenes} == {1, 2, 3, 4}


def test_captions_name_the_drawn_shapes(built):
  directory, paths, _ = built
  for row in _jsonl(paths["scenes"]):
    for image_path, scene in zip(row["images"], row["meta"]):
      caption = scenes.scene_caption(scene)
      assert caption in row["text"] or caption[0].upper() + caption[1:] in row["text"]
      with PIL.Image.open(os.path.join(directory, image_path)) as image:
        pixels = np.asarray(image)
      for shape in scene["shapes"]:
        for word in (shape["colour"], shape["kind"], shape["size"]):
          assert f" {word}" in f" {caption}", (word, caption)
        # The drawn image holds the shape's colour at the centre of its grid cell.
        row_index, col_index = shape["position"]
        x = int((col_index + 0.5) * scene["width"] / 3)
        y = int((row_index + 0.5) * scene["height"] / 3)
        assert tuple(pixels[y, x]) == scenes.COLOURS[shape["colour"]], (shape, caption)


def test_pages_carry_the_colour_of_the_store_or_town_their_questions_name(built):
  """The banner is what a tiny vision tower can match to a question at the demo's sizes: every
  page's top band has its store's (receipt, table) or town's (report) colour, and a negative that
  changes the store or town changes the banner."""
  directory, paths, pairs = built
  assert len(set(documents.STORE_COLOURS.values())) == len(documents.STORES)
  assert len(set(documents.TOWN_COLOURS.values())) == len(documents.TOWNS)
  for row in _jsonl(paths["documents"]):
    for image_path, doc in zip(row["images"], row["meta"]):
      name, colour = documents.brand(doc)
      assert name == doc["fields"]["town" if doc["type"] == "report" else "store"]
      with PIL.Image.open(os.path.join(directory, image_path)) as image:
        assert image.getpixel((2, 2)) == scenes.COLOURS[colour], (image_path, name)
  changed = 0
  for row in _jsonl(pairs["query_document"]):
    with PIL.Image.open(os.path.join(directory, "pairs", row["pos_image_path"])) as image:
      positive = image.getpixel((2, 2))
    for neg, neg_path in zip(row["meta"]["neg"], row["neg_image_path"]):
      if documents.brand(neg) != documents.brand(row["meta"]["pos"]):
        with PIL.Image.open(os.path.join(directory, "pairs", neg_path)) as image:
          assert image.getpixel((2, 2)) != positive
        changed += 1
  assert changed > 0


def test_document_rows_hold_page_text_and_answers(built):
  _, paths, _ = built
  for row in _jsonl(paths["documents"]):
    doc = row["meta"][0]
    assert row["text"].count("<image>\n") == len(row["images"])
    qa = documents.document_qa(doc)
    assert 1 <= len(qa) <= 3
    assert all(x["answer"] in documents.document_text(doc) for x in qa), qa
  receipts = [row["meta"][0] for row in _jsonl(paths["documents"]) if row["meta"][0]["type"] == "receipt"]
  assert receipts
  subtotal, tax, total = documents._receipt_totals(receipts[0]["fields"])  # pylint: disable=protected-access
  assert subtotal == sum(cents for _, _, cents in receipts[0]["fields"]["items"]) and total == subtotal + tax
  assert f"Total: {total // 100}.{total % 100:02d}" in documents.document_text(receipts[0])


# --- contrastive pairs ---------------------------------------------------------------------------


def _changed(pos, neg):
  """Returns the attributes in which two metadata dicts differ: 'shapes[i].colour' or 'fields.store'."""
  if pos["type"] == "scene":
    assert {k: v for k, v in pos.items() if k != "shapes"} == {k: v for k, v in neg.items() if k != "shapes"}
    assert len(pos["shapes"]) == len(neg["shapes"])
    return [f"shapes[{i}].{key}" for i, (a, b) in enumerate(zip(pos["shapes"], neg["shapes"]))
            for key in a if a[key] != b[key]]
  assert {k: v for k, v in pos.items() if k != "fields"} == {k: v for k, v in neg.items() if k != "fields"}
  return [f"fields.{key}" for key in pos["fields"] if pos["fields"][key] != neg["fields"][key]]


def test_pairs_follow_the_mmeb_format(built):
  directory, _, pairs = built
  keys = {"qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path", "meta"}
  for name, path in pairs.items():
    pair_rows = _jsonl(path)
    assert pair_rows, name
    for row in pair_rows:
      assert set(row) == keys
      assert len(row["neg_text"]) == len(row["neg_image_path"]) == 2
      for text, image in [(row["qry"], row["qry_image_path"]), (row["pos_text"], row["pos_image_path"])] + list(
          zip(row["neg_text"], row["neg_image_path"])):
        assert text.count("<image>") == (1 if image else 0), (name, text, image)
        assert not image or os.path.isfile(os.path.join(directory, "pairs", image))


def test_hard_negatives_differ_in_one_attribute(built):
  directory, _, pairs = built
  for name, path in pairs.items():
    for row in _jsonl(path):
      meta = row["meta"]
      changed = [_changed(meta["pos"], neg) for neg in meta["neg"]]
      assert all(len(c) == 1 for c in changed), (name, changed)
      assert len({c[0] for c in changed}) == len(changed) >= 1  # different changes
      if meta["pos"]["type"] == "scene":  # only changes visible at the demo's image sizes
        assert {c[0].split(".")[1] for c in changed} <= set(records.NEGATIVE_ATTRIBUTES), changed
      else:
        assert len(changed) == 2
      assert [c.split(":")[0] for c in meta["changes"]] == [c[0] for c in changed]
      if meta["pos"]["type"] == "scene":
        caption = scenes.scene_caption(meta["pos"])
        assert all(scenes.scene_caption(neg) != caption for neg in meta["neg"])
        if name == "scene_caption":
          assert row["pos_text"] == caption and caption not in row["neg_text"]
      else:
        # The query names the positive's value of the changed field, which the negative lacks.
        identity = documents.IDENTITY_FIELDS[meta["pos"]["type"]]
        for (field,), neg in zip(changed, meta["neg"]):
          field = field.split(".")[1]
          assert field in identity and str(meta["pos"]["fields"][field]) in row["qry"]
          assert str(neg["fields"][field]) not in row["qry"]
      for neg_path in row["neg_image_path"]:
        if neg_path:
          with open(os.path.join(directory, "pairs", neg_path), "rb") as a:
            with open(os.path.join(directory, "pairs", row["pos_image_path"]), "rb") as b:
              assert a.read() != b.read()


@pytest.mark.parametrize("attribute", scenes.SCENE_ATTRIBUTES)
def test_perturb_scene_changes_the_named_attribute(attribute):
  for i in range(30):
    scene = scenes.make_scene(scenes.item_rng(0, "scene", i))
    new, change = scenes.perturb_scene(scene, scenes.item_rng(0, "test", i), attribute)
    assert [c.split(".")[1] for c in _changed(scene, new)] == [attribute], change
    assert scenes.scene_caption(new) != scenes.scene_caption(scene)


def test_bad_arguments_name_the_field():
  scene = scenes.make_scene(scenes.item_rng(0, "scene", 0))
  rng = scenes.item_rng(0, "test", 0)
  with pytest.raises(ValueError, match="attribute 'shade'"):
    scenes.perturb_scene(scene, rng, "shade")
  doc = documents.make_document(scenes.item_rng(0, "document", 0))
  with pytest.raises(ValueError, match="field 'width' is not an identity field"):
    documents.perturb_document(doc, rng, "width")
  with pytest.raises(ValueError, match=r"shapes\[0\] has unknown colour"):
    scenes.render_scene({**scene, "shapes": [{**scene["shapes"][0], "colour": "teal"}]})
  with pytest.raises(ValueError, match="num_scenes=-1"):
    records.write_demo_dataset("/nonexistent", num_scenes=-1)
  with pytest.raises(ValueError, match="num_negatives=3"):
    records.pair_records(num_scenes=1, num_negatives=3)


def test_demo_tokenizer_knows_the_scene_words(tokenizer):
  words = list(scenes.COLOURS) + list(scenes.KINDS) + list(scenes.SIZES) + ["above", "below"]
  split = [w for w in words if len(tokenizer.encode(f" {w}", add_special_tokens=False)) > 1]
  assert not split, split


def test_video_pairs_show_their_captions_in_time(tmp_path):
  """The caption <-> clip pairs: same seed same bytes; each clip decodes to its rendered frames'
  content (the moving shape's colour where the caption puts it, first and last frame); each
  negative's caption differs from the positive's, one by reversing time."""
  from mmembed_jax.data import video  # pylint: disable=g-import-not-at-top
  from mmembed_jax.demo import clips  # pylint: disable=g-import-not-at-top
  paths = records.write_demo_video_pairs(str(tmp_path / "a"), num_clips=12)
  again = records.write_demo_video_pairs(str(tmp_path / "b"), num_clips=12)
  assert _tree_bytes(tmp_path / "a") == _tree_bytes(tmp_path / "b")
  assert sorted(paths) == ["caption_video", "video_caption"] and again
  base = os.path.dirname(paths["caption_video"])
  events = set()
  for row in _jsonl(paths["caption_video"]):
    clip = row["meta"]["pos"]
    events.add(clip["event"])
    caption = clips.clip_caption(clip)
    assert caption in row["qry"]
    negative_captions = [clips.clip_caption(n) for n in row["meta"]["neg"]]
    assert caption not in negative_captions and len(set(negative_captions)) == 2
    frames, fps, total = video.decode_frames(os.path.join(base, row["pos_video_path"]))
    assert frames.shape == (clip["frames"], clip["size"], clip["size"], 3) and fps == clip["fps"]
    rendered = clips.render_clip(clip).astype(int)
    assert np.abs(frames.astype(int) - rendered).mean() < 4  # lossy, but the same pictures
    if clip["event"] == "moves":  # the shape's colour is at the end the caption names, last
      dx, dy = clips.DIRECTIONS[clip["direction"]]
      y, x = clip["size"] // 2 + dy * 20, clip["size"] // 2 + dx * 20
      colour = np.array(scenes.COLOURS[clip["shapes"][0]["colour"]])
      assert np.abs(rendered[-1, y, x] - colour).max() == 0
      assert np.abs(rendered[0, y, x] - colour).max() > 0
  assert events == set(clips.EVENTS)
