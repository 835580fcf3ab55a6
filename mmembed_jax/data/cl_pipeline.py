"""Contrastive (MoCa stage 2, VLM2Vec, UNITE) input: pair rows -> encoded query/target batches.

  pair sources (pairs.py: MMEB / mmE5 rows, templates, image roots, target_modal)
    -> task-aware sampler (task_batching.py: one dataset per global batch when task_batching,
       this process's slice of every global batch)
    -> map PairEncoder (read the row; pick K hard negatives; encode every sequence like CPT:
       `<image>` -> `<|vision_start|>` + N x `<|image_pad|>` + `<|vision_end|>`, smart_resize,
       M-RoPE positions, no special tokens: the one SequenceEncoder of data/sequences.py; right
       pad each to its side's static shape)
    -> batch(local batch) -> to_iter_dataset (read threads, a batch each)
    -> mp_prefetch (worker processes, whole batches round robin) when num_workers > 0

One batch (this process's share, L = global_batch_size / process_count), nested numpy dicts:
  query     input_ids, segment_ids  int32 [L, query_length]   segment 1 on tokens, 0 on padding
            positions               int32 [L, 3, query_length]
            pixel_patches           float32 [L, query_max_patches, 1176]
            patch_image_ids         int32 [L, query_max_patches]
            image_grid_thw          int32 [L, max_images, 3]     (models/inputs.py contract)
  positive  the same with target_length and target_max_patches
  negative  the same as positive with a leading [L, K, ...]      (absent when num_negatives == 0)
  negative_mask  int32 [L, K]  1 = a real hard negative           (absent when num_negatives == 0)
  valid          int32 [L]     1 = the row encoded fine
  target_modal   int32 [L]     the positive's modality bitmask (text 1, image 2, video 4)
  dataset_index  int32 [L]     the row's source, by its place in `sources`
  example_ids    int32 [L]     dataset_index * 2**26 + row index (mixture.example_id)
  bad_records    int32 [L]     1 where the row was bad
  bad_messages   str [L]       "FILE:LINE: why" of a bad row, "" otherwise (bad_records.py)

An absent sequence (a missing hard negative, every sequence of a bad row) is all padding:
pad_id in input_ids, zeros everywhere else (segment_ids 0: no token). Its embedding means
nothing; losses leave it out through valid and negative_mask.

Hard negatives: K = num_negatives are drawn without replacement from the row's negatives,
seeded by (seed, example id, the dataset's epoch), so a row seen again in a later epoch may
show other negatives; fewer than K leaves the rest absent with negative_mask 0.

Truncation: a side's text past its length is cut at the end. Its images are never cut: a row
whose sampled sequences' images do not fit their side's token, patch or image budget, or that
cannot be read (malformed JSON, missing fields, a missing or corrupt image, a marker count that
does not match the images, text the tokenizer rejects: any exception while encoding it) is a bad
row: it stays in the batch with valid 0, bad_records 1, absent sequences, and its FILE:LINE and
why in bad_messages, which the trainer logs when it takes the batch. A source whose last 1000
rows (max_consecutive_bad) were all bad stops the run with one DataError line naming it.

Resume: `iter(ds).get_state()` is a small JSON-able dict; `set_state` on a fresh iterator of the
same dataset (same arguments and num_workers) continues with exactly the same batches. The
batches do not depend on num_workers or read_threads.
"""
import concurrent.futures
import dataclasses
import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import grain
import numpy as np

from mmembed_jax.data import collate, cpt_pipeline, images as images_lib, mixture, pairs
from mmembed_jax.data import task_batching as task_batching_lib
from mmembed_jax.data import video as video_lib
from mmembed_jax.data import bad_records
from mmembed_jax.data.bad_records import BadRecord
from mmembed_jax.data.sequences import EncodedRow, SequenceEncoder, tokenizer_pad_id
from mmembed_jax.data.special_tokens import check_ctoken_ids, compression_tokens
from mmembed_jax.models import inputs

log = logging.getLogger(__name__)

