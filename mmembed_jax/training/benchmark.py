"""Train-step speed of a recipe on this machine, next to the same MoCa CPT step in PyTorch.

The JAX side is the run builder's own step (sharded state, jitted update with donated state) on
one real batch from the recipe's input pipeline, repeated: tokens/s, step time, and the FLOPs of
the batch's real work (`flops.useful_train_flops`: real tokens and patches, attention within each
sequence, frame and window) per second against a square matmul measured in the same run (the
share of what this machine's matmul reaches). The PyTorch side (MoCa CPT recipes) is transformers' model with the
same parameters, the same batch and the same objective (convert/torch_moca_cpt.py, whose loss
equals the JAX one in tests), with AdamW and gradient clipping as configured. The two steps and
their matmul yardsticks are timed interleaved (`interleaved`): this machine is shared, and
sequential phases once gave 0.53x and, under load, 1.84x for the same code. The batch's share of
real tokens and real patches is reported with it.
"""
import statistics
import time
from typing import Any, Callable, Dict, List, Mapping, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmembed_jax.objectives.moca_cpt import MocaCpt
from mmembed_jax.parallel import sharding as sharding_lib
from mmembed_jax.training import flops
from mmembed_jax.training.run import HOST_ONLY, build_run


def _slots(batch: Any, key: str) -> Tuple[int, int]:
  """(real, all) entries of every `key` array in a (possibly nested) batch; real = nonzero."""
  if not isinstance(batch, Mapping):
    return 0, 0
  own = np.asarray(batch[key]) if key in batch else np.zeros((0,))
  real, total = int((own > 0).sum()), int(own.size)
  for value in batch.values():
    more = _slots(value, key)
    real, total = real + more[0], total + more[1]
  return real, total


def batch_shares(batch: Any) -> Dict[str, float]:
  """The share of token slots that hold real tokens and of patch slots that hold real patches."""
  tokens, token_slots = _slots(batch, "segment_ids")
  patches, patch_slots = _slots(batch, "patch_image_ids")
  return {"real_token_share": tokens / max(token_slots, 1),
          "real_patch_share": patches / patch_slots if patch_slots else float("nan")}


def interleaved(steps: Dict[str, Callable[[], Any]], rounds: int, warmup: int
                ) -> Dict[str, List[float]]:
  """{name: seconds of each round}: every callable (which must block until its work is done)
  runs once per round, in turn, so that background load falls on all of them alike."""
  for _ in range(warmup):
    for fn in steps.values():
      fn()
  times = {name: [] for name in steps}
  for _ in range(rounds):
    for name, fn in steps.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return times


def jax_matmul(size: int, dtype: str) -> Callable[[], Any]:
  """A [size, size] @ [size, size] matmul on one device, compiled, as a blocking callable."""
  a = jax.random.normal(jax.random.key(0), (size, size), dtype)
  b = jax.random.normal(jax.random.key(1), (size, size), dtype)
  matmul = jax.jit(jnp.matmul)
  return lambda: matmul(a, b).block_until_ready()


def torch_matmul(size: int) -> Callable[[], Any]:
  """The same float32 matmul in PyTorch."""
  import torch  # pylint: disable=g-import-not-at-top
  a, b = torch.randn(size, size), torch.randn(size, size)
  return lambda: torch.matmul(a, b)


def jax_step(config: ml_collections.ConfigDict
             ) -> Tuple[Callable[[], Any], Dict[str, Any], Any, Any, Dict[str, np.ndarray]]:
  """(one train step, figures, objective, host params, host batch) of the recipe's JAX step on
  one real batch from its input pipeline; the first step (compilation) is run and timed here."""
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
  figures = {"devices": run.mesh.devices.size, "platform": run.mesh.devices.flat[0].platform,
             "first_loss": float(holder["metrics"]["loss"]),
             "first_step_seconds": time.perf_counter() - start,
             "tokens_per_step": flops.batch_tokens(local) * jax.process_count(),
             "flops_per_step": flops.useful_train_flops(
                 run.model_config, local, run.objective.forwards_per_step,
                 run.objective.uses_lm_head) * jax.process_count(),
             "padded_flops_per_step": run.step_flops(local) * jax.process_count(),
             "max_frame_patches": run.model_config.max_frame_patches, **batch_shares(local)}
  return one_step, figures, run.objective, host_params, local


