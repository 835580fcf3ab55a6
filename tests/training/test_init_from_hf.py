"""init_from a Hugging Face directory: the run starts from exactly the imported weights, sharded."""
import numpy as np
from jax.sharding import PartitionSpec

from engine_runs import flat, restore_saved_params, run_commands, train_command
from mmembed_jax.convert.hf_import import import_hf


def test_init_from_hf_directory_starts_from_its_weights(tmp_path, cache_dir, tiny_hf_dirs):
  source = tiny_hf_dirs["qwen2_5_vl"]
  workdir = str(tmp_path / "from_hf")
  command = train_command(workdir, mesh="2x2x2", steps=1,
                          overrides=(f"--config.init_from={source}", "--config.optimizer.lr=0"))
  (result,) = run_commands(cache_dir, [command])
  assert result.returncode == 0, result.stderr[-3000:]
  _, imported = import_hf(source)
  saved = flat(restore_saved_params(workdir))
  expected = flat(imported)
  assert sorted(saved) == sorted(expected)
  for name, value in expected.items():
    np.testing.assert_array_equal(np.asarray(saved[name]), value, err_msg=name)
  embedding = saved["embed_tokens/embedding"]
  assert embedding.sharding.spec == PartitionSpec("tensor", "fsdp")