SOURCE_FIELDS = ("path", "kind", "weight", "cap") + pairs.SETTING_FIELDS
_NEGATIVE_SALT = 0x6E6567  # keeps the negatives' random stream apart from other uses of the seed


@dataclasses.dataclass(frozen=True)
class SideShape:
  """Static shape of one side's sequences: tokens, patches and images."""
  length: int
  max_patches: int
  max_images: int


def _empty_sequence(where: str) -> EncodedRow:
  """A sequence with no token and no image: all padding once collated."""
  return EncodedRow(input_ids=np.zeros((0,), np.int32),
                             patches=np.zeros((0, inputs.PATCH_DIM), np.float32),
                             grid_thw=np.zeros((0, 3), np.int32),
                             positions=np.zeros((3, 0), np.int32), source=where)


class PairEncoder:
  """Sampled slot {dataset_index, record_index, example_id, epoch} -> one fixed-shape batch row."""
  # Picklable and thread-safe (the sources and the sequence encoder are).

  def __init__(self, sources: Sequence[pairs.PairSource], tokenizer_dir: str,
               image_config: images_lib.ImageProcessingConfig, query_shape: SideShape,
               target_shape: SideShape, num_negatives: int, seed: int, pad_id: int,
               sample_negatives: bool = True, num_ctokens: int = 0,
               video: video_lib.VideoSettings = video_lib.VideoSettings()):
    self.sources, self.query_shape, self.target_shape = list(sources), query_shape, target_shape
    self.num_negatives, self.seed, self.pad_id = int(num_negatives), int(seed), int(pad_id)
    self.sample_negatives = sample_negatives
    # CoMa: every query and target ends with the compression tokens.
    self.sequences = SequenceEncoder(tokenizer_dir, image_config,
                                     suffix_tokens=compression_tokens(num_ctokens), video=video)

  def _encode(self, side: Mapping[str, Any], shape: SideShape, what: str,
              where: str) -> EncodedRow:
    """One side's sequence (text cut at its length, images never); BadRecord naming the side."""
    try:
      return self.sequences.encode(side["text"], side["images"], length=shape.length,
                                   max_patches=shape.max_patches, max_images=shape.max_images,
                                   cut_text=True, source=f"{where} {what}",
                                   videos=side.get("videos", ()), video_fps=side.get("fps"))
    except BadRecord as e:
      raise BadRecord(f"{what}: {e}") from e

  def _collate(self, sequences: Sequence[EncodedRow], shape: SideShape) -> Dict[str, Any]:
    """The sequences right padded to the side's shape: [n, ...] arrays."""
    return collate.collate(sequences, self.pad_id, shape.length, shape.max_patches,
                           shape.max_images)

  def pick_negatives(self, count: int, example_id: int, epoch: int) -> List[int]:
    """Indices of the hard negatives to use: K of `count`, seeded, without replacement."""
    k = min(self.num_negatives, count)
    if not self.sample_negatives or count <= k:
      return list(range(k))
    rng = np.random.default_rng([self.seed, _NEGATIVE_SALT, int(example_id), int(epoch)])
    return [int(i) for i in rng.choice(count, size=k, replace=False)]

  def encode(self, pair: Mapping[str, Any], example_id: int, epoch: int):
    """(query, positive, negatives, negative_mask) of a pair record; raises BadRecord."""
    if pair.get("error"):
      raise BadRecord(pair["error"])
    where = pair["where"]
    query = self._encode(pair["query"], self.query_shape, "query", where)
    positive = self._encode(pair["positive"], self.target_shape, "positive", where)
    picked = self.pick_negatives(len(pair["negatives"]), example_id, epoch)
    negatives = [self._encode(pair["negatives"][i], self.target_shape, f"negative {i}", where)
                 for i in picked]
    mask = np.zeros((self.num_negatives,), np.int32)  # [K]
    mask[:len(negatives)] = 1
    negatives += [_empty_sequence(where)] * (self.num_negatives - len(negatives))
    return query, positive, negatives, mask

  def _row(self, query: EncodedRow, positive: EncodedRow,
           negatives: Sequence[EncodedRow], negative_mask: np.ndarray, valid: int,
           target_modal: int, dataset_index: int, example_id: int, bad: str) -> Dict[str, Any]:
    """The batch row of encoded sequences and bookkeeping (see the module docstring)."""
    row = {"query": {k: v[0] for k, v in self._collate([query], self.query_shape).items()},
           "positive": {k: v[0] for k, v in self._collate([positive], self.target_shape).items()}}
    if self.num_negatives:
      row["negative"] = self._collate(negatives, self.target_shape)  # [K, ...]
      row["negative_mask"] = negative_mask
    row.update(valid=np.int32(valid), target_modal=np.int32(target_modal),
               dataset_index=np.int32(dataset_index), example_ids=np.int32(example_id),
               bad_records=np.int32(bool(bad)))
    row[bad_records.MESSAGES] = bad_records.join_messages([bad] if bad else [])
    return row

  def empty_row(self, dataset_index: int = -1, example_id: int = -1, bad: str = "",
                where: str = "padding") -> Dict[str, Any]:
    """A row with valid 0 whose sequences are all padding (a bad row, named by `bad`, or batch
    padding)."""
    empty = _empty_sequence(where)
    return self._row(empty, empty, [empty] * self.num_negatives,
                     np.zeros((self.num_negatives,), np.int32), 0, 0, dataset_index, example_id,
                     bad)

  def __call__(self, slot: Mapping[str, Any]) -> Dict[str, Any]:
    """The batch row of a sampled slot; a bad row is kept with valid 0 and named."""
    i, example_id = int(slot["dataset_index"]), int(slot["example_id"])
    where = f"source '{self.sources[i].name}' row {int(slot['record_index']) + 1}"
    try:
      pair = self.sources[i][int(slot["record_index"])]
      where = pair["where"]
      query, positive, negatives, mask = self.encode(pair, example_id, int(slot["epoch"]))
    except Exception as e:  # pylint: disable=broad-except  # any failure of one row marks it bad
      return self.empty_row(i, example_id, bad=bad_records.describe(where, e), where=where)
    return self._row(query, positive, negatives, mask, 1, pair["target_modal"], i, example_id, "")


