"""Optax AdamW with warm-up + linear/cosine decay, clipping, a weight-decay mask, per-group rates."""
import re
from typing import Any

import jax
import ml_collections
import optax


def path_name(path) -> str:
  """'visual/blocks_0/attn/qkv/kernel' for a tree path."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to `lr` over `warmup_ratio * total_steps`, then linear or cosine decay.

  The decay ends at `lr * end_lr_ratio` on the last step.
  """
  warmup = int(round(opt.warmup_ratio * total_steps))
  decay_steps = max(total_steps - warmup, 1)
  end = opt.lr * opt.end_lr_ratio
  if opt.decay == "linear":
    decay = optax.linear_schedule(opt.lr, end, decay_steps)
  elif opt.decay == "cosine":
    decay = optax.cosine_decay_schedule(opt.lr, decay_steps, alpha=opt.end_lr_ratio)
  elif opt.decay == "constant":
    decay = optax.constant_schedule(opt.lr)
  else:
    raise ValueError(f"optimizer.decay must be linear, cosine or constant, got '{opt.decay}'")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, opt.lr, warmup), decay], [warmup])


def weight_decay_mask(params: Any) -> Any:
  """True where weight decay applies: matrices, not norm scales, biases or scalars (temperature)."""
  def decays(path, leaf):
    last = path_name(path).rsplit("/", 1)[-1]
    return last not in ("bias", "scale") and len(leaf.shape) > 0
  return jax.tree_util.tree_map_with_path(decays, params)


def param_labels(params: Any, lr_multipliers: Any) -> Any:
  """Each parameter's optimiser group: 'lr_i' (the first of the `lr_multipliers` [regex, factor]
  pairs whose regex it matches), else 'train'."""
  patterns = [re.compile(regex) for regex, _ in lr_multipliers]

  def label(path, _):
    name = path_name(path)
    return next((f"lr_{i}" for i, p in enumerate(patterns) if p.search(name)), "train")
  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int, params: Any
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, schedule) for the trainable `params` (concrete or abstract; training/trainable.py
  leaves the frozen ones out): clip -> AdamW, parameter groups at `lr_multipliers` times the
  learning rate."""
  schedule = learning_rate_schedule(opt, total_steps)
  clip = optax.clip_by_global_norm(opt.max_grad_norm) if opt.max_grad_norm else optax.identity()

  def adamw(learning_rate):
    return optax.adamw(learning_rate, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                       weight_decay=opt.weight_decay, mask=weight_decay_mask)

  multipliers = [(regex, float(factor)) for regex, factor in opt.get("lr_multipliers", ())]
  if not multipliers:
    return optax.chain(clip, adamw(schedule)), schedule
  groups = {"train": adamw(schedule)}
  for i, (_, factor) in enumerate(multipliers):
    groups[f"lr_{i}"] = adamw(lambda step, factor=factor: factor * schedule(step))
  return optax.chain(clip, optax.multi_transform(groups, param_labels(params, multipliers))), schedule
