"""MoCa stage 1 (CPT) input: mixed records -> encoded, masked examples -> packed batches.

  mixture (sources.py, mixture.py: weighted, capped, shuffled, this process's slice)
    -> map CptEncoder (decode + smart_resize images, tokenize with `<image>` expansion,
       truncate to `length` without cutting an image, M-RoPE positions: the one
       SequenceEncoder of data/sequences.py; then MoCa masks)
    -> to_iter_dataset (read threads) -> first-fit pack (packing.py) -> batch
    -> mp_prefetch (worker processes) when num_workers > 0

One batch (this process's share, local_batch = global_batch_size / process_count rows in
local_buffers = local_batch / rows_per_patch_buffer patch buffers of
buffer_patches = rows_per_patch_buffer * max_patches slots and as many times max_images images):
  input_ids, segment_ids, mlm_mask  int32 [local_batch, length]
  positions                          int32 [local_batch, 3, length]
  pixel_patches                      float32 [local_buffers, buffer_patches, 1176]
  patch_image_ids, mae_mask          int32 [local_buffers, buffer_patches]
  image_grid_thw                     int32 [local_buffers, buffer_images, 3]
  example_ids                        int32 [local_batch, max_segments]  (-1 unused)
  bad_records                        int32 [local_buffers]  records skipped (sum it for a metric)
  bad_messages                       str [local_buffers]    their "FILE:LINE: why" lines

Truncation: text past `length` is cut; an image that does not fit what is left of the token,
patch or image budget is cut before its `<|vision_start|>`, with every later image. A record
whose first image does not fit, or that cannot be read (malformed JSON, no 'text', a missing
or corrupt image, a marker count that does not match its images, text the tokenizer rejects:
any exception while encoding it), is a bad record: skipped, counted in `bad_records` and named
by FILE:LINE in `bad_messages`, which the trainer logs when it takes the batch (bad_records.py).
A source whose every record is bad stops the run with one DataError line naming it.
Text-only examples carry no image and take no patch slot: the rows of a buffer share its slots
where their images fall (packing.py), so a buffer can hold far fewer than its rows' worst case.

Resume: `iter(ds).get_state()` is a small JSON-able dict; `set_state` on a fresh iterator of
the same dataset (same arguments, same num_workers) continues with exactly the batches an
uninterrupted iterator would have produced. Changing num_workers changes the stream.
"""
from typing import Any, Dict, List, Mapping, Optional, Sequence

import grain
import numpy as np

from mmembed_jax.data import images as images_lib
from mmembed_jax.data import video as video_lib
from mmembed_jax.data import masking, mixture, packing, sources as sources_lib
from mmembed_jax.data.bad_records import BadRecord
from mmembed_jax.data.sequences import SequenceEncoder, tokenizer_pad_id
from mmembed_jax.data.special_tokens import MASK_TOKEN

SOURCE_FIELDS = {"name", "path", "kind", "weight", "cap", "options"}


