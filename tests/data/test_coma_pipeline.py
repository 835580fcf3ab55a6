"""CoMa's stage-1 input (mmembed_jax.data.coma_pipeline): the sequence the released code builds,
regions and answer masks, packing, bad rows skipped and named, JSONL and Parquet, resume."""
import shutil

import numpy as np
import pytest
import tokenizers

from mmembed_jax.data import bad_records, coma_pipeline

from pipeline_checks import assert_same, take, write_jsonl

OPTIONS = dict(length=224, max_patches=256, max_images=2, min_pixels=4 * 28 * 28,
               max_pixels=16 * 28 * 28, num_ctokens=8, vocab_size=576)
DIALOGUE = [{"q": "What colour is the circle?", "a": "red"},
            {"q": "Where is it?", "a": "in the top left corner"}]


@pytest.fixture(scope="module")
def data(tmp_path_factory, image_dir):
  """{name: path}: good rows (JSONL and Parquet) and a file of bad rows among good ones."""
  root = tmp_path_factory.mktemp("coma_data")
  shutil.copytree(image_dir, root / "img")
  good = [{"image": "img/wide.png", "text": "a wide photo", "dialogue": DIALOGUE},
          {"images": ["img/small.png"], "dialogue": DIALOGUE[:1]},
          {"text": "a passage with no image", "dialogue": DIALOGUE[1:]}] * 4
  paths = {"good": write_jsonl(root / "good.jsonl", good)}
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  paths["parquet"] = str(root / "good.parquet")
  pq.write_table(pa.table({"image": ["img/tall.png"] * 4, "dialogue": [DIALOGUE] * 4}),
                 paths["parquet"], row_group_size=2)
  paths["bad"] = write_jsonl(root / "bad.jsonl", [
      good[0],
      {"image": "img/wide.png"},  # 2: no dialogue
      {"image": "img/wide.png", "dialogue": "Q: what? A: that"},  # 3: not an array
      {"image": "img/wide.png", "dialogue": [{"q": "only a question"}]},  # 4: no answer
      {"image": "img/missing.png", "dialogue": DIALOGUE},  # 5: missing image
      {"text": "word " * 300, "dialogue": DIALOGUE},  # 6: the prefix alone is too long
      {"text": "word " * 60, "dialogue": DIALOGUE},  # 7: no room left for the first answer
      "{not json",  # 8
      good[1],
  ])
  return paths


def _dataset(sources, tokenizer_dir, **options):
  return coma_pipeline.coma_dataset(sources, tokenizer_dir, global_batch_size=2, seed=0,
                                    max_segments=4, process_index=0, process_count=1,
                                    **dict(OPTIONS, **options))


def test_sequence_regions_and_answers_are_the_released_codes(data, tokenizer_dir):
  """Image, "\\n" + prompt, the summary prompt, the compression tokens, then the chat turns; the
  regions start at the first compression token, after them, and at the first assistant turn."""
  batch = next(iter(_dataset([dict(name="good", path=data["good"], kind="jsonl")],
                             tokenizer_dir)))
  tokenizer = tokenizers.Tokenizer.from_file(f"{tokenizer_dir}/tokenizer.json")
  tokenizer.add_special_tokens([tokenizers.AddedToken(t, special=True)
                                for t in coma_pipeline.compression_tokens(8)])
  row = {k: v[0] for k, v in batch.items()}
  first = row["segment_ids"] == 1
  ids, regions = row["input_ids"][first], row["attention_regions"][first]
  text = lambda mask: tokenizer.decode(ids[mask].tolist(), skip_special_tokens=False)  # pylint: disable=unnecessary-lambda-assignment
  prefix = text(regions == 0)
  assert prefix.startswith("<|vision_start|><|image_pad|>") and prefix.endswith(
      "<|vision_end|>\na wide photo\nSummarize above image and text in a few words.")
  assert text(regions == 1) == "".join(coma_pipeline.compression_tokens(8))
  assert text(regions == 2) == "<|im_start|>user\nWhat colour is the circle?<|im_end|>\n"
  assert text(regions == 3) == ("<|im_start|>assistant\nred<|im_end|>\n<|im_start|>user\nWhere is "
                                "it?<|im_end|>\n<|im_start|>assistant\nin the top left corner"
                                "<|im_end|>\n")
  answers = row["answer_mask"][first].astype(bool)
  assert text(answers) == "red<|im_end|>in the top left corner<|im_end|>"
  assert list(regions) == sorted(regions)  # regions never go back within an example
  assert (row["attention_regions"][row["segment_ids"] == 0] == 0).all()


def test_rows_pack_several_examples_and_text_only_ones(data, tokenizer_dir):
  batches = take(iter(_dataset([dict(name="good", path=data["good"], kind="jsonl")],
                               tokenizer_dir)), 3)[1]
  per_row = [int(s.max()) for b in batches for s in b["segment_ids"]]
  assert max(per_row) >= 2
  for b in batches:
    for s in range(1, int(b["segment_ids"].max()) + 1):
      regions = b["attention_regions"][b["segment_ids"] == s]
      assert {1, 2, 3} <= set(regions.tolist())  # every example keeps its dialogue


def test_bad_rows_are_skipped_counted_and_named(data, tokenizer_dir):
  _, batches = take(iter(_dataset([dict(name="bad", path=data["bad"], kind="jsonl")],
                                  tokenizer_dir)), 3)
  named = bad_records.split_messages(np.array([b[bad_records.MESSAGES] for b in batches]))
  path = data["bad"]
  expected = {2: "missing field 'text'", 3: "field 'dialogue' must be a non-empty array",
              4: "dialogue[0] must be an object with string fields 'q' and 'a'",
              5: "missing.png", 6: "more than max_length", 7: "the first answer does not fit",
              8: "malformed JSON"}
  for line, reason in expected.items():
    lines = [w for w in named if w.startswith(f"{path}:{line}: ")]
    assert lines and all(reason in w for w in lines), (line, reason, named)
  assert sum(int(b["bad_records"].sum()) for b in batches) == len(named)
  assert {int(w[len(path) + 1:].split(":")[0]) for w in named} == set(expected)
  packed = {int(i) for b in batches for i in b["example_ids"].ravel() if i >= 0}
  assert packed == {0, 8}


def test_parquet_rows_and_resume(data, tokenizer_dir):
  sources = [dict(name="parquet", path=data["parquet"], kind="parquet"),
             dict(name="good", path=data["good"], kind="jsonl")]
  states, batches = take(iter(_dataset(sources, tokenizer_dir)), 4)
  assert all(b["bad_records"].sum() == 0 for b in batches)
  resumed = iter(_dataset(sources, tokenizer_dir))
  resumed.set_state(states[2])
  assert_same(batches[2], next(resumed), "resumed at batch 2")


def test_compression_tokens_must_fit_the_vocabulary(data, tokenizer_dir):
  with pytest.raises(ValueError, match="outside the model's vocabulary of 515 rows"):
    _dataset([dict(name="good", path=data["good"], kind="jsonl")], tokenizer_dir,
             vocab_size=515)
