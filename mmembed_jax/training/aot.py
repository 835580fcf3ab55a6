"""Ahead-of-time compilation of a recipe's train step for a TPU topology, on any host.

`compile_train_step(config, devices)` builds exactly what the trainer runs (the run builder,
training/run.py: mesh, rules, model, objective, sharded state, jitted update with donated state)
against abstract arguments (no parameter or batch is ever allocated), compiles it for `devices` (e.g. the compile-only devices
of `topology_devices("v5p-64")`, which needs libtpu) and reports per-chip HBM, FLOPs and the
collectives in the program. An out-of-memory is the compiler's own verdict (`CompileOOM`).
"""
import collections
import glob
import os
import re
import tempfile
import time
from typing import Any, Dict, Optional, Sequence

import jax
import ml_collections

from mmembed_jax.training import flops, hlo_collectives
from mmembed_jax.training.run import build_run

# Nominal HBM per chip (bytes); v5p's is the figure its compiler reports as available.
HBM_BYTES = {"v4": 32 * 2**30, "v5e": 16 * 2**30, "v5p": int(95.74 * 2**30), "v6e": 32 * 2**30}
# TensorCores per chip: "v5p-64" and "v4-64" count cores (32 chips), "v5e-64" counts chips.
_CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
# Chips -> the usual slice shape.
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}
_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


class CompileOOM(RuntimeError):
  """The compiler found that the program does not fit the chip's HBM."""


def topology_name(topology: str) -> tuple[str, str]:
  """('v5p', 'v5p:2x4x4') from 'v5p-64' (cores for v4/v5p, chips for v5e/v6e) or 'v5p:2x4x4'."""
  match = re.fullmatch(r"(v4|v5p|v5e|v6e)([-:])(\S+)", topology)
  if not match:
    raise ValueError(f"topology '{topology}': expected e.g. v5p-64, v5e-16 or v5p:2x4x4")
  chip, sep, size = match.groups()
  if sep == ":":
    return chip, topology
  shapes = _SHAPES_3D if _CORES_PER_CHIP[chip] == 2 else _SHAPES_2D
  chips = int(size) // _CORES_PER_CHIP[chip] if size.isdigit() else -1
  if chips not in shapes:
    raise ValueError(f"topology '{topology}': no standard {chip} slice of {size}; give the shape, "
                     f"e.g. {chip}:{next(iter(shapes.values()))}")
  return chip, f"{chip}:{shapes[chips]}"


def topology_devices(topology: str, num_slices: int = 1) -> list:
  """The compile-only devices of `num_slices` slices of a TPU topology (needs libtpu)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  _, name = topology_name(topology)
  kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
  return list(topologies.get_topology_desc(name, "tpu", **kwargs).devices)


def _collective_counts(hlo: str) -> Dict[str, int]:
  """How many of each collective op the optimised program holds."""
  counts = collections.Counter()
  for op in _COLLECTIVES:
    counts[op] = len(re.findall(rf"\b{op}(?:-start)?\(", hlo))
  return {op: n for op, n in counts.items() if n}


def fsdp_minimum_bytes(layout: Any) -> Dict[str, int]:
  """The FSDP step's collective bytes per chip for this state (hlo_collectives' measure): every
  sharded parameter all-gathered in its stored dtype forward and backward and its gradient
  reduce-scattered; a replicated one's gradient all-reduced. Frozen parameters send no gradient."""
  params = layout.abstract_state.params
  trains = layout.trainable if layout.trainable is not None else jax.tree.map(lambda _: True, params)
  totals = collections.Counter()
  for param, sharding, train in zip(jax.tree.leaves(params), jax.tree.leaves(layout.param_shardings),
                                    jax.tree.leaves(trains)):
    size = param.size * param.dtype.itemsize
    if sharding.is_fully_replicated:
      totals["all-reduce"] += size if train else 0
    else:
      totals["all-gather"] += 2 * size
      totals["reduce-scatter"] += size if train else 0
  return {kind: n for kind, n in totals.items() if n}


