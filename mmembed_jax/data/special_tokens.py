"""Special tokens: the Qwen-VL ids a model config needs, `<|mask|>` for MoCa's MLM and CoMa's
compression tokens."""
from typing import Any, Dict, List

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


def special_token_ids(tokenizer: Any) -> Dict[str, int]:
  """Returns the vision, pad and eos ids that HF Qwen-VL configs need, from any Qwen-VL tokenizer."""
  names = {
      "image_token_id": "<|image_pad|>",
      "video_token_id": "<|video_pad|>",
      "vision_start_token_id": "<|vision_start|>",
      "vision_end_token_id": "<|vision_end|>",
  }
  ids = {key: _token_id(tokenizer, token, key) for key, token in names.items()}
  eos = tokenizer.eos_token_id
  if eos is None:
    eos = _token_id(tokenizer, "<|endoftext|>", "eos_token_id")
  pad = tokenizer.pad_token_id
  ids["pad_token_id"] = int(eos if pad is None else pad)  # Qwen2-VL pads with <|endoftext|>
  ids["eos_token_id"] = int(eos)
  return ids


def _token_id(tokenizer: Any, token: str, key: str) -> int:
  """Returns the id of token; raises ValueError naming the token and config field if it is missing."""
  token_id = tokenizer.convert_tokens_to_ids(token)
  if token_id is None or tokenizer.convert_ids_to_tokens(token_id) != token:
    raise ValueError(f"special_token_ids: tokenizer has no token {token!r} (needed for '{key}'); "
                     f"expected a Qwen-VL tokenizer")
  return int(token_id)


def vision_config_ids(tokenizer: Any) -> Dict[str, int]:
  """The vision token ids of a model config, from the run's tokenizer."""
  ids = special_token_ids(tokenizer)
  return {k: v for k, v in ids.items() if k not in ("pad_token_id", "eos_token_id")}


def compression_tokens(count: int) -> List[str]:
  """The released code's compression tokens `<|ctoken_pad_0|>` ... `<|ctoken_pad_{count-1}|>`."""
  return [f"<|ctoken_pad_{i}|>" for i in range(count)]


def check_ctoken_ids(sequences: Any, count: int, vocab_size: int) -> List[int]:
  """The compression tokens' ids in a SequenceEncoder (which adds them); ValueError unless they
  fall inside the model's padded vocabulary (the embedding is never resized)."""
  ids = [sequences.token_id(token) for token in compression_tokens(count)]
  if ids and max(ids) >= vocab_size:
    raise ValueError(f"compression tokens get ids up to {max(ids)}, outside the model's vocabulary "
                     f"of {vocab_size} rows: the tokenizer leaves too few spare rows for "
                     f"{count} tokens")
  return ids
