"""Special tokens the objectives need beyond the Qwen-VL ones: `<|mask|>` for MoCa's MLM."""
from typing import Any

MASK_TOKEN = "<|mask|>"


def mask_token_id(tokenizer: Any, vocab_size: int) -> int:
  """Id of `<|mask|>`, added to the tokenizer when absent; it must fall inside the padded vocabulary.

  Qwen's embedding matrix is padded beyond the tokenizer (151665 tokens, 151936 rows), so the new
  id uses a spare row and the embedding is never resized.
  """
  if MASK_TOKEN not in tokenizer.get_vocab():
    tokenizer.add_tokens([MASK_TOKEN], special_tokens=True)
  token_id = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
  if token_id >= vocab_size:
    raise ValueError(f"{MASK_TOKEN} gets id {token_id}, outside the model's vocabulary of "
                     f"{vocab_size} rows: the tokenizer leaves no spare row for it")
  return int(token_id)


def special_ids(tokenizer: Any) -> list[int]:
  """Ids of every special / added token (never masked): vision, chat, padding, `<|mask|>`."""
  ids = set(tokenizer.all_special_ids)
  ids.update(tokenizer.get_added_vocab().values())
  return sorted(ids)
