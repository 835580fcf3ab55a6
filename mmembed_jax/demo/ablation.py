"""MoCa's claim in miniature: does continual pre-training (MLM + MAE) before contrastive learning
give better embeddings? Four arms of the demo recipe, each over several seeds:

  cl_bidirectional   stage 2 only, from a random model (bidirectional attention, mean pooling)
  cl_causal          stage 2 only, causal attention with last-token pooling (how causal
                     embedders such as VLM2Vec pool)
  cpt_cl             stage 1 (MLM + MAE), then stage 2 from it
  cpt_no_mae_cl      stage 1 with MLM only (mae_weight 0, images never masked), then stage 2
  coma_cl            CoMa's stage 2 only (causal, compression-token pooling), from a random model
  coma_compression_cl CoMa's stage 1 (compression pre-training on dialogues), then its stage 2

Every run is a real `launch/tpu_train.py` subprocess with its own workdir under the ablation's
directory (WORKDIR/SEED/ARM_stage1, WORKDIR/SEED/ARM); a run whose metrics already hold its last
held-out evaluation is reused, so an interrupted ablation goes on where it stopped. The table
gives each dataset's held-out Precision@1 after stage 2 as mean ± standard deviation over seeds,
with chance alongside.

  python launch/ablate.py --workdir runs/ablation [--seeds 0,1,2] [--arms cl_causal,cpt_cl]
"""
import dataclasses
import json
import os
import subprocess
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

LAUNCHER = "launch/tpu_train.py"  # these paths are relative to the repository root
# recipe: (stage-1 config, stage-2 config)
RECIPES = {"moca": ("configs/moca.py", "configs/moca.py:stage=cl"),
           "coma": ("configs/coma.py:stage=1", "configs/coma.py:stage=2")}
PRECISION = "eval_precision_at_1"


@dataclasses.dataclass(frozen=True)
class Arm:
  """One arm: the stage-1 overrides (None = no stage 1), the stage-2 overrides, the recipe."""
  stage1: Optional[Tuple[str, ...]]
  stage2: Tuple[str, ...] = ()
  recipe: str = "moca"


ARMS = {
    "cl_bidirectional": Arm(None),
    "cl_causal": Arm(None, ("--config.model.attention=causal", "--config.objective.pooling=last")),
    "cpt_cl": Arm(()),
    "cpt_no_mae_cl": Arm(("--config.objective.mae_weight=0.0", "--config.input.image_mask_prob=0.0")),
    "coma_cl": Arm(None, recipe="coma"),
    "coma_compression_cl": Arm((), recipe="coma"),
}
DEFAULT_ARMS = ("cl_bidirectional", "cl_causal", "cpt_cl", "cpt_no_mae_cl")  # MoCa's ablation


@dataclasses.dataclass(frozen=True)
class Job:
  """One training run: its config, workdir and the flags after them; `evaluates` for stage 2."""
  config: str
  workdir: str
  overrides: Tuple[str, ...]
  evaluates: bool = True

  def argv(self) -> List[str]:
    """The command line of this run, from the repository root."""
    return [sys.executable, LAUNCHER, "--config", self.config, "--workdir", self.workdir,
            *self.overrides]


def plan(workdir: str, seeds: Sequence[int], arms: Sequence[str],
         extra: Sequence[str] = ()) -> Dict[Tuple[str, int], List[Job]]:
  """{(arm, seed): [stage-1 job,] stage-2 job}; `extra` flags go to every run."""
  unknown = [a for a in arms if a not in ARMS]
  if unknown or not arms:
    raise ValueError(f"ablation: unknown arms {unknown or arms}; expected some of {sorted(ARMS)}")
  if not seeds or len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
    raise ValueError(f"ablation: seeds {list(seeds)}; expected distinct integers >= 0")
  jobs = {}
  for seed in seeds:
    for name in arms:
      arm, base = ARMS[name], os.path.join(workdir, str(seed), name)
      stage1_config, stage2_config = RECIPES[arm.recipe]
      common = (f"--config.seed={seed}", *extra)
      stage2 = (*common, *arm.stage2)
      runs = []
      if arm.stage1 is not None:
        runs.append(Job(stage1_config, base + "_stage1", (*common, *arm.stage1), False))
        stage2 += (f"--config.init_from={base}_stage1",)
      jobs[name, seed] = runs + [Job(stage2_config, base, stage2)]
  return jobs


