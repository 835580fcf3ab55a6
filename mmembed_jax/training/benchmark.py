"""Train-step speed of a recipe on this machine, next to the same MoCa CPT step in PyTorch.

The JAX side is the run builder's own step (sharded state, jitted update with donated state) on
one real batch from the recipe's input pipeline, repeated: tokens/s, step time, and the analytic
FLOPs per second against a square matmul measured in the same run (the share of what this
machine's matmul reaches). The PyTorch side (MoCa CPT recipes) is transformers' model with the
same parameters, the same batch and the same objective (convert/torch_moca_cpt.py, whose loss
equals the JAX one in tests), with AdamW and gradient clipping as configured. Times are medians.
"""
import statistics
import time
from typing import Any, Callable, Dict, List, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmembed_jax.objectives.moca_cpt import MocaCpt
from mmembed_jax.parallel import sharding as sharding_lib
from mmembed_jax.training import flops
from mmembed_jax.training.run import HOST_ONLY, build_run


def median_seconds(fn: Callable[[], Any], steps: int, warmup: int) -> float:
  """Median wall time of fn() (which must block until its work is done) over `steps` calls."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def jax_matmul_flops(size: int, dtype: str) -> float:
  """FLOP/s of a [size, size] @ [size, size] matmul on one device."""
  a = jax.random.normal(jax.random.key(0), (size, size), dtype)
  b = jax.random.normal(jax.random.key(1), (size, size), dtype)
  matmul = jax.jit(jnp.matmul)
  return 2 * size**3 / median_seconds(lambda: matmul(a, b).block_until_ready(), 5, 2)


def torch_matmul_flops(size: int) -> float:
  """FLOP/s of the same float32 matmul in PyTorch."""
  import torch  # pylint: disable=g-import-not-at-top
  a, b = torch.randn(size, size), torch.randn(size, size)
  return 2 * size**3 / median_seconds(lambda: torch.matmul(a, b), 5, 2)


def bench_jax(config: ml_collections.ConfigDict, steps: int, warmup: int
              ) -> Tuple[Dict[str, Any], Any, Any, Dict[str, np.ndarray]]:
  """(figures, objective, host params, host batch) of the recipe's JAX train step."""
  run = build_run(config, jax.devices())
  local = next(iter(run.dataset()))
  local = {k: v for k, v in local.items() if k not in HOST_ONLY}
  state = run.initial_state()
  host_params = jax.device_get(state.params)
  batch_sharding = sharding_lib.batch_sharding(run.mesh)
  batch = jax.tree.map(
      lambda v: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v)), local)
  step = run.jit_step(batch)
  holder = {"state": state}

  def one_step():
    with run.layout.context():
      holder["state"], holder["metrics"] = step(holder["state"], batch)
    jax.block_until_ready(holder["metrics"]["loss"])

  start = time.perf_counter()
  one_step()
  first = time.perf_counter() - start
  first_loss = float(holder["metrics"]["loss"])
  seconds = median_seconds(one_step, steps, max(warmup - 1, 0))
  tokens = flops.batch_tokens(local) * jax.process_count()
  step_flops = run.step_flops(local) * jax.process_count()
  devices = run.mesh.devices.size
  figures = {"devices": devices, "platform": run.mesh.devices.flat[0].platform,
             "first_loss": first_loss, "first_step_seconds": first, "step_seconds": seconds,
             "tokens_per_step": tokens, "tokens_per_second": tokens / seconds,
             "flops_per_step": step_flops, "flops_per_second": step_flops / seconds}
  return figures, run.objective, host_params, local


