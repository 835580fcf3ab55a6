"""The laptop demo, built without torch or network: a tiny random model, its tokenizer, and rows.

  paths = build_demo("runs/demo")  # {"model": "runs/demo/model", "rows": ".../data/rows.jsonl"}
  python -m mmembed_jax.demo.build --out runs/demo

Layout of out_dir:
  tokenizer/            the demo BPE tokenizer (mmembed_jax.demo.tokenizer)
  model/                an HF Qwen2(.5)-VL directory (export_hf): safetensors, config.json,
                        tokenizer files, preprocessor_config.json (small images) and mmembed.json
                        (bidirectional attention, mean pooling)
  data/rows.jsonl       12 rows: text-only, one image, two images with <image> markers, image-only
  data/images/*.png     coloured shapes and a document page drawn with PIL
  BUILD_COMPLETE        written last; a directory holding it (same family and seed) is reused

`run_demo` builds (or reuses) the demo, embeds its rows with `JaxEmbedder`, writes
embeddings.npy and returns a summary; `launch/demo.py` is its command line.
"""
import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

MARKER_FILE = "BUILD_COMPLETE"
# Small images keep the demo fast: 4 to 64 merged tokens per image.
DEMO_PIXELS = {"min_pixels": 4 * 28 * 28, "max_pixels": 64 * 28 * 28}
DEMO_EMBEDDING = {"attention": "bidirectional", "pooling": "mean"}
DEMO_BATCH_SIZE = 16  # all 12 rows in one batch: one compiled program

# name -> (width, height, background, drawing); drawn by _draw_image.
_IMAGES = {
    "red_circle.png": (140, 140, "white", ("ellipse", "red")),
    "blue_square.png": (196, 112, "white", ("rectangle", "blue")),
    "green_triangle.png": (112, 196, "white", ("triangle", "green")),
    "yellow_star.png": (150, 150, "navy", ("star", "yellow")),
    "receipt.png": (120, 180, "white", ("document", "black")),
}

DEMO_ROWS = (
    {"text": "A red circle.", "image": "images/red_circle.png"},
    {"text": "Is there a red circle in the picture?"},
    {"text": "A large blue square in the centre.", "image": "images/blue_square.png"},
    {"text": "Where is the blue square?"},
    {"text": "A green triangle.", "image": "images/green_triangle.png"},
    {"text": "What colour is the triangle?"},
    {"text": "A yellow star on a blue background.", "image": "images/yellow_star.png"},
    {"text": "Find the photo that shows a yellow star."},
    {"text": "The receipt has a total at the bottom of the page.", "image": "images/receipt.png"},
    {"text": "What is written in the total of the receipt?"},
    {"text": "<image> left, <image> right: a red circle next to a blue square.",
     "images": ["images/red_circle.png", "images/blue_square.png"]},
    {"text": "", "image": "images/green_triangle.png"},
)


