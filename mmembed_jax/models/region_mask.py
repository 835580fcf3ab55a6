"""Attention between token regions that changes with depth (CoMa's compression mask).

Each token carries a small region id (`attention_regions` int32 [batch, length] in the batch;
CoMa: 0 image and prompt, 1 compression tokens, 2 first question, 3 the rest of the dialogue).
A `RegionMask` says which region may attend to which: `below[r][c]` in layers < `split_layer`,
`above[r][c]` from `split_layer` on. The mask of a layer is the usual one (same segment,
causal if the model is causal) AND that table, so packed examples stay apart as ever.
"""
import dataclasses
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

Table = Tuple[Tuple[bool, ...], ...]


@dataclasses.dataclass(frozen=True)
class RegionMask:
  """Which region may see which (`below` / `above` split_layer): [regions][regions] tables."""
  below: Table
  above: Table
  split_layer: int

  def __post_init__(self):
    shapes = {np.shape(self.below), np.shape(self.above)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2 or len(set(next(iter(shapes)))) != 1:
      raise ValueError(f"RegionMask: below and above must be equal square tables, got shapes "
                       f"{sorted(shapes)}")
    if not all(np.diag(self.below)) or not all(np.diag(self.above)):
      raise ValueError("RegionMask: every region must see itself (a token would see nothing)")

  def uses_above(self, layer: int) -> bool:
    """Whether layer `layer` (0-based) takes the `above` table."""
    return layer >= self.split_layer

  def masks(self, base: jax.Array, regions: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """(below, above) bool [batch, length, length] from the segment/causal mask `base` and
    regions int [batch, length]."""
    def visible(table):
      table = jnp.asarray(np.asarray(table, bool))
      return base & table[regions[:, :, None], regions[:, None, :]]
    return visible(self.below), visible(self.above)