def bench_torch(objective: MocaCpt, params: Any, batch: Dict[str, np.ndarray],
                config: ml_collections.ConfigDict, steps: int, warmup: int) -> Dict[str, Any]:
  """Figures of the PyTorch step of the same objective on the same parameters and batch."""
  import torch  # pylint: disable=g-import-not-at-top
  from mmembed_jax.convert import torch_moca_cpt  # pylint: disable=g-import-not-at-top
  module = torch_moca_cpt.build(objective, params)
  inputs = torch_moca_cpt.torch_batch(batch, objective.config)
  opt = config.optimizer
  optimizer = torch.optim.AdamW(module.parameters(), lr=opt.lr, betas=(opt.b1, opt.b2), eps=opt.eps,
                                weight_decay=opt.weight_decay)
  patch_dim = objective.config.vision.patch_dim
  noise_shape = (1, 1, patch_dim) if objective.noise == "shared" else inputs["pixel_patches"].shape
  bf16 = objective.config.dtype == "bfloat16"

  def one_step():
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
      loss, _ = module(inputs, torch.randn(noise_shape))
    loss.backward()
    if opt.max_grad_norm:
      torch.nn.utils.clip_grad_norm_(module.parameters(), opt.max_grad_norm)
    optimizer.step()
    return float(loss.detach())

  start = time.perf_counter()
  first_loss = one_step()
  first = time.perf_counter() - start
  seconds = median_seconds(one_step, steps, max(warmup - 1, 0))
  return {"threads": torch.get_num_threads(), "first_loss": first_loss,
          "first_step_seconds": first, "step_seconds": seconds}


def benchmark(config: ml_collections.ConfigDict, steps: int, warmup: int, with_torch: bool,
              matmul_size: int) -> Tuple[Dict[str, Any], List[str]]:
  """(figures, summary lines) of the recipe's step; PyTorch's too for MoCa CPT in one process."""
  figures, objective, params, batch = bench_jax(config, steps, warmup)
  dtype = config.model.dtype
  figures["matmul_flops_per_second"] = jax_matmul_flops(matmul_size, dtype)
  per_device = figures["flops_per_second"] / figures["devices"]
  figures["share_of_matmul"] = per_device / figures["matmul_flops_per_second"]
  result = {"config": config.model.preset, "objective": config.objective.name, "dtype": dtype,
            "matmul_size": matmul_size, "jax": figures}
  lines = [f"{config.model.preset} / {config.objective.name}, {figures['tokens_per_step']} tokens "
           f"per step, {figures['flops_per_step']:.3e} FLOPs per step, on {figures['devices']} "
           f"{figures['platform']} device(s)",
           f"JAX:     {figures['step_seconds']:.3f} s/step, {figures['tokens_per_second']:.0f} "
           f"tokens/s, {per_device / 1e9:.1f} GFLOP/s per device = "
           f"{100 * figures['share_of_matmul']:.0f}% of a {dtype} {matmul_size}^3 matmul "
           f"({figures['matmul_flops_per_second'] / 1e9:.1f} GFLOP/s); first step (compile) "
           f"{figures['first_step_seconds']:.1f} s"]
  if with_torch and isinstance(objective, MocaCpt) and jax.process_count() == 1:
    torch_figures = bench_torch(objective, params, batch, config, steps, warmup)
    torch_figures["matmul_flops_per_second"] = torch_matmul_flops(matmul_size)
    torch_figures["tokens_per_second"] = figures["tokens_per_step"] / torch_figures["step_seconds"]
    torch_figures["flops_per_second"] = figures["flops_per_step"] / torch_figures["step_seconds"]
    result["torch"] = torch_figures
    result["jax_speedup_over_torch"] = torch_figures["step_seconds"] / figures["step_seconds"]
    lines += [f"PyTorch: {torch_figures['step_seconds']:.3f} s/step, "
              f"{torch_figures['tokens_per_second']:.0f} tokens/s, "
              f"{torch_figures['flops_per_second'] / 1e9:.1f} GFLOP/s "
              f"({torch_figures['threads']} threads; its float32 matmul "
              f"{torch_figures['matmul_flops_per_second'] / 1e9:.1f} GFLOP/s)",
              f"JAX / PyTorch speed: {result['jax_speedup_over_torch']:.2f}x"]
  elif with_torch:
    lines.append("PyTorch: skipped (the reference exists for MoCa CPT recipes, in one process)")
  return result, lines
