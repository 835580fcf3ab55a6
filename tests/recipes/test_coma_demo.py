"""CoMa's demo end to end as real subprocesses (1 CPU device): stage 1 (compression pre-training
on the synthetic dialogues) lowers its loss, stage 2 chains from it through `init_from` with
compression-token pooling, and the stage-2 run exported to Hugging Face embeds in PyTorch as it
does in JAX."""
import json
import os

import numpy as np

from mmembed_jax import torch_embed
from mmembed_jax.embedding import JaxEmbedder
from mmembed_jax.training.trained_model import export_trained

from test_contrastive_demos import _metrics, _train

ROWS = [{"text": "Find an image that matches the given caption: a small red circle"},
        {"text": "<image> Represent the given image.", "image": "wide.png"},
        {"text": "<image> Represent the given image.", "image": "tall.png"}]


def test_coma_stages_chain_and_the_export_embeds_alike(tmp_path, demo_cache, image_dir,
                                                      monkeypatch):
  stage1, stage2 = tmp_path / "coma1", tmp_path / "coma2"
  run = _train("configs/coma.py:stage=1", stage1, demo_cache, "--config.total_steps=20",
               "--config.log_every=10", "--config.checkpoint.every=20")
  assert run.returncode == 0, run.stderr[-3000:]
  train, _ = _metrics(stage1)
  print(f"stage 1 loss {train[0]['loss']:.3f} -> {train[-1]['loss']:.3f}")
  assert train[-1]["loss"] < train[0]["loss"] - 0.3
  assert all(x["bad_records"] == 0 for x in train)
  run = _train("configs/coma.py:stage=2", stage2, demo_cache, f"--config.init_from={stage1}",
               "--config.total_steps=4", "--config.log_every=2", "--config.eval.every=4",
               "--config.eval.max_rows_per_dataset=8")
  assert run.returncode == 0, run.stderr[-3000:]
  train, held_out = _metrics(stage2)
  assert all(np.isfinite(x["loss"]) for x in train) and [x["step"] for x in held_out] == [0, 4]

  export_dir = str(tmp_path / "export")
  monkeypatch.setenv("MMEMBED_DEMO_CACHE", str(demo_cache))  # the run's demo tokenizer
  export_trained(str(stage2), export_dir)
  record = json.load(open(os.path.join(export_dir, "mmembed.json")))
  assert (record["pooling"], record["compression_tokens"], record["attention"]) == (
      "ctoken", 32, "causal")
  theirs = torch_embed.load(export_dir, batch_size=2)(ROWS, base_dir=image_dir)
  ours = JaxEmbedder.from_pretrained(export_dir).embed_items(
      [(f"row {i}", row) for i, row in enumerate(ROWS)], image_dir)
  diff = np.abs(theirs - ours).max()
  print(f"exported CoMa stage 2: torch vs JAX embeddings max abs diff {diff:.2e}")
  assert diff <= 1e-4
