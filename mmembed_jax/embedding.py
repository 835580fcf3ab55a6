"""Embedding rows with the Flax model: a Hugging Face directory in, L2-normalised vectors out.

  embedder = JaxEmbedder.from_pretrained("exported/")  # attention / pooling from mmembed.json
  vectors = embedder.embed_jsonl("rows.jsonl")          # np.ndarray [rows, embed], float32

Rows follow `mmembed_jax.data.rows` (text with `<image>` markers, image paths relative to the
JSONL file). Embedding streams: one batch of rows is encoded (images loaded and patchified) at a
time, and encoding batch k + 1 overlaps the device computing batch k (JAX dispatches
asynchronously). Batches have static shapes: every batch holds the same number of rows (the last
one is filled with one-token dummy rows whose outputs are dropped) and its length, patch and
image counts are rounded up to "power-of-two-ish" buckets (2^k or 1.5 * 2^k), so a whole file
compiles only a few programs. The jitted function is shared by every embedder of the same model
config and pooling; JAX caches one compiled program per batch shape.

Errors are single ValueErrors that name the row ("row R (line L) of FILE"), the file or the
field, and say what was expected vs found.
"""
import functools
import json
import math
import os
import tempfile
import time
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from mmembed_jax.convert.hf_export import EMBEDDING_FILE
from mmembed_jax.data.bad_records import printable
from mmembed_jax.data import collate as collate_lib
from mmembed_jax.data import images as images_lib
from mmembed_jax.data import rows as rows_lib
from mmembed_jax.data import video as video_lib
from mmembed_jax.data.conventions import read_conventions
from mmembed_jax.data.prompts import PromptFormat
from mmembed_jax.data.sequences import SequenceEncoder
from mmembed_jax.data.special_tokens import compression_tokens
from mmembed_jax.models import embedder as embedder_lib
from mmembed_jax.models import inputs
from mmembed_jax.models.config import ModelConfig
from mmembed_jax.parallel import sharding as sharding_lib

ATTENTIONS = ("causal", "bidirectional")
POOLINGS = ("mean", "last", "ctoken")  # 'ctoken' (CoMa): rows get `num_ctokens` appended
DTYPES = ("float32", "bfloat16")
PREPROCESSOR_FILE = "preprocessor_config.json"
DEFAULT_MAX_LENGTH = 8192
DEFAULT_BATCH_SIZE = 8
# Smallest buckets: shorter batches are padded up to these.
MIN_LENGTH_BUCKET = 32
MIN_PATCH_BUCKET = 64


def bucket(x: int, minimum: int = 1) -> int:
  """Returns the smallest of minimum, 2^k and 1.5 * 2^k (integers) that is >= x (0 stays 0)."""
  if x <= 0:
    return 0
  if x <= minimum:
    return minimum
  power = 1 << (x - 1).bit_length()  # smallest power of two >= x
  three_quarters = 3 * power // 4
  return three_quarters if three_quarters >= x and power % 4 == 0 else power