def torch_step(objective: MocaCpt, params: Any, batch: Dict[str, np.ndarray],
               config: ml_collections.ConfigDict) -> Tuple[Callable[[], Any], Dict[str, Any]]:
  """(one train step, figures) of the PyTorch step of the same objective on the same parameters
  and batch; the first step is run here."""
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
  return one_step, {"threads": torch.get_num_threads(), "first_loss": first_loss,
                    "first_step_seconds": time.perf_counter() - start}


def benchmark(config: ml_collections.ConfigDict, steps: int, warmup: int, with_torch: bool,
              matmul_size: int) -> Tuple[Dict[str, Any], List[str]]:
  """(figures, summary lines) of the recipe's step; PyTorch's too for MoCa CPT in one process.

  The JAX step, PyTorch's step and each one's float32 matmul run in turn, `steps` rounds after
  `warmup`; times are medians, and the speed ratio and the matmul shares are medians of the
  per-round ratios (a round's background load hits all four alike)."""
  step, figures, objective, params, batch = jax_step(config)
  dtype = config.model.dtype
  timed = {"jax": step, "jax_matmul": jax_matmul(matmul_size, dtype)}
  torch_figures = None
  if with_torch and isinstance(objective, MocaCpt) and jax.process_count() == 1:
    timed["torch"], torch_figures = torch_step(objective, params, batch, config)
    timed["torch_matmul"] = torch_matmul(matmul_size)
  times = interleaved(timed, steps, max(warmup - 1, 0))
  matmul_flops = 2 * matmul_size**3
  devices = figures["devices"]

  def share(name):  # per round: (this step's FLOP/s per device) / (its matmul's FLOP/s)
    return statistics.median(figures["flops_per_step"] / devices / t * m / matmul_flops
                             for t, m in zip(times[name], times[name + "_matmul"]))

  seconds = statistics.median(times["jax"])
  figures.update(step_seconds=seconds, tokens_per_second=figures["tokens_per_step"] / seconds,
                 flops_per_second=figures["flops_per_step"] / seconds,
                 matmul_flops_per_second=matmul_flops / statistics.median(times["jax_matmul"]),
                 share_of_matmul=share("jax"))
  result = {"config": config.model.preset, "objective": config.objective.name, "dtype": dtype,
            "matmul_size": matmul_size, "rounds": steps, "jax": figures}
  lines = [f"{config.model.preset} / {config.objective.name}, {figures['tokens_per_step']} tokens "
           f"per step ({100 * figures['real_token_share']:.0f}% of token slots real, "
           f"{100 * figures['real_patch_share']:.0f}% of patch slots), "
           f"{figures['flops_per_step']:.3e} FLOPs of real work per step "
           f"({figures['padded_flops_per_step']:.3e} over the padded shapes), on {devices} "
           f"{figures['platform']} device(s)",
           f"JAX:     {seconds:.3f} s/step, {figures['tokens_per_second']:.0f} tokens/s, "
           f"{100 * figures['share_of_matmul']:.0f}% of its {dtype} {matmul_size}^3 matmul "
           f"({figures['matmul_flops_per_second'] / 1e9:.1f} GFLOP/s); first step (compile) "
           f"{figures['first_step_seconds']:.1f} s"]
  if torch_figures is not None:
    torch_seconds = statistics.median(times["torch"])
    torch_figures.update(
        step_seconds=torch_seconds, tokens_per_second=figures["tokens_per_step"] / torch_seconds,
        flops_per_second=figures["flops_per_step"] / torch_seconds,
        matmul_flops_per_second=matmul_flops / statistics.median(times["torch_matmul"]),
        share_of_matmul=share("torch"))
    result["torch"] = torch_figures
    result["jax_speedup_over_torch"] = statistics.median(
        t / j for t, j in zip(times["torch"], times["jax"]))
    lines += [f"PyTorch: {torch_seconds:.3f} s/step, "
              f"{torch_figures['tokens_per_second']:.0f} tokens/s, "
              f"{100 * torch_figures['share_of_matmul']:.0f}% of its float32 matmul "
              f"({torch_figures['matmul_flops_per_second'] / 1e9:.1f} GFLOP/s; "
              f"{torch_figures['threads']} threads)",
              f"JAX / PyTorch speed: {result['jax_speedup_over_torch']:.2f}x (median of "
              f"{steps} interleaved rounds)"]
  elif with_torch:
    lines.append("PyTorch: skipped (the reference exists for MoCa CPT recipes, in one process)")
  return result, lines
