"""Compile proofs for real TPU topologies on this CPU host (libtpu's compile-only devices): the
trainer's own step compiles for a v5p slice and a v5e slice, reports per-chip HBM and FLOPs,
and an out-of-memory comes back as the compiler's verdict. Skipped where libtpu is absent."""
import importlib.util
import os
import subprocess
import sys

import pytest

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # the test process and the CLI's
pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="needs libtpu (pip install -e '.[tpu]')")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(path, arg=""):
  """get_config(arg) of a recipe file."""
  spec = importlib.util.spec_from_file_location("recipe", os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_moca_stage1_compiles_for_a_v5p_slice_with_fsdp():
  from mmembed_jax.training import aot
  config = _config("configs/moca.py")
  config.mesh.ici = dict(data=2, fsdp=2, tensor=1)
  report = aot.compile_train_step(config, aot.topology_devices("v5p-8"))
  print(aot.format_report(report, "moca demo"))
  assert report["chips"] == 4 and report["chip"] == "v5p"
  assert report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
  assert 0 < report["hbm_bytes_per_chip"] < 0.9 * report["hbm_capacity_bytes"]
  assert report["analytic_flops"] > 0 and report["flops"] > 0
  assert report["attention_impl"] == "splash" and report["pallas_kernels"] > 0
  assert 0 < report["estimated_mfu"] < 1  # the demo is unrolled: the compiler's estimate counts
  assert report["collectives"].get("all-gather") and (report["collectives"].get("reduce-scatter")
                                                      or report["collectives"].get("all-reduce"))
  # Bytes moved, next to the FSDP minimum of this state (sharded parameters gathered forward
  # and backward, their gradients reduce-scattered, replicated ones' gradients all-reduced).
  moved, minimum = report["collective_bytes_per_chip"], report["fsdp_minimum_bytes"]
  assert minimum["all-gather"] == 2 * minimum["reduce-scatter"] > 0 and moved["all-gather"] > 0
  assert "FSDP minimum" in aot.format_report(report)


def test_contrastive_step_compiles_for_v5e_and_oom_is_reported():
  from mmembed_jax.training import aot
  config = _config("configs/vlm2vec.py")
  devices = aot.topology_devices("v5e:2x2")
  report = aot.compile_train_step(config, devices)
  assert report["chip"] == "v5e" and 0 < report["hbm_bytes_per_chip"] < report["hbm_capacity_bytes"]
  # The same step with images of 16k patches per side, 4096 rows and no GradCache: 16 GB chips
  # cannot hold it, and the compiler says so.
  config.input.update(global_batch_size=4096, query_max_patches=16384, target_max_patches=16384)
  config.objective.grad_cache_chunk = 0
  with pytest.raises(aot.CompileOOM, match="HBM"):
    aot.compile_train_step(config, devices)


def test_cli_reports_a_bad_topology_in_one_line(tmp_path):
  done = subprocess.run(
      [sys.executable, "launch/aot_compile.py", "--config=configs/vlm2vec.py", "--topology=v5p-48"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="", ALLOW_MULTIPLE_LIBTPU_LOAD="1"))
  assert done.returncode == 2
  assert "error: topology 'v5p-48': no standard v5p slice" in done.stderr


def test_topology_names():
  from mmembed_jax.training import aot
  assert aot.topology_name("v5p-64") == ("v5p", "v5p:2x4x4")  # 64 TensorCores = 32 chips
  assert aot.topology_name("v5e-64") == ("v5e", "v5e:8x8")
  assert aot.topology_name("v5p:4x4x4") == ("v5p", "v5p:4x4x4")
  with pytest.raises(ValueError, match="no standard v5p slice"):
    aot.topology_name("v5p-48")