def compile_train_step(config: ml_collections.ConfigDict, devices: Sequence[Any]) -> Dict[str, Any]:
  """Compiles the config's train step for `devices`; returns the figures (see the module doc)."""
  run = build_run(config, devices, compile_proof=True)
  layout, model_config = run.layout, run.model_config
  abstract_batch = run.batch_spec()
  step = run.jit_step(abstract_batch)
  start = time.perf_counter()
  with layout.context():
    lowered = step.lower(layout.abstract_state, abstract_batch)
    # The optimised program is read from XLA's dump: as_text() fails on some TPU executables.
    with tempfile.TemporaryDirectory(prefix="mmembed_aot_") as dump:
      try:
        compiled = lowered.compile(compiler_options={"xla_dump_to": dump,
                                                     "xla_dump_hlo_as_text": True})
      except Exception as e:  # pylint: disable=broad-except  # XlaRuntimeError, by message
        if "RESOURCE_EXHAUSTED" in str(e) or "Ran out of memory" in str(e):
          raise CompileOOM(str(e).strip().splitlines()[0][:2000]) from None
        raise
      collectives, moved, kernels = collections.Counter(), collections.Counter(), 0
      for path in glob.glob(os.path.join(dump, "*after_optimizations.txt")):
        with open(path) as f:
          hlo = f.read()
        collectives.update(_collective_counts(hlo))
        moved.update(hlo_collectives.collective_bytes(hlo))
        kernels += len(re.findall(r'custom_call_target="tpu_custom_call"', hlo))
  seconds = time.perf_counter() - start
  devices = list(run.mesh.devices.flat)
  chip = flops.chip_name(devices[0])
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  per_chip = (memory.argument_size_in_bytes + memory.output_size_in_bytes
              + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  analytic = run.step_flops(abstract_batch)
  peak = flops.PEAK_FLOPS.get(chip or "")
  roofline = analytic / (len(devices) * peak) if peak else None
  # The compiler's time estimate counts a scanned layer once (shared/TPU_NOTES.md): only an
  # unrolled program's estimate says anything, and then MFU = time at peak / estimated time.
  estimate = cost.get("optimal_seconds")
  usable = estimate and estimate > 0 and not config.model.scan_layers
  return {
      "chips": len(devices), "chip": chip, "mesh": dict(run.mesh.shape),
      "hbm_bytes_per_chip": int(per_chip), "hbm_capacity_bytes": HBM_BYTES.get(chip or ""),
      "argument_bytes": int(memory.argument_size_in_bytes),
      "output_bytes": int(memory.output_size_in_bytes),
      "alias_bytes": int(memory.alias_size_in_bytes),
      "temp_bytes": int(memory.temp_size_in_bytes),
      "flops": float(cost.get("flops", 0.0)) * len(devices),  # the compiler's, all chips
      "analytic_flops": analytic,
      "compiler_seconds_estimate": estimate,
      "roofline_seconds": roofline,  # analytic FLOPs at the chips' peak: 100% MFU
      "estimated_mfu": roofline / estimate if usable and roofline else None,
      "collectives": dict(collectives),
      "collective_bytes_per_chip": dict(moved),  # training/hlo_collectives.py
      "fsdp_minimum_bytes": fsdp_minimum_bytes(layout),
      "attention_impl": model_config.attention_impl,
      "pallas_kernels": kernels,  # Mosaic custom calls in the program (splash attention on TPU)
      "compile_seconds": seconds,
      "scan_layers": bool(config.model.scan_layers),
      "tokens_per_step": int(sum(r * l for r, l, *_ in flops.sequence_groups(abstract_batch))),
  }


def format_report(report: Dict[str, Any], config_name: Optional[str] = None) -> str:
  """The console summary of a compile report."""
  gib = 2**30
  capacity = report["hbm_capacity_bytes"]
  share = f" of {capacity / gib:.1f} GiB ({100 * report['hbm_bytes_per_chip'] / capacity:.0f}%)" \
      if capacity else ""
  lines = [f"{config_name or 'config'} on {report['chips']} x {report['chip']} chips, mesh "
           f"{report['mesh']}: compiled in {report['compile_seconds']:.0f}s",
           f"HBM per chip: {report['hbm_bytes_per_chip'] / gib:.2f} GiB{share} = arguments "
           f"{report['argument_bytes'] / gib:.2f} + temporaries {report['temp_bytes'] / gib:.2f} "
           f"+ outputs {report['output_bytes'] / gib:.2f} - aliased {report['alias_bytes'] / gib:.2f}",
           f"FLOPs per step: analytic {report['analytic_flops']:.3e}, compiler "
           f"{report['flops']:.3e}" + (" (a scanned layer is counted once)"
                                        if report["scan_layers"] else ""),
           f"collectives: {report['collectives']}",
           "collective GiB per chip per step: " + ", ".join(
               f"{kind} {moved / gib:.2f}" for kind, moved in
               sorted(report["collective_bytes_per_chip"].items())) + "; FSDP minimum: " + ", ".join(
               f"{kind} {moved / gib:.2f}" for kind, moved in report["fsdp_minimum_bytes"].items()),
           f"attention: {report['attention_impl']} ({report['pallas_kernels']} Pallas kernel calls)"]
  if report["roofline_seconds"]:
    estimate = (f"compiler estimate {report['compiler_seconds_estimate']:.3f}s = "
                f"{100 * report['estimated_mfu']:.0f}% MFU" if report["estimated_mfu"] else
                "no compiler estimate (it counts a scanned layer once)")
    lines.append(f"step time at 100% MFU: {report['roofline_seconds']:.3f}s; {estimate}")
  return "\n".join(lines)
