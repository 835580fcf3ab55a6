"""Engine smoke test: masked LM on synthetic tokens with a tiny Qwen2.5-VL.

  python launch/tpu_train.py --config configs/mlm_demo.py --workdir runs/mlm_demo
  python launch/tpu_train.py --config configs/mlm_demo.py:mesh=2x2x2 --workdir runs/mlm_demo_8

Argument: `mesh=DATAxFSDPxTENSOR` (default: all devices on data), `steps=N`.
"""
from mmembed_jax.training.config import default_config


def get_config(arg: str = ""):
  """The demo config; `arg` is a comma-separated list of key=value options."""
  options = dict(item.split("=", 1) for item in arg.split(",") if item)
  config = default_config()
  config.total_steps = int(options.get("steps", 20))
  config.log_every = 5
  config.model.preset = "tiny_qwen2_5_vl"
  config.objective = dict(name="masked_lm", mask_prob=0.3)
  config.input = dict(name="synthetic_tokens", global_batch_size=16, length=32)
  if "mesh" in options:
    data, fsdp, tensor = (int(x) for x in options["mesh"].split("x"))
    config.mesh.ici = dict(data=data, fsdp=fsdp, tensor=tensor)
  config.optimizer.lr = 1e-3
  config.checkpoint.every = 10
  return config
