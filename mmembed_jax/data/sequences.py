"""The one sequence encoder: text with media markers and its images -> token ids, patches, grids
and M-RoPE positions (an `EncodedRow`).

Inference rows (rows.py: embed.py, evaluation, torch_embed), MoCa stage-1 records
(cpt_pipeline.py) and contrastive pair sides (cl_pipeline.py) are all encoded here:

  encoder = SequenceEncoder(tokenizer_dir, image_config)   # or an HF tokenizer object
  row = encoder.encode("<image> a red circle", ["circle.png"], length=512)

Each `<image>` marker stands for the next image and becomes `<|vision_start|>` + N x
`<|image_pad|>` + `<|vision_end|>`, N = t*h*w / merge_size**2 merged tokens of the image after
preprocessing (`images.preprocess_image`); each `<video>` marker likewise stands for the next
video (`videos=`: a file, or a list of frame images) with `<|video_pad|>` tokens, sampled and
processed as Qwen's pipeline does (`video.py`; its patches join the same patch list, in order of
appearance). Text with media and no marker gets one marker per image, then per video, prepended
(the prepend rule); otherwise markers and media must be equal in number. Text is tokenised piece
by piece between markers, without special tokens, and may not spell a vision token itself.

How vision items sit in the sequence, and their positions (mmembed.json's `vision_tokens` and
`positions`, for checkpoints trained another way):
  vision_tokens "wrapped"  `<|vision_start|>` + pads + `<|vision_end|>` (Qwen's processor; default)
                "bare"     the pads alone (VLM2Vec writes `<|image_pad|>` without a vision start:
                           transformers then finds no image to place in M-RoPE and every token
                           gets the 1-D position of its index), so positions must be "sequential"
  positions     "mrope"      (t, h, w) positions for vision tokens (`mrope.py`; default)
                "sequential" every token at its index on all three axes (UNITE's model was called
                             without position ids)

Budgets and what happens beyond them: `length` tokens (text past it is cut with `cut_text`, else
the sequence is refused: inference never truncates silently), `max_patches` and `max_images`
(None: no limit). An image that does not fit what is left is refused, or with `cut_images`
(stage 1) the sequence is cut before its `<|vision_start|>` with every later image; a first
image that does not fit is always refused.

Errors are `BadRecord`s (ValueErrors) saying why, without naming the row: callers add "FILE:LINE"
or "row R (line L) of FILE". The encoder is picklable and thread-safe: a tokenizer directory's
tokenizer.json is loaded with the `tokenizers` library once per process (worker processes never
import transformers).
"""
import dataclasses
import json
import os
import re
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from mmembed_jax.data import images as images_lib
from mmembed_jax.data import mrope
from mmembed_jax.data import video as video_lib
from mmembed_jax.data.bad_records import BadRecord
from mmembed_jax.models import inputs

IMAGE_MARKER = "<image>"
VISION_LAYOUTS = ("wrapped", "bare")  # mmembed.json vision_tokens
POSITIONS = ("mrope", "sequential")
VIDEO_MARKER = "<video>"
_MARKERS = re.compile(f"({re.escape(IMAGE_MARKER)}|{re.escape(VIDEO_MARKER)})")
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
VISION_TOKENS = (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)


@dataclasses.dataclass(frozen=True)
class EncodedRow:
  """One encoded sequence: token ids, its images' patches and grids, and M-RoPE positions."""
  input_ids: np.ndarray  # int32 [n]
  patches: np.ndarray  # float32 [p, 1176]; p = sum of t*h*w over the row's images
  grid_thw: np.ndarray  # int32 [num_images, 3]: images and videos in order of appearance
  positions: np.ndarray  # int32 [3, n]
  source: str = "row"  # names the row in error messages, e.g. "row 7 (line 7) of data.jsonl"
  is_video: Optional[np.ndarray] = None  # bool [num_images]: which items are videos (None: none)

  @property
  def num_tokens(self) -> int:
    """Returns n, the number of tokens."""
    return int(self.input_ids.shape[0])

  @property
  def num_patches(self) -> int:
    """Returns p, the number of (unmerged) patches."""
    return int(self.patches.shape[0])

  @property
  def num_images(self) -> int:
    """Returns the number of images and videos."""
    return int(self.grid_thw.shape[0])

  @property
  def video_patches(self) -> np.ndarray:
    """bool [p]: which patches belong to videos."""
    if self.is_video is None:
      return np.zeros(self.num_patches, bool)
    return np.repeat(np.asarray(self.is_video, bool), self.grid_thw.prod(-1).astype(np.int64))


