"""Train -> evaluate -> export -> PyTorch: a real run (launch/tpu_train.py, MoCa stage-2 demo, 2
steps) is embedded from its workdir by the JAX evaluators on the sample sets, exported with
launch/export_to_pytorch.py, and embedded again by transformers: the embeddings agree to 1e-4
(fp32) and so do the Precision@1 scores, dataset by dataset."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mmembed_jax.demo.eval_sets import write_demo_mmeb, write_demo_mmeb_v2, write_demo_vidore
from mmembed_jax.embedding import JaxEmbedder, embed_file
from mmembed_jax.evaluation import mmeb, mmeb_v2, vidore
from mmembed_jax.training import trained_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _start(script, *args, devices=8, cache=None):
  """Starts launch/SCRIPT with args on `devices` fake CPU devices (Gloo collectives)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  if cache:
    env["MMEMBED_DEMO_CACHE"] = str(cache)
  return subprocess.Popen([sys.executable, os.path.join("launch", script), *map(str, args)],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _run(script, *args, devices=8, cache=None):
  """Runs launch/SCRIPT to completion; returns (returncode, stdout, stderr)."""
  process = _start(script, *args, devices=devices, cache=cache)
  stdout, stderr = process.communicate(timeout=900)
  return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, demo_cache):
  """A 2-step MoCa stage-2 demo run (bidirectional, mean pooling), checkpoints at steps 1 and 2.
  Its config.json records the demo tokenizer it resolved (in the shared demo cache), so this
  process finds it without setting MMEMBED_DEMO_CACHE."""
  root = tmp_path_factory.mktemp("round_trip")
  workdir = root / "run"
  cache = demo_cache
  done = _run("tpu_train.py", "--config=configs/moca.py:stage=cl", f"--workdir={workdir}",
              "--config.total_steps=2", "--config.eval.every=0", "--config.checkpoint.every=1",
              "--config.input.global_batch_size=8", devices=1, cache=cache)
  assert done.returncode == 0, done.stderr[-3000:]
  return str(workdir)


@pytest.fixture(scope="module")
def sample_sets(tmp_path_factory):
  """The sample MMEB, ViDoRe and MMEB-V2 sets (directories)."""
  root = tmp_path_factory.mktemp("sample_sets")
  write_demo_mmeb(str(root / "mmeb"))
  write_demo_vidore(str(root / "vidore"))
  write_demo_mmeb_v2(str(root / "mmeb_v2"))
  return str(root / "mmeb"), str(root / "vidore"), str(root / "mmeb_v2")


class _Recorder:
  """An embed function that keeps every (rows, embeddings) call."""

  def __init__(self, embed):
    self.embed, self.calls = embed, []

  def __call__(self, rows):
    out, errors = self.embed(rows)
    assert not errors, errors
    self.calls.append((list(rows), out))
    return out, errors