def _metrics(workdir: str) -> List[dict]:
  """The run's metrics.jsonl lines (complete lines only); [] when there is none."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.endswith("\n")]


def finished(job: Job) -> bool:
  """Whether the run's last logged step is its last, with a held-out evaluation for stage 2."""
  try:
    with open(os.path.join(job.workdir, "config.json"), encoding="utf-8") as f:
      total = json.load(f)["total_steps"]
  except (OSError, ValueError, KeyError):
    return False
  lines = _metrics(job.workdir)
  wanted = [m for m in lines if PRECISION in m] if job.evaluates else lines
  return bool(wanted) and wanted[-1]["step"] == total


def final_scores(workdir: str) -> Dict[str, float]:
  """{dataset: P@1, "chance/dataset": chance} of a stage-2 run's last held-out evaluation."""
  evaluations = [m for m in _metrics(workdir) if PRECISION in m]
  if not evaluations:
    raise ValueError(f"{workdir}/metrics.jsonl has no held-out evaluation")
  last, out = evaluations[-1], {}
  for key, value in last.items():
    if key.startswith(PRECISION + "/"):
      out[key.split("/", 1)[1]] = value
    elif key.startswith("eval_chance/"):
      out["chance/" + key.split("/", 1)[1]] = value
  return out


def run_all(jobs: Dict[Tuple[str, int], List[Job]], root: str,
            execute: Callable[..., int] = subprocess.call) -> None:
  """Runs every unfinished job in order from the repository `root` (a stage-1 run before its
  stage 2); raises on a failure."""
  for (arm, seed), runs in jobs.items():
    for job in runs:
      if finished(job):
        print(f"[{arm} seed {seed}] {job.workdir}: finished, reused", flush=True)
        continue
      print(f"[{arm} seed {seed}] python {' '.join(job.argv()[1:])}", flush=True)
      status = execute(job.argv(), cwd=root)
      if status != 0:
        raise RuntimeError(f"ablation: {job.workdir} failed (exit {status}); rerun to go on")


def table(scores: Dict[Tuple[str, int], Dict[str, float]]) -> str:
  """Markdown: one row per arm, one column per dataset plus the mean, `mean ± std` over seeds
  (population std), and a chance row; `scores` maps (arm, seed) to `final_scores`."""
  arms = list(dict.fromkeys(arm for arm, _ in scores))
  datasets = sorted(k for k in next(iter(scores.values())) if not k.startswith("chance/"))
  header = ["arm", "seeds"] + datasets + ["mean"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for arm in arms:
    runs = [s for (a, _), s in scores.items() if a == arm]
    columns = [[run[d] for run in runs] for d in datasets]
    columns.append([float(np.mean([run[d] for d in datasets])) for run in runs])
    cells = [f"{np.mean(c):.3f} ± {np.std(c):.3f}" for c in columns]
    lines.append("| " + " | ".join([arm, str(len(runs))] + cells) + " |")
  chance = [float(np.mean([s["chance/" + d] for s in scores.values()])) for d in datasets]
  cells = [f"{c:.3f}" for c in chance + [float(np.mean(chance))]]
  lines.append("| " + " | ".join(["chance", ""] + cells) + " |")
  return "\n".join(lines)


def ablate(workdir: str, seeds: Sequence[int], arms: Sequence[str], root: str,
           extra: Sequence[str] = ()) -> str:
  """Runs (or reuses) every arm and seed from the repository `root`; writes WORKDIR/ablation.md
  and ablation.json; returns the table."""
  workdir = os.path.abspath(workdir)
  jobs = plan(workdir, seeds, arms, extra)
  run_all(jobs, root)
  scores = {key: final_scores(runs[-1].workdir) for key, runs in jobs.items()}
  text = table(scores)
  with open(os.path.join(workdir, "ablation.md"), "w", encoding="utf-8") as f:
    f.write(text + "\n")
  with open(os.path.join(workdir, "ablation.json"), "w", encoding="utf-8") as f:
    json.dump({f"{arm}/{seed}": s for (arm, seed), s in scores.items()}, f, indent=1)
  return text