def _draw_image(path: str, width: int, height: int, background: str,
                drawing: Sequence[str]) -> None:
  """Draws one demo PNG: a filled shape (or a document page) on a plain background."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  image = Image.new("RGB", (width, height), background)
  draw = ImageDraw.Draw(image)
  kind, colour = drawing
  cx, cy, r = width / 2, height / 2, 0.38 * min(width, height)
  if kind == "ellipse":
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
  elif kind == "rectangle":
    draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
  elif kind == "triangle":
    draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
  elif kind == "star":
    points = []
    for k in range(10):
      radius = r if k % 2 == 0 else 0.45 * r
      angle = np.pi / 2 + k * np.pi / 5
      points.append((cx + radius * np.cos(angle), cy - radius * np.sin(angle)))
    draw.polygon(points, fill=colour)
  elif kind == "document":
    draw.rectangle([8, 8, width - 8, 24], fill="grey")  # title bar
    for y in range(34, height - 40, 12):  # lines of "text"
      draw.rectangle([12, y, width - 12 - (y * 7) % 30, y + 4], fill=colour)
    draw.rectangle([width // 2, height - 30, width - 12, height - 16], fill="red")  # the total
  else:
    raise ValueError(f"unknown demo drawing {kind!r}")
  image.save(path)


def random_params(config: Any, seed: int = 0) -> Dict[str, Any]:
  """Random parameters with init_params' tree and initialisers, fast to build on CPU.

  `init_params` compiles one random-number program per tensor (tens of seconds on a laptop
  CPU); here its tree comes from `jax.eval_shape` (no compilation) and every weight is drawn
  from ONE normal sample of std INIT_STD; norm scales are 1 and biases 0, as in init_params.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from mmembed_jax.models.embedder import init_params  # pylint: disable=g-import-not-at-top
  from mmembed_jax.models.layers import INIT_STD  # pylint: disable=g-import-not-at-top

  shapes = jax.eval_shape(lambda rng: init_params(config, rng), jax.random.PRNGKey(0))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)

  def kind(path) -> str:
    name = getattr(path[-1], "key", str(path[-1]))
    return name if name in ("scale", "bias") else "weight"

  sizes = [int(np.prod(leaf.shape)) for path, leaf in leaves if kind(path) == "weight"]
  sample = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (sum(sizes),), np.float32))
  out, offset = [], 0
  for path, leaf in leaves:
    if kind(path) == "scale":
      value = np.ones(leaf.shape, leaf.dtype)
    elif kind(path) == "bias":
      value = np.zeros(leaf.shape, leaf.dtype)
    else:
      size = int(np.prod(leaf.shape))
      value = (INIT_STD * sample[offset:offset + size]).reshape(leaf.shape).astype(leaf.dtype)
      offset += size
    out.append(value)
  return jax.tree_util.tree_unflatten(treedef, out)


def _finished(out_dir: str, family: str, seed: int) -> bool:
  """Returns whether out_dir holds a finished build of this family and seed."""
  marker = os.path.join(out_dir, MARKER_FILE)
  if not os.path.exists(marker):
    return False
  try:
    with open(marker, "r", encoding="utf-8") as f:
      record = json.load(f)
  except (OSError, json.JSONDecodeError):
    return False
  return record.get("family") == family and record.get("seed") == seed


def demo_paths(out_dir: str) -> Dict[str, str]:
  """Returns {"model": model directory, "rows": rows.jsonl} inside out_dir."""
  return {"model": os.path.join(out_dir, "model"),
          "rows": os.path.join(out_dir, "data", "rows.jsonl")}


def build_demo(out_dir: str, family: str = "qwen2_5_vl", seed: int = 0) -> Dict[str, str]:
  """Builds (or reuses) the demo in out_dir; returns {"model": HF dir, "rows": rows.jsonl}."""
  from mmembed_jax.models.config import FAMILIES  # pylint: disable=g-import-not-at-top
  if family not in FAMILIES:
    raise ValueError(f"build_demo: unknown family {family!r}, expected one of {FAMILIES}")
  paths = demo_paths(out_dir)
  if _finished(out_dir, family, seed):
    return paths
  import transformers  # pylint: disable=g-import-not-at-top
  from mmembed_jax.convert.hf_export import export_hf  # pylint: disable=g-import-not-at-top
  from mmembed_jax.data.images import ImageProcessingConfig  # pylint: disable=g-import-not-at-top
  from mmembed_jax.data import special_tokens  # pylint: disable=g-import-not-at-top
  from mmembed_jax.demo import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from mmembed_jax.demo.tiny_model import tiny_config  # pylint: disable=g-import-not-at-top

  os.makedirs(out_dir, exist_ok=True)
  marker = os.path.join(out_dir, MARKER_FILE)
  if os.path.exists(marker):  # a finished build of another family or seed: rebuilt in place
    os.remove(marker)

  tokenizer_dir = tokenizer_lib.build_tokenizer(os.path.join(out_dir, "tokenizer"))
  tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  ids = special_tokens.special_token_ids(tokenizer)
  token_ids = {k: v for k, v in ids.items() if k not in ("pad_token_id", "eos_token_id")}
  config = tiny_config(family, attention=DEMO_EMBEDDING["attention"], **token_ids)
  export_hf(config, random_params(config, seed), paths["model"], source_dir=tokenizer_dir,
            embedding=DEMO_EMBEDDING, overwrite=True)
  with open(os.path.join(paths["model"], "preprocessor_config.json"), "w", encoding="utf-8") as f:
    json.dump(ImageProcessingConfig(**DEMO_PIXELS).to_preprocessor_config(), f, indent=2)

  data_dir = os.path.dirname(paths["rows"])
  os.makedirs(os.path.join(data_dir, "images"), exist_ok=True)
  for name, (width, height, background, drawing) in _IMAGES.items():
    _draw_image(os.path.join(data_dir, "images", name), width, height, background, drawing)
  with open(paths["rows"], "w", encoding="utf-8") as f:
    for row in DEMO_ROWS:
      f.write(json.dumps(row) + "\n")

  with open(marker, "w", encoding="utf-8") as f:  # last: the build is complete
    json.dump({"family": family, "seed": seed, **paths}, f, indent=2)
  return paths