def open_pair_sources(
    sources: Any) -> Tuple[List[pairs.PairSource], List[task_batching_lib.DatasetSpec]]:
  """Pair sources and sampler specs of {name: dict(path, kind, format, weight, cap, ...)}."""
  if not hasattr(sources, "items") or isinstance(sources, str):
    raise ValueError(f"cl sources: expected a mapping {{name: dict(path, kind, ...)}}, found "
                     f"{type(sources).__name__}")
  opened, specs = [], []
  for name, spec in sources.items():
    if not hasattr(spec, "items"):
      raise ValueError(f"source '{name}': expected a dict of fields {list(SOURCE_FIELDS)}, found "
                       f"{type(spec).__name__}")
    spec = dict(spec.items())
    unknown = sorted(set(spec) - set(SOURCE_FIELDS))
    if unknown:
      raise ValueError(f"source '{name}': unknown field(s) {unknown}; expected fields "
                       f"{list(SOURCE_FIELDS)}")
    if not spec.get("path"):
      raise ValueError(f"source '{name}': field 'path' is missing or empty; set it (a file, glob "
                       f"or list of them, local or gs://)")
    cap = spec.get("cap")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, np.integer))
                            or cap < 1):
      raise ValueError(f"source '{name}': field 'cap' = {cap!r}, expected a positive integer "
                       f"or None")
    weight = spec.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
      raise ValueError(f"source '{name}': field 'weight' = {weight!r}, expected a positive number")
    settings = pairs.settings_from_spec(name, spec)
    source = pairs.PairSource(spec.get("kind") or "jsonl", spec["path"], name, settings)
    opened.append(source)
    specs.append(task_batching_lib.DatasetSpec(name, len(source), float(weight), cap))
  if not opened:
    raise ValueError("cl sources: expected at least one source, found none")
  return opened, specs


