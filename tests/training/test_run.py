"""The run builder and the lineage it resolves once: the architecture takes its vision token ids
from the run's tokenizer; `init_from` chains are followed to their HF directory, and a run's
recorded lineage is read instead of walked."""
import json
import sys

import jax
import pytest

import mmembed_jax
from mmembed_jax.training import lineage
from mmembed_jax.training import run as run_lib

sys.path.insert(0, mmembed_jax.__file__.rsplit("/mmembed_jax/", 1)[0])
from configs import moca  # noqa: E402  pylint: disable=wrong-import-position


@pytest.mark.parametrize("arg", ["", "stage=cl"])
def test_preset_takes_the_tokenizers_vision_ids(arg, tokenizer_dir, tokenizer):
  """A preset architecture trained with a small tokenizer must use that tokenizer's
  `<|image_pad|>` id, or the model would never see an image."""
  config = moca.get_config(arg)
  config.tokenizer_dir = tokenizer_dir
  model_config = run_lib.model_config(config, lineage.resolve(config))
  assert model_config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
  assert model_config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
  assert model_config.vision_end_token_id == tokenizer.convert_tokens_to_ids("<|vision_end|>")
  assert model_config.image_token_id < model_config.text.vocab_size


def _runs(tmp_path, hf_dir, recorded=None):
  """Two workdirs: cpt (init_from the HF directory) and cl (init_from cpt)."""
  first, second = tmp_path / "cpt", tmp_path / "cl"
  for run, parent in ((first, hf_dir), (second, str(first))):
    (run / "checkpoints").mkdir(parents=True)
    record = {"init_from": parent}
    if recorded and run == first:
      record[lineage.RESOLVED] = recorded
    (run / "config.json").write_text(json.dumps(record))
  return first, second


def test_lineage_follows_workdirs_to_the_hf_directory(tmp_path, tiny_hf_dirs):
  """init_from a run that started from an HF directory (through another run) finds that
  directory, its tokenizer, and the whole chain."""
  hf_dir = tiny_hf_dirs["qwen2_vl"]
  first, second = _runs(tmp_path, hf_dir)
  config = moca.get_config("stage=cl")
  config.init_from = str(second)
  resolved = lineage.resolve(config)
  assert resolved == lineage.Resolved(hf_dir, (str(second), str(first), hf_dir), hf_dir)
  assert lineage.source_lineage("") == ("", (), "")


def test_a_recorded_lineage_is_read_not_walked(tmp_path, tiny_hf_dirs):
  """A run whose config.json records its resolved lineage ends the walk there: the directory it
  names need not exist on this host any more (a moved HF directory, say)."""
  recorded = lineage.Resolved("/gone/hf_dir", ("/gone/hf_dir",), "/gone/hf_dir").to_json()
  first, second = _runs(tmp_path, tiny_hf_dirs["qwen2_vl"], recorded)
  source, chain, tokenizer = lineage.source_lineage(str(second))
  assert (source, chain, tokenizer) == ("/gone/hf_dir",
                                        (str(second), str(first), "/gone/hf_dir"), "/gone/hf_dir")


def test_build_run_names_a_missing_tokenizer():
  """A pod config (its sources' paths unset, no init_from) names no tokenizer: one line."""
  config = moca.get_config("size=3b")
  with pytest.raises(ValueError, match="no tokenizer: set tokenizer_dir"):
    run_lib.build_run(config, jax.devices())


def test_a_new_objective_plugs_in_with_its_class_and_one_registry_line(monkeypatch):
  """README's example: an Objective subclass and its registry entry train through the run
  builder (typed field, FLOP count without the LM head) with nothing else changed."""
  import dataclasses
  from typing import ClassVar, Tuple

  import jax.numpy as jnp

  from mmembed_jax.models.config import ModelConfig
  from mmembed_jax.models.vlm import VisionLanguageModel
  from mmembed_jax.objectives.base import Objective
  from mmembed_jax.training import registry
  from mmembed_jax.training.config import default_config
  from mmembed_jax.training.run import HOST_ONLY

  @dataclasses.dataclass(frozen=True)
  class MeanSquaredNorm(Objective):
    name: ClassVar[str] = "mean_squared_norm"
    inputs: ClassVar[Tuple[str, ...]] = ("moca_cpt", "synthetic_tokens")
    uses_lm_head: ClassVar[bool] = False
    config: ModelConfig
    weight: float = 1.0

    def __call__(self, params, batch, rng):
      hidden = VisionLanguageModel(self.config).apply({"params": params}, batch)
      loss = self.weight * jnp.mean(jnp.square(hidden))
      return loss, {"hidden_energy": loss}

  monkeypatch.setitem(registry.OBJECTIVES, MeanSquaredNorm.name, MeanSquaredNorm)
  config = default_config()
  config.objective = dict(name="mean_squared_norm", weight=0.5)
  config.mesh.num_devices = 1
  run = run_lib.build_run(config, jax.devices())
  assert run.objective == MeanSquaredNorm(run.model_config, weight=0.5)
  batch = {k: v for k, v in next(iter(run.dataset())).items() if k not in HOST_ONLY}
  state, metrics = run.jit_step(batch)(run.initial_state(), batch)
  assert int(state.step) == 1 and float(metrics["hidden_energy"]) > 0
  assert run.step_flops(batch) < dataclasses.replace(run, objective=registry.MaskedLm(
      run.model_config)).step_flops(batch)  # no LM head in its count
  config.objective = dict(name="mean_squared_norm", weight="heavy")
  with pytest.raises(ValueError, match="field weight='heavy' should be of type float"):
    run_lib.build_run(config, jax.devices())
