"""MMEB (v1) dataset names (METHODS.md §4), shared by the recipes and the evaluators."""
import dataclasses
from typing import Mapping, Optional

# The 20 training sets of MMEB-train (the in-distribution half of the benchmark).
MMEB_TRAIN = ("ImageNet_1K", "N24News", "HatefulMemes", "VOC2007", "SUN397", "OK-VQA", "A-OKVQA",
              "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W", "VisDial", "CIRR",
              "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t", "NIGHTS", "WebQA",
              "MSCOCO")

# --- The 36 evaluation datasets ------------------------------------------------------------------
# Names as in the TIGER-Lab/MMEB-eval subsets (training sets spell ImageNet_1K where eval has
# ImageNet-1K). Instructions as in the VLM2Vec paper's instruction table; {text} stands for the
# row's own text (caption, question, dialogue, ...). MMEB-eval rows already carry their query and
# target instructions in `qry_text` / `tgt_text`, and the evaluator uses the rows as they are: the
# table gives each dataset its meta-task and documents the prompts for users who build rows.
META_TASKS = ("classification", "vqa", "retrieval", "grounding")
_IMAGE = "<|image_1|>"
_REPRESENT_IMAGE = f"{_IMAGE} Represent the given image."
_CROPPED = f"{_IMAGE} Represent the given cropped image of the object"


@dataclasses.dataclass(frozen=True)
class MmebEvalTask:
  """One MMEB evaluation dataset: its meta-task, split and prompts.

  query_modality / target_modality: "text", "image" or "image,text" (an image with text).
  """
  name: str
  meta_task: str
  in_distribution: bool
  query_instruction: str
  target_instruction: str
  query_modality: str
  target_modality: str


def _classification(name, in_distribution, instruction):
  return MmebEvalTask(name, "classification", in_distribution, f"{_IMAGE} {instruction}", "",
                      "image,text", "text")


def _vqa(name, in_distribution):
  return MmebEvalTask(name, "vqa", in_distribution,
                      f"{_IMAGE} Represent the given image with the following question: {{text}}",
                      "", "image,text", "text")


_CLASSIFY = "Represent the given image for classification"
_SCENE = "Identify the scene shown in the image"
_OBJECT = "Identify the object shown in the image"
MMEB_EVAL = (
    _classification("ImageNet-1K", True, _CLASSIFY),
    _classification("N24News", True, "Represent the given news image with the following caption "
                    "for domain classification: {text}"),
    _classification("HatefulMemes", True, "Represent the given image for binary classification "
                    "to determine whether it constitutes hateful speech or not"),
    _classification("VOC2007", True, _OBJECT),
    _classification("SUN397", True, _SCENE),
    _classification("Place365", False, _SCENE),
    _classification("ImageNet-A", False, _CLASSIFY),
    _classification("ImageNet-R", False, _CLASSIFY),
    _classification("ObjectNet", False, _OBJECT),
    _classification("Country211", False, "Identify the country depicted in the image"),
    *(_vqa(name, True) for name in ("OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA",
                                    "Visual7W")),
    *(_vqa(name, False) for name in ("ScienceQA", "VizWiz", "GQA", "TextVQA")),
    MmebEvalTask("VisDial", "retrieval", True, "Represent the given dialogue about an image, which "
                 "is used for image retrieval: {text}", _REPRESENT_IMAGE, "text", "image"),
    MmebEvalTask("CIRR", "retrieval", True, f"{_IMAGE} Given an image, find a similar everyday "
                 "image with the described changes: {text}", _REPRESENT_IMAGE, "image,text",
                 "image"),
    MmebEvalTask("VisualNews_t2i", "retrieval", True, "Retrieve an image of this news caption: "
                 "{text}", _REPRESENT_IMAGE, "text", "image"),
    MmebEvalTask("VisualNews_i2t", "retrieval", True, f"{_IMAGE} Find a caption for the news in "
                 "the given photo", "", "image", "text"),
    MmebEvalTask("MSCOCO_t2i", "retrieval", True, "Find me an everyday image that matches the "
                 "given caption: {text}", _REPRESENT_IMAGE, "text", "image"),
    MmebEvalTask("MSCOCO_i2t", "retrieval", True, f"{_IMAGE} Find an image caption describing the "
                 "given everyday image", "", "image", "text"),
    MmebEvalTask("NIGHTS", "retrieval", True, f"{_IMAGE} Find a day-to-day image that looks "
                 "similar to the provided image", _REPRESENT_IMAGE, "image", "image"),
    MmebEvalTask("WebQA", "retrieval", True, "Find a Wikipedia image that answers this question: "
                 "{text}", f"{_IMAGE} Represent the given Wikipedia image with related text "
                 "information: {text}", "text", "image,text"),
    MmebEvalTask("FashionIQ", "retrieval", False, f"{_IMAGE} Find an image to match the fashion "
                 "image and style note: {text}", _REPRESENT_IMAGE, "image,text", "image"),
    MmebEvalTask("Wiki-SS-NQ", "retrieval", False, "Find the document screenshot that can answer "
                 "the given query: {text}", f"{_IMAGE} Represent the given Wikipedia "
                 "screenshot", "text", "image"),
    MmebEvalTask("OVEN", "retrieval", False, f"{_IMAGE} Retrieve a Wikipedia paragraph that "
                 "provides an answer to the given query about the image: {text}",
                 f"{_IMAGE} Represent the given Wikipedia image with related text information: "
                 "{text}", "image,text", "image,text"),
    MmebEvalTask("EDIS", "retrieval", False, "Find a news image that matches the provided "
                 "caption: {text}", f"{_IMAGE} Represent the given image with related text "
                 "information: {text}", "text", "image,text"),
    MmebEvalTask("MSCOCO", "grounding", True, f"{_IMAGE} Select the portion of the image that "
                 "isolates the object labeled as \"{text}\"", _CROPPED, "image,text", "image"),
    MmebEvalTask("RefCOCO", "grounding", False, f"{_IMAGE} Select the portion of the image that "
                 "follows the language expressions: \"{text}\"", _CROPPED, "image,text", "image"),
    MmebEvalTask("RefCOCO-Matching", "grounding", False, f"{_IMAGE} Select the portion of the "
                 "image that follows the language expressions: {text}", f"{_IMAGE} Select the "
                 "portion of the image that follows the language expressions: {text}",
                 "image,text", "image,text"),
    MmebEvalTask("Visual7W-Pointing", "grounding", False, f"{_IMAGE} Select the portion of the "
                 "image that answers the question: {text}", _CROPPED, "image,text", "image"),
)
MMEB_EVAL_BY_NAME = {task.name: task for task in MMEB_EVAL}


def meta_task_of(name: str, overrides: Optional[Mapping[str, str]] = None) -> str:
  """The meta-task of a dataset: `overrides` first (e.g. a meta_tasks.json), then MMEB_EVAL."""
  if overrides and name in overrides:
    return overrides[name]
  if name in MMEB_EVAL_BY_NAME:
    return MMEB_EVAL_BY_NAME[name].meta_task
  raise ValueError(f"dataset '{name}' is not one of MMEB's 36 and has no meta-task; add it to "
                   f"meta_tasks.json next to the datasets ({{\"{name}\": one of {META_TASKS}}})")
