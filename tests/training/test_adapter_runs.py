"""A DoRA run of launch/tpu_train.py end to end: 8 fake devices on a (2, 2, 2) mesh, the VLM2Vec
demo recipe with its released adapters on a tiny Qwen2.5-VL HF directory; SIGKILL and resume;
merged and peft-format exports embedded by PyTorch equal to the JAX model."""
import json
import os
import runpy
import sys

import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from engine_runs import (REPO, STANDARD, Run, checkpoint_steps, flat, kill_past_checkpoint, read_metrics,
                         restore_saved_params)
from mmembed_jax.convert.hf_import import import_hf
from mmembed_jax.models.adapters import LEAVES

STEPS, EVERY = 6, 2
TIMING_KEYS = ("tokens_per_second", "step_time", "tflops_per_device", "mfu")


def _command(workdir, hf_dir, *extra):
  return [sys.executable, "launch/tpu_train.py", "--config=configs/vlm2vec.py:adapters=dora",
          f"--workdir={workdir}", f"--config.init_from={hf_dir}", "--config.mesh.ici.data=2",
          "--config.mesh.ici.fsdp=2", "--config.mesh.ici.tensor=2",
          f"--config.total_steps={STEPS}", "--config.eval.every=0", "--config.log_every=1",
          f"--config.checkpoint.every={EVERY}", "--config.input.global_batch_size=16",
          *STANDARD, *extra]


def _deterministic(entry):
  return {k: v for k, v in entry.items() if k not in TIMING_KEYS}


def test_dora_run_trains_only_adapters_resumes_bit_identically_and_exports(
    tmp_path, cache_dir, demo_cache, tiny_hf_dirs, image_dir, monkeypatch):
  monkeypatch.setenv("MMEMBED_DEMO_CACHE", str(demo_cache))
  from mmembed_jax import demo  # pylint: disable=g-import-not-at-top
  demo.sources("contrastive_pairs")  # written once here, not by the two runs at the same time
  hf_dir = tiny_hf_dirs["qwen2_5_vl"]
  reference_dir, workdir = str(tmp_path / "reference"), str(tmp_path / "killed")
  reference = Run(cache_dir, _command(reference_dir, hf_dir), reference_dir)
  run = Run(cache_dir, _command(workdir, hf_dir), workdir)
  kill_past_checkpoint(run, workdir, EVERY, steps_past=1)
  resume_from = max(checkpoint_steps(workdir))
  assert resume_from < STEPS
  resumed = Run(cache_dir, _command(workdir, hf_dir), workdir).check()
  assert f"resumed from step {resume_from}" in resumed.output()
  reference.check()
  expected, got = read_metrics(reference_dir), read_metrics(workdir)
  assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
  for step in range(resume_from + 1, STEPS + 1):
    assert _deterministic(got[step]) == _deterministic(expected[step]), step  # bit-identical
  assert expected[STEPS]["loss"] < expected[1]["loss"] - 0.2, (expected[1], expected[STEPS])

  # The base weights are the HF directory's, bit for bit; only adapters moved.
  model_config, base = import_hf(hf_dir)
  saved = flat(restore_saved_params(workdir))
  base = flat(base)
  adapter_names = [n for n in saved if n.rsplit("/", 1)[-1] in LEAVES]
  # A, B and the magnitude on the LLM's q/k/v/o/down_proj and each vision block's down_proj.
  assert len(adapter_names) == 3 * (5 * model_config.text.num_layers + model_config.vision.depth)
  assert sorted(set(saved) - set(adapter_names)) == sorted(base)
  for name, value in base.items():
    assert np.array_equal(np.asarray(saved[name]), np.asarray(value)), name
  # The optimiser state holds adapter shapes only (Adam's mu and nu of each adapter tensor).
  step_dir = epath.Path(workdir) / "checkpoints" / str(max(checkpoint_steps(workdir)))
  opt_tree = ocp.PyTreeCheckpointHandler().metadata(step_dir / "opt_state").tree
  opt_paths = [n for n, leaf in flat(opt_tree).items() if len(getattr(leaf, "shape", ())) > 0]
  assert len(opt_paths) == 2 * len(adapter_names)
  assert all(n.rsplit("/", 1)[-1] in LEAVES for n in opt_paths), opt_paths[:4]

  # Exports: merged and peft-format, embedded by PyTorch, equal the JAX model.
  from mmembed_jax import torch_embed  # pylint: disable=g-import-not-at-top
  from mmembed_jax.embedding import JaxEmbedder  # pylint: disable=g-import-not-at-top
  merged, adapter = str(tmp_path / "merged"), str(tmp_path / "adapter")
  exports = [Run(cache_dir, [sys.executable, "launch/export_to_pytorch.py",
                             f"--checkpoint={workdir}", f"--out={out}", *extra], out, devices=1)
             for out, extra in ((merged, ()), (adapter, ("--adapters_only",)))]  # side by side
  for export in exports:
    export.check()
  config = json.loads((epath.Path(adapter) / "adapter_config.json").read_text())
  assert config["use_dora"] and config["r"] == 16 and config["lora_alpha"] == 64
  rows = [{"text": "a red circle above a blue square"},
          {"text": "<image> two green triangles", "image": os.path.join(image_dir, "wide.png")}]
  jax_vectors = JaxEmbedder.load(workdir, batch_size=2).embed_rows(rows)
  for out in (merged, adapter):
    np.testing.assert_allclose(torch_embed.load(out)(rows), jax_vectors, atol=1e-4, rtol=0)
  assert os.path.exists(os.path.join(adapter, "adapter_model.safetensors"))

  # Chaining: a run started from this one merges its adapters into the weights, then adds fresh
  # ones (B zero, DoRA's magnitude the merged kernel's norm).
  import jax  # pylint: disable=g-import-not-at-top
  from mmembed_jax.models.adapters import weight_norm  # pylint: disable=g-import-not-at-top
  from mmembed_jax.training import trained_model  # pylint: disable=g-import-not-at-top
  from mmembed_jax.training.run import build_run  # pylint: disable=g-import-not-at-top
  config = runpy.run_path(os.path.join(REPO, "configs", "vlm2vec.py"))["get_config"](
      "adapters=dora")
  config.update(init_from=workdir, total_steps=1)
  config.mesh.num_devices, config.eval.every = 1, 0
  chained = flat(jax.device_get(build_run(config, jax.devices()).initial_state().params))
  merged_weights = flat(jax.device_get(trained_model.load_trained(workdir).params))
  for name, value in merged_weights.items():  # merged on 1 device here, on 8 there: fp32 rounding
    np.testing.assert_allclose(chained[name], value, rtol=1e-6, atol=1e-7, err_msg=name)
  q_proj = "language_model/layers_0/self_attn/q_proj/"
  assert not np.array_equal(merged_weights[q_proj + "kernel"], base[q_proj + "kernel"])
  assert not np.any(chained[q_proj + "lora_b"])
  np.testing.assert_allclose(chained[q_proj + "lora_magnitude"],
                             weight_norm(chained[q_proj + "kernel"], chained[q_proj + "lora_a"],
                                         chained[q_proj + "lora_b"], 4.0), rtol=1e-6)
