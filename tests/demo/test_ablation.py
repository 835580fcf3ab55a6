"""The demo ablation (mmembed_jax.demo.ablation): its plan of runs, its reuse of finished runs and
its table, without training (launch/ablate.py trains; its numbers are in the README)."""
import json
import os
import sys

import numpy as np
import pytest

from mmembed_jax.demo import ablation

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import coma  # noqa: E402  pylint: disable=wrong-import-position
import moca  # noqa: E402  pylint: disable=wrong-import-position


def test_plan_chains_stage1_into_stage2_per_seed():
  jobs = ablation.plan("/runs/ab", [0, 3], list(ablation.ARMS), extra=["--config.total_steps=5"])
  assert sorted(jobs) == sorted((arm, seed) for arm in ablation.ARMS for seed in (0, 3))
  assert [j.workdir for j in jobs["cl_bidirectional", 3]] == ["/runs/ab/3/cl_bidirectional"]
  stage1, stage2 = jobs["cpt_no_mae_cl", 3]
  assert (stage1.config, stage1.workdir) == ("configs/moca.py", "/runs/ab/3/cpt_no_mae_cl_stage1")
  assert "--config.objective.mae_weight=0.0" in stage1.overrides
  assert stage2.config == "configs/moca.py:stage=cl"
  assert "--config.init_from=/runs/ab/3/cpt_no_mae_cl_stage1" in stage2.overrides
  assert "--config.objective.mae_weight=0.0" not in stage2.overrides
  for runs in jobs.values():
    for job in runs:
      assert "--config.seed=3" in job.overrides or "--config.seed=0" in job.overrides
      assert "--config.total_steps=5" in job.overrides
  assert "--config.model.attention=causal" in jobs["cl_causal", 0][0].overrides
  stage1, stage2 = jobs["coma_compression_cl", 0]
  assert (stage1.config, stage1.evaluates) == ("configs/coma.py:stage=1", False)
  assert (stage2.config, stage2.evaluates) == ("configs/coma.py:stage=2", True)
  assert [j.config for j in jobs["coma_cl", 0]] == ["configs/coma.py:stage=2"]
  with pytest.raises(ValueError, match="unknown arms"):
    ablation.plan("/runs/ab", [0], ["cpt_cl", "no_such_arm"])
  with pytest.raises(ValueError, match="distinct"):
    ablation.plan("/runs/ab", [1, 1], ["cpt_cl"])


def test_every_override_names_a_field_of_its_recipe():
  """A misspelt override would fail each run only after the ablation started."""
  configs = {"configs/moca.py": moca.get_config(""), "configs/moca.py:stage=cl": moca.get_config("stage=cl"),
             "configs/coma.py:stage=1": coma.get_config("stage=1"),
             "configs/coma.py:stage=2": coma.get_config("stage=2")}
  for runs in ablation.plan("/runs/ab", [0], list(ablation.ARMS)).values():
    for job in runs:
      for flag in job.overrides:
        *path, last = flag[len("--config."):].split("=", 1)[0].split(".")
        section = configs[job.config]
        for name in path:
          section = section[name]
        assert last in section, (job.config, flag)


def _write_run(workdir, total, evaluations):
  """A finished-looking run: config.json and metrics.jsonl with training lines and evaluations."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump({"total_steps": total}, f)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for step, scores in evaluations:
      f.write(json.dumps({"step": step, "loss": 1.0}) + "\n")
      if scores is not None:
        line = {"step": step, "eval_precision_at_1": float(np.mean(list(scores.values())))}
        line.update({f"eval_precision_at_1/{k}": v for k, v in scores.items()})
        line.update({f"eval_chance/{k}": 0.25 if k == "a" else 0.5 for k in scores})
        f.write(json.dumps(line) + "\n")


def test_finished_runs_are_reused_and_tabulated(tmp_path, capsys):
  jobs = ablation.plan(str(tmp_path), [0, 1], ["cl_bidirectional", "cpt_cl"])
  scores = {("cl_bidirectional", 0): {"a": 0.5, "b": 0.75}, ("cl_bidirectional", 1): {"a": 0.25, "b": 0.75},
            ("cpt_cl", 0): {"a": 1.0, "b": 0.5}, ("cpt_cl", 1): {"a": 0.5, "b": 0.5}}
  for key, runs in jobs.items():
    for job in runs[:-1]:
      _write_run(job.workdir, 3, [(3, None)])
    _write_run(runs[-1].workdir, 4, [(0, {"a": 0.0, "b": 0.0}), (4, scores[key])])
  half_done = ablation.Job("configs/moca.py:stage=cl", str(tmp_path / "half"), ())
  _write_run(half_done.workdir, 4, [(0, {"a": 0.0, "b": 0.0}), (2, None)])
  assert not ablation.finished(half_done)
  executed = []
  ablation.run_all(jobs, ROOT, execute=lambda argv, cwd: executed.append(argv) or 0)
  assert executed == []  # everything finished: nothing is retrained
  assert "finished, reused" in capsys.readouterr().out
  ablation.run_all({("x", 0): [half_done]}, ROOT, execute=lambda argv, cwd: executed.append(argv) or 0)
  assert executed[0][1:5] == ["launch/tpu_train.py", "--config", "configs/moca.py:stage=cl", "--workdir"]
  with pytest.raises(RuntimeError, match="half failed"):
    ablation.run_all({("x", 0): [half_done]}, ROOT, execute=lambda argv, cwd: 1)

  table = ablation.table({key: ablation.final_scores(runs[-1].workdir) for key, runs in jobs.items()})
  lines = table.splitlines()
  assert lines[0] == "| arm | seeds | a | b | mean |"
  # cl_bidirectional: a = 0.375 ± 0.125, b = 0.75 ± 0, per-seed means 0.625 and 0.5.
  assert lines[2] == "| cl_bidirectional | 2 | 0.375 ± 0.125 | 0.750 ± 0.000 | 0.562 ± 0.062 |"
  assert lines[3] == "| cpt_cl | 2 | 0.750 ± 0.250 | 0.500 ± 0.000 | 0.625 ± 0.125 |"
  assert lines[4] == "| chance |  | 0.250 | 0.500 | 0.375 |"
