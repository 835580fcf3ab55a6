"""Config sections -> objects: the architecture takes its vision token ids from the run's tokenizer."""
import sys

import pytest

from mmembed_jax.training import builders

sys.path.insert(0, builders.__file__.rsplit("/mmembed_jax/", 1)[0])
from configs import moca  # noqa: E402  pylint: disable=wrong-import-position


@pytest.mark.parametrize("arg", ["", "stage=cl"])
def test_preset_takes_the_tokenizers_vision_ids(arg, tokenizer_dir, tokenizer):
  """A preset architecture trained with a small tokenizer must use that tokenizer's
  `<|image_pad|>` id, or the model would never see an image."""
  config = moca.get_config(arg)
  section = config.objective if arg == "" else config.input
  section.tokenizer_dir = tokenizer_dir
  model_config = builders.build_model_config(config)
  assert model_config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
  assert model_config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
  assert model_config.vision_end_token_id == tokenizer.convert_tokens_to_ids("<|vision_end|>")
  assert model_config.image_token_id < model_config.text.vocab_size


def test_source_hf_dir_follows_workdirs(tmp_path, tiny_hf_dirs):
  """init_from a run that started from an HF directory (through another run) finds that directory."""
  import json
  hf_dir = tiny_hf_dirs["qwen2_vl"]
  first, second = tmp_path / "cpt", tmp_path / "cl"
  for run, parent in ((first, hf_dir), (second, str(first))):
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"init_from": parent}))
  assert builders.source_hf_dir(str(second)) == hf_dir
  assert builders.source_hf_dir("") == ""
