r"""Wall time and peak host memory of `import_hf` on a random ~1.2B-parameter Qwen2.5-VL checkpoint.

  python launch/benchmark_import.py [--out /tmp/bench_ckpt] [--keep]   # calls run()

Writes a hub-style checkpoint with numpy alone (no torch model): random bf16 tensors of the
shapes `mapping.tensor_maps` expects, pre-4.52 tensor names as on the hub, ~2 GB shards with
an index, config.json. Then imports it in a fresh subprocess per setting and reports wall
time and peak RSS (`ru_maxrss`, which counts resident mmap'd file pages too), next to the
bytes of the imported params and of the largest tensor. A sampler thread also records the
peaks of anonymous (RssAnon) and file-backed (RssFile) resident memory separately.
"""
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import List

import ml_dtypes
import numpy as np
import safetensors.numpy

from mmembed_jax.convert.mapping import tensor_maps
from mmembed_jax.models.config import ModelConfig, TextConfig, VisionConfig, to_hf_config_dict

VOCAB = 151936
GB = 1e9


def model_config(text_layers: int, vision_depth: int) -> ModelConfig:
  """A Qwen2.5-VL ModelConfig: 3B-like LLM width, real vision width, fewer layers/blocks."""
  vision = VisionConfig(depth=vision_depth, hidden_size=1280, num_heads=16, intermediate_size=3420,
                        out_hidden_size=2048, hidden_act="silu", window_size=112,
                        fullatt_block_indexes=(vision_depth - 1,))
  text = TextConfig(vocab_size=VOCAB, hidden_size=2048, intermediate_size=11008,
                    num_layers=text_layers, num_heads=16, num_kv_heads=2,
                    mrope_section=(16, 24, 24))
  return ModelConfig(family="qwen2_5_vl", vision=vision, text=text, tie_word_embeddings=False)


def hub_name(name: str) -> str:
  """The pre-4.52 name the hub's Qwen2.5-VL checkpoints use (`model.layers`, `visual.`)."""
  if name.startswith("model.visual."):
    return name[len("model."):]
  if name.startswith("model.language_model."):
    return "model." + name[len("model.language_model."):]
  return name


def write_checkpoint(out_dir: str, config, shard_bytes: float) -> None:
  """Random bf16 safetensors (sharded, with index) and config.json; one shard in RAM at a time."""
  maps = list(tensor_maps(config))
  shards, current, size = [], [], 0
  for m in maps:
    nbytes = int(np.prod(m.hf_shape)) * 2
    if current and size + nbytes > shard_bytes:
      shards.append(current)
      current, size = [], 0
    current.append(m)
    size += nbytes
  shards.append(current)
  rng = np.random.default_rng(0)
  weight_map, total = {}, 0
  for number, shard in enumerate(shards, start=1):
    name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
    tensors = {}
    for m in shard:
      values = np.empty(m.hf_shape, ml_dtypes.bfloat16)
      flat = values.reshape(-1)
      for start in range(0, flat.size, 1 << 26):  # 64M values (256 MB of float32) at a time
        chunk = rng.standard_normal(min(1 << 26, flat.size - start), dtype=np.float32)
        flat[start:start + chunk.size] = chunk * 0.02
      tensors[hub_name(m.hf_name)] = values
      weight_map[hub_name(m.hf_name)] = name
      total += values.nbytes
    safetensors.numpy.save_file(tensors, os.path.join(out_dir, name), metadata={"format": "pt"})
    del tensors
    print(f"  wrote {name}", flush=True)
  with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(to_hf_config_dict(config, dtype="bfloat16"), f, indent=2)


def _status_kib(fields=("VmRSS", "RssAnon", "RssFile")) -> dict:
  """Current resident memory counters of this process from /proc/self/status, in KiB."""
  out = {}
  with open("/proc/self/status") as f:
    for line in f:
      key = line.split(":")[0]
      if key in fields:
        out[key] = int(line.split()[1])
  return out