def similarity_summary(embeddings: np.ndarray, texts: Sequence[str], top: int = 4) -> List[str]:
  """Returns printable lines: off-diagonal cosine statistics, the first rows' nearest rows."""
  n = embeddings.shape[0]
  if n < 2:
    return [f"{n} row(s): no pairs to compare"]
  cosine = embeddings @ embeddings.T  # [n, n]; rows are unit vectors
  off = cosine[~np.eye(n, dtype=bool)]
  lines = [f"cosine similarity between different rows: mean {off.mean():.3f}, "
           f"min {off.min():.3f}, max {off.max():.3f}"]
  masked = np.where(np.eye(n, dtype=bool), -np.inf, cosine)
  for i in range(min(top, n)):
    j = int(np.argmax(masked[i]))
    lines.append(f"  row {i + 1:2d} {texts[i][:40]!r:44} nearest: row {j + 1:2d} "
                 f"{texts[j][:40]!r:44} cos {cosine[i, j]:.3f}")
  return lines


def run_demo(out_dir: str = "runs/demo", family: str = "qwen2_5_vl", seed: int = 0,
             batch_size: int = DEMO_BATCH_SIZE, progress: bool = False) -> Dict[str, Any]:
  """Builds (or reuses) the demo, embeds its rows into out_dir/embeddings.npy; returns a summary."""
  from mmembed_jax import embedding  # pylint: disable=g-import-not-at-top
  from mmembed_jax.data import rows as rows_lib  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  reused = _finished(out_dir, family, seed)
  paths = build_demo(out_dir, family, seed)
  built = time.perf_counter()
  embedder = embedding.JaxEmbedder.from_pretrained(paths["model"], batch_size=batch_size)
  loaded = time.perf_counter()
  embeddings = embedder.embed_jsonl(paths["rows"], progress=progress)
  embedded = time.perf_counter()
  output = embedding.save_npy(os.path.join(out_dir, "embeddings.npy"), embeddings)
  texts = [row["text"] or "(image only)" for row in rows_lib.read_jsonl_rows(paths["rows"])]
  return {
      "model": paths["model"],
      "rows": paths["rows"],
      "output": output,
      "shape": tuple(embeddings.shape),
      "reused_build": reused,
      "build_seconds": built - start,
      "load_seconds": loaded - built,
      "embed_seconds": embedded - loaded,
      "total_seconds": time.perf_counter() - start,
      "batch_shapes": sorted(embedder.batch_shapes),
      "summary": similarity_summary(embeddings, texts),
  }


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`python -m mmembed_jax.demo.build --out DIR`: builds the demo and prints its paths."""
  parser = argparse.ArgumentParser(description="Build the tiny demo model and rows (no torch).")
  parser.add_argument("--out", default="runs/demo", help="directory to build the demo into")
  parser.add_argument("--family", default="qwen2_5_vl", choices=("qwen2_5_vl", "qwen2_vl"),
                      help="architecture of the tiny random model")
  parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
  args = parser.parse_args(argv)
  try:
    paths = build_demo(args.out, args.family, args.seed)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"model: {paths['model']}\nrows: {paths['rows']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
