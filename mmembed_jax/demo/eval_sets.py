"""Small MMEB-format and ViDoRe-format evaluation sets drawn by the synthetic demo generator.

  write_demo_mmeb("runs/eval/mmeb")      # {dataset: jsonl}, plus meta_tasks.json and images/
  write_demo_vidore("runs/eval/vidore")  # {dataset: directory}
  write_demo_mmeb_v2("runs/eval/mmeb_v2")  # {task: path}: MMEB-V2 task names and layout

MMEB layout (what `mmembed_jax.evaluation.mmeb` reads), DIR/:
  NAME.jsonl        one row per query: qry_text (instruction included, `<|image_1|>` marks the
                    query image), qry_img_path ("" = none), tgt_text [candidates], tgt_img_path
                    [candidates] ("" = text only); candidate 0 is the truth; image paths are
                    relative to DIR
  meta_tasks.json   {NAME: classification | vqa | retrieval | grounding}
  images/...
Four datasets, one per meta-task:
  shape_classification  a one-shape scene -> its kind, among all 6 kind names (shared by every
                        row; the first row lists its truth twice, at 0 and at the end)
  document_vqa          a page and a question -> the answer, among answers of other pages
  caption_retrieval     a caption -> its scene, among 2 one-attribute hard negatives and 3 other
                        scenes of the set (candidate images shared between rows)
  shape_grounding       a scene and "the <colour> <kind>" -> the crop of that shape's grid cell,
                        among the crops of the scene's other shapes and of one empty cell

ViDoRe layout (`mmembed_jax.evaluation.vidore`), DIR/NAME/:
  queries.jsonl  {"query-id", "query"}
  corpus.jsonl   {"corpus-id", "image"} (image relative to DIR/NAME)
  qrels.jsonl    {"query-id", "corpus-id", "score"}
  images/...
One dataset, document_pages: pages and the questions that name them (`document_qa`'s query). A
third of the pages are also rendered a second time under another id (a copy, relevance 1 next
to the original's 2), so some queries have several, graded relevant pages; a few pages are asked
about by no query.

Deterministic (same arguments, same bytes); a finished directory whose marker records the same
arguments is reused, anything else is rebuilt, and the marker is written last.
"""
import json
import os
import shutil
from typing import Any, Dict, List

from mmembed_jax.demo import documents, records, scenes

MMEB_MARKER = "DEMO_MMEB_COMPLETE"
VIDORE_MARKER = "DEMO_VIDORE_COMPLETE"
_VERSION = 2
META_TASKS = {"shape_classification": "classification", "document_vqa": "vqa",
              "caption_retrieval": "retrieval", "shape_grounding": "grounding"}
IMAGE_TARGET = "<|image_1|>\nRepresent the given image."


def _start(directory: str, marker: str) -> None:
  """Removes a stale marker and the images a previous build wrote."""
  os.makedirs(directory, exist_ok=True)
  if os.path.exists(os.path.join(directory, marker)):
    os.remove(os.path.join(directory, marker))
  shutil.rmtree(os.path.join(directory, "images"), ignore_errors=True)


def _save(image: Any, directory: str, relative: str) -> str:
  """Saves a PIL image under directory; returns its relative path."""
  path = os.path.join(directory, relative)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image.save(path, format="PNG")
  return relative


def _write_jsonl(path: str, rows: List[dict]) -> None:
  with open(path, "w", encoding="utf-8", newline="\n") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")


def _finish(directory: str, marker: str, params: Dict[str, Any], outputs: Dict[str, str]
            ) -> Dict[str, str]:
  """Writes the marker (last); returns {name: absolute path}."""
  with open(os.path.join(directory, marker), "w", encoding="utf-8") as f:
    json.dump({"params": params, "outputs": outputs}, f, indent=1)
  return {name: os.path.join(directory, path) for name, path in outputs.items()}


def _scenes(seed: int, count: int, shapes: tuple) -> List[dict]:
  """The first `count` scenes of the seed whose number of shapes is in `shapes`."""
  out, index = [], 0
  while len(out) < count:
    scene = scenes.make_scene(scenes.item_rng(seed, "eval-scene", index))
    index += 1
    if len(scene["shapes"]) in shapes:
      out.append(scene)
  return out


def _cell_crop(image: Any, position: List[int]) -> Any:
  """The grid cell at [row, col] of a rendered scene."""
  width, height = image.size
  row, col = position
  return image.crop((int(col * width / 3), int(row * height / 3), int((col + 1) * width / 3),
                     int((row + 1) * height / 3)))


