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
EVALUATE = os.path.join(REPO, "launch", "evaluate.py")
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


# case -> (rows file lines (None: the demo's rows), extra arguments, fragments the error holds).
# Strings are written verbatim (bytes too), dicts JSON-encoded.
BAD_INPUTS = {
    "missing_image": ([{"text": "a red circle"}, {"text": "a blue square", "image": "gone.png"}],
                      (), ("gone.png", "row 2 (line 2)")),
    "malformed_row": ([{"text": "a red circle"}, "", '{"text": "a blue'], (),
                      ("rows.jsonl: line 3", "malformed JSON")),
    "over_long_row": ([{"text": "red"}, {"text": "A large blue square in the centre of the page."}],
                      ("--max_length=8",), ("row 2 (line 2)", "tokens, more than max_length 8")),
    "empty_row": ([{"text": "red"}, {"text": ""}], (),
                  ("row 2 (line 2)", "empty: no text and no image")),
    "not_utf8": ([{"text": "red"}, b'{"text": "caf\xe9"}'], (),
                 ("rows.jsonl: line 2", "not UTF-8")),
    "lone_surrogate": ([{"text": "red"}, {"text": "a lone surrogate \ud800 here"}], (),
                       ("row 2 (line 2)", "the tokenizer rejects the text")),
    "truncated_model": (None, ("--model={model}",), ("model.safetensors", "cannot read it as "
                                                     "safetensors")),
    # launch/evaluate.py reads its --model the same way.
    "evaluate_truncated_model": (None, ("--model={model}",),
                                 ("model.safetensors", "cannot read it as safetensors")),
}


@pytest.fixture(scope="module")
def bad_input_results(demo, tmp_path_factory):
  """{case: (CompletedProcess, directory)} of launch/embed.py on every BAD_INPUTS case, run side
  by side (one per core)."""
  import concurrent.futures
  import shutil
  _, out, cache = demo
  root = tmp_path_factory.mktemp("bad_inputs")
  truncated = root / "model_with_half_its_weights"
  shutil.copytree(os.path.join(out, "model"), truncated)
  weights = truncated / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
  commands = {}
  for case, (lines, extra, _) in BAD_INPUTS.items():
    directory = root / case
    directory.mkdir()
    rows = f"{out}/data/rows.jsonl"
    if lines is not None:
      rows = str(directory / "rows.jsonl")
      with open(rows, "wb") as f:
        for line in lines:
          f.write(line if isinstance(line, bytes) else
                  (line if isinstance(line, str) else json.dumps(line)).encode() + b"\n")
          if isinstance(line, bytes):
            f.write(b"\n")
    args = [a.format(model=truncated) for a in extra]
    model = [] if any(a.startswith("--model") for a in args) else [f"--model={out}/model"]
    if case.startswith("evaluate_"):
      commands[case] = ([EVALUATE, *args, f"--mmeb={out}/data", f"--out={directory}/emb.npy"],
                        directory)
    else:
      commands[case] = ([EMBED, *model, f"--input={rows}", f"--output={directory}/emb.npy",
                         *args], directory)
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    results = pool.map(lambda item: (item[0], _run(item[1][0], cache), item[1][1]),
                       commands.items())
    return {case: (result, directory) for case, result, directory in results}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_embed_bad_input_is_one_error_line_and_writes_nothing(case, bad_input_results):
  """Before: the empty row wrote an all-zero embedding, non-UTF-8 bytes and a lone surrogate
  ended in tracebacks naming no line, a truncated model.safetensors in a traceback."""
  result, directory = bad_input_results[case]
  _assert_one_error(result, *BAD_INPUTS[case][2])
  assert not os.path.exists(directory / "emb.npy")
