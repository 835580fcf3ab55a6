"""MoCa stage 1 (CPT) input: mixed records -> encoded, masked examples -> packed batches.

  mixture (sources.py, mixture.py: weighted, capped, shuffled, this process's slice)
    -> map CptEncoder (decode + smart_resize images, tokenize with `<image>` expansion,
       truncate to `length` without cutting an image, M-RoPE positions: the SequenceEncoder
       shared with cl_pipeline.py; then MoCa masks)
    -> to_iter_dataset (read threads) -> first-fit pack (packing.py) -> batch
    -> mp_prefetch (worker processes) when num_workers > 0

One batch (this process's share, local_batch = global_batch_size / process_count):
  input_ids, segment_ids, mlm_mask  int32 [local_batch, length]
  positions                          int32 [local_batch, 3, length]
  pixel_patches                      float32 [local_batch, max_patches, 1176]
  patch_image_ids, mae_mask          int32 [local_batch, max_patches]
  image_grid_thw                     int32 [local_batch, max_images, 3]
  example_ids                        int32 [local_batch, max_segments]  (-1 unused)
  bad_records                        int32 [local_batch]  records skipped (sum it for a metric)
  bad_messages                       str [local_batch]    their "FILE:LINE: why" lines

Truncation: text past `length` is cut; an image that does not fit what is left of the token,
patch or image budget is cut before its `<|vision_start|>`, with every later image. A record
whose first image does not fit, or that cannot be read (malformed JSON, no 'text', a missing
or corrupt image, a marker count that does not match its images, text the tokenizer rejects:
any exception while encoding it), is a bad record: skipped, counted in `bad_records` and named
by FILE:LINE in `bad_messages`, which the trainer logs when it takes the batch (bad_records.py).
A source whose every record is bad stops the run with one DataError line naming it.
Text-only examples carry no image; text-only rows have no patches.

Resume: `iter(ds).get_state()` is a small JSON-able dict; `set_state` on a fresh iterator of
the same dataset (same arguments, same num_workers) continues with exactly the batches an
uninterrupted iterator would have produced. Changing num_workers changes the stream.
"""
import json
import os
import threading
from typing import Any, Dict, List, Mapping, Optional, Sequence

import grain
import numpy as np

from mmembed_jax.data import images as images_lib
from mmembed_jax.data import masking, mixture, mrope, packing, sources as sources_lib
from mmembed_jax.data.bad_records import BadRecord, describe
from mmembed_jax.data.rows import IMAGE_MARKER, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START

SOURCE_FIELDS = {"name", "path", "kind", "weight", "cap", "options"}