def _image_name(image: Any) -> str:
  """How messages name an image: its path, or its type for bytes and arrays."""
  return image if isinstance(image, str) else type(image).__name__


def _read_text(path: str) -> str:
  """Reads a local or gs:// text file."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  return epath.Path(path).read_text()


class SequenceEncoder:
  """Text with `<image>` markers + images -> EncodedRow (see the module docstring)."""

  def __init__(self, tokenizer: Union[str, Any],
               image_config: Optional[images_lib.ImageProcessingConfig] = None,
               extra_special_tokens: Sequence[str] = (), suffix_tokens: Sequence[str] = (),
               video: video_lib.VideoSettings = video_lib.VideoSettings(),
               vision_tokens: str = "wrapped", positions: str = "mrope"):
    """tokenizer: a tokenizer directory (its tokenizer.json, local or gs://) or a loaded
    transformers tokenizer; image_config: the image preprocessing (default: Qwen2-VL's);
    extra_special_tokens: added to the tokenizer when absent, as `data/special_tokens.py` adds
    them to the objective's (`<|mask|>`: the same ids on both sides); suffix_tokens: special
    tokens ending every sequence `encode` makes (CoMa's compression tokens; added too), kept
    when the text is cut; video: frame sampling, the video processor's bounds and the model's
    M-RoPE time scale (`video.VideoSettings`; set its tokens_per_second from `ModelConfig.
    video_tokens_per_second`); vision_tokens, positions: see the module docstring."""
    if vision_tokens not in VISION_LAYOUTS or positions not in POSITIONS:
      raise ValueError(f"vision_tokens must be one of {VISION_LAYOUTS} and positions one of "
                       f"{POSITIONS}, found {vision_tokens!r} and {positions!r}")
    if vision_tokens == "bare" and positions != "sequential":
      raise ValueError("vision_tokens 'bare' needs positions 'sequential': without a vision start "
                       "transformers gives every token its 1-D index")
    self.vision_tokens, self.positions = vision_tokens, positions
    self.tokenizer_dir = tokenizer if isinstance(tokenizer, str) else None
    self.image_config = image_config or images_lib.ImageProcessingConfig()
    self.video_config = video.processor_config(self.image_config)
    self.video_sampling = video.sampling
    self.tokens_per_second = video.tokens_per_second
    self.suffix_tokens = tuple(suffix_tokens)
    self.extra_special_tokens = tuple(extra_special_tokens) + tuple(
        t for t in suffix_tokens if t not in extra_special_tokens)
    self._hf_tokenizer = None if isinstance(tokenizer, str) else tokenizer
    self._tokenizer = None  # the `tokenizers` Tokenizer, loaded lazily
    self._vision_ids: Optional[Dict[str, int]] = None
    self._extra_ids: Dict[str, int] = {}  # ids of extra_special_tokens, set with _vision_ids
    self._lock = threading.Lock()

  def __getstate__(self):
    state = dict(self.__dict__, _tokenizer=None, _vision_ids=None, _extra_ids=None)
    state.pop("_lock")
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def _load(self) -> None:
    """Loads the tokenizer and the vision token ids once (thread-safe)."""
    with self._lock:
      if self._vision_ids is not None:
        return
      if self._hf_tokenizer is not None:
        missing = [t for t in self.extra_special_tokens if t not in self._hf_tokenizer.get_vocab()]
        if missing:
          self._hf_tokenizer.add_tokens(missing, special_tokens=True)
        lookup = self._hf_tokenizer.convert_tokens_to_ids
        ids = {token: lookup(token) for token in VISION_TOKENS}
        ids = {t: i if self._hf_tokenizer.convert_ids_to_tokens(i) == t else None
               for t, i in ids.items()}
        where = "the tokenizer"
      else:
        import tokenizers  # pylint: disable=g-import-not-at-top
        path = os.path.join(self.tokenizer_dir, "tokenizer.json")
        self._tokenizer = tokenizers.Tokenizer.from_str(_read_text(path))
        self._tokenizer.add_special_tokens([
            tokenizers.AddedToken(t, special=True) for t in self.extra_special_tokens
            if self._tokenizer.token_to_id(t) is None])
        ids = {token: self._tokenizer.token_to_id(token) for token in VISION_TOKENS}
        where = path
      missing = [token for token, i in ids.items() if i is None]
      if missing:
        raise ValueError(f"{where} has no token {missing[0]!r}; expected a Qwen-VL tokenizer "
                         f"(e.g. mmembed_jax.demo.tokenizer.build_tokenizer)")
      self._extra_ids = {token: int(self._lookup(token)) for token in self.extra_special_tokens}
      self._vision_ids = {token: int(i) for token, i in ids.items()}  # last: tested without lock

  @property
  def vision_ids(self) -> Dict[str, int]:
    """{vision token: id} of the tokenizer."""
    if self._vision_ids is None:
      self._load()
    return self._vision_ids

  def _lookup(self, token: str) -> Optional[int]:
    """The id of a token in the loaded tokenizer (None if it has none)."""
    if self._hf_tokenizer is not None:
      return self._hf_tokenizer.get_vocab().get(token)
    return self._tokenizer.token_to_id(token)

  def token_id(self, token: str) -> Optional[int]:
    """The id of a token (None if the tokenizer has none)."""
    self._load()
    return self._lookup(token)

  def extra_ids(self, tokens: Sequence[str]) -> List[int]:
    """Ids of some of the `extra_special_tokens` (looked up once, when the tokenizer loads)."""
    if self._vision_ids is None:
      self._load()
    return [self._extra_ids[token] for token in tokens]

  def added_token_ids(self) -> List[int]:
    """Ids of every added (special) token of the tokenizer: vision, chat, padding, and the
    `extra_special_tokens` (`<|mask|>`)."""
    self._load()
    if self._hf_tokenizer is not None:
      return sorted(self._hf_tokenizer.added_tokens_decoder)
    return sorted(self._tokenizer.get_added_tokens_decoder())

  def text_ids(self, text: str) -> List[int]:
    """Token ids of plain text (no special tokens added); BadRecord if the tokenizer rejects it
    (a lone surrogate, say) or it spells a vision token literally."""
    if not text:
      return []
    vision = self.vision_ids
    try:
      if self._hf_tokenizer is not None:
        ids = list(self._hf_tokenizer.encode(text, add_special_tokens=False))
      else:
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
    except Exception as e:  # pylint: disable=broad-except  # e.g. TypeError for "\ud800"
      raise BadRecord(f"the tokenizer rejects the text ({type(e).__name__}: {e}); expected valid "
                      f"Unicode text") from None
    reserved = set(ids) & set(vision.values())
    if reserved:
      names = sorted(t for t, i in vision.items() if i in reserved)
      raise BadRecord(f"text contains the reserved token(s) {names}; expected plain text with "
                      f"'{IMAGE_MARKER}' markers for images")
    return ids

  def image(self, image: Any, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """(patches float32 [p, 1176], grid_thw int32 [3]) of image k: a path (local or gs://),
    encoded bytes or an array; BadRecord naming it if it cannot be read."""
    name = _image_name(image)
    if isinstance(image, str) and "://" not in image and not os.path.isfile(image):
      raise BadRecord(f"image {k} file {image!r} does not exist")
    try:
      if isinstance(image, str):
        image = images_lib.load_image(image)
      elif isinstance(image, bytes):
        image = images_lib.decode_image(image)
      patches, grid = images_lib.preprocess_image(image, self.image_config)
    except Exception as e:  # pylint: disable=broad-except  # decoders raise their own types
      cause = e.__cause__ if isinstance(e, ValueError) and e.__cause__ is not None else e
      raise BadRecord(f"cannot read image {k} ({name}): {type(cause).__name__}: {cause}") from None
    return (np.asarray(patches, np.float32),
            np.asarray(grid, np.int32).reshape(3))

  def video(self, video: Any, k: int, fps: Optional[float] = None
            ) -> Tuple[np.ndarray, np.ndarray, float]:
    """(patches float32 [p, 1176], grid_thw int32 [3], sample fps) of video k: a file path (local
    or gs://) or a list of frame images (`fps`: their rate, default 2); BadRecord naming it if it
    cannot be read."""
    name = _image_name(video) if not isinstance(video, (list, tuple)) else f"{len(video)} frames"
    if isinstance(video, str) and "://" not in video and not os.path.isfile(video):
      raise BadRecord(f"video {k} file {video!r} does not exist")
    try:
      if isinstance(video, (list, tuple)):
        clip = video_lib.read_frame_list(video, self.video_sampling,
                                         2.0 if fps is None else fps, self.image_config.factor)
      else:
        clip = video_lib.read_video(video, self.video_sampling, self.image_config.factor)
      patches, grid = video_lib.preprocess_video(clip.frames, self.video_config)
    except Exception as e:  # pylint: disable=broad-except  # decoders raise their own types
      raise BadRecord(f"cannot read video {k} ({name}): {type(e).__name__}: {e}") from None
    return patches, grid, clip.sample_fps

  def _pieces(self, text: str, num_images: int, num_videos: int = 0
              ) -> Tuple[List[str], List[str]]:
    """(the text between markers, the markers in order); the prepend rule; BadRecord on counts
    that do not match."""
    parts = _MARKERS.split(text)
    pieces, markers = parts[0::2], parts[1::2]
    if not markers and num_images + num_videos:
      markers = [IMAGE_MARKER] * num_images + [VIDEO_MARKER] * num_videos
      return [""] * len(markers) + [text], markers
    for marker, count, what in ((IMAGE_MARKER, num_images, "images"),
                                (VIDEO_MARKER, num_videos, "videos")):
      if markers.count(marker) != count:
        raise BadRecord(f"text has {markers.count(marker)} '{marker}' markers but the row has "
                        f"{count} {what}; expected one marker per image and video (or none, to "
                        f"prepend them)")
    return pieces, markers

  def _vision_span(self, grid: np.ndarray, pad: str = IMAGE_PAD) -> List[int]:
    """`<|vision_start|>` + N x `pad` + `<|vision_end|>` of an image or video of this grid."""
    merge = self.image_config.merge_size
    t, h, w = (int(x) for x in grid)
    if t * h * w % (merge * merge):
      raise BadRecord(f"an image of grid_thw {[t, h, w]} has {t * h * w} patches, which do not "
                      f"split into merged tokens of merge_size**2 = {merge**2}")
    ids = self.vision_ids
    pads = [ids[pad]] * (t * h * w // merge**2)
    return pads if self.vision_tokens == "bare" else [ids[VISION_START]] + pads + [ids[VISION_END]]

  def ids_for_grids(self, text: str, grid_thw: Any) -> np.ndarray:
    """int32 [n]: the token ids of `text` whose images have these grids [k, 3] (not loaded)."""
    grids = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    pieces, _ = self._pieces(text, len(grids))
    ids = self.text_ids(pieces[0])
    for grid, piece in zip(grids, pieces[1:]):
      ids += self._vision_span(grid) + self.text_ids(piece)
    return np.asarray(ids, np.int32).reshape(-1)

  def encode(self, text: str, images: Sequence[Any], *, length: int,
             max_patches: Optional[int] = None, max_images: Optional[int] = None,
             cut_text: bool = False, cut_images: bool = False, source: str = "row",
             videos: Sequence[Any] = (), video_fps: Optional[float] = None) -> EncodedRow:
    """The EncodedRow of `text` and its `images` and `videos` within the budgets (see the module
    docstring; `max_images` counts videos too), ending with the suffix tokens (counted in
    `length`); `video_fps`: the rate of videos given as frame lists."""
    images, videos = list(images), list(videos)
    suffix = self.extra_ids(self.suffix_tokens)
    length -= len(suffix)
    merge = self.image_config.merge_size
    pieces, markers = self._pieces(text, len(images), len(videos))
    media = iter(images)
    clips = iter(videos)
    ids = self.text_ids(pieces[0])
    patches: List[np.ndarray] = []
    grids: List[np.ndarray] = []
    intervals: List[Optional[float]] = []
    num_patches = 0
    for k, marker in enumerate(markers):
      image = next(media) if marker == IMAGE_MARKER else next(clips)
      if max_images is not None and k >= max_images:
        detail = f"max_images is {max_images}"
      else:
        if marker == IMAGE_MARKER:
          image_patches, grid = self.image(image, k)
          span = self._vision_span(grid)
          interval = None
        else:
          image_patches, grid, sample_fps = self.video(image, k, video_fps)
          span = self._vision_span(grid, VIDEO_PAD)
          interval = mrope.video_time_interval(self.tokens_per_second, sample_fps,
                                               self.video_config.temporal_patch_size)
        detail = ""
        if cut_text and len(ids) + len(span) > length or (
            max_patches is not None and num_patches + image_patches.shape[0] > max_patches):
          detail = (f"{image_patches.shape[0] // merge**2} tokens and {image_patches.shape[0]} "
                    f"patches after {len(ids)} tokens and {num_patches} patches")
      if detail:
        if cut_images and k > 0:
          break  # cut before this image's vision start; later images are dropped too
        what = "image" if marker == IMAGE_MARKER else "video"
        raise BadRecord(f"{what} {k} ({_image_name(image)}) does not fit the budget (length "
                        f"{length}, max_patches {max_patches}): it needs {detail}")
      ids += span
      patches.append(image_patches)
      grids.append(grid)
      intervals.append(interval)
      num_patches += image_patches.shape[0]
      ids += self.text_ids(pieces[k + 1])
    if len(ids) > length:
      if not cut_text:
        image_tokens = sum(int(np.prod(g)) // merge**2 for g in grids)
        detail = f" ({image_tokens} of them image tokens)" if grids else ""
        room = f" less {len(suffix)} suffix tokens" if suffix else ""
        raise BadRecord(f"has {len(ids)} tokens{detail}, more than max_length "
                        f"{length + len(suffix)}{room}")
      ids = ids[:length]  # cuts text only: every kept image fits
    if not ids and not suffix:
      raise BadRecord("empty: no text and no image")
    input_ids = np.asarray(ids + suffix, np.int32)  # [n]
    grid_thw = np.stack(grids).astype(np.int32) if grids else np.zeros((0, 3), np.int32)  # [k, 3]
    pixel_patches = (np.concatenate(patches) if patches
                     else np.zeros((0, inputs.PATCH_DIM), np.float32))  # [p, 1176]
    if self.positions == "sequential":
      positions = np.tile(np.arange(len(input_ids), dtype=np.int32), (3, 1))  # [3, n]
    else:
      positions = mrope.mrope_positions(input_ids, grid_thw, self.vision_ids[IMAGE_PAD],
                                        self.image_config.merge_size,
                                        video_token_id=self.vision_ids[VIDEO_PAD],
                                        time_intervals=intervals)
    is_video = np.asarray([m == VIDEO_MARKER for m in markers[:len(grids)]], bool)  # [k]
    return EncodedRow(input_ids, pixel_patches, grid_thw, positions, source,
                      is_video if is_video.any() else None)


def tokenizer_pad_id(tokenizer_dir: str) -> int:
  """Id of the tokenizer's pad token (tokenizer_config.json), else of `<|endoftext|>`."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  tokenizer = tokenizers.Tokenizer.from_str(_read_text(os.path.join(tokenizer_dir, "tokenizer.json")))
  pad = "<|endoftext|>"
  config_path = os.path.join(tokenizer_dir, "tokenizer_config.json")
  try:
    pad_token = json.loads(_read_text(config_path)).get("pad_token")
  except FileNotFoundError:
    pad_token = None
  if isinstance(pad_token, dict):
    pad_token = pad_token.get("content")
  pad_id = tokenizer.token_to_id(pad_token or pad)
  if pad_id is None:
    raise ValueError(f"{tokenizer_dir}: no pad token ({pad_token or pad!r} is not in tokenizer.json)")
  return int(pad_id)
