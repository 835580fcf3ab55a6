"""A tiny byte-level BPE tokenizer with the Qwen2-VL special tokens, trained offline on the spot.

Demo and test models cannot download the real Qwen tokenizer (151k tokens), so this module trains
a small one from a built-in, deterministic English corpus with the `tokenizers` library and saves
it in the Hugging Face format, so `transformers.AutoTokenizer.from_pretrained(out_dir)` loads it
without network access. It follows Qwen2's tokenizer layout: NFC normalisation, Qwen2's
pre-tokenisation regex, byte-level BPE over all 256 bytes (no unknown text), and the 14 Qwen-VL
special tokens appended after the learned vocabulary in Qwen2-VL's order.

  out_dir = build_tokenizer("/tmp/tok", vocab_size=512)
  tok = transformers.AutoTokenizer.from_pretrained(out_dir)
  ids = mmembed_jax.data.special_tokens.special_token_ids(tok)  # {"image_token_id": ...}
"""
import itertools
import os
from typing import List

# The Qwen2-VL special tokens, in the order of their ids in the real tokenizer (151643...151656).
ENDOFTEXT = "<|endoftext|>"
SPECIAL_TOKENS = (
    ENDOFTEXT,
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2's pre-tokenisation regex (from its tokenizer.json).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_NUM_BYTES = 256  # the byte-level alphabet, always fully in the vocabulary

_COLOURS = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple", "grey", "pink")
_SHAPES = ("circle", "square", "triangle", "rectangle", "star", "hexagon", "line", "dot")
_SIZES = ("small", "large", "tiny", "huge", "medium")
_PLACES = ("top left corner", "bottom right corner", "centre", "left edge", "right edge",
           "top of the page", "bottom of the page")
_DOCS = ("invoice", "receipt", "letter", "report", "form", "table", "chart", "slide", "page",
         "screenshot", "photo", "diagram")
_DOC_PARTS = ("title", "header", "footer", "total", "date", "signature", "logo", "caption",
              "first paragraph", "last row")
_QUESTIONS = (
    "What colour is the {shape}?",
    "How many {shape}s are in the image?",
    "Where is the {colour} {shape}?",
    "Is there a {colour} {shape} in the picture?",
    "What is written in the {part} of the {doc}?",
    "Find the {doc} that shows a {colour} {shape}.",
    "Which {doc} has the {part} at the {place}?",
)
_STATEMENTS = (
    "A {size} {colour} {shape} is in the {place}.",
    "The image shows a {size} {colour} {shape} next to a {colour2} {shape2}.",
    "There are {count} {colour} {shape}s on a {colour2} background.",
    "The {doc} has a {colour} {part} at the {place}.",
    "This {doc} contains {count} rows and a {part}.",
    "The {part} of the {doc} reads: total {count}.{count2} dollars.",
    "Represent the {doc} for retrieval: a {colour} {shape} and the {part}.",
    "Query: {colour} {shape} near the {place}. Answer: yes, it is {size}.",
)


def demo_corpus() -> List[str]:
  """Returns the built-in English training corpus: about two thousand deterministic sentences."""
  sentences = []
  fields = itertools.count()
  templates = _STATEMENTS + _QUESTIONS
  for i in range(600):
    k = next(fields)
    template = templates[i % len(templates)]
    values = {
        "colour": _COLOURS[k % len(_COLOURS)],
        "colour2": _COLOURS[(3 * k + 1) % len(_COLOURS)],
        "shape": _SHAPES[(k // 2) % len(_SHAPES)],
        "shape2": _SHAPES[(5 * k + 3) % len(_SHAPES)],
        "size": _SIZES[(k // 3) % len(_SIZES)],
        "place": _PLACES[(k // 5) % len(_PLACES)],
        "doc": _DOCS[(k // 7) % len(_DOCS)],
        "part": _DOC_PARTS[(k // 11) % len(_DOC_PARTS)],
        "count": str((7 * k) % 23),
        "count2": f"{(13 * k) % 100:02d}",
    }
    sentences.append(template.format(**values))
  # A little punctuation, digits and line structure so those bytes get merges too.
  sentences += [f"Line {n}:\n  item {n * 3}, price ${n}.{n * 7 % 100:02d}; note (see page {n})."
                for n in range(40)]
  # The synthetic demo data's own words (scene captions, page lines, questions, passages), so the
  # demo data tokenises into few tokens. Imported here: the data module is only needed for training.
  from mmembed_jax.demo import records  # pylint: disable=g-import-not-at-top
  sentences += records.corpus_sentences()
  return sentences


def build_tokenizer(out_dir: str, vocab_size: int = 512) -> str:
  """Trains the demo BPE tokenizer (<= vocab_size tokens), saves it to out_dir, returns out_dir."""
  # Imported here so importing this module stays cheap.
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
  from tokenizers import pre_tokenizers, trainers
  import transformers

  min_size = _NUM_BYTES + len(SPECIAL_TOKENS)
  if vocab_size < min_size:
    raise ValueError(f"build_tokenizer: vocab_size={vocab_size} is too small; expected at least "
                     f"{min_size} ({_NUM_BYTES} byte tokens + {len(SPECIAL_TOKENS)} special tokens)")
  tok = Tokenizer(models.BPE())
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
  ])
  tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size - len(SPECIAL_TOKENS),
      min_frequency=2,
      show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      special_tokens=[],
  )
  tok.train_from_iterator(demo_corpus(), trainer=trainer)
  # Appended after the learned vocabulary, in Qwen2-VL's order, as in the real tokenizer.
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
  if tok.get_vocab_size() > vocab_size:
    raise AssertionError(f"build_tokenizer: trained {tok.get_vocab_size()} tokens, "
                         f"more than vocab_size {vocab_size}")
  hf_tok = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok,
      eos_token=ENDOFTEXT,
      pad_token=ENDOFTEXT,
      unk_token=ENDOFTEXT,
      additional_special_tokens=list(SPECIAL_TOKENS[1:]),
      model_max_length=32768,
      clean_up_tokenization_spaces=False,
  )
  os.makedirs(out_dir, exist_ok=True)
  hf_tok.save_pretrained(out_dir)
  return out_dir
