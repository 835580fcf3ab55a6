"""The published checkpoints' evaluation protocols (profiles.json), applied to a model directory.

  python launch/apply_profile.py --model ckpt/VLM2Vec-V2.0 --profile vlm2vec_v2
  python launch/evaluate.py --model ckpt/VLM2Vec-V2.0 --mmeb_v2 data/MMEB-V2   # nothing else

A profile is what the family's released evaluation code does, as mmembed.json fields: attention,
pooling and where it pools, how vision tokens sit in the sequence and their positions, the
prompt format (data/prompts.py), video frames, compression tokens; and the image processor's
pixel bounds (preprocessor_config.json). The JAX embedder, the evaluators, launch/embed.py and
torch_embed all read them from the directory. What a family does that this project does not
reproduce is listed in its profile ("not_reproduced").
"""
import dataclasses
import json
import os
from typing import Any, Dict

from etils import epath

from mmembed_jax.convert.hf_export import EMBEDDING_FILE
from mmembed_jax.data import images as images_lib
from mmembed_jax.data.prompts import PromptFormat

TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profiles.json")
PREPROCESSOR_FILE = "preprocessor_config.json"


def load_profiles(path: str = TABLE) -> Dict[str, Dict[str, Any]]:
  """{name: profile} of the table; each profile's prompt is checked."""
  with open(path, encoding="utf-8") as f:
    profiles = json.load(f)["profiles"]
  for name, profile in profiles.items():
    PromptFormat.from_record(profile["mmembed"].get("prompt"), f"{path}: profile {name}")
  return profiles


PROFILES = load_profiles()


def apply_profile(model_dir: str, name: str) -> Dict[str, Any]:
  """Writes profile `name` into model_dir's mmembed.json (over its fields, with "profile": name)
  and preprocessor_config.json's pixel bounds; returns the new mmembed.json record."""
  if name not in PROFILES:
    raise ValueError(f"unknown profile {name!r}; expected one of {sorted(PROFILES)}")
  root = epath.Path(model_dir)
  if not (root / "config.json").exists():
    raise FileNotFoundError(f"{model_dir}: no config.json; expected a Hugging Face model directory")
  profile = PROFILES[name]
  path = root / EMBEDDING_FILE
  record = json.loads(path.read_text()) if path.exists() else {}
  record.update(profile["mmembed"], profile=name)
  path.write_text(json.dumps(record, indent=2))
  preprocessor = root / PREPROCESSOR_FILE
  image = (images_lib.ImageProcessingConfig.from_preprocessor_config(str(preprocessor))
           if preprocessor.exists() else images_lib.ImageProcessingConfig())
  image = dataclasses.replace(image, **profile["image"])
  preprocessor.write_text(json.dumps(image.to_preprocessor_config(), indent=2))
  return record