def test_export_to_pytorch_embeds_and_scores_like_jax(run_dir, sample_sets, tmp_path):
  from mmembed_jax import torch_embed
  mmeb_dir, vidore_dir, mmeb_v2_dir = sample_sets
  jax_embedder = JaxEmbedder.load(run_dir, batch_size=16)
  assert jax_embedder.step == 2 and jax_embedder.mesh.size == 8
  assert (jax_embedder.config.attention, jax_embedder.pooling) == ("bidirectional", "mean")
  recorder = _Recorder(jax_embedder.try_embed_rows)
  jax_result = mmeb.evaluate_mmeb(recorder, mmeb_dir)
  compiles = len(jax_embedder.batch_shapes)
  rows = sum(len(r) for r, _ in recorder.calls)
  print(f"JAX MMEB sample: {rows} rows, {compiles} batch shapes, P@1 {jax_result['per_dataset']}")
  assert compiles <= 8

  out = tmp_path / "exported"
  done = _run("export_to_pytorch.py", f"--checkpoint={run_dir}", f"--out={out}")
  assert done.returncode == 0, done.stderr[-3000:]
  assert "step 2" in done.stdout
  record = json.loads((out / "mmembed.json").read_text())
  assert (record["attention"], record["pooling"], record["step"]) == ("bidirectional", "mean", 2)
  torch_embedder = torch_embed.load(str(out), batch_size=16)
  for rows_in, jax_vectors in recorder.calls:
    np.testing.assert_allclose(torch_embedder(rows_in), jax_vectors, atol=1e-4, rtol=0)
  hf_embedder = JaxEmbedder.load(str(out), batch_size=16, mesh=trained_model.export_mesh())
  rows_in, jax_vectors = recorder.calls[0]
  np.testing.assert_allclose(hf_embedder.embed_rows(rows_in), jax_vectors, atol=1e-5, rtol=0)
  torch_result = mmeb.evaluate_mmeb(lambda rows: (torch_embedder(rows), {}), mmeb_dir)
  assert torch_result["per_dataset"] == jax_result["per_dataset"]
  assert set(jax_result["per_task"]) == {"classification", "vqa", "retrieval", "grounding"}

  jax_vidore = vidore.evaluate_vidore(jax_embedder.try_embed_rows, vidore_dir, jax_embedder.mesh)
  torch_vidore = vidore.evaluate_vidore(lambda rows: (torch_embedder(rows), {}), vidore_dir,
                                        jax_embedder.mesh)
  for name, scores in jax_vidore["per_dataset"].items():
    for key in ("ndcg_at_5", "recall_at_5"):
      assert torch_vidore["per_dataset"][name][key] == pytest.approx(scores[key], abs=1e-9)

  jax_v2 = mmeb_v2.evaluate_mmeb_v2(jax_embedder.try_embed_rows, mmeb_v2_dir, jax_embedder.mesh)
  torch_v2 = mmeb_v2.evaluate_mmeb_v2(lambda rows: (torch_embedder(rows), {}), mmeb_v2_dir,
                                      jax_embedder.mesh)
  assert len(jax_v2["per_task"]) == 5
  for name, scores in jax_v2["per_task"].items():
    metric = mmeb_v2.TASKS[name].metric
    assert torch_v2["per_task"][name][metric] == pytest.approx(scores[metric], abs=1e-9), name
  print(f"MMEB-V2 sample: {mmeb_v2.format_table(jax_v2)}")


def test_embed_from_a_workdir_or_step(run_dir, tmp_path):
  rows = tmp_path / "rows.jsonl"
  rows.write_text('{"text": "a small red circle"}\n{"text": "What is the total?"}\n')
  latest = embed_file(run_dir, str(rows), str(tmp_path / "latest.npy"), progress=False)
  step_1 = embed_file(os.path.join(run_dir, "checkpoints", "1"), str(rows),
                      str(tmp_path / "step1.npy"), progress=False)
  assert latest["shape"] == step_1["shape"] == (2, 64)
  assert not np.allclose(np.load(tmp_path / "latest.npy"), np.load(tmp_path / "step1.npy"))
  with pytest.raises(FileNotFoundError, match="not a training run"):
    trained_model.locate(str(tmp_path))


@pytest.fixture(scope="module")
def damaged_evaluation(run_dir, sample_sets, tmp_path_factory):
  """launch/evaluate.py in one process (8 devices) on damaged copies of the sample sets: a
  truncated query image, a line that is not UTF-8, a truncated Parquet dataset and a truncated
  corpus page. -> (mmeb dir, vidore dir, results JSON, the finished process)."""
  root = tmp_path_factory.mktemp("damaged")
  mmeb_dir, vidore_dir = _damaged_copies(*sample_sets[:2], root)
  out = root / "results.json"
  done = _run("evaluate.py", f"--model={run_dir}", f"--mmeb={mmeb_dir}", f"--vidore={vidore_dir}",
              f"--mmeb_v2={sample_sets[2]}", f"--mmeb_v2_out={root / 'mmeb_v2'}", f"--out={out}",
              "--batch_size=16")
  assert done.returncode == 0, done.stderr[-3000:]
  submission = json.loads((root / "mmeb_v2" / "submission.json").read_text())
  assert set(submission["metrics"]["image"]) == {"ImageNet-1K", "DocVQA", "MSCOCO_t2i", "RefCOCO"}
  assert "[overall, 5 of 78 tasks]" in done.stdout
  return mmeb_dir, vidore_dir, json.loads(out.read_text()), done