def _read_text(path: str) -> str:
  """Reads a local or gs:// text file."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  return epath.Path(path).read_text()


class SequenceEncoder:
  """Text with `<image>` markers + images -> token ids, patches, grids and M-RoPE positions."""
  # Picklable and thread-safe: the tokenizer (the `tokenizers` library, from tokenizer.json) is
  # loaded lazily once per process, so worker processes do not import transformers.

  def __init__(self, tokenizer_dir: str, image_config: images_lib.ImageProcessingConfig):
    self.tokenizer_dir, self.image_config = tokenizer_dir, image_config
    self._lock = threading.Lock()
    self._tokenizer = None

  def __getstate__(self):
    state = dict(self.__dict__, _tokenizer=None)
    state.pop("_lock")
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def _load_tokenizer(self):
    """The tokenizer and its special ids, loaded once."""
    with self._lock:
      if self._tokenizer is None:
        import tokenizers  # pylint: disable=g-import-not-at-top
        tokenizer = tokenizers.Tokenizer.from_str(
            _read_text(os.path.join(self.tokenizer_dir, "tokenizer.json")))
        ids = {}
        for token in (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD):
          ids[token] = tokenizer.token_to_id(token)
          if ids[token] is None:
            raise ValueError(f"{self.tokenizer_dir}/tokenizer.json has no token {token!r}; "
                             f"expected a Qwen-VL tokenizer")
        self.vision_ids = ids
        self._loaded(tokenizer)
        self._tokenizer = tokenizer  # last: other threads test it without the lock
    return self._tokenizer

  def _loaded(self, tokenizer: Any) -> None:
    """Hook for subclasses: derive more ids from the freshly loaded tokenizer (under the lock)."""

  def _encode_text(self, text: str) -> List[int]:
    """Token ids of plain text; BadRecord if it spells a vision token literally."""
    if not text:
      return []
    ids = self._tokenizer.encode(text, add_special_tokens=False).ids
    reserved = set(ids) & set(self.vision_ids.values())
    if reserved:
      names = sorted(t for t, i in self.vision_ids.items() if i in reserved)
      raise BadRecord(f"text contains the reserved token(s) {names}; expected plain text with "
                      f"'{IMAGE_MARKER}' markers for images")
    return ids

  def _image(self, image: Any, k: int):
    """(patches float32 [p, 1176], grid_thw int32 [3]) of image k (path, bytes or array)."""
    name = _image_name(image)
    try:
      if isinstance(image, str):
        image = images_lib.load_image(image)
      elif isinstance(image, bytes):
        image = images_lib.decode_image(image)
      patches, grid = images_lib.preprocess_image(image, self.image_config)
    except Exception as e:  # pylint: disable=broad-except  # decoders raise their own types
      raise BadRecord(f"cannot read image {k} ({name}): {e}") from e
    return patches, np.asarray(grid, np.int32).reshape(3)

  def encode_sequence(self, text: str, record_images: Sequence[Any], length: int, max_patches: int,
                      max_images: int, cut_images: bool = True) -> Dict[str, np.ndarray]:
    """{input_ids [n], positions [3, n], pixel_patches [p, 1176], image_grid_thw [k, 3]}.

    n <= length: text past `length` is cut. An image that does not fit what is left of the token,
    patch or image budget raises BadRecord if it is the first image or cut_images is False;
    otherwise the sequence is cut before its `<|vision_start|>` and later images are dropped.
    """
    if self._tokenizer is None:
      self._load_tokenizer()
    record_images = list(record_images)
    pieces = text.split(IMAGE_MARKER)
    if len(pieces) == 1 and record_images:
      pieces = [""] * len(record_images) + [text]  # the prepend rule of rows.py
    elif len(pieces) - 1 != len(record_images):
      raise BadRecord(f"text has {len(pieces) - 1} '{IMAGE_MARKER}' markers but the record has "
                      f"{len(record_images)} images; expected one per image (or none, to prepend)")
    merge = self.image_config.merge_size
    ids = self._encode_text(pieces[0])
    patches: List[np.ndarray] = []
    grids: List[np.ndarray] = []
    num_patches = 0
    for k, image in enumerate(record_images):
      if k < max_images:
        image_patches, grid = self._image(image, k)
        image_tokens = int(np.prod(grid)) // merge**2
        fits = (len(ids) + image_tokens + 2 <= length
                and num_patches + image_patches.shape[0] <= max_patches)
      else:
        fits = False
      if not fits:
        if k == 0 or not cut_images:
          detail = (f"{image_tokens} tokens and {image_patches.shape[0]} patches after "
                    f"{len(ids)} text tokens and {num_patches} patches" if k < max_images
                    else f"max_images is {max_images}")
          raise BadRecord(f"image {k} ({_image_name(image)}) does not fit the budget (length "
                          f"{length}, max_patches {max_patches}): it needs {detail}")
        break  # cut before this image's vision start; later images are dropped too
      ids += ([self.vision_ids[VISION_START]] + [self.vision_ids[IMAGE_PAD]] * image_tokens
              + [self.vision_ids[VISION_END]])
      patches.append(image_patches)
      grids.append(grid)
      num_patches += image_patches.shape[0]
      ids += self._encode_text(pieces[k + 1])
    input_ids = np.asarray(ids[:length], np.int32)  # [n]; cuts text only
    if input_ids.shape[0] == 0:
      raise BadRecord("empty: no text and no image")
    grid_thw = np.stack(grids).astype(np.int32) if grids else np.zeros((0, 3), np.int32)  # [k, 3]
    pixel_patches = (np.concatenate(patches).astype(np.float32, copy=False) if patches
                     else np.zeros((0, self.image_config.patch_dim), np.float32))
    positions = mrope.mrope_positions(input_ids, grid_thw, self.vision_ids[IMAGE_PAD], merge)
    return {"input_ids": input_ids, "positions": positions, "pixel_patches": pixel_patches,
            "image_grid_thw": grid_thw}


class CptEncoder(SequenceEncoder):
  """Record -> encoded, truncated, masked example, or {"bad_record": "FILE:LINE: why"}; both
  carry the record's "source" name."""

  def __init__(self, tokenizer_dir: str, budget: packing.PackingBudget,
               image_config: images_lib.ImageProcessingConfig, text_mask_prob: float,
               image_mask_prob: float, mask_seed: int, extra_never_mask: Sequence[int] = ()):
    super().__init__(tokenizer_dir, image_config)
    self.budget = budget
    self.text_mask_prob, self.image_mask_prob = text_mask_prob, image_mask_prob
    self.mask_seed, self.extra_never_mask = int(mask_seed), tuple(extra_never_mask)

  def _loaded(self, tokenizer: Any) -> None:
    """Ids never masked: every added (special) token and extra_never_mask."""
    self.never_mask = frozenset(tokenizer.get_added_tokens_decoder()) | set(self.extra_never_mask)

  def encode(self, record: Mapping[str, Any]) -> Dict[str, Any]:
    """The encoded example of a record; raises BadRecord (see the module docstring)."""
    if record.get("error"):
      raise BadRecord(record["error"])
    budget, merge = self.budget, self.image_config.merge_size
    example = self.encode_sequence(record["text"], record["images"], budget.length,
                                   budget.max_patches, budget.max_images, cut_images=True)
    mlm_mask, mae_mask = masking.mask_example(
        self.mask_seed, record["example_id"], example["input_ids"],
        example["pixel_patches"].shape[0], self.never_mask, self.text_mask_prob,
        self.image_mask_prob, merge**2)
    return dict(example, mlm_mask=mlm_mask, mae_mask=mae_mask,
                example_id=int(record["example_id"]), source=record.get("source", "?"))

  def __call__(self, record: Mapping[str, Any]) -> Dict[str, Any]:
    try:
      return self.encode(record)
    except Exception as e:  # pylint: disable=broad-except  # any failure of one record skips it
      return {packing.BAD_RECORD: describe(record.get("where", "?"), e),
              "source": record.get("source", "?")}


