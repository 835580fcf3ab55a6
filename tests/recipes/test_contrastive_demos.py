"""The contrastive recipes' demos run end to end as real subprocesses (1 CPU device): MoCa stage 2
lifts held-out Precision@1 far above chance on the text retrieval set; VLM2Vec (GradCache) and UNITE (stage 1 -> stage 2,
MAMCL) train, evaluate, checkpoint and chain through `init_from`."""
import concurrent.futures
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _train(config, workdir, cache, *overrides):
  """Runs launch/tpu_train.py; returns the completed process."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", MMEMBED_DEMO_CACHE=str(cache),
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run(
      [sys.executable, "launch/tpu_train.py", "--config", config, "--workdir", str(workdir),
       *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)


def _metrics(workdir):
  """(training lines, held-out lines) of a run's metrics.jsonl."""
  lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return ([x for x in lines if "loss" in x], [x for x in lines if "eval_precision_at_1" in x])


SHORT_RUN = ("--config.total_steps=4", "--config.log_every=2", "--config.eval.every=4",
               "--config.eval.max_rows_per_dataset=16")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_cache):
  """{name: (workdir, CompletedProcess)}: MoCa stage 2 in one lane; VLM2Vec, then UNITE's stage 1
  and stage 2 from it, in the other; the lanes side by side (one per core)."""
  root = tmp_path_factory.mktemp("contrastive_demos")
  saved = os.environ.get("MMEMBED_DEMO_CACHE")
  os.environ["MMEMBED_DEMO_CACHE"] = str(demo_cache)
  try:  # written once here, not by two runs at the same time
    from mmembed_jax import demo  # pylint: disable=g-import-not-at-top
    demo.tokenizer_dir()
    for kind in ("contrastive_pairs", "held_out_pairs"):
      demo.sources(kind, "demo+video")
  finally:
    if saved is None:
      os.environ.pop("MMEMBED_DEMO_CACHE")
    else:
      os.environ["MMEMBED_DEMO_CACHE"] = saved
  lanes = [[("moca", "configs/moca.py:stage=cl",
             ("--config.total_steps=60", "--config.eval.every=60"))],
           [("vlm2vec", "configs/vlm2vec.py", SHORT_RUN),
            ("unite1", "configs/unite.py:stage=1", SHORT_RUN),
            ("unite2", "configs/unite.py:stage=2",
             SHORT_RUN + (f"--config.init_from={root / 'unite1'}",))]]

  def lane(jobs):
    return [(name, (root / name, _train(config, root / name, demo_cache, *extra)))
            for name, config, extra in jobs]

  with concurrent.futures.ThreadPoolExecutor(len(lanes)) as pool:
    return dict(item for done in pool.map(lane, lanes) for item in done)


def test_moca_stage2_demo_lifts_held_out_precision(runs):
  workdir, run = runs["moca"]
  assert run.returncode == 0, run.stderr[-3000:]
  train, held_out = _metrics(workdir)
  assert [x["step"] for x in held_out] == [0, 60]
  before, after = held_out[0], held_out[-1]
  text = "eval_precision_at_1/question_passage"
  print(f"held-out P@1 mean {before['eval_precision_at_1']:.3f} -> {after['eval_precision_at_1']:.3f} "
        f"(chance {after['eval_chance']:.3f}); question_passage {before[text]:.3f} -> "
        f"{after[text]:.3f} (chance {after['eval_chance/question_passage']:.3f})")
  assert after[text] > 5 * after["eval_chance/question_passage"]
  assert after[text] > before[text] + 0.1
  assert after["eval_precision_at_1"] > 2 * after["eval_chance"]
  assert all(x["bad_records"] == 0 and x["valid_pairs"] == 32 for x in train)


def test_vlm2vec_and_unite_demos_train_and_chain(runs):
  """VLM2Vec's demo (GradCache, last-token, no negatives) and UNITE's two stages (MAMCL on the
  demo's pairs and caption <-> clip pairs, stage 2 from the stage-1 run) each train a few steps
  with finite losses and held-out P@1, the video sets' included. (Video P@1 after the demo's 300
  steps, over 3 seeds: README, contrastive demos.)"""
  for name in ("vlm2vec", "unite1", "unite2"):
    workdir, run = runs[name]
    assert run.returncode == 0, (name, run.stderr[-3000:])
    train, held_out = _metrics(workdir)
    assert [x["step"] for x in train] == [1, 2, 4], name
    assert all(math.isfinite(x["loss"]) and x["loss"] > 0 for x in train), name
    assert [x["step"] for x in held_out] == [0, 4], name
    assert "4" in os.listdir(workdir / "checkpoints"), name
    if name.startswith("unite"):
      assert all(0 <= x[f"eval_precision_at_1/{s}"] <= 1 for x in held_out
                 for s in ("caption_video", "video_caption")), name
      assert all(x["bad_records"] == 0 for x in train), name
  config = json.load(open(runs["unite2"][0] / "config.json"))
  assert config["objective"]["modality_mask"] and not config["objective"]["symmetric"]
