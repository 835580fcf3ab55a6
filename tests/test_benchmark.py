"""The benchmark's pieces on the MoCa demo (mmembed_jax/training/benchmark.py): the JAX step and
the PyTorch step of the same objective run on the same batch from the same parameters, and the
figures are the run's own (the speeds themselves are measured in the README, not asserted)."""
import math
import sys

import jax
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
  assert figures["flops_per_step"] == run.step_flops(batch)  # the analytic count of this batch
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
