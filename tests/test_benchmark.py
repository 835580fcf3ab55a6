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
  figures, objective, params, batch = benchmark.bench_jax(config, steps=2, warmup=0)
  run = build_run(config, jax.devices())
  assert figures["devices"] == 1 and figures["tokens_per_step"] == int((batch["segment_ids"] > 0).sum())
  assert figures["flops_per_step"] == run.step_flops(batch)  # the analytic count of this batch
  assert figures["flops_per_second"] == pytest.approx(figures["flops_per_step"]
                                                      / figures["step_seconds"])
  torch_figures = benchmark.bench_torch(objective, params, batch, config, steps=2, warmup=0)
  assert torch_figures["threads"] >= 1
  # Same parameters, batch and objective (only the MAE noise draws differ): the same loss scale.
  assert math.isfinite(figures["first_loss"]) and math.isfinite(torch_figures["first_loss"])
  assert torch_figures["first_loss"] == pytest.approx(figures["first_loss"], rel=0.02)
  print(f"first-step loss: JAX {figures['first_loss']:.4f}, PyTorch {torch_figures['first_loss']:.4f}")
  size = 256
  assert 2 * size**3 / benchmark.jax_matmul_flops(size, "float32") < 1.0  # seconds, not zero
  assert np.isfinite(benchmark.torch_matmul_flops(size))