def _shapes(query_length: int, target_length: int, query_max_patches: int,
            target_max_patches: int, max_images: int, num_negatives: int,
            merge_unit: int) -> Tuple[SideShape, SideShape]:
  """The query and target shapes; ValueError naming the argument."""
  for name, value, low in (("query_length", query_length, 1), ("target_length", target_length, 1),
                           ("query_max_patches", query_max_patches, 0),
                           ("target_max_patches", target_max_patches, 0),
                           ("max_images", max_images, 0), ("num_negatives", num_negatives, 0)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
      raise ValueError(f"cl pipeline: {name} must be an integer >= {low}, found {value!r}")
  for name, value in (("query_max_patches", query_max_patches),
                      ("target_max_patches", target_max_patches)):
    if value % merge_unit:
      raise ValueError(f"cl pipeline: {name} {value} must be a multiple of {merge_unit} "
                       f"(whole merged tokens)")
  return (SideShape(query_length, query_max_patches, max_images),
          SideShape(target_length, target_max_patches, max_images))


def _encoder(sources: Sequence[pairs.PairSource], tokenizer_dir: str, seed: int,
             sample_negatives: bool, num_negatives: int, query_length: int, target_length: int,
             query_max_patches: int, target_max_patches: int, max_images: int, min_pixels: int,
             max_pixels: int, num_ctokens: int = 0, vocab_size: Optional[int] = None,
             video: video_lib.VideoSettings = video_lib.VideoSettings()) -> PairEncoder:
  """The PairEncoder for these encoding arguments (vocab_size: checks the compression tokens'
  ids fall inside it)."""
  image_config = images_lib.ImageProcessingConfig(min_pixels=min_pixels, max_pixels=max_pixels)
  query_shape, target_shape = _shapes(query_length, target_length, query_max_patches,
                                      target_max_patches, max_images, num_negatives,
                                      image_config.merge_size**2)
  pad_id = tokenizer_pad_id(tokenizer_dir)
  encoder = PairEncoder(sources, tokenizer_dir, image_config, query_shape, target_shape,
                        num_negatives, seed, pad_id, sample_negatives, num_ctokens, video)
  if num_ctokens and vocab_size is not None:
    check_ctoken_ids(encoder.sequences, num_ctokens, vocab_size)
  return encoder


def cl_dataset(sources: Any, tokenizer_dir: str, global_batch_size: int, seed: int, *,
               num_negatives: int, query_length: int, target_length: int,
               query_max_patches: int, target_max_patches: int, max_images: int = 1,
               min_pixels: int, max_pixels: int, num_ctokens: int = 0,
               video: video_lib.VideoSettings = video_lib.VideoSettings(),
               vocab_size: Optional[int] = None, task_batching: bool = True,
               num_workers: int = 0, read_threads: int = 4, read_buffer: Optional[int] = None,
               worker_buffer: int = 2, process_index: Optional[int] = None,
               process_count: Optional[int] = None,
               max_consecutive_bad: int = bad_records.MAX_CONSECUTIVE) -> grain.IterDataset:
  """This process's endless dataset of contrastive batches (see the module docstring)."""
  # sources: {name: dict(path (file, glob or list), kind (jsonl | parquet, default jsonl),
  #   format (mmeb | mmE5), weight (default 1), cap (default all rows), image_root,
  #   query_template, target_template, target_modal)}, e.g. a ConfigDict; pairs.py explains the
  #   pair settings. read_threads / read_buffer: batches encoded at once / kept ahead (default
  #   read_threads), per worker. process_index / process_count default to JAX's.
  #   max_consecutive_bad: bad rows in a row from one source that stop the run (DataError).
  #   num_ctokens: compression tokens ending every sequence (CoMa), inside vocab_size.
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index, process_count = jax.process_index(), jax.process_count()
  opened, specs = open_pair_sources(sources)
  sampler = task_batching_lib.TaskBatchSampler(specs, global_batch_size, seed, task_batching,
                                           process_index, process_count)
  encoder = _encoder(opened, tokenizer_dir, seed, True, num_negatives, query_length,
                     target_length, query_max_patches, target_max_patches, max_images,
                     min_pixels, max_pixels, num_ctokens, vocab_size, video)
  # Batch before to_iter_dataset: Grain threads and worker processes then take whole batches
  # (worker w every W-th), so a batch is always one global batch's slice and num_workers does
  # not change the stream; rows within a batch are encoded one after the other.
  ds = task_batching_lib.sampler_dataset(sampler).map(encoder)
  ds = ds.batch(sampler.local_batch_size, drop_remainder=True)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                            prefetch_buffer_size=read_buffer or read_threads))
  ds = cpt_pipeline.with_worker_processes(ds, num_workers, worker_buffer)
  return ds.map(_BadSourceCheck([source.name for source in opened], max_consecutive_bad))