def test_evaluation_skips_counts_and_names_bad_rows(damaged_evaluation):
  """Each fault is skipped, counted and named by its file and line; the evaluation runs to the
  end and writes its results."""
  mmeb_dir, vidore_dir, result, done = damaged_evaluation
  assert set(result) >= {"overall", "per_task", "per_dataset", "details", "vidore", "throughput"}
  assert 0.0 <= result["overall"] <= 1.0 and "ndcg_at_5" in result["vidore"]
  assert result["throughput"]["rows_per_second"] > 0
  details = result["details"]
  assert (details["document_vqa"]["rows"], details["document_vqa"]["bad_rows"]) == (15, 1)
  assert (details["shape_classification"]["rows"], details["shape_classification"]["bad_rows"]
          ) == (16, 1)
  assert (details["broken"]["rows"], details["broken"]["bad_rows"]) == (0, 1)
  pages = result["vidore"]["per_dataset"]["document_pages"]
  assert pages["bad_rows"] == 1 and pages["queries"] == 43
  skipped = [line for line in done.stderr.splitlines() if "skipped" in line]
  for where, why in ((f"{mmeb_dir}/document_vqa.jsonl:1: cannot read image 0", "truncated"),
                     (f"{mmeb_dir}/shape_classification.jsonl:17: ", "not UTF-8"),
                     (f"{mmeb_dir}/broken.parquet: ", "cannot read the Parquet file"),
                     (f"{vidore_dir}/document_pages/corpus.jsonl:1: ", "cannot read image 0")):
    assert [line for line in skipped if where in line and why in line], (where, skipped)
  print(done.stdout)


def _scores(result):
  """The results without the timings and per-process counts."""
  drop = ("throughput", "seconds", "embed_seconds", "rows_per_second")
  if isinstance(result, dict):
    return {k: _scores(v) for k, v in result.items() if k not in drop}
  return result


def test_two_process_evaluation_equals_one_process(run_dir, sample_sets, damaged_evaluation,
                                                   tmp_path):
  """2 processes x 4 devices: each reads and encodes about half the rows (the other half is
  padding to it), the bad rows each one met are known to both, and the scores equal the
  1-process run's exactly."""
  mmeb_dir, vidore_dir, expected, one = damaged_evaluation
  port = 20000 + (os.getpid() + 7) % 20000
  out = tmp_path / "results.json"
  processes = [_start("evaluate.py", f"--model={run_dir}", f"--mmeb={mmeb_dir}",
                      f"--vidore={vidore_dir}", f"--mmeb_v2={sample_sets[2]}", f"--out={out}",
                      "--batch_size=16", "--distributed",
                      f"--coordinator_address=localhost:{port}", "--num_processes=2",
                      f"--process_id={i}", devices=4) for i in range(2)]
  outputs = [p.communicate(timeout=900) for p in processes]
  for process, (_, stderr) in zip(processes, outputs):
    assert process.returncode == 0, stderr[-3000:]
  assert _scores(json.loads(out.read_text())) == _scores(expected)
  total = expected["throughput"]["rows_embedded"]
  shares = []
  for _, stderr in [(None, one.stderr)] + outputs:
    line = [l for l in stderr.splitlines() if "read and encoded" in l][-1]
    shares.append(int(line.split("read and encoded ")[1].split()[0]))
  one_process, process_0, process_1 = shares
  assert process_0 + process_1 == one_process <= total
  assert 0.35 * total < process_0 < 0.65 * total and 0.35 * total < process_1 < 0.65 * total
  print(f"rows embedded {total}: one process read {one_process}, two read {process_0} and "
        f"{process_1}")


