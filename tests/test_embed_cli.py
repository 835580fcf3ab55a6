"""Tests of the command lines launch/embed.py and launch/demo.py, run as real subprocesses.

The demo runs first (into a temporary directory); its model and rows serve the embed runs.
Bad inputs must end with one line `error: ...` on stderr, exit status 2 and no traceback.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMBED = os.path.join(REPO, "launch", "embed.py")
DEMO = os.path.join(REPO, "launch", "demo.py")
TIMEOUT = 180


def _run(args, cache):
  """Runs `python args...` from the repository root on CPU; returns the CompletedProcess."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             # The embed run reuses the program the demo compiled.
             JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env.pop("XLA_FLAGS", None)  # one CPU device is enough (conftest asks for 8 in-process)
  return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=TIMEOUT, check=False)


def _write_jsonl(path, lines):
  """Writes lines (dicts JSON-encoded, strings verbatim) to path; returns str(path)."""
  with open(path, "w", encoding="utf-8") as f:
    for line in lines:
      f.write((json.dumps(line) if not isinstance(line, str) else line) + "\n")
  return str(path)


def _assert_one_error(result, *fragments):
  """Asserts exit status 2 and one `error:` line on stderr holding every fragment, no traceback."""
  assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
  assert "Traceback" not in result.stderr, result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, result.stderr
  for fragment in fragments:
    assert fragment in errors[0], (fragment, errors[0])


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  """Runs launch/demo.py into a fresh directory; returns (CompletedProcess, directory, cache)."""
  out = str(tmp_path_factory.mktemp("demo"))
  cache = str(tmp_path_factory.mktemp("jax_cache"))
  return _run([DEMO, f"--out={out}"], cache), out, cache


def test_demo_runs_end_to_end(demo):
  result, out, _ = demo
  assert result.returncode == 0, result.stderr
  embeddings = np.load(os.path.join(out, "embeddings.npy"))
  assert embeddings.shape == (12, 64) and embeddings.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(embeddings, axis=-1), 1.0, atol=1e-5)
  assert "shape (12, 64)" in result.stdout and "cosine similarity" in result.stdout
  assert "total" in result.stdout
  for name in ("config.json", "model.safetensors", "mmembed.json", "preprocessor_config.json",
               "tokenizer.json"):
    assert os.path.exists(os.path.join(out, "model", name)), name
  with open(os.path.join(out, "model", "mmembed.json")) as f:
    record = json.load(f)
  assert (record["attention"], record["pooling"]) == ("bidirectional", "mean")


def _embed(demo, directory, *args):
  """Runs launch/embed.py on the demo model, writing directory/emb.npy; returns the result."""
  _, out, cache = demo
  return _run([EMBED, f"--model={out}/model", f"--output={directory}/emb.npy", *args], cache)


def test_embed_writes_embeddings(demo, tmp_path):
  _, out, _ = demo
  result = _embed(demo, tmp_path, f"--input={out}/data/rows.jsonl", "--batch_size=16")
  assert result.returncode == 0, result.stderr
  embeddings = np.load(tmp_path / "emb.npy")
  assert embeddings.shape == (12, 64)
  assert "(12, 64)" in result.stdout and "rows/s" in result.stdout
  # Same model, same mmembed.json defaults, same batch: the demo's own vectors.
  np.testing.assert_allclose(embeddings, np.load(os.path.join(out, "embeddings.npy")), atol=1e-6)
  assert os.listdir(tmp_path) == ["emb.npy"]  # no temporary file left behind


def test_embed_missing_image(demo, tmp_path):
  rows = _write_jsonl(tmp_path / "rows.jsonl", [
      {"text": "a red circle"}, {"text": "a blue square", "image": "gone.png"}])
  result = _embed(demo, tmp_path, f"--input={rows}")
  _assert_one_error(result, os.path.join(str(tmp_path), "gone.png"), "row 2 (line 2)")
  assert not os.path.exists(tmp_path / "emb.npy")


def test_embed_malformed_row(demo, tmp_path):
  rows = _write_jsonl(tmp_path / "rows.jsonl", [{"text": "a red circle"}, "", '{"text": "a blue'])
  result = _embed(demo, tmp_path, f"--input={rows}")
  _assert_one_error(result, "rows.jsonl: line 3", "malformed JSON")


def test_embed_over_long_row(demo, tmp_path):
  rows = _write_jsonl(tmp_path / "rows.jsonl", [
      {"text": "red"}, {"text": "A large blue square in the centre of the page."}])
  result = _embed(demo, tmp_path, f"--input={rows}", "--max_length=8")
  _assert_one_error(result, "row 2 (line 2)", "tokens, more than max_length 8")