class _BadSourceCheck:
  """Passes batches through; DataError once a source's last `limit` rows were all bad."""

  def __init__(self, names: Sequence[str], limit: int):
    self.names, self.check = list(names), bad_records.ConsecutiveBadCheck(limit)

  def __call__(self, batch: Dict[str, Any]) -> Dict[str, Any]:
    for index, bad, message in zip(batch["dataset_index"], batch["bad_records"],
                                   batch[bad_records.MESSAGES]):
      name = self.names[int(index)]
      if bad:
        self.check.bad(name, str(message))
      else:
        self.check.good(name)
    return batch


def _stack(rows: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
  """Nested dicts of arrays stacked along a new leading axis."""
  return {k: _stack([r[k] for r in rows]) if isinstance(rows[0][k], Mapping)
          else np.stack([r[k] for r in rows]) for k in rows[0]}


def cl_eval_batches(sources: Any, tokenizer_dir: str, batch_size: int, *,
                    max_rows_per_dataset: int, num_negatives: int, query_length: int,
                    target_length: int, query_max_patches: int, target_max_patches: int,
                    max_images: int = 1, min_pixels: int, max_pixels: int,
                    num_ctokens: int = 0, read_threads: int = 4,
                    video: video_lib.VideoSettings = video_lib.VideoSettings()
                    ) -> List[Dict[str, Any]]:
  """Held-out batches: the first rows of every dataset in file order, same format as cl_dataset."""
  # No shuffle and no sharding (every process gets every batch; the caller shards them), the
  # first K hard negatives of each row, the last batch padded with rows of valid 0,
  # dataset_index -1 and example_ids -1. Rows of several datasets may share a batch.
  if max_rows_per_dataset < 1 or batch_size < 1:
    raise ValueError(f"cl_eval_batches: batch_size ({batch_size}) and max_rows_per_dataset "
                     f"({max_rows_per_dataset}) must be >= 1")
  opened, _ = open_pair_sources(sources)
  encoder = _encoder(opened, tokenizer_dir, 0, False, num_negatives, query_length, target_length,
                     query_max_patches, target_max_patches, max_images, min_pixels, max_pixels,
                     num_ctokens, video=video)
  slots = [{"dataset_index": i, "record_index": r, "example_id": mixture.example_id(i, r),
            "epoch": 0}
           for i, source in enumerate(opened)
           for r in range(min(len(source), max_rows_per_dataset))]
  with concurrent.futures.ThreadPoolExecutor(max(1, read_threads)) as pool:
    rows = list(pool.map(encoder, slots))
  for message in bad_records.split_messages(np.array([row[bad_records.MESSAGES] for row in rows])):
    log.warning("held-out set: skipped bad row %s", message)
  batches = []
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    chunk += [encoder.empty_row()] * (batch_size - len(chunk))
    batches.append(_stack(chunk))
  return batches


def batch_row(num_negatives: int, query_length: int, target_length: int, query_max_patches: int,
              target_max_patches: int, max_images: int = 1, **unused: Any) -> Dict[str, Any]:
  """One batch row of the shapes `cl_dataset` makes with these fields (all padding): for
  compiling the train step without data (launch/aot_compile.py)."""
  del unused
  query_shape, target_shape = _shapes(query_length, target_length, query_max_patches,
                                      target_max_patches, max_images, num_negatives, 4)
  encoder = PairEncoder([], "", images_lib.ImageProcessingConfig(), query_shape, target_shape,
                        num_negatives, seed=0, pad_id=0)
  return encoder.empty_row()
