r"""Records a published checkpoint family's evaluation protocol in a model directory.

  python launch/apply_profile.py --model ckpt/VLM2Vec-V2.0 --profile vlm2vec_v2

Writes the profile's fields into DIR/mmembed.json and its pixel bounds into
DIR/preprocessor_config.json (mmembed_jax/convert/profiles.py); evaluate.py, embed.py and
torch_embed then follow them with no other flag.
"""
import json
import sys

from absl import app, flags

from mmembed_jax.convert import profiles
from mmembed_jax.data.bad_records import printable

_MODEL = flags.DEFINE_string("model", None, "Hugging Face model directory.")
_PROFILE = flags.DEFINE_enum("profile", None, sorted(profiles.PROFILES),
                             "The checkpoint family whose released evaluation to follow.")


def main(argv):
  """Applies the profile; prints the mmembed.json record and what is not reproduced."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    record = profiles.apply_profile(_MODEL.value, _PROFILE.value)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {printable(e)}", file=sys.stderr)
    return 2
  print(json.dumps(record, indent=2))
  for item in profiles.PROFILES[_PROFILE.value]["not_reproduced"]:
    print(f"not reproduced: {item}")
  return 0


if __name__ == "__main__":
  flags.mark_flags_as_required(["model", "profile"])
  app.run(main)
