"""mmembed.json's fields on how rows become model input and where embeddings are pooled, read
once for the JAX embedder (embedding.py) and the PyTorch one (convert/torch_embed.py) alike.

  pooling_point   "final_norm" (the decoder's output, transformers' last_hidden_state; default)
                  or "before_final_norm" (the hidden states entering its final RMSNorm)
  vision_tokens   "wrapped" (default) or "bare"        } data/sequences.py
  positions       "mrope" (default) or "sequential"    }
  prompt          how instructions and texts are rendered (data/prompts.py)
"""
from typing import Any, Dict, Mapping

from mmembed_jax.data.prompts import PromptFormat
from mmembed_jax.data.sequences import POSITIONS, VISION_LAYOUTS

POOLING_POINTS = ("final_norm", "before_final_norm")


def read_conventions(record: Mapping[str, Any], where: Any) -> Dict[str, Any]:
  """{"pooling_point", "vision_tokens", "positions", "prompt"} of a record (absent fields: the
  defaults); ValueError naming `where` and the field otherwise."""
  out: Dict[str, Any] = {}
  for field, allowed in (("pooling_point", POOLING_POINTS), ("vision_tokens", VISION_LAYOUTS),
                         ("positions", POSITIONS)):
    value = record.get(field, allowed[0])
    if value not in allowed:
      raise ValueError(f"{where}: field '{field}' must be one of {allowed}, found {value!r}")
    out[field] = value
  out["prompt"] = PromptFormat.from_record(record.get("prompt"), where)
  return out