def _classification(directory: str, seed: int, rows: int) -> List[dict]:
  out = []
  for i, scene in enumerate(_scenes(seed, rows, (1,))):
    path = _save(scenes.render_scene(scene), directory, f"images/classification/{i:04d}.png")
    kind = scene["shapes"][0]["kind"]
    labels = [kind] + [k for k in scenes.KINDS if k != kind]
    if i == 0:
      labels.append(kind)  # a duplicate of the truth: scored as a tie, which counts as a hit
    out.append({"qry_text": "<|image_1|> Identify the object shown in the image",
                "qry_img_path": path, "tgt_text": labels, "tgt_img_path": [""] * len(labels)})
  return out


def _vqa(directory: str, seed: int, rows: int, distractors: int = 5) -> List[dict]:
  docs = [documents.make_document(scenes.item_rng(seed, "eval-document", i)) for i in range(rows)]
  answers = sorted({qa["answer"] for doc in docs for qa in documents.document_qa(doc)})
  out = []
  for i, doc in enumerate(docs):
    path = _save(documents.render_document(doc), directory, f"images/vqa/{i:04d}.png")
    qa = documents.document_qa(doc)[0]
    rng = scenes.item_rng(seed, "eval-vqa-distractors", i)
    others = rng.sample([a for a in answers if a != qa["answer"]], distractors)
    out.append({"qry_text": "<|image_1|> Represent the given image with the following question: "
                            + qa["question"], "qry_img_path": path,
                "tgt_text": [qa["answer"]] + others, "tgt_img_path": [""] * (1 + distractors)})
  return out


def _retrieval(directory: str, seed: int, rows: int, others: int = 3) -> List[dict]:
  chosen = _scenes(seed + 1, rows, (1, 2, 3, 4))
  paths = [_save(scenes.render_scene(s), directory, f"images/retrieval/{i:04d}.png")
           for i, s in enumerate(chosen)]
  out = []
  for i, scene in enumerate(chosen):
    rng = scenes.item_rng(seed, "eval-retrieval", i)
    negatives = []
    for k, attribute in enumerate(rng.sample(scenes.SCENE_ATTRIBUTES, len(scenes.SCENE_ATTRIBUTES))):
      if len(negatives) == 2:
        break
      try:
        negative, _ = scenes.perturb_scene(scene, rng, attribute)
      except ValueError:
        continue
      negatives.append(_save(scenes.render_scene(negative), directory,
                             f"images/retrieval/{i:04d}_neg{k}.png"))
    shared = [paths[(i + j) % len(paths)] for j in range(1, others + 1)]  # overlap between rows
    images = [paths[i]] + negatives + shared
    out.append({"qry_text": "Find me an everyday image that matches the given caption: "
                            + scenes.scene_caption(scene), "qry_img_path": "",
                "tgt_text": [IMAGE_TARGET] * len(images), "tgt_img_path": images})
  return out


def _grounding(directory: str, seed: int, rows: int) -> List[dict]:
  out = []
  for i, scene in enumerate(_scenes(seed + 2, rows, (2, 3, 4))):
    image = scenes.render_scene(scene)
    path = _save(image, directory, f"images/grounding/{i:04d}.png")
    target = scene["shapes"][0]
    taken = [s["position"] for s in scene["shapes"]]
    empty = next([r, c] for r in range(3) for c in range(3) if [r, c] not in taken)
    cells = [s["position"] for s in scene["shapes"]] + [empty]
    crops = [_save(_cell_crop(image, cell), directory, f"images/grounding/{i:04d}_cell{k}.png")
             for k, cell in enumerate(cells)]
    out.append({"qry_text": "<|image_1|> Select the portion of the image that isolates the object "
                            f"labeled as \"{target['colour']} {target['kind']}\"",
                "qry_img_path": path,
                "tgt_text": ["<|image_1|>\nRepresent the given cropped image of the object"]
                            * len(crops), "tgt_img_path": crops})
  return out


def _image_sets(directory: str, names: Dict[str, str], seed: int, rows: int) -> Dict[str, str]:
  """Writes the four image datasets under the given names ({builder's name: name})."""
  outputs = {}
  for key, build in (("shape_classification", _classification), ("document_vqa", _vqa),
                     ("caption_retrieval", _retrieval), ("shape_grounding", _grounding)):
    _write_jsonl(os.path.join(directory, f"{names[key]}.jsonl"), build(directory, seed, rows))
    outputs[names[key]] = f"{names[key]}.jsonl"
  return outputs


