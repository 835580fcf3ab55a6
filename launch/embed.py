r"""Embeds the rows of a JSONL file with an HF model directory or a training run into .npy [rows, embed].

  python launch/embed.py --model runs/demo/model --input rows.jsonl --output emb.npy \
      [--attention bidirectional|causal] [--pooling mean|last] [--dtype float32|bfloat16] \
      [--batch_size 8] [--max_length 8192]
  python launch/embed.py --model runs/moca_cl --input rows.jsonl --output emb.npy  # a workdir

Attention and pooling default to the model directory's mmembed.json, or to the run's config (a
workdir embeds with its latest checkpoint; WORKDIR/checkpoints/STEP names one step). A bad row, a missing
image or an over-long input prints one line `error: ...` to stderr and exits with status 2.
"""
import sys

from absl import app
from absl import flags

from mmembed_jax import embedding
from mmembed_jax.data.bad_records import printable

_MODEL = flags.DEFINE_string("model", None, "Hugging Face model directory (config.json, "
                             "safetensors, tokenizer, optional preprocessor_config.json), or a "
                             "training run's workdir (or WORKDIR/checkpoints/STEP).")
_INPUT = flags.DEFINE_string("input", None, "JSONL file of rows ({'text': ..., 'image': ...}); "
                             "image paths are relative to this file.")
_OUTPUT = flags.DEFINE_string("output", None, "Output .npy file [rows, embed] float32, written "
                              "atomically.")
_ATTENTION = flags.DEFINE_enum("attention", None, list(embedding.ATTENTIONS),
                               "Attention mode; default: the model's mmembed.json, else causal.")
_POOLING = flags.DEFINE_enum("pooling", None, list(embedding.POOLINGS),
                             "Pooling; default: the model's mmembed.json, else last.")
_DTYPE = flags.DEFINE_enum("dtype", None, list(embedding.DTYPES),
                           "Parameter and compute dtype; default float32 for an HF directory, "
                           "the run's own for a workdir.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", embedding.DEFAULT_BATCH_SIZE,
                                   "Rows per batch (the last batch is padded to it).",
                                   lower_bound=1)
_MAX_LENGTH = flags.DEFINE_integer("max_length", embedding.DEFAULT_MAX_LENGTH,
                                   "Most tokens a row may have (image tokens included); longer "
                                   "rows are an error, never truncated.", lower_bound=1)
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar on stderr.")


def main(argv):
  """Runs the embedding; returns the exit status."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    result = embedding.embed_file(
        _MODEL.value, _INPUT.value, _OUTPUT.value, attention=_ATTENTION.value,
        pooling=_POOLING.value, dtype=_DTYPE.value, max_length=_MAX_LENGTH.value,
        batch_size=_BATCH_SIZE.value, progress=_PROGRESS.value)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {printable(e)}", file=sys.stderr)
    return 2
  print(f"wrote {result['output']}: shape {result['shape']} "
        f"({result['attention']} attention, {result['pooling']} pooling)")
  print(f"{result['shape'][0]} rows in {result['embed_seconds']:.2f}s "
        f"({result['rows_per_second']:.1f} rows/s, {len(result['batch_shapes'])} batch shape(s)); "
        f"model load {result['load_seconds']:.2f}s")
  return 0


if __name__ == "__main__":
  flags.mark_flags_as_required(["model", "input", "output"])
  app.run(main)
