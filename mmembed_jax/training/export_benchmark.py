r"""Wall time and peak host memory of launch/export_to_pytorch.py on a random run of a real size.

  python launch/benchmark_export.py --preset qwen2_vl_2b [--workdir /tmp/bench_run] [--keep]

Builds (or reuses) a training-run workdir holding random parameters of the preset in bfloat16,
initialised sharded over all devices and saved with Orbax as the trainer saves them, then runs
the export CLI in a fresh subprocess and reports its wall time and peak RSS next to the bytes of
the parameters: an export that held the model twice would peak above twice that.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_random_run(workdir: str, preset: str, dtype: str) -> int:
  """Writes config.json and a step-1 checkpoint of random params; returns the parameter bytes."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from mmembed_jax.models.embedder import boxed_param_shapes  # pylint: disable=g-import-not-at-top
  from mmembed_jax.parallel import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from mmembed_jax import demo  # pylint: disable=g-import-not-at-top
  from mmembed_jax.training import lineage, trained_model  # pylint: disable=g-import-not-at-top
  from mmembed_jax.training import run as run_lib  # pylint: disable=g-import-not-at-top
  from mmembed_jax.training.config import default_config  # pylint: disable=g-import-not-at-top
  config = default_config()
  config.objective = dict(name="contrastive", pooling="last")
  config.model.update(preset=preset, param_dtype=dtype, dtype=dtype)
  resolved = lineage.Resolved(tokenizer_dir=demo.tokenizer_dir())
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(dict(json.loads(config.to_json_best_effort()),
                   **{lineage.RESOLVED: resolved.to_json()}), f, indent=2)
  model_config = run_lib.model_config(config, resolved)
  mesh = trained_model.export_mesh()
  boxed = boxed_param_shapes(model_config)
  shardings = sharding_lib.logical_shardings(boxed, mesh, sharding_lib.DEFAULT_RULES)
  abstract = nn.meta.unbox(boxed)
  # One tensor at a time, each created on its shards (a whole-model init would need several
  # times the model in temporaries); the values only need to be random, not a trained model's.
  makers = {}

  def random_leaf(index, leaf, sharding):
    key = (leaf.shape, leaf.dtype, sharding)
    if key not in makers:
      makers[key] = jax.jit(lambda k: (0.02 * jax.random.normal(k, leaf.shape)).astype(leaf.dtype),
                            out_shardings=sharding)
    return makers[key](jax.random.fold_in(jax.random.key(0), index))

  leaves, treedef = jax.tree.flatten(abstract)
  params = jax.tree.unflatten(treedef, [
      random_leaf(i, leaf, sharding)
      for i, (leaf, sharding) in enumerate(zip(leaves, treedef.flatten_up_to(shardings)))])
  with ocp.CheckpointManager(os.path.join(workdir, trained_model.CHECKPOINTS)) as manager:
    manager.save(1, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
    manager.wait_until_finished()
  return sum(x.nbytes for x in jax.tree.leaves(params))


def run(preset: str, workdir: str, keep: bool, dtype: str) -> int:
  """Builds the run (in a child process), exports it (in another), prints the figures; returns
  the exit status."""
  workdir = workdir or tempfile.mkdtemp(prefix="mmembed_bench_export_")
  record = os.path.join(workdir, "benchmark_build.json")
  if not os.path.exists(record):
    start = time.perf_counter()
    code = ("import json, sys; from mmembed_jax.training import export_benchmark as b; "
            "print(json.dumps(b.build_random_run(*sys.argv[1:])))")
    done = subprocess.run([sys.executable, "-c", code, workdir, preset, dtype], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    if done.returncode:
      print(done.stderr[-3000:], file=sys.stderr)
      return 1
    with open(record, "w") as f:
      json.dump({"param_bytes": json.loads(done.stdout.strip().splitlines()[-1]),
                 "build_seconds": time.perf_counter() - start}, f)
  with open(record) as f:
    built = json.load(f)
  out = os.path.join(workdir, "exported")
  start = time.perf_counter()
  done = subprocess.run([sys.executable, "launch/export_to_pytorch.py", f"--checkpoint={workdir}",
                         f"--out={out}", "--overwrite"], cwd=ROOT, capture_output=True, text=True,
                        check=False)
  seconds = time.perf_counter() - start
  if done.returncode:
    print(done.stderr[-3000:], file=sys.stderr)
    return 1
  print(done.stdout.strip())
  written = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)
                if f.endswith(".safetensors"))
  print(json.dumps({"preset": preset, "dtype": dtype, "param_gb": built["param_bytes"] / 1e9,
                    "safetensors_gb": written / 1e9, "export_seconds_with_startup": seconds}))
  if not keep:
    shutil.rmtree(workdir, ignore_errors=True)
  return 0
