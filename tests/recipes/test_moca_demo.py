"""The main job: the MoCa stage-1 demo trains (MLM and MAE losses fall), logs, checkpoints, resumes."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _train(workdir, cache, steps):
  env = dict(os.environ, JAX_PLATFORMS="cpu", MMEMBED_DEMO_CACHE=str(cache),
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run(
      [sys.executable, "launch/tpu_train.py", "--config", "configs/moca.py", "--workdir",
       str(workdir), f"--config.total_steps={steps}", "--config.log_every=10",
       "--config.checkpoint.every=30"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_moca_demo_losses_fall_and_rerun_resumes(tmp_path, demo_cache):
  workdir, cache = tmp_path / "run", demo_cache
  first = _train(workdir, cache, 80)
  assert first.returncode == 0, first.stderr[-3000:]
  lines = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  start, end = lines[0], lines[-1]
  assert end["step"] == 80
  assert end["mlm_loss"] < start["mlm_loss"] - 0.5, (start["mlm_loss"], end["mlm_loss"])
  assert end["mae_loss"] < 0.5 * start["mae_loss"], (start["mae_loss"], end["mae_loss"])
  assert end["bad_records"] == 0
  assert any(name.startswith("events") for name in os.listdir(workdir / "tensorboard"))
  assert "80" in os.listdir(workdir / "checkpoints")
  # What a newcomer sees: MLM and MAE losses on the progress bar, then a summary with the next
  # commands; the lineage resolved at the start is recorded for embedding and export.
  assert "mlm_loss=" in first.stderr and "mae_loss=" in first.stderr
  summary = first.stdout[first.stdout.index("Done: step 80"):]
  assert f"mlm_loss {start['mlm_loss']:.4g} -> {end['mlm_loss']:.4g}" in summary
  assert f"mae_loss {start['mae_loss']:.4g} -> {end['mae_loss']:.4g}" in summary
  for line in (f"{workdir}/checkpoints (latest: step 80)", f"{workdir}/metrics.jsonl",
               f"tensorboard --logdir {workdir}/tensorboard",
               f"--config configs/moca.py:stage=cl --workdir {workdir}_cl --config.init_from={workdir}",
               f"launch/evaluate.py --model {workdir}", f"--checkpoint {workdir} --out {workdir}_hf"):
    assert line in summary, (line, summary)
  resolved = json.loads((workdir / "config.json").read_text())["resolved"]
  assert resolved == {"source_hf_dir": "", "init_from_chain": [],
                      "tokenizer_dir": str(cache / "tokenizer")}

  again = _train(workdir, cache, 90)  # same workdir: resumes at 80, trains 10 more
  assert again.returncode == 0, again.stderr[-3000:]
  steps = [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl")]
  assert steps[len(lines):] == [90]