def _document_pages(root: str, num_pages: int, seed: int) -> None:
  """Writes one BEIR-layout page-retrieval dataset to root (see the module doc)."""
  _start(root, VIDORE_MARKER)
  corpus, queries, qrels = [], [], []
  for i in range(num_pages):
    doc = documents.make_document(scenes.item_rng(seed, "eval-page", i))
    page = documents.render_document(doc)
    corpus.append({"corpus-id": f"page{i:03d}", "image": _save(page, root, f"images/{i:03d}.png")})
    if i % 3 == 0:  # a copy under another id: a second, lower-graded relevant page
      corpus.append({"corpus-id": f"page{i:03d}_copy",
                     "image": _save(page, root, f"images/{i:03d}_copy.png")})
    if i % 8 == 7:
      continue  # asked about by no query
    for k, qa in enumerate(documents.document_qa(doc)):
      query_id = f"q{i:03d}_{k}"
      queries.append({"query-id": query_id, "query": qa["query"]})
      qrels.append({"query-id": query_id, "corpus-id": f"page{i:03d}", "score": 2})
      if i % 3 == 0:
        qrels.append({"query-id": query_id, "corpus-id": f"page{i:03d}_copy", "score": 1})
  for table, rows in (("corpus", corpus), ("queries", queries), ("qrels", qrels)):
    _write_jsonl(os.path.join(root, f"{table}.jsonl"), rows)


def write_demo_mmeb(directory: str, rows_per_dataset: int = 16, seed: int = 2) -> Dict[str, str]:
  """Writes (or reuses) the sample MMEB set; returns {dataset: jsonl path}."""
  params = {"version": _VERSION, "rows_per_dataset": rows_per_dataset, "seed": seed}
  done = records.finished_build(directory, MMEB_MARKER, params)
  if done:
    return {name: path for name, path in done.items() if name in META_TASKS}
  _start(directory, MMEB_MARKER)
  outputs = _image_sets(directory, {name: name for name in META_TASKS}, seed, rows_per_dataset)
  with open(os.path.join(directory, "meta_tasks.json"), "w", encoding="utf-8") as f:
    json.dump(META_TASKS, f, indent=1)
  return _finish(directory, MMEB_MARKER, params, outputs)


def write_demo_vidore(directory: str, num_pages: int = 24, seed: int = 3) -> Dict[str, str]:
  """Writes (or reuses) the sample ViDoRe set; returns {dataset: directory}."""
  params = {"version": _VERSION, "num_pages": num_pages, "seed": seed}
  done = records.finished_build(directory, VIDORE_MARKER, params)
  if done:
    return done
  _start(directory, VIDORE_MARKER)
  _document_pages(os.path.join(directory, "document_pages"), num_pages, seed)
  return _finish(directory, VIDORE_MARKER, params, {"document_pages": "document_pages"})


# The sample MMEB-V2 set: each demo dataset under the name of a task of the same format and
# meta-task (its rows carry their own instructions, as MMEB-V2's image rows do).
MMEB_V2_IMAGE = {"shape_classification": "ImageNet-1K", "document_vqa": "DocVQA",
                 "caption_retrieval": "MSCOCO_t2i", "shape_grounding": "RefCOCO"}
MMEB_V2_VISDOC = "ViDoRe_docvqa"
MMEB_V2_MARKER = "DEMO_MMEB_V2_COMPLETE"


def write_demo_mmeb_v2(directory: str, rows_per_dataset: int = 16, num_pages: int = 24,
                       seed: int = 2) -> Dict[str, str]:
  """Writes (or reuses) the sample MMEB-V2 set (evaluation/mmeb_v2.py's layout: image/NAME.jsonl,
  visdoc/NAME/): 4 image tasks, one per image meta-task, and 1 document task; returns
  {task: path}. Video tasks come with the video evaluation."""
  params = {"version": _VERSION, "rows_per_dataset": rows_per_dataset, "num_pages": num_pages,
            "seed": seed}
  done = records.finished_build(directory, MMEB_V2_MARKER, params)
  if done:
    return done
  _start(directory, MMEB_V2_MARKER)
  image = os.path.join(directory, "image")
  _start(image, MMEB_V2_MARKER)
  outputs = {name: f"image/{path}"
             for name, path in _image_sets(image, MMEB_V2_IMAGE, seed, rows_per_dataset).items()}
  _document_pages(os.path.join(directory, "visdoc", MMEB_V2_VISDOC), num_pages, seed + 1)
  outputs[MMEB_V2_VISDOC] = f"visdoc/{MMEB_V2_VISDOC}"
  return _finish(directory, MMEB_V2_MARKER, params, outputs)
