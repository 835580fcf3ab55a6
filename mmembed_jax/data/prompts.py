"""How a row's instruction and text become the model's input text: mmembed.json's "prompt".

A row may carry an "instruction" and a "role" ("query", the default, or "candidate") beside its
"text" (rows.py). The prompt format renders them; its defaults are this project's convention,
so rows without an instruction are encoded as they always were:

  format           "raw": the text as it is; "chat": Qwen's chat turns (below)
  template         how an instruction joins the text: "{instruction} {text}"; "{vision}" in it
                   places the row's media markers (when its text has none; with no media,
                   "{vision} " is dropped), else the encoder prepends them to the whole input
                   (rows.py's rule); a row without text drops the space after the instruction
  instructions_on  "both", or "query": candidates' instructions are dropped
  system           chat: the system turn's text (None: no system turn); "{instruction}" in it
                   moves the instruction there, out of the user turn
  user_suffix      chat: appended inside the user turn; "{modality}" -> what the row holds
                   ("sentence", "image", "video", joined by " and ")
  suffix           appended at the very end (after the assistant prompt in chat)

chat renders "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{markers}{user}"
"{user_suffix}<|im_end|>\n<|im_start|>assistant\n{suffix}", the media markers at the start of the
user turn unless the text places them.
"""
import dataclasses
import re
from typing import Any, Mapping, Optional

from mmembed_jax.data.sequences import IMAGE_MARKER, VIDEO_MARKER

FORMATS = ("raw", "chat")
ROLES = ("query", "candidate")
_FIELD = re.compile(r"\{(vision|instruction|text|modality)\}")


def _fill(template: str, **values: str) -> str:
  """template with its {vision} / {instruction} / {text} / {modality} fields filled in one
  pass (braces inside the values stay as they are)."""
  return _FIELD.sub(lambda m: values.get(m.group(1), m.group(0)), template)


@dataclasses.dataclass(frozen=True)
class PromptFormat:
  """mmembed.json's "prompt" (see the module docstring)."""
  format: str = "raw"
  template: str = "{instruction} {text}"
  instructions_on: str = "both"
  system: Optional[str] = None
  user_suffix: str = ""
  suffix: str = ""

  def __post_init__(self):
    if self.format not in FORMATS:
      raise ValueError(f"prompt format must be one of {FORMATS}, found {self.format!r}")
    if self.instructions_on not in ("both", "query"):
      raise ValueError(f"prompt instructions_on must be 'both' or 'query', found "
                       f"{self.instructions_on!r}")
    if "{text}" not in self.template or "{instruction}" not in self.template:
      raise ValueError(f"prompt template must hold {{instruction}} and {{text}}, found "
                       f"{self.template!r}")

  @classmethod
  def from_record(cls, record: Optional[Mapping[str, Any]], where: Any = "prompt"
                  ) -> "PromptFormat":
    """The format of mmembed.json's "prompt" object (None or absent: the defaults)."""
    if record is None:
      return cls()
    if not isinstance(record, Mapping):
      raise ValueError(f"{where}: 'prompt' must be an object, found {type(record).__name__}")
    unknown = sorted(set(record) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(f"{where}: unknown prompt fields {unknown}")
    try:
      return cls(**record)
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from None

  def render(self, text: str, instruction: str = "", role: str = "query", num_images: int = 0,
             num_videos: int = 0) -> str:
    """The input text of one row (media markers included or left to the encoder)."""
    if role not in ROLES:
      raise ValueError(f"role must be one of {ROLES}, found {role!r}")
    if role == "candidate" and self.instructions_on == "query":
      instruction = ""
    has_markers = IMAGE_MARKER in text or VIDEO_MARKER in text
    markers = "" if has_markers else IMAGE_MARKER * num_images + VIDEO_MARKER * num_videos
    in_system = self.format == "chat" and self.system is not None and "{instruction}" in self.system
    body = text
    if instruction and not in_system:
      template = self.template if markers else self.template.replace("{vision} ", "")
      body = _fill(template, vision=markers, instruction=instruction, text=text)
      if not text:  # no dangling separator after the instruction
        body = body.rstrip(" ")
      markers = "" if "{vision}" in self.template else markers
    if self.format == "raw":
      return body + self.suffix  # markers, if any, are prepended by the encoder
    parts = ["sentence"] if text.strip() else []
    parts += ["image"] * bool(num_images) + ["video"] * bool(num_videos)
    user = markers + body + _fill(self.user_suffix, modality=" and ".join(parts))
    system = "" if self.system is None else (
        f"<|im_start|>system\n{_fill(self.system, instruction=instruction)}<|im_end|>\n")
    return f"{system}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{self.suffix}"
