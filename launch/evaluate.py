r"""Evaluates an embedding model on MMEB (Precision@1), MMEB-V2 and ViDoRe-style (NDCG@5) sets.

  python launch/evaluate.py --model runs/moca_cl --mmeb data/MMEB-eval --image_root data/eval_images \
      [--datasets ImageNet-1K,N24News] [--vidore data/vidore] [--out results.json]
  python launch/evaluate.py --model runs/moca_cl --mmeb_v2 data/MMEB-V2 [--tasks image,visdoc] \
      [--mmeb_v2_out results/mmeb_v2]

--model is a Hugging Face directory (e.g. from launch/export_to_pytorch.py) or a training run's
workdir (its latest checkpoint; or WORKDIR/checkpoints/STEP). Batches are sharded over all
devices; on several hosts (--distributed) each process reads and encodes only the rows of its
own devices and the first process reports. Prints a table per benchmark; --out writes the JSON
({"overall", "per_task", "per_dataset", "details"} for MMEB, under "vidore" for ViDoRe, under
"mmeb_v2" for MMEB-V2, and the throughput).
"""
import logging
import sys

from absl import app
from absl import flags
from absl import logging as absl_logging

from mmembed_jax.parallel import distributed_flags

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
_MMEB_V2 = flags.DEFINE_string("mmeb_v2", None, "MMEB-V2 directory (image/, video/, visdoc/ "
                                "entries named as the leaderboard's tasks).")
_TASKS = flags.DEFINE_list("tasks", None, "MMEB-V2 tasks: modalities (image, video, visdoc) "
                           "and/or task names (default: all 78).")
_MMEB_V2_OUT = flags.DEFINE_string("mmeb_v2_out", None, "Write MMEB-V2's per-task score files "
                                   "and submission.json (the leaderboard's layout) here.")
_SCORING = flags.DEFINE_enum("scoring", "pytrec_eval", ["pytrec_eval", "corpus_order"],
                             "Document ranking scores: pytrec_eval's conventions (equal scores by "
                             "document id, judged queries without a relevant document score 0) "
                             "or corpus order (ties to the earlier row, such queries left out).")
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
  if not (_MMEB.value or _VIDORE.value or _MMEB_V2.value):
    raise app.UsageError("give --mmeb, --vidore and/or --mmeb_v2")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  absl_logging.set_verbosity(absl_logging.WARNING)
  distributed_flags.initialize()
  import jax  # pylint: disable=g-import-not-at-top
  from mmembed_jax.data.bad_records import printable  # pylint: disable=g-import-not-at-top
  from mmembed_jax.embedding import save_json  # pylint: disable=g-import-not-at-top
  from mmembed_jax.evaluation.evaluate import evaluate  # pylint: disable=g-import-not-at-top
  try:
    result, tables = evaluate(
        _MODEL.value, mmeb=_MMEB.value, datasets=_DATASETS.value, image_root=_IMAGE_ROOT.value,
        max_rows=_MAX_ROWS.value, vidore=_VIDORE.value, vidore_datasets=_VIDORE_DATASETS.value,
        query_template=_QUERY_TEMPLATE.value, document_template=_DOCUMENT_TEMPLATE.value,
        batch_size=_BATCH_SIZE.value, max_length=_MAX_LENGTH.value, dtype=_DTYPE.value,
        scoring=_SCORING.value, mmeb_v2=_MMEB_V2.value, tasks=_TASKS.value,
        mmeb_v2_out=_MMEB_V2_OUT.value)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {printable(e)}", file=sys.stderr)
    return 2
  throughput = result["throughput"]
  print(f"process {jax.process_index()} of {jax.process_count()} read and encoded "
        f"{throughput['rows_encoded_here']} of the {throughput['rows_embedded']} rows embedded",
        file=sys.stderr)
  if jax.process_index() > 0:  # every process holds the same results; the first one reports
    return 0
  print("\n".join(tables))
  if _OUT.value:
    save_json(_OUT.value, result)
    print(f"wrote {_OUT.value}")
  return 0


if __name__ == "__main__":
  flags.mark_flags_as_required(["model"])
  app.run(main)
