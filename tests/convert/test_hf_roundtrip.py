"""HF checkpoint -> Flax params -> HF checkpoint is exact, and transformers reloads it.

Covers both families, unrolled and scanned layers, untied and tied embeddings, a bf16
export, both checkpoint naming generations, the import errors and the `put` callback.
The reference is always transformers itself: the tiny models are saved by `save_pretrained`
and reloaded with `from_pretrained`.
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from safetensors import safe_open

from mmembed_jax.convert import hf_export
from mmembed_jax.convert.hf_import import import_hf
from mmembed_jax.convert.mapping import canonical_hf_name
from mmembed_jax.data import images as images_lib

from tiny_models import FAMILIES, TEST_PIXELS, build_tiny_hf_model

CLASSES = {"qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
           "qwen2_vl": transformers.Qwen2VLForConditionalGeneration}
SMALL_SHARD = 64 * 1024  # bytes: forces several shards for the tiny models


@pytest.fixture(scope="module")
def tied_hf_dirs(tmp_path_factory, tokenizer_dir):
  """{family: directory} of tiny transformers models with tie_word_embeddings=True."""
  return {family: build_tiny_hf_model(str(tmp_path_factory.mktemp(f"{family}_tied")), family,
                                      tokenizer_dir, tie=True, seed=1)
          for family in FAMILIES}


def _hf_model(model_dir, dtype=torch.float32):
  """transformers' model of a directory; fails unless every checkpoint tensor was used."""
  model_type = json.loads(open(os.path.join(model_dir, "config.json")).read())["model_type"]
  model, info = CLASSES[model_type].from_pretrained(model_dir, dtype=dtype,
                                                    output_loading_info=True)
  for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
    assert not info[kind], f"{model_dir}: {kind} {info[kind]}"
  return model.eval()


def _read_checkpoint(model_dir) -> dict:
  """{name as saved: numpy array} of every safetensors file in a directory."""
  tensors = {}
  for name in sorted(os.listdir(model_dir)):
    if name.endswith(".safetensors"):
      tensors.update(safetensors.numpy.load_file(os.path.join(model_dir, name)))
  return tensors


def _write_checkpoint(out_dir, tensors: dict, config_from: str) -> str:
  """A model directory: config.json of `config_from` and `tensors` in one model.safetensors."""
  os.makedirs(out_dir, exist_ok=True)
  shutil.copy(os.path.join(config_from, "config.json"), out_dir)
  safetensors.numpy.save_file(tensors, os.path.join(out_dir, "model.safetensors"))
  return str(out_dir)


def _legacy_name(name: str) -> str:
  """A current HF name in the pre-4.52 scheme (`model.layers...`, `visual...`)."""
  name = canonical_hf_name(name)
  if name.startswith("model.visual."):
    return name[len("model."):]
  if name.startswith("model.language_model."):
    return "model." + name[len("model.language_model."):]
  return name


def _max_tree_diff(a, b) -> float:
  """Max abs difference over two params trees, which must have the same structure and shapes."""
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  diffs = jax.tree_util.tree_map(
      lambda x, y: float(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)).max())
      if np.shape(x) == np.shape(y) else np.inf, a, b)
  return max(jax.tree_util.tree_leaves(diffs))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("tied", [False, True])
