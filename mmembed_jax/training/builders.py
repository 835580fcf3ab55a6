"""Config sections -> objects: the model architecture, the objective and the input pipeline.

Each recipe names its objective and input by `name`; new recipes register a builder here.
"""
import json
import os
from typing import Any, Callable, Mapping, Optional

import ml_collections

from mmembed_jax.models.config import ModelConfig
from mmembed_jax.models.presets import preset_config


def is_hf_dir(path: str) -> bool:
  """True for a Hugging Face model directory: config.json, but not a run's workdir (checkpoints/)."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  if not path:
    return False
  root = epath.Path(path)
  return (root / "config.json").exists() and not (root / "checkpoints").exists()


def source_hf_dir(init_from: str) -> str:
  """The HF directory a run starts from: `init_from` itself, or the one the run it names (and so
  on, through each workdir's config.json) started from; "" when there is none."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  seen = set()
  while init_from and init_from not in seen:
    if is_hf_dir(init_from):
      return init_from
    seen.add(init_from)
    config_file = epath.Path(init_from) / "config.json"
    if not config_file.exists():
      return ""
    init_from = json.loads(config_file.read_text()).get("init_from", "")
  return ""


def build_model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """The architecture of the HF directory the run starts from (`source_hf_dir`), else `model.preset`."""
  options = dict(attention=config.model.attention, dtype=config.model.dtype,
                 param_dtype=config.model.param_dtype, scan_layers=config.model.scan_layers,
                 remat_policy=config.model.remat_policy, attention_impl=config.model.get("attention_impl", "auto"))
  hf_dir = source_hf_dir(config.init_from)
  if hf_dir:
    from mmembed_jax.convert.hf_import import model_config  # pylint: disable=g-import-not-at-top
    return model_config(hf_dir, **options)
  architecture = preset_config(config.model.preset, **options)
  tokenizer_dir = run_tokenizer_dir(config)
  if not tokenizer_dir:
    return architecture
  # The vision token ids are the tokenizer's: a mismatch would silently drop every image.
  import transformers  # pylint: disable=g-import-not-at-top
  from mmembed_jax.demo.tokenizer import special_token_ids  # pylint: disable=g-import-not-at-top
  ids = special_token_ids(transformers.AutoTokenizer.from_pretrained(tokenizer_dir))
  return architecture.replace(**ids)


def run_tokenizer_dir(config: ml_collections.ConfigDict) -> str:
  """The run's tokenizer directory (objective's, input's, or resolved), "" when it has none."""
  for section in (config.objective, config.input):
    if section.get("tokenizer_dir"):
      return section.tokenizer_dir
  try:
    return resolve_tokenizer_dir(config, "")
  except ValueError:
    return ""


def _fields(section: ml_collections.ConfigDict) -> dict:
  fields = section.to_dict()
  fields.pop("name")
  return fields


def _checked(builder: Callable, section: ml_collections.ConfigDict, what: str, *args) -> Any:
  try:
    return builder(*args, **_fields(section))
  except TypeError as e:
    raise ValueError(f"{what} '{section.name}': bad fields {sorted(_fields(section))}: {e}") from e


def _masked_lm(model_config: ModelConfig, mask_prob: float = 0.15, mask_token_id: int = -1):
  from mmembed_jax.objectives.masked_lm import make_masked_lm  # pylint: disable=g-import-not-at-top
  if mask_token_id < 0:
    mask_token_id = model_config.text.vocab_size - 1
  return make_masked_lm(model_config, mask_token_id, mask_prob)


def _moca_cpt_input(model_config: ModelConfig, seed: int, sources: Any, tokenizer_dir: str,
                    **fields):
  from mmembed_jax.data.cpt_pipeline import cpt_dataset  # pylint: disable=g-import-not-at-top
  if sources == "demo":
    from mmembed_jax.data.demo_data import write_demo_dataset  # pylint: disable=g-import-not-at-top
    files = write_demo_dataset(os.path.join(DEMO_CACHE, "data"), seed=0)
    sources = [dict(name=name, path=path, kind="jsonl", weight=1.0) for name, path in files.items()]
  else:
    sources = {name: dict(source) for name, source in dict(sources).items()}
    unset = [name for name, source in sources.items() if not source.get("path")]
    if unset:
      raise ValueError(f"input.sources: no path set for {unset}; set --config.input.sources."
                       f"{unset[0]}.path=... (local or gs://) or remove the source")
  return cpt_dataset(sources, tokenizer_dir, seed=seed, **fields)


def _synthetic_tokens(model_config: ModelConfig, seed: int, global_batch_size: int, length: int):
  from mmembed_jax.data.synthetic_tokens import synthetic_token_dataset  # pylint: disable=g-import-not-at-top
  return synthetic_token_dataset(global_batch_size, length, model_config.text.vocab_size - 16, seed)


DEMO_CACHE = os.environ.get("MMEMBED_DEMO_CACHE",
                            os.path.join(os.path.expanduser("~"), ".cache", "mmembed_jax", "demo"))


def demo_tokenizer_dir() -> str:
  """The demo tokenizer, trained into the demo cache on first use."""
  from mmembed_jax.demo.tokenizer import build_tokenizer  # pylint: disable=g-import-not-at-top
  path = os.path.join(DEMO_CACHE, "tokenizer")
  if not os.path.exists(os.path.join(path, "tokenizer.json")):
    build_tokenizer(path)
  return path


def resolve_tokenizer_dir(config: ml_collections.ConfigDict, tokenizer_dir: str) -> str:
  """An explicit tokenizer_dir, else the source HF directory's, else the demo tokenizer."""
  if tokenizer_dir:
    return tokenizer_dir
  hf_dir = source_hf_dir(config.init_from)
  if hf_dir:
    return hf_dir
  if config.input.get("sources") == "demo":
    return demo_tokenizer_dir()
  raise ValueError("no tokenizer: set tokenizer_dir (in the objective or input section) or "
                   "init_from an HF model directory (or a run that started from one)")


def _moca_cpt(model_config: ModelConfig, tokenizer_dir: str, mae_weight: float = 0.5,
              mlm_shift_labels: bool = True, noise: str = "shared", logits_chunk: int = 512):
  import transformers  # pylint: disable=g-import-not-at-top
  from mmembed_jax.data.special_tokens import mask_token_id  # pylint: disable=g-import-not-at-top
  from mmembed_jax.objectives.moca_cpt import MocaCpt  # pylint: disable=g-import-not-at-top
  tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  return MocaCpt(model_config, mask_token_id(tokenizer, model_config.text.vocab_size),
                 mae_weight=mae_weight, shift_labels=mlm_shift_labels, noise=noise,
                 logits_chunk=logits_chunk)


def _contrastive(model_config: ModelConfig, **fields):
  from mmembed_jax.objectives.contrastive_objective import Contrastive  # pylint: disable=g-import-not-at-top
  return Contrastive(model_config, **fields)


# The demo's synthetic pairs (data/demo_data.py): a training split and a held-out one.
DEMO_PAIRS = dict(num_scenes=192, num_documents=64, num_passages=192, seed=0, name="pairs")
DEMO_HELD_OUT_PAIRS = dict(num_scenes=48, num_documents=16, num_passages=48, seed=1,
                           name="pairs_eval")


def pair_sources(sources: Any, demo_split: Mapping[str, Any] = DEMO_PAIRS) -> dict:
  """{name: source dict} of a config's pair sources; "demo" writes (or reuses) the demo pairs."""
  if sources == "demo":
    from mmembed_jax.data.demo_data import write_demo_pairs  # pylint: disable=g-import-not-at-top
    files = write_demo_pairs(os.path.join(DEMO_CACHE, "data"), **demo_split)
    return {name: dict(path=path, kind="jsonl", format="mmeb") for name, path in files.items()}
  sources = {name: dict(source) for name, source in dict(sources).items()}
  unset = [name for name, source in sources.items() if not source.get("path")]
  if unset:
    raise ValueError(f"pair sources: no path set for {unset}; set --config.input.sources."
                     f"{unset[0]}.path=... (local or gs://) or remove the source")
  return sources


def _contrastive_pairs_input(model_config: ModelConfig, seed: int, sources: Any, tokenizer_dir: str,
                             **fields):
  from mmembed_jax.data.cl_pipeline import cl_dataset  # pylint: disable=g-import-not-at-top
  return cl_dataset(pair_sources(sources), tokenizer_dir, seed=seed, **fields)


OBJECTIVES = {"masked_lm": _masked_lm, "moca_cpt": _moca_cpt, "contrastive": _contrastive}
INPUTS = {"synthetic_tokens": _synthetic_tokens, "moca_cpt": _moca_cpt_input,
          "contrastive_pairs": _contrastive_pairs_input}
# Input fields that say how pairs are encoded; held-out evaluation encodes the same way.
PAIR_ENCODING = ("num_negatives", "query_length", "target_length", "query_max_patches",
                 "target_max_patches", "max_images", "min_pixels", "max_pixels")


def build_objective(config: ml_collections.ConfigDict, model_config: ModelConfig) -> Callable:
  """fn(params, batch, rng) -> (loss, metrics) named by `config.objective.name`."""
  if config.objective.name not in OBJECTIVES:
    raise ValueError(f"unknown objective '{config.objective.name}', expected one of {sorted(OBJECTIVES)}")
  return _checked(OBJECTIVES[config.objective.name], _with_tokenizer(config, config.objective),
                  "objective", model_config)


def build_input(config: ml_collections.ConfigDict, model_config: ModelConfig) -> Any:
  """This process's Grain iterator dataset of batches, named by `config.input.name`."""
  if config.input.name not in INPUTS:
    raise ValueError(f"unknown input '{config.input.name}', expected one of {sorted(INPUTS)}")
  return _checked(INPUTS[config.input.name], _with_tokenizer(config, config.input), "input",
                  model_config, config.seed)


# Keys the input adds for the host only; the trainer drops them before the step.
HOST_ONLY = ("bad_records", "bad_messages", "example_ids")


def batch_row(config: ml_collections.ConfigDict, model_config: ModelConfig) -> dict:
  """One row (host arrays, no batch axis) of the batches the input makes, read from no data."""
  fields = _fields(config.input)
  if config.input.name == "moca_cpt":
    from mmembed_jax.data.cpt_pipeline import batch_row as row  # pylint: disable=g-import-not-at-top
  elif config.input.name == "contrastive_pairs":
    from mmembed_jax.data.cl_pipeline import batch_row as row  # pylint: disable=g-import-not-at-top
  else:  # a synthetic input: its first batch
    batch = next(iter(build_input(config, model_config)))
    row = lambda **_: {k: v[0] for k, v in batch.items()}
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  out = {k: v for k, v in row(**fields).items() if k not in HOST_ONLY}
  return jax.tree.map(np.asarray, out)


def build_eval(config: ml_collections.ConfigDict, objective: Any, mesh: Any) -> Optional[Callable]:
  """fn(params) -> held-out metrics (`config.eval`), or None when `eval.every` is 0."""
  if not config.eval.every:
    return None
  if config.input.name != "contrastive_pairs" or not hasattr(objective, "embed"):
    raise ValueError("eval: held-out retrieval needs input 'contrastive_pairs' and objective "
                     f"'contrastive', got '{config.input.name}' / '{config.objective.name}'")
  from mmembed_jax.data.cl_pipeline import cl_eval_batches  # pylint: disable=g-import-not-at-top
  from mmembed_jax.parallel.sharding import batch_sharding  # pylint: disable=g-import-not-at-top
  from mmembed_jax.training.retrieval_eval import RetrievalEval  # pylint: disable=g-import-not-at-top
  sources = pair_sources(config.eval.sources, DEMO_HELD_OUT_PAIRS)
  encoding = {k: config.input[k] for k in PAIR_ENCODING if k in config.input}
  batches = cl_eval_batches(sources, resolve_tokenizer_dir(config, config.input.get("tokenizer_dir", "")),
                            config.input.global_batch_size,
                            max_rows_per_dataset=config.eval.max_rows_per_dataset, **encoding)
  return RetrievalEval(objective.embed, batches, list(sources), batch_sharding(mesh))


def _with_tokenizer(config: ml_collections.ConfigDict, section: ml_collections.ConfigDict
                    ) -> ml_collections.ConfigDict:
  """The section with `tokenizer_dir` resolved, when the builder takes one."""
  builder = {**OBJECTIVES, **INPUTS}[section.name]
  if "tokenizer_dir" not in builder.__code__.co_varnames:
    return section
  section = ml_collections.ConfigDict(section.to_dict())
  section.tokenizer_dir = resolve_tokenizer_dir(config, section.get("tokenizer_dir", ""))
  return section


def checkpoint_dir(workdir: str) -> str:
  """Where a run's checkpoints live."""
  return os.path.join(workdir, "checkpoints")
