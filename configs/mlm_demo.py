"""Engine smoke test: masked LM on synthetic tokens with a tiny Qwen2.5-VL.

  python launch/tpu_train.py --config configs/mlm_demo.py --workdir runs/mlm_demo
  python launch/tpu_train.py --config configs/mlm_demo.py:mesh=2x2x2 --workdir runs/mlm_demo_8

Argument: `mesh=DATAxFSDPxTENSOR` (default: all devices on data), `steps=N`.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # recipe_common.py, beside this file
import recipe_common  # pylint: disable=wrong-import-position


def _mesh(value: str) -> tuple:
  """'DATAxFSDPxTENSOR' -> (data, fsdp, tensor)."""
  sizes = tuple(int(x) for x in value.split("x"))
  if len(sizes) != 3:
    raise ValueError("expected DATAxFSDPxTENSOR, e.g. 2x2x2")
  return sizes


def get_config(arg: str = ""):
  """The demo config; `arg` is a comma-separated list of key=value options."""
  options = recipe_common.parse_args(arg, "configs/mlm_demo.py", {"mesh": _mesh, "steps": int},
                                     {"mesh": None, "steps": 20})
  config = recipe_common.default_config()
  config.total_steps = options["steps"]
  config.log_every = 5
  config.model.preset = "tiny_qwen2_5_vl"
  config.objective = dict(name="masked_lm", mask_prob=0.3)
  config.input = dict(name="synthetic_tokens", global_batch_size=16, length=32)
  if options["mesh"]:
    data, fsdp, tensor = options["mesh"]
    config.mesh.ici = dict(data=data, fsdp=fsdp, tensor=tensor)
  config.optimizer.lr = 1e-3
  config.checkpoint.every = 10
  return config
