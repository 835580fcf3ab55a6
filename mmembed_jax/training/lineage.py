"""Where a run comes from, resolved once at its start and recorded in its workdir's config.json.

  resolved = resolve(config)        # Resolved(source_hf_dir, init_from_chain, tokenizer_dir)

`init_from` names nothing (random weights), a Hugging Face directory, or another run's workdir,
which itself may start from another run, and so on. The trainer writes the resolved lineage into
its config.json (section `resolved`); embedding, export and evaluation read that record instead
of walking the chain again, and a run started from a recorded run stops walking there.
"""
import dataclasses
import json
from typing import Any, Optional, Tuple

from etils import epath

RESOLVED = "resolved"  # the config.json section holding a run's Resolved


@dataclasses.dataclass(frozen=True)
class Resolved:
  """A run's lineage: the HF directory its weights come from ("" if trained from scratch), the
  `init_from` chain from the run's own to that directory, and its tokenizer directory ("" for
  an input that needs none)."""
  source_hf_dir: str = ""
  init_from_chain: Tuple[str, ...] = ()
  tokenizer_dir: str = ""

  def to_json(self) -> dict:
    """The record config.json holds."""
    return dict(dataclasses.asdict(self), init_from_chain=list(self.init_from_chain))

  @classmethod
  def from_json(cls, record: dict) -> "Resolved":
    """The record config.json holds, read back."""
    return cls(source_hf_dir=record.get("source_hf_dir", ""),
               init_from_chain=tuple(record.get("init_from_chain", ())),
               tokenizer_dir=record.get("tokenizer_dir", ""))


def is_hf_dir(path: str) -> bool:
  """True for a Hugging Face model directory: config.json, but not a run's workdir (checkpoints/)."""
  if not path:
    return False
  root = epath.Path(path)
  return (root / "config.json").exists() and not (root / "checkpoints").exists()


def run_record(workdir: str) -> Optional[dict]:
  """A workdir's config.json as a dict, or None when it has none."""
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: invalid JSON ({e})") from None


def source_lineage(init_from: str) -> Tuple[str, Tuple[str, ...], str]:
  """(source HF directory, init_from chain, the source run's recorded tokenizer or "") of an
  `init_from`, following runs' config.json back to an HF directory (or to a recorded lineage)."""
  chain, seen = [], set()
  while init_from and init_from not in seen:
    chain.append(init_from)
    if is_hf_dir(init_from):
      return init_from, tuple(chain), ""
    seen.add(init_from)
    record = run_record(init_from)
    if record is None:
      return "", tuple(chain), ""
    if RESOLVED in record:  # that run resolved its own lineage: no need to walk further
      earlier = Resolved.from_json(record[RESOLVED])
      return (earlier.source_hf_dir, tuple(chain) + earlier.init_from_chain,
              earlier.tokenizer_dir)
    init_from = record.get("init_from", "")
  return "", tuple(chain), ""


def resolve(config: Any, demo_tokenizer: Any = None) -> Resolved:
  """The run's Resolved. Its tokenizer: `config.tokenizer_dir`, else the source HF directory's,
  else the one the source run recorded, else `demo_tokenizer()` (a callable, or None when the
  run may not fall back to the demo's)."""
  source, chain, recorded = source_lineage(config.init_from)
  tokenizer = config.get("tokenizer_dir", "") or source or recorded
  if not tokenizer and demo_tokenizer is not None:
    tokenizer = demo_tokenizer()
  return Resolved(source_hf_dir=source, init_from_chain=chain, tokenizer_dir=tokenizer)
