"""A bad config fails before compiling: a one-line ValueError, or exit 2 and one CLI error line."""
import importlib.util
import os
import subprocess
import sys
import textwrap

import jax
import pytest

from engine_runs import DEMO, REPO, TRAIN, run_commands
from mmembed_jax.training.config import default_config, validate
from mmembed_jax.training.run import build_run

RECIPES = {
    "unknown_fields": """
        config = base()
        config.learning_rate = 1e-3      # top level: optimizer.lr was meant
        config.optimizer.foo = 1         # nested
        return config""",
    "bad_objective_field": """
        config = base()
        config.objective = dict(name="masked_lm", mask_prop=0.3)  # mask_prob was meant
        return config""",
}

# case -> (recipe or the demo, extra command-line arguments, words the error line must hold)
CLI_CASES = {
    "unknown_fields_in_recipe": ("unknown_fields", (),
                                 ("unknown config field(s)", "learning_rate", "optimizer.foo")),
    "unknown_nested_override": (None, ("--config.optimizer.foo=1",),
                                ("unknown config field", "foo", "--config")),
    "unknown_top_level_override": (None, ("--config.learning_rate=1",),
                                   ("unknown config field", "learning_rate", "--config")),
    "mesh_not_matching_devices": (None, ("--config.mesh.ici.data=3",),
                                  ("mesh.ici", "3", "8 are available")),
    "unknown_objective": (None, ("--config.objective.name=coma",),
                          ("unknown objective 'coma'", "masked_lm")),
    "bad_objective_field": ("bad_objective_field", (),
                            ("objective 'masked_lm'", "mask_prop")),
    # Before: accepted, and the loss exploded.
    "negative_learning_rate": (None, ("--config.optimizer.lr=-1.0",),
                               ("optimizer.lr=-1.0: expected a number >= 0",)),
    # Before: ZeroDivisionError tracebacks.
    "log_every_zero": (None, ("--config.log_every=0",), ("log_every=0: expected an integer >= 1",)),
    "checkpoint_every_zero": (None, ("--config.checkpoint.every=0",),
                              ("checkpoint.every=0: expected an integer >= 1",)),
    # Before: error: unknown config field '\'lrr\'\nDid you mean "lr" instead of "lrr"?'
    "misspelt_field": (None, ("--config.optimizer.lrr=1",),
                       ("unknown config field 'lrr' in --config.optimizer.lrr=1",
                        'Did you mean "lr"')),
    # Before: an 8-line and a 37-line traceback.
    "recipe_argument_out_of_range": ("configs/moca.py:size=huge", (),
                                     ("configs/moca.py: size must be demo, 3b or 7b, got 'huge'",)),
    "missing_config_file": ("configs/no_such_recipe.py", (),
                            ("config file configs/no_such_recipe.py does not exist",)),
    # Before: tracebacks (FileExistsError, NotADirectoryError, OSError).
    "workdir_is_a_file": (None, ("--workdir={root}/a_file",), ("workdir", "a_file is a file")),
    "workdir_under_a_file": (None, ("--workdir={root}/a_file/run",),
                             ("lies under", "a_file, which is a file")),
    "workdir_read_only": (None, ("--workdir={root}/read_only/run",),
                          ("read_only/run", "read-only file system")),
    "adapter_targets_match_nothing": (None, ("--config.adapters.kind=dora",
                                             "--config.adapters.targets=no_such_layer"),
                                      ("adapters.targets='no_such_layer' matches no linear layer",)),
    "adapter_kind_unknown": (None, ("--config.adapters.kind=qlora", "--config.adapters.targets=q"),
                             ("adapters.kind='qlora'", "lora", "dora")),
    # Before: a SafetensorError traceback.
    "init_from_truncated_safetensors": (None, ("--config.init_from={root}/truncated_model",),
                                        ("truncated_model/model", "cannot read it as safetensors")),
}


def _read_only_directory(path) -> bool:
  """Mounts an empty read-only tmpfs at `path`; False where this machine does not allow it."""
  os.makedirs(path, exist_ok=True)
  done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                        capture_output=True, check=False)
  return done.returncode == 0


