"""What a newcomer sees when a training run ends: what it did, where it is, what to run next."""
import json
import os
from typing import List, Optional


def _losses(metrics: List[dict]) -> str:
  """"loss 8.33 -> 4.12, mlm_loss ..." from the first and last logged training lines."""
  training = [m for m in metrics if "loss" in m]
  if not training:
    return "no training step logged"
  first, last = training[0], training[-1]
  keys = ["loss"] + sorted(k for k in last if k.endswith("_loss"))
  return ", ".join(f"{k} {first[k]:.4g} -> {last[k]:.4g}" for k in keys if k in first)


def run_summary(workdir: str, config_spec: Optional[str] = None) -> str:
  """A few lines: steps and losses (first -> last), where the checkpoints, metrics and
  TensorBoard logs are, and the commands that go on from this run."""
  path = os.path.join(workdir, "metrics.jsonl")
  metrics = []
  if os.path.exists(path):
    with open(path) as f:
      metrics = [json.loads(line) for line in f if line.endswith("\n")]
  steps = [m["step"] for m in metrics if "loss" in m]
  checkpoints = os.path.join(workdir, "checkpoints")
  saved = sorted(int(n) for n in os.listdir(checkpoints) if n.isdigit()) if os.path.isdir(
      checkpoints) else []
  bad = next((m["bad_records"] for m in reversed(metrics) if "bad_records" in m), 0)
  lines = [f"Done: step {steps[-1] if steps else 0}; {_losses(metrics)}"
           + (f"; {bad:.0f} bad records skipped (named in the log)" if bad else ""),
           f"  checkpoints   {checkpoints} (latest: step {saved[-1] if saved else 'none'})",
           f"  metrics       {path}",
           f"  TensorBoard   tensorboard --logdir {os.path.join(workdir, 'tensorboard')}",
           "Next:"]
  name = workdir.rstrip("/")
  if config_spec and config_spec.startswith("configs/moca.py") and "stage=cl" not in config_spec:
    size = [a for a in config_spec.partition(":")[2].split(",") if a.startswith("size=")]
    arg = ",".join(size + ["stage=cl"])
    lines.append(f"  stage 2 from this run:  python launch/tpu_train.py --config "
                 f"configs/moca.py:{arg} --workdir {name}_cl --config.init_from={name}")
  else:
    lines.append(f"  train on from this run: python launch/tpu_train.py --config CONFIG "
                 f"--workdir NEW_WORKDIR --config.init_from={name}")
  lines += [f"  evaluate:               python launch/evaluate.py --model {name} --mmeb DIR "
            f"[--vidore DIR]",
            f"  export to PyTorch:      python launch/export_to_pytorch.py --checkpoint {name} "
            f"--out {name}_hf"]
  return "\n".join(lines)