def measure(model_dir: str, mode: str) -> dict:
  """Imports the checkpoint once under `mode`; returns times and memory peaks in bytes."""
  import jax  # pylint: disable=g-import-not-at-top
  from mmembed_jax.convert import hf_import  # pylint: disable=g-import-not-at-top
  jax.devices()
  hf_import.model_config(model_dir)  # imports transformers: part of the baseline, not the import
  parts = mode.split("_")
  dtype = {"bf16": "bfloat16", "fp32": "float32"}[parts[0]]
  put = None
  if "put" in parts:
    put = lambda path, array: jax.device_put(array)
  elif "drop" in parts:
    put = lambda path, array: jax.ShapeDtypeStruct(array.shape, array.dtype)
  baseline = _status_kib()
  peaks = dict(baseline)
  done = threading.Event()

  def sample():
    while not done.is_set():
      for key, value in _status_kib().items():
        peaks[key] = max(peaks[key], value)
      time.sleep(0.002)

  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()
  start = time.perf_counter()
  config, params = hf_import.import_hf(model_dir, param_dtype=dtype, put=put,
                                       scan_layers="scan" in parts)
  jax.block_until_ready([x for x in jax.tree_util.tree_leaves(params) if isinstance(x, jax.Array)])
  seconds = time.perf_counter() - start
  done.set()
  sampler.join()
  sizes = [int(np.prod(m.hf_shape)) for m in tensor_maps(config)]
  itemsize = jax.numpy.dtype(config.param_dtype).itemsize
  return {
      "mode": mode, "seconds": seconds,
      "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      "baseline_rss": baseline["VmRSS"] * 1024,
      "peak_anon": peaks["RssAnon"] * 1024, "baseline_anon": baseline["RssAnon"] * 1024,
      "peak_file": peaks["RssFile"] * 1024, "baseline_file": baseline["RssFile"] * 1024,
      "params": sum(sizes),
      "param_bytes": sum(sizes) * itemsize,
      "held_bytes": 0 if "drop" in parts else sum(sizes) * itemsize,  # params left on the host
      "largest_bytes": max(sizes) * itemsize,  # one converted tensor (lm_head / embed_tokens)
  }


def _run_child(model_dir: str, mode: str) -> dict:
  """Runs `measure` in a fresh Python process (so peaks are this import's alone)."""
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  code = ("import json, sys; from mmembed_jax.convert import import_benchmark as b; "
          "print(json.dumps(b.measure(sys.argv[1], sys.argv[2])))")
  result = subprocess.run([sys.executable, "-c", code, model_dir, mode], capture_output=True,
                          text=True, env=env, check=False)
  if result.returncode:
    raise RuntimeError(f"benchmark child for mode {mode} failed:\n{result.stderr[-4000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def _disk_bytes(model_dir: str) -> int:
  """Bytes of the checkpoint's files on disk."""
  return sum(os.path.getsize(os.path.join(model_dir, name)) for name in os.listdir(model_dir))


def run(out: str, keep: bool, text_layers: int, vision_depth: int, shard_gb: float,
        modes: List[str]) -> None:
  """Builds the checkpoint in `out` (a new temporary directory if empty) unless it is there,
  measures every mode in its own process, prints the table."""
  out = out or tempfile.mkdtemp(prefix="mmembed_bench_")
  os.makedirs(out, exist_ok=True)
  existed = os.path.exists(os.path.join(out, "model.safetensors.index.json"))
  config = model_config(text_layers, vision_depth)
  if existed:
    print(f"reusing the checkpoint in {out}")
  else:
    print(f"writing a random checkpoint to {out}", flush=True)
    start = time.perf_counter()
    write_checkpoint(out, config, shard_gb * GB)
    print(f"  {time.perf_counter() - start:.0f}s")
  files = sorted(name for name in os.listdir(out) if name.endswith(".safetensors"))
  largest_shard = max(os.path.getsize(os.path.join(out, name)) for name in files)
  disk = _disk_bytes(out)
  try:
    results = [_run_child(out, mode) for mode in modes]
  finally:
    if not keep and not existed:
      shutil.rmtree(out)
  params = results[0]["params"]
  print(f"\ncheckpoint: {params / 1e9:.3f}B params, {disk / GB:.2f} GB on disk in {len(files)} "
        f"shards (largest {largest_shard / GB:.2f} GB), bf16; {os.cpu_count()} CPUs")
  print("memory in GB (1e9 bytes); 'held': final params on the host (0 with _drop); "
        "'over' = peak - baseline - held;\n"
        "anon = RssAnon, mmap = RssFile (resident file pages) above the baseline, sampled\n")
  header = (f"{'mode':<15}{'time s':>7}{'params':>8}{'held':>6}{'baseline':>10}{'ru_maxrss':>11}"
            f"{'over':>7}{'anon peak':>11}{'anon over':>11}{'mmap peak':>11}{'largest':>9}")
  print(header)
  print("-" * len(header))
  for r in results:
    over = r["ru_maxrss"] - r["baseline_rss"] - r["held_bytes"]
    anon_over = r["peak_anon"] - r["baseline_anon"] - r["held_bytes"]
    print(f"{r['mode']:<15}{r['seconds']:>7.1f}{r['param_bytes'] / GB:>8.2f}"
          f"{r['held_bytes'] / GB:>6.2f}{r['baseline_rss'] / GB:>10.2f}"
          f"{r['ru_maxrss'] / GB:>11.2f}{over / GB:>7.2f}"
          f"{r['peak_anon'] / GB:>11.2f}{anon_over / GB:>11.2f}"
          f"{(r['peak_file'] - r['baseline_file']) / GB:>11.2f}{r['largest_bytes'] / GB:>9.2f}")
  if keep or existed:
    print(f"\nkept the checkpoint in {out}")


