r"""Evaluates an embedding model on MMEB (Precision@1) and ViDoRe-style (NDCG@5) sets.

  python launch/evaluate.py --model runs/moca_cl --mmeb data/MMEB-eval --image_root data/eval_images \
      [--datasets ImageNet-1K,N24News] [--vidore data/vidore] [--out results.json]

--model is a Hugging Face directory (e.g. from launch/export_to_pytorch.py) or a training run's
workdir (its latest checkpoint; or WORKDIR/checkpoints/STEP). Batches are sharded over all
devices. Prints a table per benchmark; --out writes the JSON ({"overall", "per_task",
"per_dataset", "details"} for MMEB, under "vidore" for ViDoRe, and the throughput).
"""
import logging
import sys
import time

from absl import app
from absl import flags
from absl import logging as absl_logging

_MODEL = flags.DEFINE_string("model", None, "HF model directory or training run workdir.")
_MMEB = flags.DEFINE_string("mmeb", None, "MMEB evaluation directory (NAME.jsonl / NAME.parquet "
                            "/ NAME/*.parquet per dataset).")
_DATASETS = flags.DEFINE_list("datasets", None, "MMEB datasets to run (default: all found).")
_IMAGE_ROOT = flags.DEFINE_string("image_root", None, "Where MMEB image paths resolve "
                                  "(default: the --mmeb directory).")
_MAX_ROWS = flags.DEFINE_integer("max_rows", None, "At most this many rows per MMEB dataset.",
                                 lower_bound=1)
_VIDORE = flags.DEFINE_string("vidore", None, "ViDoRe directory: one dataset (queries, corpus, "
                              "qrels) or a directory of them.")
_VIDORE_DATASETS = flags.DEFINE_list("vidore_datasets", None, "ViDoRe datasets to run (default: "
                                     "all found).")
_QUERY_TEMPLATE = flags.DEFINE_string("vidore_query_template", None,
                                      "ViDoRe query template with {text} (default: the module's).")
_DOCUMENT_TEMPLATE = flags.DEFINE_string("vidore_document_template", None,
                                         "ViDoRe page template with one <image> marker.")
_OUT = flags.DEFINE_string("out", None, "Write the results as JSON to this file.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Rows per batch (rounded up to a multiple "
                                   "of the devices).", lower_bound=1)
_MAX_LENGTH = flags.DEFINE_integer("max_length", 8192, "Most tokens a row may have.", lower_bound=1)
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                           "Compute and parameter dtype (default: float32 for an HF directory, "
                           "the run's for a workdir).")


def main(argv):
  """Runs the evaluations; returns the exit status."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not (_MMEB.value or _VIDORE.value):
    raise app.UsageError("give --mmeb and/or --vidore")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  absl_logging.set_verbosity(absl_logging.WARNING)
  from mmembed_jax.data.bad_records import printable  # pylint: disable=g-import-not-at-top
  from mmembed_jax.embedding import JaxEmbedder  # pylint: disable=g-import-not-at-top
  from mmembed_jax.evaluation import mmeb, vidore  # pylint: disable=g-import-not-at-top
  from mmembed_jax.training.trained_model import export_mesh  # pylint: disable=g-import-not-at-top
  mesh = export_mesh()
  try:
    embedder = JaxEmbedder.load(_MODEL.value, dtype=_DTYPE.value, batch_size=_BATCH_SIZE.value,
                                max_length=_MAX_LENGTH.value, mesh=mesh)
    counts = {"rows": 0, "seconds": 0.0}

    def embed(rows):
      start = time.perf_counter()
      out = embedder.try_embed_rows(rows)  # rows that fail are skipped and named, not raised
      counts["rows"] += len(rows)
      counts["seconds"] += time.perf_counter() - start
      return out

    result = {"model": _MODEL.value}
    if _MMEB.value:
      result.update(mmeb.evaluate_mmeb(embed, _MMEB.value, _DATASETS.value, _IMAGE_ROOT.value,
                                       _MAX_ROWS.value))
      print(mmeb.format_table(result))
    if _VIDORE.value:
      templates = {k: v for k, v in (("query_template", _QUERY_TEMPLATE.value),
                                     ("document_template", _DOCUMENT_TEMPLATE.value)) if v}
      result["vidore"] = vidore.evaluate_vidore(embed, _VIDORE.value, mesh,
                                                _VIDORE_DATASETS.value, **templates)
      print(vidore.format_table(result["vidore"]))
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {printable(e)}", file=sys.stderr)
    return 2
  result["throughput"] = {
      "rows_embedded": counts["rows"], "embed_seconds": counts["seconds"],
      "rows_per_second": counts["rows"] / max(counts["seconds"], 1e-9),
      "compiled_batch_shapes": len(embedder.batch_shapes), "devices": mesh.size}
  print(f"{counts['rows']} rows embedded in {counts['seconds']:.1f}s "
        f"({result['throughput']['rows_per_second']:.1f} rows/s) with "
        f"{len(embedder.batch_shapes)} compiled batch shape(s) on {mesh.size} device(s)")
  if _OUT.value:
    from mmembed_jax.embedding import save_json  # pylint: disable=g-import-not-at-top
    save_json(_OUT.value, result)
    print(f"wrote {_OUT.value}")
  return 0


if __name__ == "__main__":
  flags.mark_flags_as_required(["model"])
  app.run(main)
