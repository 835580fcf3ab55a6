r"""Exports a training run's model as a Hugging Face directory that transformers loads.

  python launch/export_to_pytorch.py --checkpoint runs/moca_cl --out exported/ [--dtype bfloat16] \
      [--overwrite] [--adapters_only]

--checkpoint is a workdir (its latest checkpoint) or WORKDIR/checkpoints/STEP. The directory
holds safetensors, config.json, the run's tokenizer and image preprocessor, and mmembed.json
(attention, pooling), so `mmembed_jax.torch_embed.load(OUT)` embeds as the JAX model does; a
run's LoRA / DoRA adapters are merged into it, or, with --adapters_only, written alone as a peft
adapter directory for the HF directory the run started from. On a
pod, run it on every host: the checkpoint is read sharded and gathered one tensor at a time.
"""
import resource
import sys
import time

from absl import app
from absl import flags

from mmembed_jax.data.bad_records import printable
from mmembed_jax.parallel import distributed_flags
from absl import logging as absl_logging

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training run workdir, or "
                                  "WORKDIR/checkpoints/STEP for one step.")
_OUT = flags.DEFINE_string("out", None, "Output Hugging Face directory (local or gs://).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["bfloat16", "float32"],
                           "Dtype of the written tensors; default: the run's parameter dtype.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace --out if it is not empty (the new "
                               "export is written aside and swapped in whole).")
_ADAPTERS_ONLY = flags.DEFINE_bool("adapters_only", False, "Write the run's adapters as a peft "
                                   "adapter directory (peft.PeftModel.from_pretrained) instead of "
                                   "the merged model.")


def main(argv):
  """Runs the export; returns the exit status."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every file it reads at INFO
  import jax  # pylint: disable=g-import-not-at-top
  distributed_flags.initialize()
  from mmembed_jax.training import trained_model  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  try:
    model = trained_model.export_trained(_CHECKPOINT.value, _OUT.value, dtype=_DTYPE.value,
                                         overwrite=_OVERWRITE.value,
                                         adapters_only=_ADAPTERS_ONLY.value)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {printable(e)}", file=sys.stderr)
    return 2
  peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  if jax.process_index():
    return 0
  print(f"exported {model.workdir} step {model.step} to {_OUT.value} "
        f"({model.embedding['attention']} attention, {model.embedding['pooling']} pooling) in "
        f"{time.perf_counter() - start:.1f}s; peak RSS {peak_mib:.0f} MiB")
  return 0


if __name__ == "__main__":
  flags.mark_flags_as_required(["checkpoint", "out"])
  app.run(main)