def test_import_export_reload_is_exact(family, scan_layers, tied, tiny_hf_dirs, tied_hf_dirs,
                                       tmp_path):
  source = (tied_hf_dirs if tied else tiny_hf_dirs)[family]
  config, params = import_hf(source, scan_layers=scan_layers)
  assert config.tie_word_embeddings == tied
  assert ("lm_head" in params) == (not tied)
  out = hf_export.export_hf(config, params, str(tmp_path / "export"), source_dir=source,
                            max_shard_bytes=SMALL_SHARD)

  # The files: every tensor under its current name, bit-identical (a tied head is not saved).
  exported = _read_checkpoint(out)
  original = {canonical_hf_name(name): value for name, value in _read_checkpoint(source).items()}
  if tied:
    original.pop("lm_head.weight", None)
  assert sorted(exported) == sorted(original)
  file_diff = max(float(np.abs(exported[k] - original[k]).max()) for k in original)
  assert all(exported[k].dtype == original[k].dtype == np.float32 for k in original)

  # transformers: the reloaded model's state dict equals the original model's.
  reloaded, reference = _hf_model(str(out)), _hf_model(source)
  ours, theirs = reloaded.state_dict(), reference.state_dict()
  assert sorted(ours) == sorted(theirs)
  model_diff = max((ours[k] - theirs[k]).abs().max().item() for k in theirs)
  print(f"{family} scan={scan_layers} tied={tied}: files max abs diff {file_diff}, "
        f"state_dict max abs diff {model_diff} over {len(theirs)} tensors")
  assert file_diff == 0 and model_diff == 0
  if tied:  # transformers re-tied the head to the embedding
    assert (reloaded.get_output_embeddings().weight.data_ptr()
            == reloaded.get_input_embeddings().weight.data_ptr())


