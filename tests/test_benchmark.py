"""launch/benchmark.py's pieces on the MoCa demo: the JAX step and the PyTorch step of the same
objective run on the same batch and give comparable figures (the speeds themselves are measured
in the README, not asserted here)."""
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module(path, name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_benchmark_times_the_jax_and_torch_steps():
  pytest.importorskip("torch")
  benchmark = _module("launch/benchmark.py", "benchmark")
  config = _module("configs/moca.py", "recipe").get_config("")
  config.mesh.num_devices = 1
  figures, objective, params, batch = benchmark.bench_jax(config, steps=1, warmup=0)
  assert figures["devices"] == 1 and figures["tokens_per_step"] == int((batch["segment_ids"] > 0).sum())
  assert figures["flops_per_second"] == pytest.approx(figures["flops_per_step"]
                                                      / figures["step_seconds"])
  torch_figures = benchmark.bench_torch(objective, params, batch, config, steps=1, warmup=0)
  assert torch_figures["step_seconds"] > 0 and torch_figures["threads"] >= 1
  assert benchmark.jax_matmul_flops(128, "float32") > 0 and benchmark.torch_matmul_flops(128) > 0