def _image_name(image: Any) -> str:
  """How messages name an image: its path, or its type for bytes and arrays."""
  return image if isinstance(image, str) else type(image).__name__


def open_sources(sources: Any) -> List[mixture.MixtureEntry]:
  """Mixture entries from source dicts {name, path, kind, weight, cap[, options]}, or {name: dict}."""
  if isinstance(sources, Mapping):  # {name: {path, kind, ...}}, e.g. from a ConfigDict
    sources = [dict(spec, name=name) for name, spec in sources.items()]
  entries = []
  for i, spec in enumerate(sources):
    spec = dict(spec)
    unknown = set(spec) - SOURCE_FIELDS
    missing = {"name", "path", "kind"} - set(spec)
    if unknown or missing:
      raise ValueError(f"sources[{i}] ({spec.get('name', '?')}): unknown fields {sorted(unknown)}, "
                       f"missing fields {sorted(missing)}; expected {sorted(SOURCE_FIELDS)}")
    if not spec["path"]:
      raise ValueError(f"source '{spec['name']}' has an empty path; set it (local or gs://)")
    source = sources_lib.open_source(spec["kind"], spec["path"], spec["name"],
                                     **dict(spec.get("options") or {}))
    entries.append(mixture.MixtureEntry(spec["name"], source, float(spec.get("weight", 1.0)),
                                        spec.get("cap")))
  return entries