def test_export_directory_layout(tiny_hf_dirs, tokenizer, image_dir, tmp_path):
  source = tiny_hf_dirs["qwen2_5_vl"]
  config, params = import_hf(source)
  embedding = {"attention": "bidirectional", "pooling": "mean", "normalize": True,
               "query_prompt": "Query: "}
  out = hf_export.export_hf(config, params, str(tmp_path / "export"), source_dir=source,
                            embedding=embedding, max_shard_bytes=SMALL_SHARD)
  names = sorted(os.listdir(out))

  # Sharded safetensors with an index naming every tensor's file.
  index = json.loads((out / "model.safetensors.index.json").read_text())
  shards = sorted(name for name in names if name.endswith(".safetensors"))
  assert len(shards) > 1 and "model.safetensors" not in shards
  assert all(name == f"model-{i:05d}-of-{len(shards):05d}.safetensors"
             for i, name in enumerate(shards, start=1))
  assert sorted(set(index["weight_map"].values())) == shards
  total = 0
  for shard in shards:
    with safe_open(str(out / shard), framework="np") as reader:
      keys = list(reader.keys())
      assert sorted(keys) == sorted(k for k, v in index["weight_map"].items() if v == shard)
      sizes = [reader.get_tensor(k).nbytes for k in keys]
    assert len(keys) == 1 or sum(sizes) <= SMALL_SHARD, (shard, sum(sizes))
    total += sum(sizes)
  assert index["metadata"]["total_size"] == total

  # config.json rebuilds the architecture.
  hf_config = json.loads((out / "config.json").read_text())
  assert hf_config["model_type"] == "qwen2_5_vl"
  assert hf_config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
  assert hf_config["dtype"] == "float32" and hf_config["tie_word_embeddings"] is False

  # Tokenizer and preprocessor files are carried over byte for byte.
  carried = [name for name in hf_export.CARRIED_FILES if os.path.exists(os.path.join(source, name))]
  assert {"tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"} <= set(carried)
  for name in carried:
    assert (out / name).read_bytes() == open(os.path.join(source, name), "rb").read(), name

  # mmembed.json records the conventions passed in, over the defaults.
  record = json.loads((out / hf_export.EMBEDDING_FILE).read_text())
  assert {k: record[k] for k in embedding} == embedding
  assert record["image_marker"] == "<image>" and "prompt_format" in record

  # transformers loads the tokenizer and the image processor from the export alone.
  exported_tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
  text = "a red circle <|vision_start|><|image_pad|><|vision_end|> next to a square"
  assert exported_tokenizer.encode(text) == tokenizer.encode(text)
  assert exported_tokenizer.pad_token_id == tokenizer.pad_token_id
  processor = transformers.AutoImageProcessor.from_pretrained(str(out), backend="pil")  # the reference
  assert processor.size == {"shortest_edge": TEST_PIXELS["min_pixels"],
                            "longest_edge": TEST_PIXELS["max_pixels"]}
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = Image.open(os.path.join(image_dir, "wide.png"))
  theirs = processor(images=[image], return_tensors="np")
  ours = images_lib.preprocess_image(
      image, images_lib.ImageProcessingConfig.from_preprocessor_config(
          str(out / "preprocessor_config.json")))
  np.testing.assert_array_equal(np.asarray(theirs["image_grid_thw"]).reshape(3), ours[1])
  np.testing.assert_allclose(np.asarray(theirs["pixel_values"]), ours[0], atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_export_reloads_as_rounded_fp32(family, tiny_hf_dirs, tmp_path):
  source = tiny_hf_dirs[family]
  config, params = import_hf(source)
  out = hf_export.export_hf(config, params, str(tmp_path / "bf16"), source_dir=source,
                            dtype="bfloat16")
  assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
  assert not (out / "model.safetensors.index.json").exists()  # default shard size: one file
  with safe_open(str(out / "model.safetensors"), framework="np") as reader:
    assert {reader.get_slice(k).get_dtype() for k in reader.keys()} == {"BF16"}

  reloaded = _hf_model(str(out), dtype="auto")
  reference = _hf_model(source).state_dict()
  ours = reloaded.state_dict()
  assert {v.dtype for v in ours.values()} == {torch.bfloat16}
  rounding = max((ours[k].float() - reference[k]).abs().max().item() for k in reference)
  diff = max((ours[k].float() - reference[k].to(torch.bfloat16).float()).abs().max().item()
             for k in reference)
  print(f"{family} bf16 export: max abs diff vs rounded fp32 {diff}, vs fp32 {rounding:.2e}")
  assert diff == 0
  assert rounding > 0  # the rounding did happen, so the comparison above means something

  # Rounding on import (param_dtype) writes the same bits as rounding on export.
  config16, params16 = import_hf(source, param_dtype="bfloat16")
  assert {x.dtype for x in jax.tree_util.tree_leaves(params16)} == {jnp.dtype("bfloat16")}
  out16 = hf_export.export_hf(config16, params16, str(tmp_path / "bf16_import"))
  assert json.loads((out16 / "config.json").read_text())["dtype"] == "bfloat16"
  a, b = _read_checkpoint(out), _read_checkpoint(out16)
  assert sorted(a) == sorted(b)
  assert all(a[k].tobytes() == b[k].tobytes() for k in a)


@pytest.mark.parametrize("family", FAMILIES)
def test_both_naming_generations_import_alike(family, tiny_hf_dirs, tmp_path):
  source = tiny_hf_dirs[family]
  tensors = _read_checkpoint(source)
  current = {canonical_hf_name(k): v for k, v in tensors.items()}
  legacy = {_legacy_name(k): v for k, v in tensors.items()}
  assert all(k.startswith(("model.language_model.", "model.visual.", "lm_head."))
             for k in current)
  assert all(k.startswith(("model.layers.", "model.embed_tokens.", "model.norm.", "visual.",
                           "lm_head.")) for k in legacy)
  assert len(current) == len(legacy) == len(tensors)
  _, expected = import_hf(source)
  for name, checkpoint in (("current", current), ("legacy", legacy)):
    _, params = import_hf(_write_checkpoint(tmp_path / name, checkpoint, source))
    diff = _max_tree_diff(params, expected)
    print(f"{family} {name} names: params max abs diff {diff}")
    assert diff == 0


# Errors: each names the file, tensor or field at fault.


@pytest.fixture(scope="module")
def checkpoint(tiny_hf_dirs):
  """(source directory, {current name: array}) of the tiny Qwen2.5-VL model."""
  source = tiny_hf_dirs["qwen2_5_vl"]
  return source, {canonical_hf_name(k): v for k, v in _read_checkpoint(source).items()}


@pytest.mark.parametrize("model_type,message", [
    ("llama", "unsupported architecture: model_type 'llama'"),
    ("bogus_vlm", "unknown model_type 'bogus_vlm'"),
])
def test_unknown_architecture(model_type, message, checkpoint, tmp_path):
  source, _ = checkpoint
  model_dir = tmp_path / "model"
  shutil.copytree(source, model_dir)
  config = {"model_type": model_type, "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
            "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
            "vocab_size": 512}
  (model_dir / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=message) as error:
    import_hf(str(model_dir))
  assert "config.json" in str(error.value)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_missing_tensor(scan_layers, checkpoint, tmp_path):
  source, tensors = checkpoint
  dropped = "model.language_model.layers.1.self_attn.k_proj.bias"
  model_dir = _write_checkpoint(tmp_path, {k: v for k, v in tensors.items() if k != dropped},
                                source)
  with pytest.raises(ValueError, match=f"missing 1 tensor.*'{dropped}'"):
    import_hf(model_dir, scan_layers=scan_layers)


def test_extra_tensor(checkpoint, tmp_path):
  source, tensors = checkpoint
  extra = "model.visual.blocks.0.attn.extra.weight"
  model_dir = _write_checkpoint(tmp_path, dict(tensors, **{extra: np.zeros((4, 4), np.float32)}),
                                source)
  with pytest.raises(ValueError, match=f"unexpected tensor '{extra}'.*qwen2_5_vl"):
    import_hf(model_dir)


def test_tensor_under_both_names(checkpoint, tmp_path):
  source, tensors = checkpoint
  name = "model.language_model.norm.weight"
  model_dir = _write_checkpoint(tmp_path, dict(tensors, **{_legacy_name(name): tensors[name]}),
                                source)
  with pytest.raises(ValueError, match="model.norm.weight' appears twice"):
    import_hf(model_dir)


def test_wrong_shape(checkpoint, tmp_path):
  source, tensors = checkpoint
  name = "model.language_model.layers.0.mlp.up_proj.weight"
  assert tensors[name].shape == (96, 64)
  model_dir = _write_checkpoint(tmp_path, dict(tensors, **{name: tensors[name][:95]}), source)
  with pytest.raises(ValueError,
                     match=rf"'{name}' has shape \(95, 64\), expected \(96, 64\) from config.json"):
    import_hf(model_dir)


def test_no_safetensors_files(checkpoint, tmp_path):
  source, _ = checkpoint
  shutil.copy(os.path.join(source, "config.json"), tmp_path)
  with pytest.raises(FileNotFoundError, match="neither model.safetensors nor "
                                              "model.safetensors.index.json") as error:
    import_hf(str(tmp_path))
  assert str(tmp_path) in str(error.value)


def test_missing_shard_file(checkpoint, tmp_path):
  source, _ = checkpoint
  model_dir = tmp_path / "model"
  shutil.copytree(source, model_dir)
  (model_dir / "model-00002-of-00004.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="model-00002-of-00004.safetensors"):
    import_hf(str(model_dir))


def test_missing_config(checkpoint, tmp_path):
  source, tensors = checkpoint
  model_dir = _write_checkpoint(tmp_path, tensors, source)
  os.remove(os.path.join(model_dir, "config.json"))
  with pytest.raises(FileNotFoundError, match="config.json not found") as error:
    import_hf(model_dir)
  assert model_dir in str(error.value)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_put_called_once_per_parameter_with_final_array(scan_layers, tiny_hf_dirs):
  source = tiny_hf_dirs["qwen2_5_vl"]
  calls = []

  def put(path, array):
    calls.append((path, np.array(array)))  # a copy: what the array was when handed over
    return jax.device_put(array)

  config, params = import_hf(source, scan_layers=scan_layers, param_dtype="bfloat16", put=put)
  _, plain = import_hf(source, scan_layers=scan_layers, param_dtype="bfloat16")
  leaves = jax.tree_util.tree_leaves_with_path(plain)
  assert len(calls) == len(leaves)
  assert len({path for path, _ in calls}) == len(calls)  # once per parameter
  assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(params))  # put's results
  expected = {tuple(k.key for k in path): value for path, value in leaves}
  stacked = 0
  for path, array in calls:
    assert array.dtype == jnp.bfloat16, path
    assert array.shape == expected[path].shape, path
    assert array.tobytes() == np.asarray(expected[path]).tobytes(), path  # complete, final
    if len(path) > 1 and path[1] in ("layers", "blocks"):  # stacked: whole, every layer filled
      depth = config.text.num_layers if path[1] == "layers" else config.vision.depth
      assert array.shape[0] == depth, path
      stacked += 1
  assert (stacked > 0) == scan_layers
  assert _max_tree_diff(params, plain) == 0


def _scaled(params, factor):
  """params with every leaf multiplied by `factor` (another step's weights, say)."""
  return jax.tree.map(lambda x: np.asarray(x) * factor, params)


def test_export_replaces_a_directory_whole_and_never_leaves_a_mixture(tiny_hf_dirs, tmp_path):
  """An earlier sharded export, then a single-file export of other weights into the same
  directory: refused without overwrite; with it, the directory holds only the new export (no
  old index or shards, which our loader preferred over the new file) and every loader reads the
  new weights. A directory mixing the two layouts is refused by both loaders; an export that
  fails half way leaves the previous export untouched and no temporary directory behind."""
  from mmembed_jax import torch_embed
  source = tiny_hf_dirs["qwen2_5_vl"]
  config, params = import_hf(source)
  target = tmp_path / "export"
  hf_export.export_hf(config, params, str(target), source_dir=source, max_shard_bytes=SMALL_SHARD)
  assert "model.safetensors.index.json" in os.listdir(target)
  newer = _scaled(params, 0.5)
  with pytest.raises(ValueError, match=r"is not empty; choose an empty directory or pass "
                                       r"--overwrite"):
    hf_export.export_hf(config, newer, str(target), source_dir=source)
  hf_export.export_hf(config, newer, str(target), source_dir=source, overwrite=True)
  assert not [n for n in os.listdir(target) if n.startswith("model-") or n.endswith(".index.json")]
  assert sorted(os.listdir(tmp_path)) == ["export"]  # no staging or old directory left
  assert _max_tree_diff(import_hf(str(target))[1], newer) == 0
  reloaded = _hf_model(str(target)).state_dict()
  key = "model.language_model.embed_tokens.weight"
  np.testing.assert_array_equal(reloaded[key].numpy(),
                                np.asarray(newer["embed_tokens"]["embedding"]))

  # A mixture made by hand (as an export that did not swap would have left it): refused.
  mixed = tmp_path / "mixed"
  shutil.copytree(target, mixed)
  hf_export.export_hf(config, params, str(tmp_path / "sharded"), max_shard_bytes=SMALL_SHARD)
  for name in os.listdir(tmp_path / "sharded"):
    if name.startswith("model-") or name.endswith(".index.json"):
      shutil.copy(tmp_path / "sharded" / name, mixed)
  for load in (import_hf, torch_embed.load):
    with pytest.raises(ValueError, match="holds both model.safetensors and "
                                         "model.safetensors.index.json"):
      load(str(mixed))

  # A failure half way through writing: the previous export stays as it was.
  before = {n: (target / n).read_bytes() for n in os.listdir(target)}
  broken = dict(newer, language_model=dict(newer["language_model"],
                                           norm={"scale": np.zeros((3,), np.float32)}))
  with pytest.raises(ValueError, match="cannot reshape"):
    hf_export.export_hf(config, broken, str(target), overwrite=True)
  assert {n: (target / n).read_bytes() for n in os.listdir(target)} == before
  assert sorted(os.listdir(tmp_path)) == ["export", "mixed", "sharded"]


def test_export_target_that_is_a_file_is_refused(tiny_hf_dirs, tmp_path):
  config, params = import_hf(tiny_hf_dirs["qwen2_vl"])
  (tmp_path / "file").write_text("not a directory")
  with pytest.raises(ValueError, match=r"export target .*file is a file, not a directory"):
    hf_export.export_hf(config, params, str(tmp_path / "file"))


def test_truncated_safetensors_is_one_error_naming_the_file(tiny_hf_dirs, tmp_path):
  source = tiny_hf_dirs["qwen2_vl"]
  broken = tmp_path / "broken"
  shutil.copytree(source, broken)
  shard = sorted(n for n in os.listdir(broken) if n.endswith(".safetensors"))[0]
  data = (broken / shard).read_bytes()
  (broken / shard).write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match=f"{shard}: cannot read it as safetensors"):
    import_hf(str(broken))