def _truncated_model(source, out) -> None:
  """A copy of the HF directory `source` whose first safetensors file lost its second half."""
  import shutil
  shutil.copytree(source, out)
  shard = sorted(name for name in os.listdir(out) if name.endswith(".safetensors"))[0]
  with open(os.path.join(out, shard), "rb") as f:
    data = f.read()
  with open(os.path.join(out, shard), "wb") as f:
    f.write(data[:len(data) // 2])


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory, cache_dir, tiny_hf_dirs):
  """{case: CompletedProcess} of launch/tpu_train.py for every CLI case, run side by side.

  A case's recipe is one of RECIPES, a config path of the repository, or None (the demo); a
  `--workdir=` among its arguments ({root}: this fixture's directory) replaces its own.
  """
  root = tmp_path_factory.mktemp("config_errors")
  (root / "a_file").write_text("not a directory")
  _truncated_model(tiny_hf_dirs["qwen2_5_vl"], root / "truncated_model")
  read_only = _read_only_directory(root / "read_only")
  commands = {}
  for case, (recipe, extra, _) in CLI_CASES.items():
    config = DEMO
    if recipe in RECIPES:
      config = str(root / f"{recipe}.py")
      with open(config, "w") as f:
        f.write(f"from mmembed_jax.training.config import default_config as base\n\n\n"
                f"def get_config():\n{textwrap.indent(textwrap.dedent(RECIPES[recipe]), '  ')}\n")
    elif recipe is not None:
      config = recipe
    extra = [arg.format(root=root) for arg in extra]
    workdir = [] if any(a.startswith("--workdir=") for a in extra) else [f"--workdir={root / case}"]
    commands[case] = [sys.executable, TRAIN, f"--config={config}", *workdir, *extra]
  if not read_only:
    commands.pop("workdir_read_only")
  try:
    yield dict(zip(commands, run_commands(cache_dir, list(commands.values()))))
  finally:
    if read_only:
      subprocess.run(["umount", str(root / "read_only")], check=False)


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_launcher_reports_a_config_error_in_one_line_with_status_2(case, cli_results):
  if case not in cli_results:
    pytest.skip("this machine cannot mount a read-only file system")
  result = cli_results[case]
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, result.stderr[-3000:]
  for words in CLI_CASES[case][2]:
    assert words in errors[0], errors[0]
  assert "\\" not in errors[0], errors[0]  # no escaped quotes or newlines


def _config(**changes):
  config = default_config()
  for name, value in changes.items():
    *sections, key = name.split("__")
    target = config
    for section in sections:
      target = target[section]
    target[key] = value
  return config


VALIDATE_CASES = {
    "unknown_top_level_field": (dict(learning_rate=1.0), "unknown config field(s): learning_rate"),
    "unknown_nested_field": (dict(optimizer__foo=1), "unknown config field(s): optimizer.foo"),
    "mesh_not_matching_devices": (dict(mesh__ici=dict(data=2, fsdp=2, tensor=1)),
                                  "has 4 devices, but 8 are available"),
    "minus_one_that_cannot_fill": (dict(mesh__ici=dict(data=-1, fsdp=3, tensor=1)),
                                   "cannot fill 8 devices (8 is not a multiple of 3)"),
    "two_minus_ones": (dict(mesh__ici=dict(data=-1, fsdp=-1, tensor=1)),
                       "at most one axis may be -1"),
    "unknown_mesh_axis": (dict(mesh__ici=dict(data=-1, pipeline=2)),
                          "unknown mesh axes ['pipeline']"),
    "batch_not_divisible_by_data_parallel": (
        dict(input__global_batch_size=12, mesh__ici=dict(data=2, fsdp=4, tensor=1)),
        "global_batch_size=12 is not divisible by the data-parallel size 8"),
    "grad_accum_not_dividing": (dict(grad_accum_steps=3),
                                "grad_accum_steps=3: global batch 16 must split into 3"),
    "micro_batch_not_divisible": (dict(grad_accum_steps=4),
                                  "grad_accum_steps=4: global batch 16 must split into 4"),
    "num_devices_too_large": (dict(mesh__num_devices=9), "mesh.num_devices=9 must be 0 (all)"),
    "total_steps_not_positive": (dict(total_steps=0), "total_steps=0: expected an integer >= 1"),
    "input_without_batch_size": (dict(input=dict(name="synthetic_tokens", length=32)),
                                 "input 'synthetic_tokens' has no global_batch_size"),
    "unknown_objective": (dict(objective=dict(name="coma")),
                          "unknown objective 'coma', expected one of ['coma_compression', "
                          "'contrastive', 'masked_lm', 'moca_cpt']"),
    "misspelt_objective_field": (dict(objective=dict(name="masked_lm", mask_prop=0.3)),
                                 "objective 'masked_lm': unknown field(s) ['mask_prop']; its fields "
                                 "are ['mask_prob', 'mask_token_id']"),
    "objective_field_of_the_wrong_type": (dict(objective=dict(name="masked_lm", mask_prob="high")),
                                          "objective 'masked_lm': field mask_prob='high' should be "
                                          "of type float"),
    "unknown_input": (dict(input=dict(name="webdataset", global_batch_size=16)),
                      "unknown input 'webdataset', expected one of"),
    "misspelt_input_field": (dict(input=dict(name="synthetic_tokens", global_batch_size=16,
                                             len=32)),
                             "input 'synthetic_tokens': unknown field(s) ['len']; missing field(s) "
                             "['length']; its fields are ['global_batch_size', 'length']"),
    "objective_and_input_that_do_not_fit": (
        dict(objective=dict(name="contrastive")),
        "objective 'contrastive' trains on input ['contrastive_pairs'], not 'synthetic_tokens'"),
    "gradient_accumulation_with_a_contrastive_loss": (
        dict(objective=dict(name="contrastive"), grad_accum_steps=2,
             input=dict(name="contrastive_pairs", sources="demo", global_batch_size=16,
                        num_negatives=0, query_length=8, target_length=8, query_max_patches=0,
                        target_max_patches=0, min_pixels=784, max_pixels=784)),
        "grad_accum_steps=2: a contrastive loss needs every candidate of the global batch"),
    "pooled_compression_tokens_the_input_does_not_append": (
        dict(objective=dict(name="contrastive", pooling="ctoken", num_ctokens=32),
             input=dict(name="contrastive_pairs", sources="demo", global_batch_size=16,
                        num_negatives=0, query_length=8, target_length=8, query_max_patches=0,
                        target_max_patches=0, min_pixels=784, max_pixels=784)),
        "objective.num_ctokens=32 but input.num_ctokens=0"),
}


@pytest.mark.parametrize("case", sorted(VALIDATE_CASES))
def test_validate_raises_one_line_naming_the_problem(case):
  changes, message = VALIDATE_CASES[case]
  with pytest.raises(ValueError) as error:
    validate(_config(**changes), jax.devices())
  assert message in str(error.value)
  assert "\n" not in str(error.value)


def test_validate_accepts_the_defaults_and_a_restricted_device_count():
  validate(default_config(), jax.devices())
  validate(_config(mesh__num_devices=1, mesh__ici=dict(data=1, fsdp=1, tensor=1)), jax.devices())


def _moca_demo(**input_changes):
  spec = importlib.util.spec_from_file_location("moca", os.path.join(REPO, "configs", "moca.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("")
  config.input.update(input_changes)
  return config


@pytest.mark.parametrize("changes,devices,message", [
    (dict(rows_per_patch_buffer=3), 1,
     "input.rows_per_patch_buffer=3: the 8 rows of a batch do not split into whole patch buffers "
     "on each of 1 data-parallel devices x 1 grad_accum_steps"),
    (dict(), 8,  # one row per device: 128 slots
     "input.max_patches=128 x rows_per_patch_buffer=1 patch slots cannot hold one image of"),
])
def test_patch_buffers_that_do_not_fit_the_batch_or_its_images_are_one_error(changes, devices,
                                                                             message):
  config = _moca_demo(**changes)
  config.mesh.num_devices = devices
  with pytest.raises(ValueError) as error:
    build_run(config, jax.devices())
  assert message in str(error.value) and "\n" not in str(error.value)
