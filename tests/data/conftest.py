"""Shared fixtures for the data tests: the demo tokenizer, built once per session."""
import pytest


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
  """Returns the directory of the demo tokenizer (vocab <= 512), trained once per session."""
  from mmembed_jax.demo import tokenizer as tokenizer_lib

  return tokenizer_lib.build_tokenizer(str(tmp_path_factory.mktemp("tokenizer")), vocab_size=512)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
  """Returns the demo tokenizer loaded with transformers.AutoTokenizer."""
  import transformers

  return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