def _damaged_copies(mmeb_dir, vidore_dir, root):
  """Copies of the sample sets with one fault of each kind the evaluators must survive."""
  import shutil
  mmeb_copy, vidore_copy = root / "mmeb", root / "vidore"
  shutil.copytree(mmeb_dir, mmeb_copy)
  shutil.copytree(vidore_dir, vidore_copy)
  for image in (mmeb_copy / "images" / "vqa" / "0000.png",
                vidore_copy / "document_pages" / "images" / "000.png"):
    image.write_bytes(image.read_bytes()[:100])
  with open(mmeb_copy / "shape_classification.jsonl", "ab") as f:
    f.write(b'{"qry_text": "caf\xe9 #1", "tgt_text": ["x"]}\n')  # line 17: Latin-1, not UTF-8
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"qry_text": ["a"] * 50, "tgt_text": [["b"]] * 50}),
                 mmeb_copy / "broken.parquet")
  data = (mmeb_copy / "broken.parquet").read_bytes()
  (mmeb_copy / "broken.parquet").write_bytes(data[:len(data) // 2])
  tasks = json.loads((mmeb_copy / "meta_tasks.json").read_text())
  (mmeb_copy / "meta_tasks.json").write_text(json.dumps(dict(tasks, broken="vqa")))
  return str(mmeb_copy), str(vidore_copy)


def test_export_refuses_a_file_or_a_non_empty_target_in_one_line(run_dir, tmp_path):
  """Before: a traceback for a file, and files written over an earlier export (its shards and
  index left beside the new file)."""
  (tmp_path / "a_file").write_text("x")
  (tmp_path / "earlier").mkdir()
  (tmp_path / "earlier" / "model.safetensors.index.json").write_text("{}")
  for out, words in ((tmp_path / "a_file", "is a file, not a directory"),
                     (tmp_path / "earlier", "is not empty; choose an empty directory or pass "
                                            "--overwrite")):
    done = _run("export_to_pytorch.py", f"--checkpoint={run_dir}", f"--out={out}", devices=1)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert len(errors) == 1 and str(out) in errors[0] and words in errors[0], errors
  assert os.listdir(tmp_path / "earlier") == ["model.safetensors.index.json"]
  assert sorted(os.listdir(tmp_path)) == ["a_file", "earlier"]  # no staging directory left


def test_two_process_export_equals_one_process(run_dir, tmp_path):
  """2 processes x 4 devices: each holds half the checkpoint's shards, gathers tensor by tensor;
  process 0 writes, and the files equal a 1-process export's."""
  import safetensors.numpy
  trained_model.export_trained(run_dir, str(tmp_path / "one"))
  port = 20000 + os.getpid() % 20000
  processes = [_start("export_to_pytorch.py", f"--checkpoint={run_dir}", f"--out={tmp_path / 'two'}",
                      "--distributed", f"--coordinator_address=localhost:{port}",
                      "--num_processes=2", f"--process_id={i}", devices=4) for i in range(2)]
  outputs = [p.communicate(timeout=300) for p in processes]
  assert [p.returncode for p in processes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
  one = safetensors.numpy.load_file(str(tmp_path / "one" / "model.safetensors"))
  two = safetensors.numpy.load_file(str(tmp_path / "two" / "model.safetensors"))
  assert sorted(one) == sorted(two)
  for name in one:
    np.testing.assert_array_equal(two[name], one[name], err_msg=name)


def test_bfloat16_export(run_dir, tmp_path):
  import safetensors.numpy
  model = trained_model.export_trained(run_dir, str(tmp_path / "bf16"), dtype="bfloat16")
  tensors = safetensors.numpy.load_file(str(tmp_path / "bf16" / "model.safetensors"))
  assert {str(t.dtype) for t in tensors.values()} == {"bfloat16"}
  assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
  assert model.step == 2
