"""The mteb bridge: `mteb.evaluate` runs end to end on local data (no hub) with an exported tiny
model, through PyTorch and through JAX; the rows it builds are the documented ones; and on the
sample page-retrieval set mteb's NDCG@5 equals our ViDoRe evaluator's (both pytrec_eval)."""
import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
mteb = pytest.importorskip("mteb")
from datasets import Dataset, Image as DatasetImage  # pylint: disable=g-import-not-at-top,wrong-import-position
from mteb.abstasks.retrieval import AbsTaskRetrieval  # pylint: disable=g-import-not-at-top,wrong-import-position
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData  # pylint: disable=g-import-not-at-top,wrong-import-position
from mteb.abstasks.task_metadata import TaskMetadata  # pylint: disable=g-import-not-at-top,wrong-import-position

from mmembed_jax.convert.hf_export import export_hf  # pylint: disable=wrong-import-position
from mmembed_jax.convert.hf_import import import_hf  # pylint: disable=wrong-import-position
from mmembed_jax.demo.eval_sets import write_demo_vidore  # pylint: disable=wrong-import-position
from mmembed_jax.evaluation import vidore  # pylint: disable=wrong-import-position
from mmembed_jax.evaluation.mteb_bridge import MtebEncoder  # pylint: disable=wrong-import-position

QUERY_INSTRUCTION = "Find a document image that answers the question:"
PAGE_PROMPT = "Represent the given document image."
PAGES = {}  # {"root": the sample ViDoRe dataset directory}, set by the fixture


def _read(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _metadata(name, kind, category, modalities, prompt=None):
  return TaskMetadata(name=name, description=f"{name}, from local files.", reference=None,
                      dataset={"path": "local/none", "revision": "local"}, type=kind,
                      category=category, modalities=modalities, eval_splits=["test"],
                      eval_langs=["eng-Latn"], main_score="ndcg_at_5", prompt=prompt)


class LocalPages(AbsTaskRetrieval):
  """Text questions -> page images: the sample ViDoRe set as an mteb Any2AnyRetrieval task."""
  metadata = _metadata("LocalPages", "Any2AnyRetrieval", "t2i", ["text", "image"],
                       {"query": QUERY_INSTRUCTION})

  def load_data(self, num_proc=None, **kwargs):
    root = PAGES["root"]
    corpus = _read(os.path.join(root, "corpus.jsonl"))
    pages = Dataset.from_dict({"id": [r["corpus-id"] for r in corpus],
                               "image": [os.path.join(root, r["image"]) for r in corpus]})
    queries = _read(os.path.join(root, "queries.jsonl"))
    qrels = {}
    for r in _read(os.path.join(root, "qrels.jsonl")):
      qrels.setdefault(r["query-id"], {})[r["corpus-id"]] = int(r["score"])
    self.dataset = {"default": {"test": RetrievalSplitData(
        corpus=pages.cast_column("image", DatasetImage()),
        queries=Dataset.from_dict({"id": [q["query-id"] for q in queries],
                                   "text": [q["query"] for q in queries]}),
        relevant_docs=qrels, top_ranked=None)}}
    self.data_loaded = True


class LocalText(AbsTaskRetrieval):
  """Text -> text retrieval on three passages."""
  metadata = _metadata("LocalText", "Retrieval", "t2t", ["text"], {"query": "Find the passage:"})

  def load_data(self, num_proc=None, **kwargs):
    self.dataset = {"default": {"test": RetrievalSplitData(
        corpus=Dataset.from_dict({"id": ["d1", "d2", "d3"], "title": ["", "", ""],
                                  "text": ["a red circle", "a blue square", "a green star"]}),
        queries=Dataset.from_dict({"id": ["q1", "q2"], "text": ["red circle", "green star"]}),
        relevant_docs={"q1": {"d1": 1}, "q2": {"d3": 1}}, top_ranked=None)}}
    self.data_loaded = True


@pytest.fixture(scope="module")
def exported(tiny_hf_dirs, tmp_path_factory):
  """A tiny Qwen2.5-VL exported with bidirectional attention and mean pooling."""
  source = tiny_hf_dirs["qwen2_5_vl"]
  config, params = import_hf(source)
  out = tmp_path_factory.mktemp("mteb") / "export"
  export_hf(config, params, str(out), source_dir=source,
            embedding={"attention": "bidirectional", "pooling": "mean"})
  PAGES["root"] = write_demo_vidore(str(tmp_path_factory.mktemp("pages")), num_pages=8)[
      "document_pages"]
  return str(out)


def _evaluate(model):
  results = mteb.evaluate(model, [LocalPages(), LocalText()], cache=None,
                          encode_kwargs={"batch_size": 8}, overwrite_strategy="always",
                          show_progress_bar=False)
  return {r.task_name: r.scores["test"][0] for r in results.task_results}


def test_mteb_runs_end_to_end_through_pytorch_and_jax(exported):
  torch_scores = _evaluate(MtebEncoder.load(exported, image_prompt=PAGE_PROMPT))
  jax_model = MtebEncoder.load(exported, backend="jax", image_prompt=PAGE_PROMPT)
  jax_scores = _evaluate(jax_model)
  for task in ("LocalPages", "LocalText"):
    assert 0.0 <= torch_scores[task]["main_score"] <= 1.0
    for key in ("ndcg_at_5", "recall_at_5"):
      assert jax_scores[task][key] == pytest.approx(torch_scores[task][key], abs=1e-9), task

  # mteb's NDCG@5 equals our evaluator's on the same set with the same prompts (pytrec_eval).
  from mmembed_jax.training.trained_model import export_mesh  # pylint: disable=g-import-not-at-top
  ours = vidore.evaluate_vidore(
      lambda rows: (jax_model.embed(rows), {}), os.path.dirname(PAGES["root"]), export_mesh(),
      query_template=QUERY_INSTRUCTION + " {text}",
      document_template=vidore.IMAGE_MARKER + "\n" + PAGE_PROMPT)
  assert ours["ndcg_at_5"] == pytest.approx(jax_scores["LocalPages"]["ndcg_at_5"], abs=1e-5)
  print({t: s["main_score"] for t, s in jax_scores.items()}, ours["ndcg_at_5"])


def test_rows_follow_the_documented_convention(exported, tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  model = MtebEncoder(lambda rows: np.zeros((len(rows), 4)), "stand-in", 4)
  image = Image.new("RGBA", (40, 30), (10, 20, 30, 255))
  text = model.rows({"text": ["red circle"]}, "Find the passage:", True, str(tmp_path))
  assert text == [{"text": "Find the passage: red circle", "images": []}]
  document = model.rows({"text": ["a red circle"]}, "", False, str(tmp_path))
  assert document == [{"text": "a red circle", "images": []}]
  page = model.rows({"image": [image]}, "", False, str(tmp_path))
  assert page[0]["text"] == "<image>\nRepresent the given image."
  saved = np.asarray(Image.open(page[0]["images"][0]))
  np.testing.assert_array_equal(saved, np.asarray(image.convert("RGB")))
  both = model.rows({"image": [image], "text": ["what colour?"]}, "Answer:", True, str(tmp_path))
  assert both[0]["text"] == "<image>\nAnswer: what colour?"
