"""The benchmark's pieces on the MoCa demo (mmembed_jax/training/benchmark.py): the JAX step and
the PyTorch step of the same objective run on the same batch from the same parameters, and the
figures are the run's own (the speeds themselves are measured in the README, not asserted)."""
import math
import sys

import jax
import numpy as np
import pytest

import mmembed_jax
from mmembed_jax.training import benchmark

sys.path.insert(0, mmembed_jax.__file__.rsplit("/mmembed_jax/", 1)[0])
from configs import moca  # noqa: E402  pylint: disable=wrong-import-position


def test_benchmark_times_the_jax_and_torch_steps_of_the_same_objective_and_batch():
  pytest.importorskip("torch")
  from mmembed_jax.training.run import build_run
  config = moca.get_config("")
  config.mesh.num_devices = 1
  result, lines = benchmark.benchmark(config, steps=2, warmup=0, with_torch=True, matmul_size=256)
  figures, torch_figures = result["jax"], result["torch"]
  run = build_run(config, jax.devices())
  batch = next(iter(run.dataset()))  # the benchmark's batch: the pipeline's first
  assert figures["devices"] == 1 and figures["tokens_per_step"] == int((batch["segment_ids"] > 0).sum())
  assert figures["padded_flops_per_step"] == run.step_flops(batch)  # the analytic count
  assert 0 < figures["flops_per_step"] < figures["padded_flops_per_step"]  # the real work
  assert figures["real_token_share"] == (batch["segment_ids"] > 0).mean()
  assert figures["real_patch_share"] == (batch["patch_image_ids"] > 0).mean()
  assert figures["flops_per_second"] == pytest.approx(figures["flops_per_step"]
                                                      / figures["step_seconds"])
  assert torch_figures["threads"] >= 1 and result["jax_speedup_over_torch"] > 0
  # Same parameters, batch and objective (only the MAE noise draws differ): the same loss scale.
  assert math.isfinite(figures["first_loss"]) and math.isfinite(torch_figures["first_loss"])
  assert torch_figures["first_loss"] == pytest.approx(figures["first_loss"], rel=0.02)
  assert 0 < figures["share_of_matmul"] and 0 < torch_figures["share_of_matmul"]
  assert any("JAX / PyTorch speed" in line for line in lines)


def test_interleaved_runs_every_step_once_per_round_in_turn():
  calls = []
  times = benchmark.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                rounds=3, warmup=1)
  assert calls == ["a", "b"] * 4 and {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}


def test_useful_flops_equal_the_padded_count_without_padding_and_count_each_span():
  from mmembed_jax.demo.tiny_model import tiny_config
  from mmembed_jax.training import flops
  # One sequence filling each row, one 1-frame image filling each patch buffer, full attention:
  # the real work is the padded shapes' work.
  config = tiny_config("qwen2_vl")
  batch = {"input_ids": np.zeros((2, 64), np.int32), "segment_ids": np.ones((2, 64), np.int32),
           "pixel_patches": np.zeros((2, 48, 1176), np.float32),
           "patch_image_ids": np.ones((2, 48), np.int32),
           "image_grid_thw": np.array([[[1, 6, 8]], [[1, 6, 8]]], np.int32)}
  assert flops.useful_train_flops(config, batch) == pytest.approx(
      flops.batch_train_flops(config, batch), rel=1e-12)
  # Two sequences of 40 and 24 instead: attention over 40**2 + 24**2 token pairs, not 64**2.
  split = dict(batch, segment_ids=np.repeat([[1] * 40 + [2] * 24], 2, axis=0).astype(np.int32))
  attention = 3 * 2 * 2 * 2 * config.text.hidden_size * config.text.num_layers
  assert (flops.useful_train_flops(config, batch) - flops.useful_train_flops(config, split)
          == pytest.approx(attention * (64**2 - 40**2 - 24**2)))
  # Qwen2.5-VL: a 6 x 8 patch frame (3 x 4 merged tokens) is one window of 4 x 4 merged tokens,
  # partly filled; window layers attend over it, full layers over the frame: the same 48 patches.
  windowed = tiny_config("qwen2_5_vl")
  assert flops._window_sizes(windowed, 2, 6, 8) == [48, 48]  # pylint: disable=protected-access
  assert flops._window_sizes(windowed, 1, 10, 18) == [64, 64, 16, 16, 16, 4]  # pylint: disable=protected-access
