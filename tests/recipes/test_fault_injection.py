"""Fault injection on the training path: sources mixing good rows with every kind of bad row the
tests know. MoCa stage 1 and stage 2 (each stopped half way and resumed), VLM2Vec and UNITE
stage 2 run to the end as real subprocesses with finite losses; every bad row is counted in
`bad_records` (carried across the resume by the checkpoint) and named exactly once in the log.

Before: stage 2 stopped with `grad_norm is nan` at step 1 (mean pooling of a masked slot), a
lone surrogate ended stage 1 with a Grain traceback, and `bad_records` restarted at 0 on resume.
"""
import collections
import concurrent.futures
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAGE2_BATCH = 8
STAGE2_ROWS = 48  # 6 global batches: one epoch, each row read exactly once
STAGE1_STEPS = (3, 6)  # stopped after the first, resumed to the second
SKIPPED = re.compile(r"skipped bad record (.*?:\d+): ")


def _write_lines(path, lines):
  """JSONL: dicts JSON-encoded, strings verbatim, bytes as they are."""
  with open(path, "wb") as f:
    for line in lines:
      if isinstance(line, dict):
        line = json.dumps(line)
      f.write((line if isinstance(line, bytes) else line.encode()) + b"\n")


def _images(root):
  """Good images, and a missing, a truncated, a zero-byte and a non-image file."""
  rng = np.random.default_rng(0)
  for name, size in (("good0.png", (56, 56)), ("good1.png", (84, 56)), ("good2.png", (56, 112))):
    Image.fromarray(rng.integers(0, 255, size + (3,), np.uint8)).save(root / name)
  data = (root / "good1.png").read_bytes()
  (root / "truncated.png").write_bytes(data[:len(data) // 3])
  (root / "empty.png").write_bytes(b"")
  (root / "notes.png").write_text("a text file, not an image\n")


# kind -> a stage-1 row that is bad in that way
STAGE1_BAD = {
    "bad JSON": '{"text": "unterminated',
    "missing field": {"caption": "no text field"},
    "missing image": {"text": "a photo", "images": ["gone.png"]},
    "truncated image": {"text": "a photo", "images": ["truncated.png"]},
    "zero-byte image": {"text": "a photo", "images": ["empty.png"]},
    "not an image": {"text": "a photo", "images": ["notes.png"]},
    "lone surrogate": '{"text": "broken \\ud800 text"}',
    "wrong list length": {"text": "<image> and <image>", "images": ["good0.png"]},
    "empty text": {"text": ""},
    "wrong type": {"text": 42},
    "not UTF-8": b'{"text": "caf\xe9"}',
}
# kind -> a stage-2 (MMEB-format) row that is bad in that way
STAGE2_BAD = {
    "bad JSON": '{"qry": "unterminated',
    "missing field": {"pos_text": "a target without a query"},
    "missing image": {"qry": "find it", "pos_text": "<|image_1|> x", "pos_image_path": "gone.png"},
    "truncated image": {"qry": "<|image_1|> what is it", "qry_image_path": "truncated.png",
                        "pos_text": "a thing"},
    "zero-byte image": {"qry": "find it", "pos_text": "<|image_1|>", "pos_image_path": "empty.png"},
    "not an image": {"qry": "find it", "pos_text": "<|image_1|>", "pos_image_path": "notes.png"},
    "lone surrogate": '{"qry": "broken \\ud800 query", "pos_text": "x"}',
    "wrong list length": {"qry": "q", "pos_text": "p", "neg_text": ["a", "b"],
                          "neg_image_path": ["good0.png"]},
    "empty text": {"qry": "", "qry_image_path": "", "pos_text": "p"},
    "wrong type": {"qry": ["not", "a", "string"], "pos_text": "p"},
    "not UTF-8": b'{"qry": "caf\xe9", "pos_text": "p"}',
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """{"stage1": (path, {line: kind}), "stage2": (path, {line: kind})} and the image root."""
  root = tmp_path_factory.mktemp("faulty_data")
  _images(root)
  words = "red blue green small large circle square page table total price".split()
  rng = np.random.default_rng(1)

  def text(n):
    return " ".join(rng.choice(words, n))

  def interleave(good, bad):
    lines, kinds = list(good), {}
    for k, (kind, row) in enumerate(bad.items()):
      position = 3 + k * (len(lines) // len(bad))
      lines.insert(position, row)
    for number, line in enumerate(lines, start=1):
      for kind, row in bad.items():
        if line is row:
          kinds[number] = kind
    return lines, kinds

  stage1_good = [{"text": text(int(rng.integers(5, 30)))} if i % 2 else
                 {"text": f"<image> {text(8)}", "images": [f"good{i % 3}.png"]} for i in range(60)]
  lines, stage1_kinds = interleave(stage1_good, STAGE1_BAD)
  _write_lines(root / "stage1.jsonl", lines)

  stage2_good = []
  for i in range(STAGE2_ROWS - len(STAGE2_BAD)):
    row = {"qry": f"find {text(4)}", "pos_text": f"<|image_1|> {text(3)}",
           "pos_image_path": f"good{i % 3}.png"}
    # Hard negatives: 2 (= K), 1 (fewer than K) or none: the missing ones are masked slots.
    negatives = [text(3) for _ in range(i % 3)]
    if negatives:
      row["neg_text"] = negatives
    stage2_good.append(row)
  lines, stage2_kinds = interleave(stage2_good, STAGE2_BAD)
  assert len(lines) == STAGE2_ROWS
  _write_lines(root / "stage2.jsonl", lines)
  _write_lines(root / "all_bad.jsonl", list(STAGE1_BAD.values()))
  return {"stage1": (str(root / "stage1.jsonl"), stage1_kinds),
          "stage2": (str(root / "stage2.jsonl"), stage2_kinds),
          "all_bad": (str(root / "all_bad.jsonl"), dict(enumerate(STAGE1_BAD, start=1)))}


CONFIG = '''
import importlib.util


def get_config(arg=""):
  spec = importlib.util.spec_from_file_location("recipe", {recipe!r})
  recipe = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(recipe)
  config = recipe.get_config({recipe_arg!r})
  config.input = dict(config.input.to_dict(), sources={sources!r})
  config.tokenizer_dir = {tokenizer!r}
  config.update_from_flattened_dict({overrides!r})
  return config
'''


def _config(tmp_path, name, recipe, recipe_arg, sources, tokenizer, overrides):
  """A config file: the recipe's demo config reading the faulty sources."""
  path = tmp_path / f"{name}.py"
  path.write_text(CONFIG.format(recipe=os.path.join(ROOT, "configs", recipe),
                                recipe_arg=recipe_arg, sources=sources, tokenizer=tokenizer,
                                overrides=overrides))
  return str(path)


def _train(config, workdir, steps):
  """Runs launch/tpu_train.py on 1 CPU device; returns the CompletedProcess."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run([sys.executable, "launch/tpu_train.py", f"--config={config}",
                         f"--workdir={workdir}", f"--config.total_steps={steps}"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _metrics(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


# name -> (recipe, its argument, stage of the data, overrides, steps of each launch)
RUNS = {
    "moca_stage1": ("moca.py", "", "stage1",
                    {"log_every": 1}, STAGE1_STEPS),
    "moca_stage2": ("moca.py", "stage=cl", "stage2",
                    {"log_every": 1, "eval.every": 0, "input.global_batch_size": STAGE2_BATCH},
                    (3, 6)),
    "vlm2vec": ("vlm2vec.py", "", "stage2",
                {"log_every": 1, "eval.every": 0, "input.global_batch_size": STAGE2_BATCH,
                 "objective.grad_cache_chunk": 4}, (6,)),
    "unite_stage2": ("unite.py", "stage=2", "stage2",
                     {"log_every": 1, "eval.every": 0, "input.global_batch_size": STAGE2_BATCH},
                     (6,)),
}
# A stage-1 source whose every row is bad: the run stops with one line naming it.
ALL_BAD = ("moca.py", "", "all_bad", {"log_every": 1}, (5,))


@pytest.fixture(scope="module")
def runs(data, tokenizer_dir, tmp_path_factory):
  """{name: (workdir, [CompletedProcess of each launch])}, two recipes side by side."""
  root = tmp_path_factory.mktemp("faulty_runs")

  def run(name):
    recipe, recipe_arg, stage, overrides, launches = RUNS.get(name, ALL_BAD)
    path, _ = data[stage]
    kind = (dict(kind="jsonl", format="mmeb") if stage == "stage2"
            else dict(kind="jsonl", weight=1.0))
    config = _config(root, name, recipe, recipe_arg, {"faulty": dict(path=path, **kind)},
                     tokenizer_dir, overrides)
    workdir = str(root / name)
    return name, (workdir, [_train(config, workdir, steps) for steps in launches])

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    return dict(pool.map(run, list(RUNS) + ["all_bad"]))


def _expected_stage1_bad(tokenizer_dir, data, steps):
  """The bad records (FILE:LINE, in order) that the first `steps` batches of the stage-1 demo
  pipeline on the faulty source carry: what an uninterrupted run would skip."""
  import jax
  from mmembed_jax.data import bad_records
  from mmembed_jax.data.cpt_pipeline import cpt_dataset
  from mmembed_jax.training.run import build_run
  config = _recipe_module("moca.py").get_config("")
  config.mesh.num_devices = 1  # as the run: one device, whose rows share one patch buffer
  run = build_run(config, jax.devices())
  fields = run.input_spec.pipeline_fields(run.model_config)
  dataset = cpt_dataset([dict(name="faulty", path=data["stage1"][0], kind="jsonl", weight=1.0)],
                        tokenizer_dir, seed=config.seed, process_index=0, process_count=1,
                        **fields)
  iterator, named = iter(dataset), []
  for _ in range(steps):
    batch = next(iterator)
    named += bad_records.split_messages(batch[bad_records.MESSAGES])
  return [line.split(": ", 1)[0] for line in named]


def _recipe_module(name):
  """configs/NAME as a module."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("recipe", os.path.join(ROOT, "configs", name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name", sorted(RUNS))
def test_recipe_runs_to_the_end_counting_and_naming_every_bad_row(name, runs, data,
                                                                   tokenizer_dir):
  workdir, launches = runs[name]
  for launch in launches:
    assert launch.returncode == 0, launch.stderr[-4000:]
    assert "Traceback" not in launch.stderr
  metrics = [m for m in _metrics(workdir) if "loss" in m]
  steps = RUNS[name][4]
  assert [m["step"] for m in metrics] == list(range(1, steps[-1] + 1))  # no step twice
  assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in metrics)
  named = [w for launch in launches for w in SKIPPED.findall(launch.stderr)]
  path, kinds = data[RUNS[name][2]]
  print(f"{name}: losses {[round(m['loss'], 3) for m in metrics]}, bad_records "
        f"{[m['bad_records'] for m in metrics]}, {len(named)} named ({len(set(named))} rows)")
  if RUNS[name][2] == "stage2":
    # One epoch: every row once. The bad ones are counted (across the resume) and named once.
    assert metrics[-1]["bad_records"] == len(kinds) == len(STAGE2_BAD)
    assert sorted(named) == sorted(f"{path}:{line}" for line in kinds)
    assert all(m["valid_pairs"] + m["bad_records"] - previous == STAGE2_BATCH
               for m, previous in zip(metrics, [0] + [m["bad_records"] for m in metrics]))
  else:
    # Several epochs of a small source: what the pipeline itself yields for these steps.
    expected = _expected_stage1_bad(tokenizer_dir, data, steps[-1])
    assert collections.Counter(named) == collections.Counter(expected)
    assert metrics[-1]["bad_records"] == len(expected)
    assert {f"{path}:{line}" for line in kinds} == set(expected)  # every kind was met
  if len(launches) > 1:  # the count went on from the checkpoint instead of restarting at 0
    first = [m for m in metrics if m["step"] <= steps[0]][-1]["bad_records"]
    assert 0 < first < metrics[-1]["bad_records"]
    assert f"resumed from step {steps[0]}" in launches[1].stderr


def test_a_source_of_only_bad_rows_stops_the_run_with_one_line_naming_it(runs, data):
  """Before: `RuntimeError: packing: 1001 bad records in a row` with a Grain traceback."""
  workdir, (launch,) = runs["all_bad"]
  assert launch.returncode == 2, launch.stderr[-4000:]
  assert "Traceback" not in launch.stderr
  errors = [line for line in launch.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, launch.stderr[-4000:]
  assert errors[0].startswith("error: source 'faulty': the last 1000 records read from it were "
                              "all bad (the last: " + data["all_bad"][0] + ":")