def cpt_dataset(sources: Any, tokenizer_dir: str, global_batch_size: int,
                length: int, max_patches: int, max_images: int, min_pixels: int, max_pixels: int,
                text_mask_prob: float, image_mask_prob: float, seed: int, num_workers: int = 0,
                max_segments: int = 64, packing_bins: Optional[int] = None,
                read_threads: int = 4, read_buffer: int = 16, worker_buffer: int = 2,
                process_index: Optional[int] = None,
                process_count: Optional[int] = None,
                extra_never_mask: Sequence[int] = (), data_shards: int = 0) -> grain.IterDataset:
  """This process's endless dataset of packed CPT batches (see the module docstring)."""
  # sources: dicts {name, path (file, glob or list), kind (jsonl | parquet | array_record |
  #   tfds), weight (default 1), cap (default: all records), options (kwargs of the source)},
  #   or a mapping {name: dict}; a source's index (in example ids) is its place in that order.
  # packing_bins: rows packed at once (default 2 x local batch); more bins pack tighter and hold
  #   more decoded examples in memory. read_threads / read_buffer: decoding threads and decoded
  #   examples kept ahead, per worker. process_index / process_count default to JAX's.
  # data_shards: independent read-and-pack streams, each filling global_batch_size / data_shards
  #   rows of every batch (default: one per process). Batches depend on it, not on how many
  #   processes read them: 1 process with data_shards=2 makes the batches 2 processes make.
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index, process_count = jax.process_index(), jax.process_count()
  data_shards = data_shards or process_count
  if data_shards % process_count:
    raise ValueError(f"input.data_shards={data_shards} is not a multiple of the {process_count} "
                     f"processes")
  if global_batch_size % data_shards:
    raise ValueError(f"global_batch_size {global_batch_size} is not divisible by "
                     f"{data_shards} data shards (one per process unless input.data_shards is set)")
  shard_batch = global_batch_size // data_shards
  per_process = data_shards // process_count
  image_config = images_lib.ImageProcessingConfig(min_pixels=min_pixels, max_pixels=max_pixels)
  pad_id = tokenizer_pad_id(tokenizer_dir)
  budget = packing.PackingBudget(length, max_patches, max_images, max_segments, pad_id,
                                 image_config.merge_size**2)
  encoder = CptEncoder(tokenizer_dir, budget, image_config, text_mask_prob, image_mask_prob,
                       seed, tuple(extra_never_mask) + (pad_id,))
  entries = open_sources(sources)

  def stream(shard: int) -> grain.IterDataset:
    """Batches of shard_batch rows packed from data shard `shard`'s records."""
    ds = mixture.mixture_dataset(entries, seed, shard, data_shards).map(encoder)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                              prefetch_buffer_size=read_buffer))
    ds = packing.PackIterDataset(ds, budget, packing_bins or 2 * shard_batch)
    return ds.batch(shard_batch, drop_remainder=True)

  streams = [stream(process_index * per_process + i) for i in range(per_process)]
  ds = streams[0]
  if per_process > 1:  # this process's shards, one after the other along the batch
    ds = grain.experimental.ZipIterDataset(streams).map(
        lambda parts: {key: np.concatenate([part[key] for part in parts]) for key in parts[0]})
  return with_worker_processes(ds, num_workers, worker_buffer)


def with_worker_processes(ds: grain.IterDataset, num_workers: int,
                          worker_buffer: int) -> grain.IterDataset:
  """`ds` prefetched by `num_workers` worker processes (unchanged when 0)."""
  if num_workers <= 0:
    return ds
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():  # outside absl.app (tests, notebooks) grain reads flag defaults
    flags.FLAGS.mark_as_parsed()
  return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                     per_worker_buffer_size=worker_buffer))


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


def batch_row(length: int, max_patches: int, max_images: int, max_segments: int = 64,
              **unused: Any) -> Dict[str, Any]:
  """One packed row of the shapes `cpt_dataset` makes with these fields (all padding): for
  compiling the train step without data (launch/aot_compile.py)."""
  del unused
  return packing.layout_row([], packing.PackingBudget(length, max_patches, max_images,
                                                      max_segments))