class CptEncoder:
  """Record -> encoded, truncated, masked example, or {"bad_record": "FILE:LINE: why"}; both
  carry the record's "source" name. Picklable and thread-safe (the SequenceEncoder is)."""

  def __init__(self, tokenizer_dir: str, budget: packing.PackingBudget,
               image_config: images_lib.ImageProcessingConfig, text_mask_prob: float,
               image_mask_prob: float, mask_seed: int, extra_never_mask: Sequence[int] = (),
               mae_on_video: bool = True,
               video: video_lib.VideoSettings = video_lib.VideoSettings()):
    # <|mask|> is added as the objective adds it, so its id is never chosen for masking.
    self.sequences = SequenceEncoder(tokenizer_dir, image_config, (MASK_TOKEN,), video=video)
    self.mae_on_video = bool(mae_on_video)
    self.budget = budget
    self.text_mask_prob, self.image_mask_prob = text_mask_prob, image_mask_prob
    self.mask_seed, self.extra_never_mask = int(mask_seed), tuple(extra_never_mask)

  def encode(self, record: Mapping[str, Any]) -> Dict[str, Any]:
    """The encoded example of a record; raises BadRecord (see the module docstring)."""
    if record.get("error"):
      raise BadRecord(record["error"])
    budget = self.budget
    row = self.sequences.encode(record["text"], record["images"], length=budget.length,
                                max_patches=budget.max_patches, max_images=budget.max_images,
                                cut_text=True, cut_images=True, videos=record.get("videos", ()),
                                video_fps=record.get("fps"))
    # Never masked: every added (special) token and extra_never_mask.
    never_mask = set(self.sequences.added_token_ids()) | set(self.extra_never_mask)
    mlm_mask, mae_mask = masking.mask_example(
        self.mask_seed, record["example_id"], row.input_ids, row.num_patches, never_mask,
        self.text_mask_prob, self.image_mask_prob, self.sequences.image_config.merge_size**2,
        None if self.mae_on_video else ~row.video_patches)
    return {"input_ids": row.input_ids, "positions": row.positions,
            "pixel_patches": row.patches, "image_grid_thw": row.grid_thw, "mlm_mask": mlm_mask,
            "mae_mask": mae_mask, "example_id": int(record["example_id"]),
            "source": record.get("source", "?")}

  def __call__(self, record: Mapping[str, Any]) -> Dict[str, Any]:
    return packing.encode_or_skip(self.encode, record)


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
                extra_never_mask: Sequence[int] = (), data_shards: int = 0,
                video: video_lib.VideoSettings = video_lib.VideoSettings(),
                mae_on_video: bool = True, rows_per_patch_buffer: int = 1) -> grain.IterDataset:
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
  image_config = images_lib.ImageProcessingConfig(min_pixels=min_pixels, max_pixels=max_pixels)
  pad_id = tokenizer_pad_id(tokenizer_dir)  # data/sequences.py
  budget = cpt_budget(length, max_patches, max_images, max_segments, pad_id, rows_per_patch_buffer)
  encoder = CptEncoder(tokenizer_dir, budget, image_config, text_mask_prob, image_mask_prob,
                       seed, tuple(extra_never_mask) + (pad_id,), mae_on_video, video)
  return packed_dataset(open_sources(sources), encoder, budget, global_batch_size, seed,
                        num_workers=num_workers, packing_bins=packing_bins,
                        read_threads=read_threads, read_buffer=read_buffer,
                        worker_buffer=worker_buffer, process_index=process_index,
                        process_count=process_count, data_shards=data_shards)


def packed_dataset(entries: Sequence[mixture.MixtureEntry], encoder: Any,
                   budget: packing.PackingBudget, global_batch_size: int, seed: int, *,
                   num_workers: int = 0, packing_bins: Optional[int] = None,
                   read_threads: int = 4, read_buffer: int = 16, worker_buffer: int = 2,
                   process_index: Optional[int] = None, process_count: Optional[int] = None,
                   data_shards: int = 0) -> grain.IterDataset:
  """This process's endless dataset of rows packed from `entries`' records mapped by `encoder`
  (record -> example or {"bad_record": ...}); the arguments as `cpt_dataset`'s."""
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
  if shard_batch % budget.rows_per_buffer:
    raise ValueError(f"input.rows_per_patch_buffer={budget.rows_per_buffer} does not divide the "
                     f"{shard_batch} rows of a data shard's batch")

  def stream(shard: int) -> grain.IterDataset:
    """Batches of shard_batch rows packed from data shard `shard`'s records."""
    ds = mixture.mixture_dataset(entries, seed, shard, data_shards).map(encoder)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                              prefetch_buffer_size=read_buffer))
    ds = packing.PackIterDataset(ds, budget, packing_bins or 2 * shard_batch)
    return ds.batch(shard_batch // budget.rows_per_buffer, drop_remainder=True).map(
        packing.merge_units)

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


def cpt_budget(length: int, max_patches: int, max_images: int, max_segments: int = 64,
               pad_id: int = 0, rows_per_patch_buffer: int = 1) -> packing.PackingBudget:
  """The packed unit's static shape: buffers of rows_per_patch_buffer rows share
  rows_per_patch_buffer times max_patches patch slots and max_images image slots."""
  r = rows_per_patch_buffer
  return packing.PackingBudget(length, r * max_patches, r * max_images, max_segments, pad_id,
                               rows_per_buffer=r)


def batch_unit(length: int, max_patches: int, max_images: int, max_segments: int = 64,
               rows_per_patch_buffer: int = 1, **unused: Any) -> Dict[str, Any]:
  """One patch buffer and its rows, of the shapes `cpt_dataset` makes with these fields (all
  padding): for compiling the train step without data (launch/aot_compile.py)."""
  del unused
  return packing.layout_unit([], cpt_budget(length, max_patches, max_images, max_segments,
                                            rows_per_patch_buffer=rows_per_patch_buffer))
