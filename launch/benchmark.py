r"""Train-step speed of a recipe on this machine, next to the same MoCa CPT step in PyTorch.

  python launch/benchmark.py --config configs/moca.py [--config.model.preset=small_qwen2_5_vl]
      [--steps 10] [--warmup 2] [--torch] [--json FILE]

The JAX side is the trainer's own step (sharded state, jitted update with donated state) on one
real batch from the recipe's input pipeline, repeated: tokens/s, step time, and the analytic FLOPs
per second against a square matmul measured in the same run (the share of what this machine's
matmul reaches). The PyTorch side (MoCa CPT recipes) is transformers' model with the same
parameters, the same batch and the same objective (convert/torch_moca_cpt.py, whose loss equals
the JAX one in tests), with AdamW and gradient clipping as configured. Times are medians.
"""
import json
import statistics
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe config file, e.g. configs/moca.py.",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per framework.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps first (compilation, allocator warm-up).")
_TORCH = flags.DEFINE_bool("torch", True, "Also time the PyTorch step (MoCa CPT recipes).")
_MATMUL = flags.DEFINE_integer("matmul_size", 2048, "Side of the square matmul used as yardstick.")
_JSON = flags.DEFINE_string("json", None, "Write the figures to this JSON file.")


def _median_seconds(fn, steps: int, warmup: int) -> float:
  """Median wall time of fn() (which must block until its work is done)."""
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
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a = jax.random.normal(jax.random.key(0), (size, size), dtype)
  b = jax.random.normal(jax.random.key(1), (size, size), dtype)
  matmul = jax.jit(jnp.matmul)
  seconds = _median_seconds(lambda: matmul(a, b).block_until_ready(), 5, 2)
  return 2 * size**3 / seconds


def torch_matmul_flops(size: int) -> float:
  """FLOP/s of the same float32 matmul in PyTorch."""
  import torch  # pylint: disable=g-import-not-at-top
  a, b = torch.randn(size, size), torch.randn(size, size)
  return 2 * size**3 / _median_seconds(lambda: torch.matmul(a, b), 5, 2)


def bench_jax(config, steps: int, warmup: int):
  """(figures, objective, host params, host batch) of the recipe's JAX train step."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mmembed_jax.parallel import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from mmembed_jax.parallel.mesh import make_mesh  # pylint: disable=g-import-not-at-top
  from mmembed_jax.training import builders, flops  # pylint: disable=g-import-not-at-top
  from mmembed_jax.training.config import mesh_devices, validate  # pylint: disable=g-import-not-at-top
  from mmembed_jax.training.sharded_state import state_layout  # pylint: disable=g-import-not-at-top
  from mmembed_jax.training.train_step import make_update_fn  # pylint: disable=g-import-not-at-top
  from mmembed_jax.training.trainer import initial_state  # pylint: disable=g-import-not-at-top
  validate(config, jax.devices())
  devices = mesh_devices(config, jax.devices())
  mesh = make_mesh(config.mesh.ici, config.mesh.dcn, devices=devices)
  model_config = builders.build_model_config(config)
  objective = builders.build_objective(config, model_config)
  local = next(iter(builders.build_input(config, model_config)))
  for key in builders.HOST_ONLY:
    local.pop(key, None)
  layout = state_layout(config, model_config, objective, mesh,
                        sharding_lib.config_rules(config.sharding.rules))
  state = initial_state(config, model_config, objective, layout)
  host_params = jax.device_get(state.params)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  batch = jax.tree.map(
      lambda v: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v)), local)
  step = layout.jit_step(make_update_fn(objective, layout.tx, layout.schedule,
                                        config.grad_accum_steps), batch)
  holder = {"state": state}

  def one_step():
    with layout.context():
      holder["state"], metrics = step(holder["state"], batch)
    jax.block_until_ready(metrics["loss"])

  start = time.perf_counter()
  one_step()
  first = time.perf_counter() - start
  seconds = _median_seconds(one_step, steps, max(warmup - 1, 0))
  tokens = flops.batch_tokens(local) * jax.process_count()
  step_flops = flops.batch_train_flops(model_config, local,
                                       getattr(objective, "forwards_per_step", 1),
                                       getattr(objective, "uses_lm_head", True)) * jax.process_count()
  figures = {"devices": len(devices), "platform": devices[0].platform,
             "first_step_seconds": first, "step_seconds": seconds,
             "tokens_per_step": tokens, "tokens_per_second": tokens / seconds,
             "flops_per_step": step_flops, "flops_per_second": step_flops / seconds}
  return figures, objective, host_params, local


def bench_torch(objective, params, batch, config, steps: int, warmup: int) -> dict:
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

  start = time.perf_counter()
  one_step()
  first = time.perf_counter() - start
  seconds = _median_seconds(one_step, steps, max(warmup - 1, 0))
  return {"threads": torch.get_num_threads(), "first_step_seconds": first,
          "step_seconds": seconds}


def main(argv):
  """Runs the benchmark; prints a summary (and writes --json)."""
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  figures, objective, params, batch = bench_jax(config, _STEPS.value, _WARMUP.value)
  dtype = config.model.dtype
  figures["matmul_flops_per_second"] = jax_matmul_flops(_MATMUL.value, dtype)
  per_device = figures["flops_per_second"] / figures["devices"]
  figures["share_of_matmul"] = per_device / figures["matmul_flops_per_second"]
  result = {"config": config.model.preset, "objective": config.objective.name, "dtype": dtype,
            "matmul_size": _MATMUL.value, "jax": figures}
  lines = [f"{config.model.preset} / {config.objective.name}, {figures['tokens_per_step']} tokens "
           f"per step, {figures['flops_per_step']:.3e} FLOPs per step, on {figures['devices']} "
           f"{figures['platform']} device(s)",
           f"JAX:     {figures['step_seconds']:.3f} s/step, {figures['tokens_per_second']:.0f} "
           f"tokens/s, {per_device / 1e9:.1f} GFLOP/s per device = "
           f"{100 * figures['share_of_matmul']:.0f}% of a {dtype} {_MATMUL.value}^3 matmul "
           f"({figures['matmul_flops_per_second'] / 1e9:.1f} GFLOP/s); first step (compile) "
           f"{figures['first_step_seconds']:.1f} s"]
  if _TORCH.value and config.objective.name == "moca_cpt" and jax.process_count() == 1:
    torch_figures = bench_torch(objective, params, batch, config, _STEPS.value, _WARMUP.value)
    torch_figures["matmul_flops_per_second"] = torch_matmul_flops(_MATMUL.value)
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
  elif _TORCH.value:
    lines.append("PyTorch: skipped (the reference exists for MoCa CPT recipes, in one process)")
  print("\n".join(lines))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