def _round_up(x: int, multiple: int) -> int:
  """Returns the smallest multiple of `multiple` that is >= x."""
  return -(-x // multiple) * multiple


@functools.lru_cache(maxsize=None)
def _shared_embed_fn(config: ModelConfig, pooling: str, num_ctokens: int) -> Callable[..., jax.Array]:
  """One jitted fn(params, batch) -> [batch, embed] per (config, pooling), shared by embedders."""
  return embedder_lib.make_embed_fn(config, pooling, num_ctokens)


def _sharded_put(config: ModelConfig, mesh: Mesh) -> Callable[[tuple, np.ndarray], jax.Array]:
  """put(path, array) placing each imported parameter with its FSDP sharding on `mesh`."""
  return sharding_lib.put_by_path(sharding_lib.logical_shardings(
      embedder_lib.boxed_param_shapes(config), mesh, sharding_lib.DEFAULT_RULES))


def _read_json_object(path: Any) -> Dict[str, Any]:
  """Returns the JSON object at path (local or gs://); ValueError naming the file otherwise."""
  try:
    record = json.loads(epath.Path(path).read_text())
  except json.JSONDecodeError as e:
    raise ValueError(
        f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
  if not isinstance(record, dict):
    raise ValueError(f"{path}: expected a JSON object, found {type(record).__name__}")
  return record


def _load_tokenizer(model_dir: str) -> Any:
  """Loads the directory's tokenizer with AutoTokenizer (gs:// files are copied locally first)."""
  import transformers  # pylint: disable=g-import-not-at-top
  from mmembed_jax.convert import hf_export  # pylint: disable=g-import-not-at-top
  try:
    if "://" not in model_dir:
      return transformers.AutoTokenizer.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory(prefix="mmembed_tokenizer_") as local:
      for name in hf_export.CARRIED_FILES:
        source = epath.Path(model_dir) / name
        if source.exists():
          source.copy(epath.Path(local) / name)
      return transformers.AutoTokenizer.from_pretrained(local)
  except (OSError, ValueError) as e:
    raise ValueError(f"{model_dir}: cannot load the tokenizer ({e})") from None


def _choice(value: Any, allowed: Sequence[str], what: str) -> str:
  """Returns value if it is one of `allowed`; ValueError naming `what` otherwise."""
  if value not in allowed:
    raise ValueError(f"{what} must be one of {tuple(allowed)}, found {value!r}")
  return value


def _positive(value: Any, what: str) -> int:
  """Returns value as an int if it is a positive integer; ValueError naming `what` otherwise."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{what} must be a positive integer, found {value!r}")
  return int(value)


def _padding_row(pad_id: int) -> rows_lib.EncodedRow:
  """Returns a one-token text-only row that fills the last batch up to batch_size."""
  return rows_lib.EncodedRow(
      input_ids=np.array([pad_id], np.int32),
      patches=np.zeros((0, inputs.PATCH_DIM), np.float32),
      grid_thw=np.zeros((0, 3), np.int32),
      positions=np.zeros((3, 1), np.int32),
      source="padding row")


def _write_atomically(path: str, write: Callable[[Any], None]) -> str:
  """Calls write(binary file) on a temp file in path's directory, then renames it to path."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def save_npy(path: str, array: np.ndarray) -> str:
  """Writes array to path atomically (temp file in the same directory, then os.replace)."""
  return _write_atomically(path, lambda f: np.save(f, array))


def save_json(path: str, record: Any) -> str:
  """Writes record as indented JSON to path atomically."""
  return _write_atomically(path, lambda f: f.write(json.dumps(record, indent=2).encode()))


def compression_token_count(record: Mapping[str, Any], where: Any) -> int:
  """mmembed.json's 'compression_tokens' (0 when absent); ValueError naming the file otherwise."""
  count = record.get("compression_tokens", 0)
  if isinstance(count, bool) or not isinstance(count, int) or count < 0:
    raise ValueError(f"{where}: field 'compression_tokens' is {count!r}; expected an integer >= 0")
  return count


class JaxEmbedder:
  """Rows -> L2-normalised embeddings [rows, embed] with the Flax model, in fixed-shape batches."""

  def __init__(self, config: ModelConfig, params: Mapping[str, Any], tokenizer: Any,
               image_config: Optional[images_lib.ImageProcessingConfig] = None, *,
               pooling: str = "last", max_length: int = DEFAULT_MAX_LENGTH,
               batch_size: int = DEFAULT_BATCH_SIZE, mesh: Optional[Mesh] = None,
               num_ctokens: int = 0, video: Optional[Mapping[str, Any]] = None,
               vision_tokens: str = "wrapped", positions: str = "mrope",
               prompt: PromptFormat = PromptFormat()):
    """Wraps loaded parts; the model's attention mode and dtype are those of `config`.

    mesh: shard every batch's rows over all its devices (params placed as given, e.g. FSDP-sharded
    by `load_trained`); batches are then a multiple of the device count. None: one device.
    num_ctokens: CoMa's compression tokens, appended to every row (mmembed.json
    'compression_tokens'); 'ctoken' pooling averages them, 'last' takes the last one (the
    released CoMa evaluation's "eos" pooling).
    video: how videos are sampled and processed (mmembed.json 'video', data/video.py
    SETTING_FIELDS; None: qwen-vl-utils' and transformers' defaults).
    vision_tokens, positions: how vision tokens sit in the sequence (mmembed.json's fields of
    those names, data/sequences.py); prompt: how rows' instructions and texts are rendered
    (mmembed.json's "prompt", data/prompts.py).
    """
    self.config = config
    self.pooling = _choice(pooling, POOLINGS, "pooling")
    if self.pooling == "ctoken" and num_ctokens < 1:
      raise ValueError(f"pooling 'ctoken' with {num_ctokens} compression tokens: it averages the "
                       f"compression tokens (mmembed.json 'compression_tokens')")
    self.num_ctokens = num_ctokens
    self.prompt = prompt
    self.max_length = _positive(max_length, "max_length")
    self.batch_size = _positive(batch_size, "batch_size")
    self.tokenizer = tokenizer
    self.image_config = image_config or images_lib.ImageProcessingConfig()
    self.encoder = SequenceEncoder(  # shared with training
        tokenizer, self.image_config, suffix_tokens=compression_tokens(num_ctokens),
        video=video_lib.VideoSettings.from_spec(video, config.video_tokens_per_second,
                                                "mmembed.json video"),
        vision_tokens=vision_tokens, positions=positions)
    self._check_compatible()
    pad_id = tokenizer.pad_token_id
    self.pad_id = int(pad_id if pad_id is not None else (tokenizer.eos_token_id or 0))
    self.mesh = mesh
    self.params = params if mesh is not None else jax.device_put(params)  # once, not per call
    self._embed_fn = _shared_embed_fn(config, self.pooling, num_ctokens)
    self.batch_shapes: set = set()  # (batch, length, patches, images) of every batch run so far
    self.rows_encoded = 0  # rows this process has read and encoded (its share on a pod)
    self.step: Optional[int] = None  # the checkpoint step, for a model read from a training run

  @classmethod
  def from_run(cls, path: str, *, attention: Optional[str] = None, pooling: Optional[str] = None,
               dtype: Optional[str] = None, max_length: int = DEFAULT_MAX_LENGTH,
               batch_size: int = DEFAULT_BATCH_SIZE, mesh: Optional[Mesh] = None) -> "JaxEmbedder":
    """Loads a training run (workdir: its latest checkpoint; or WORKDIR/checkpoints/STEP) sharded
    over `mesh` (default all devices); attention / pooling default to the run's config."""
    from mmembed_jax.training import trained_model  # pylint: disable=g-import-not-at-top
    model = trained_model.load_trained(path, dtype=dtype, mesh=mesh)
    attention = _choice(attention or model.embedding["attention"], ATTENTIONS, "attention")
    embedder = cls(model.config.replace(attention=attention), model.params,
                   _load_tokenizer(model.tokenizer_dir), model.image_config,
                   pooling=pooling or model.embedding["pooling"], max_length=max_length,
                   batch_size=batch_size, mesh=model.mesh,
                   num_ctokens=model.embedding.get("compression_tokens", 0),
                   video=model.embedding.get("video"))
    embedder.step = model.step
    return embedder

  @classmethod
  def load(cls, path: str, **options: Any) -> "JaxEmbedder":
    """`from_run` for a training run's workdir or step directory, else `from_pretrained`."""
    from mmembed_jax.training import trained_model  # pylint: disable=g-import-not-at-top
    if trained_model.is_run(path):
      return cls.from_run(path, **options)
    options["dtype"] = options.get("dtype") or "float32"
    return cls.from_pretrained(path, **options)

  @classmethod
  def from_pretrained(cls, model_dir: str, *, attention: Optional[str] = None,
                      pooling: Optional[str] = None, dtype: str = "float32",
                      max_length: int = DEFAULT_MAX_LENGTH,
                      batch_size: int = DEFAULT_BATCH_SIZE, mesh: Optional[Mesh] = None
                      ) -> "JaxEmbedder":
    """Loads an HF directory (local or gs://); attention / pooling default to its mmembed.json."""
    from mmembed_jax.convert import hf_import  # pylint: disable=g-import-not-at-top
    root = epath.Path(model_dir)
    if not root.is_dir():
      raise FileNotFoundError(f"model directory {model_dir} does not exist")
    record_path = root / EMBEDDING_FILE
    record = _read_json_object(record_path) if record_path.exists() else {}
    if attention is None:
      attention = _choice(record.get("attention", "causal"), ATTENTIONS,
                          f"{record_path}: field 'attention'")
    if pooling is None:
      pooling = _choice(record.get("pooling", "last"), POOLINGS, f"{record_path}: field 'pooling'")
    if record.get("normalize", True) is not True:
      raise ValueError(f"{record_path}: field 'normalize' is {record['normalize']!r}; expected "
                       f"true (this embedder always L2-normalises)")
    marker = record.get("image_marker", rows_lib.IMAGE_MARKER)
    if marker != rows_lib.IMAGE_MARKER:
      raise ValueError(f"{record_path}: field 'image_marker' is {marker!r}; expected "
                       f"{rows_lib.IMAGE_MARKER!r}, the only marker the row convention knows")
    _choice(attention, ATTENTIONS, "attention")
    _choice(pooling, POOLINGS, "pooling")
    _choice(dtype, DTYPES, "dtype")
    num_ctokens = compression_token_count(record, record_path)
    conventions = read_conventions(record, record_path)
    pooling_point = conventions.pop("pooling_point")
    put = None
    if mesh is not None:
      put = _sharded_put(hf_import.model_config(model_dir, attention=attention, dtype=dtype,
                                                param_dtype=dtype), mesh)
    config, params = hf_import.import_hf(model_dir, attention=attention, dtype=dtype,
                                         param_dtype=dtype, put=put)
    config = config.replace(final_norm=pooling_point == "final_norm")
    tokenizer = _load_tokenizer(model_dir)
    preprocessor = root / PREPROCESSOR_FILE
    image_config = (images_lib.ImageProcessingConfig.from_preprocessor_config(preprocessor)
                    if preprocessor.exists() else images_lib.ImageProcessingConfig())
    return cls(config, params, tokenizer, image_config, pooling=pooling, max_length=max_length,
               batch_size=batch_size, mesh=mesh, num_ctokens=num_ctokens,
               video=record.get("video"), **conventions)

  @property
  def dim(self) -> int:
    """Returns the embedding width (the LLM's hidden size)."""
    return self.config.text.hidden_size

  def _check_compatible(self) -> None:
    """Raises ValueError if tokenizer or image settings disagree with the model config."""
    ids = self.encoder.vision_ids
    for field, token in (("image_token_id", rows_lib.IMAGE_PAD),
                         ("vision_start_token_id", rows_lib.VISION_START),
                         ("vision_end_token_id", rows_lib.VISION_END)):
      if getattr(self.config, field) != ids[token]:
        raise ValueError(f"config.json {field} is {getattr(self.config, field)} but the "
                         f"tokenizer's {token} has id {ids[token]}; expected the model's own "
                         f"tokenizer")
    vision, image = self.config.vision, self.image_config
    for field, model_value, image_value in (
        ("merge_size", vision.spatial_merge_size, image.merge_size),
        ("patch_size", vision.patch_size, image.patch_size),
        ("temporal_patch_size", vision.temporal_patch_size, image.temporal_patch_size)):
      if model_value != image_value:
        raise ValueError(f"{PREPROCESSOR_FILE} {field} is {image_value} but the model's vision "
                         f"config has {model_value}; expected them to agree")

  def batch_dims(self, encoded: Sequence[rows_lib.EncodedRow]) -> Tuple[int, int, int]:
    """Returns the bucketed (length, max_patches, max_images) of a batch of encoded rows."""
    merge = self.image_config.merge_size
    length, patches, images = collate_lib.bucket_sizes(
        encoded, length_multiple=1, patch_multiple=1, image_multiple=1, merge_size=merge)
    length = min(bucket(length, MIN_LENGTH_BUCKET), self.max_length)
    patches = _round_up(bucket(patches, MIN_PATCH_BUCKET), merge * merge)
    return length, patches, bucket(images)

  def _rows_per_batch(self, num_rows: int) -> int:
    """Returns the batch dimension: batch_size, or the power of two >= num_rows if that is less
    (rounded up to a multiple of the mesh's devices)."""
    rows = min(self.batch_size, 1 << max(num_rows - 1, 0).bit_length())
    return rows if self.mesh is None else _round_up(rows, self.mesh.size)

  def run_batch(self, batch: Mapping[str, np.ndarray]) -> jax.Array:
    """Starts the model on one collated host batch; returns its embeddings [batch, embed] (async).

    With a mesh, only the rows of this process's devices are read from `batch` (on a pod the
    others may be padding)."""
    if self.mesh is not None:
      sharding = sharding_lib.batch_sharding(self.mesh)
      batch = {k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
               for k, v in batch.items()}
    return self._embed_fn(self.params, batch)

  def _local_positions(self, rows_per_batch: int) -> Optional[set]:
    """Positions in a batch whose rows this process's devices hold; None: all of them."""
    if self.mesh is None or jax.process_count() == 1:
      return None
    indices = sharding_lib.batch_sharding(self.mesh).addressable_devices_indices_map(
        (rows_per_batch,))
    return {i for index in indices.values() for i in range(*index[0].indices(rows_per_batch))}

  @staticmethod
  def to_host(embeddings: jax.Array) -> np.ndarray:
    """Device embeddings [batch, embed] (sharded across processes or not) -> host float32."""
    if jax.process_count() > 1:
      embeddings = multihost_utils.process_allgather(embeddings, tiled=True)
    return np.asarray(embeddings, np.float32)

  def _embed_encoded(self, batches: Iterator[List[rows_lib.EncodedRow]], num_rows: int,
                     progress: bool, desc: str) -> np.ndarray:
    """Runs the model on an iterator of encoded batches; returns [num_rows, embed] float32."""
    import tqdm  # pylint: disable=g-import-not-at-top
    rows_per_batch = self._rows_per_batch(num_rows)
    padding = _padding_row(self.pad_id)
    outputs: List[np.ndarray] = []
    pending = None  # (device array [rows_per_batch, embed], real rows in it)
    # Opened once the first batch has encoded, so an error in it prints no empty bar.
    bar = tqdm.tqdm(total=num_rows, unit="row", desc=desc, disable=True)
    try:
      for encoded in batches:  # encoding this batch overlaps the device running the previous one
        if progress and bar.disable:
          bar = tqdm.tqdm(total=num_rows, unit="row", desc=desc, dynamic_ncols=True,
                          smoothing=0.1, disable=jax.process_index() > 0)
        real = len(encoded)
        encoded = list(encoded) + [padding] * (rows_per_batch - real)
        dims = self.batch_dims(encoded)
        if jax.process_count() > 1:  # each process saw its rows only: agree on the largest
          dims = tuple(int(d) for d in multihost_utils.process_allgather(np.asarray(dims)).max(0))
        batch = collate_lib.collate(encoded, self.pad_id, *dims)
        self.batch_shapes.add((rows_per_batch,) + dims)
        result = self.run_batch(batch)  # [rows_per_batch, embed], dispatched async
        if pending is not None:
          outputs.append(self.to_host(pending[0])[:pending[1]])
          bar.update(pending[1])
        pending = (result, real)
      if pending is not None:
        outputs.append(self.to_host(pending[0])[:pending[1]])
        bar.update(pending[1])
    finally:
      bar.close()
    if not outputs:
      return np.zeros((0, self.dim), np.float32)
    return np.concatenate(outputs, axis=0)

  def _batches(self, items: Sequence[Tuple[str, Dict[str, Any]]], base_dir: Optional[str],
               rows_per_batch: int, errors: Optional[Dict[int, str]] = None
               ) -> Iterator[List[rows_lib.EncodedRow]]:
    """Yields encoded batches of (name, row) items, encoding one batch at a time, and of each
    batch only the rows this process's devices hold (padding elsewhere). A row that cannot be
    encoded raises ValueError naming it, or, with `errors`, is recorded there ({index: why})
    and replaced by a padding row."""
    padding = _padding_row(self.pad_id)
    local = self._local_positions(rows_per_batch)
    for start in range(0, len(items), rows_per_batch):
      batch = []
      for index, (where, row) in enumerate(items[start:start + rows_per_batch], start=start):
        if local is not None and index - start not in local:
          batch.append(padding)  # another process reads this row
          continue
        try:
          batch.append(rows_lib.encode_row(row, self.encoder, self.image_config,
                                           self.max_length, base_dir, where, self.prompt))
          self.rows_encoded += 1
        except Exception as e:  # pylint: disable=broad-except  # any failure names the row
          if errors is None:
            raise
          errors[index] = printable(str(e) if isinstance(e, ValueError)
                                    else f"{where}: {type(e).__name__}: {e}")
          batch.append(padding)
      yield batch

  def _embed_named(self, items: Sequence[Tuple[str, Dict[str, Any]]], base_dir: Optional[str],
                   strict: bool, progress: bool = False, desc: str = "embed"
                   ) -> Tuple[np.ndarray, Dict[int, str]]:
    """(embeddings [rows, embed], {row index: why}) with every process's errors; `strict` raises
    the first error instead (in one process as soon as it is met, on a pod once all have run)."""
    errors: Optional[Dict[int, str]] = None if strict and jax.process_count() == 1 else {}
    batches = self._batches(items, base_dir, self._rows_per_batch(len(items)), errors)
    vectors = self._embed_encoded(batches, len(items), progress, desc)
    errors = all_processes_errors(errors or {})
    if strict and errors:
      raise ValueError(errors[min(errors)])
    vectors[sorted(errors)] = np.nan
    return vectors, errors

  def embed_items(self, items: Sequence[Tuple[str, Dict[str, Any]]], base_dir: Optional[str] = None,
                  progress: bool = False, desc: str = "embed") -> np.ndarray:
    """Embeds (row name, row) pairs (names go into errors): [rows, embed] float32.

    Every local image file is checked first, so a missing one fails before any compute.
    """
    check_image_files(items, base_dir)
    return self._embed_named(items, base_dir, True, progress, desc)[0]

  def embed_rows(self, rows: Sequence[Dict[str, Any]], base_dir: Optional[str] = None,
                 progress: bool = False) -> np.ndarray:
    """Embeds rows (relative image paths resolve against base_dir, default cwd): [rows, embed].

    Errors name a row by its "where" field when it has one (e.g. "data.jsonl:7"), else "row R".
    """
    return self.embed_items(_named(rows), base_dir, progress)

  def try_embed_rows(self, rows: Sequence[Dict[str, Any]], base_dir: Optional[str] = None
                     ) -> Tuple[np.ndarray, Dict[int, str]]:
    """(embeddings [rows, embed], {row index: why}): rows that cannot be encoded (an unreadable
    image, say) are skipped, not raised; their embeddings are NaN. The evaluators' EmbedFn.

    On a pod every process passes the same rows, reads and encodes only its devices' share, and
    gets every row's embedding and every process's errors back."""
    return self._embed_named(_named(rows), base_dir, False)

  def embed_jsonl(self, path: str, progress: bool = True) -> np.ndarray:
    """Embeds every row of a JSONL file (images relative to the file): [rows, embed] float32."""
    items, base_dir = read_jsonl(path)
    return self.embed_items(items, base_dir, progress, desc=os.path.basename(path))


def all_processes_errors(errors: Dict[int, str]) -> Dict[int, str]:
  """{row index: why} merged over every process (each saw only the rows it encoded)."""
  if jax.process_count() == 1:
    return errors
  data = np.frombuffer(json.dumps(sorted(errors.items())).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.asarray([data.size])).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  merged = {}
  for size, row in zip(sizes, multihost_utils.process_allgather(padded)):
    merged.update({int(i): why for i, why in json.loads(bytes(row[:size]).decode())})
  return merged


def _named(rows: Sequence[Dict[str, Any]]) -> List[Tuple[str, Dict[str, Any]]]:
  """(name, row) items: a row's own "where" field, else "row R" (1-based)."""
  return [(row.get("where") or f"row {i}", row) for i, row in enumerate(rows, start=1)]


def read_jsonl(path: str) -> Tuple[List[Tuple[str, Dict[str, Any]]], str]:
  """Returns ([(row name, row)], directory image paths resolve against) of a JSONL file.

  Every line is parsed and validated (errors name the file and line); images are not loaded.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"input file {path} does not exist")
  numbered = rows_lib._read_jsonl(path)  # pylint: disable=protected-access
  items = [(rows_lib.row_name(path, r, line), row)
           for r, (line, row) in enumerate(numbered, start=1)]
  return items, os.path.dirname(os.path.abspath(path))


def check_image_files(items: Sequence[Tuple[str, Dict[str, Any]]],
                      base_dir: Optional[str] = None) -> None:
  """Raises ValueError naming the row and path of the first local image file that does not exist."""
  for where, row in items:
    for i, path in enumerate(rows_lib.resolve_image_paths(row, base_dir, where)):
      if "://" not in path and not os.path.isfile(path):
        raise ValueError(f"{where}: image {i} file {path!r} does not exist")


def embed_file(model_dir: str, input_path: str, output_path: str, *,
               attention: Optional[str] = None, pooling: Optional[str] = None,
               dtype: Optional[str] = None, max_length: int = DEFAULT_MAX_LENGTH,
               batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True) -> Dict[str, Any]:
  """Embeds a JSONL file into an .npy file (written atomically); returns shape, timings, rows/s.

  model_dir: an HF directory or a training run (`JaxEmbedder.load`).
  """
  start = time.perf_counter()
  # Bad rows and missing images fail before the model loads.
  items, base_dir = read_jsonl(input_path)
  check_image_files(items, base_dir)
  embedder = JaxEmbedder.load(model_dir, attention=attention, pooling=pooling, dtype=dtype,
                              max_length=max_length, batch_size=batch_size)
  loaded = time.perf_counter()
  embeddings = embedder.embed_items(items, base_dir, progress, desc=os.path.basename(input_path))
  embedded = time.perf_counter()
  save_npy(output_path, embeddings)
  seconds = embedded - loaded
  return {
      "output": output_path,
      "shape": tuple(embeddings.shape),
      "load_seconds": loaded - start,
      "embed_seconds": seconds,
      "rows_per_second": embeddings.shape[0] / seconds if seconds > 0 else math.inf,
      "batch_shapes": sorted(embedder.batch_shapes),
      "attention": embedder.config.attention,
      "pooling": embedder.pooling,
  }
