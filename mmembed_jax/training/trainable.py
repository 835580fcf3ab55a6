"""Which parameters train, and the step's view of them.

Every parameter trains by default. With adapters (config `adapters`), only the adapter
parameters, those matching `adapters.trainable_extra` (e.g. CoMa's token embeddings) and the
objective's own (MoCa's MAE decoder, a learned temperature) train; `optimizer.freeze` freezes
any of them in either case. The update differentiates the trainable parameters only and the
optimiser state holds them only: a frozen parameter costs no gradient, no optimiser memory,
and leaves the step bit-identical.
"""
import re
from typing import Any, Optional, Sequence

import jax
import optax

from mmembed_jax.models.adapters import is_adapter_path
from mmembed_jax.training.optimizer import path_name


def trainable_mask(params: Any, freeze: str = "", adapters: bool = False,
                   trainable_extra: str = "", objective_keys: Sequence[str] = ()) -> Optional[Any]:
  """A tree of Python bools shaped like `params` (abstract or concrete), True where a parameter
  trains; None when every parameter does. ValueError when none would."""
  frozen = re.compile(freeze) if freeze else None
  extra = re.compile(trainable_extra) if trainable_extra else None

  def trains(path, _):
    name = path_name(path)
    if frozen is not None and frozen.search(name):
      return False
    if not adapters:
      return True
    return (is_adapter_path(name) or name.split("/", 1)[0] in objective_keys
            or (extra is not None and extra.search(name) is not None))
  mask = jax.tree_util.tree_map_with_path(trains, params)
  leaves = jax.tree.leaves(mask)
  if not any(leaves):
    raise ValueError(f"no parameter trains: optimizer.freeze={freeze!r} freezes every parameter"
                     if not adapters else f"no parameter trains with adapters (freeze={freeze!r})")
  return None if all(leaves) else mask


def select(params: Any, mask: Optional[Any]) -> Any:
  """The trainable parameters: `params` with every frozen leaf replaced by an empty node."""
  if mask is None:
    return params
  return jax.tree.map(lambda p, trains: p if trains else optax.MaskedNode(), params, mask)


def combine(trained: Any, params: Any) -> Any:
  """`params` with its trainable leaves taken from `trained` (a `select` of the same tree)."""
  return jax.tree.map(lambda t, p: p if isinstance(t, optax.MaskedNode) else t, trained, params,
                      is_leaf=lambda x: isinstance(x, optax.MaskedNode))


def count(params: Any, mask: Optional[Any]) -> tuple[int, int]:
  """(trainable values, all values) of a parameter tree."""
  sizes = jax.tree.map(lambda p: int(p.size) if hasattr(p, "size") else 0, params)
  total = sum(jax.tree.leaves(sizes))
  return sum(jax.tree.leaves(select(sizes, mask))), total
