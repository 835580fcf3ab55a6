"""The `mteb` package's evaluations for our models: an mteb encoder around our embed path.

  import mteb
  from mmembed_jax.evaluation.mteb_bridge import MtebEncoder
  model = MtebEncoder.load("exported/")                    # PyTorch (mmembed_jax.torch_embed)
  model = MtebEncoder.load("runs/moca_cl", backend="jax")  # a run or HF directory, in JAX
  results = mteb.evaluate(model, mteb.get_tasks(tasks=["..."]), cache=None)

mteb hands `encode` batches of dicts: "text" (a query, or a document's title and body) and/or
"image" (PIL images). Each item becomes one of our rows:
  text only   query_template.format(instruction=..., text=...) for queries, where the
              instruction is the task's own (mteb's `get_task_instruction`; "" when it has
              none), and the text as it is for documents: instructions go on queries only
  with image  the image first (our `<image>` marker), then the text, or `image_prompt` when
              the item has no text
Images are written as PNG files for the row encoder (lossless, so the pixels are mteb's).
Only `mteb` (an optional dependency, `pip install mteb`) needs this module.
"""
import os
import tempfile
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta
from mteb.types import PromptType

from mmembed_jax.data.rows import IMAGE_MARKER

QUERY_TEMPLATE = "{instruction} {text}"
IMAGE_PROMPT = "Represent the given image."

# rows [{"text", "images"}] -> L2-normalised embeddings [rows, embed]
EmbedFn = Callable[[Sequence[Dict[str, Any]]], np.ndarray]


def _model_meta(name: str, dim: int, max_tokens: int) -> ModelMeta:
  """mteb's description of the model (every field it requires; unknown ones None)."""
  return ModelMeta(
      loader=None, name=f"mmembed_jax/{name}", revision="local", release_date=None,
      languages=None, n_parameters=None, memory_usage_mb=None, max_tokens=max_tokens,
      embed_dim=dim, license=None, open_weights=True, public_training_code=None,
      public_training_data=None, framework=["JAX", "PyTorch"], similarity_fn_name="cosine",
      use_instructions=True, training_datasets=None, modalities=["text", "image"])


class MtebEncoder(AbsEncoder):
  """An mteb encoder over any embed function of our rows (see the module doc)."""

  def __init__(self, embed: EmbedFn, name: str, dim: int, max_tokens: int = 8192,
               query_template: str = QUERY_TEMPLATE, image_prompt: str = IMAGE_PROMPT):
    """embed: rows -> [rows, dim]; name: how mteb's results name the model."""
    self.embed = embed
    self.query_template, self.image_prompt = query_template, image_prompt
    self.mteb_model_meta = _model_meta(name, dim, max_tokens)

  @classmethod
  def load(cls, path: str, backend: str = "torch", batch_size: int = 16,
           **options: Any) -> "MtebEncoder":
    """The encoder of an exported directory (torch: transformers, as downstream users run it)
    or of a run or HF directory in JAX (backend "jax", over every device)."""
    name = os.path.basename(os.path.normpath(path))
    if backend == "torch":
      from mmembed_jax import torch_embed  # pylint: disable=g-import-not-at-top
      embedder = torch_embed.load(path, batch_size=batch_size)
      return cls(embedder, name, embedder.dim, **options)
    if backend == "jax":
      from mmembed_jax.embedding import JaxEmbedder  # pylint: disable=g-import-not-at-top
      embedder = JaxEmbedder.load(path, batch_size=batch_size)
      return cls(embedder.embed_rows, name, embedder.dim, embedder.max_length, **options)
    raise ValueError(f"backend must be 'torch' or 'jax', got {backend!r}")

  def rows(self, batch: Dict[str, List[Any]], instruction: str, is_query: bool,
           image_dir: str) -> List[Dict[str, Any]]:
    """Our rows for one of mteb's batches (images saved under image_dir)."""
    texts = batch.get("text")
    images = batch.get("image")
    count = len(texts if texts is not None else images)
    out = []
    for i in range(count):
      text = texts[i] if texts is not None else ""
      if images is None:
        if is_query and instruction:
          text = self.query_template.format(instruction=instruction, text=text)
        out.append({"text": text, "images": []})
        continue
      handle, path = tempfile.mkstemp(suffix=".png", dir=image_dir)
      os.close(handle)
      images[i].convert("RGB").save(path, format="PNG")
      prompt = text or self.image_prompt
      if is_query and instruction:
        prompt = self.query_template.format(instruction=instruction, text=prompt)
      out.append({"text": f"{IMAGE_MARKER}\n{prompt}", "images": [path]})
    return out

  def encode(self, inputs: Any, *, task_metadata: Any, hf_split: str, hf_subset: str,
             prompt_type: Optional[PromptType] = None, **kwargs: Any) -> np.ndarray:
    """Embeddings [items, dim] of every batch mteb's DataLoader yields."""
    del hf_split, hf_subset, kwargs
    is_query = prompt_type == PromptType.query
    instruction = self.get_task_instruction(task_metadata, prompt_type) if is_query else ""
    out = []
    with tempfile.TemporaryDirectory(prefix="mmembed_mteb_") as image_dir:
      for batch in inputs:
        out.append(np.asarray(self.embed(self.rows(batch, instruction or "", is_query,
                                                   image_dir)), np.float32))
    return np.concatenate(out, axis=0)
