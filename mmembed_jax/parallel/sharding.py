"""Logical axis rules -> shardings, and the check that big parameters are not left replicated."""
import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, Any]]

# FSDP over `fsdp`, Megatron-style tensor parallelism over `tensor`, batch over data x fsdp.
# A rule lists (logical name, mesh axes); the first rule whose mesh axes are still free wins.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("patches", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp_out", None),
    ("patch", None),
    ("layers", None),
    ("norm", None),
    ("head_dim", None),
    ("adapter_rank", None),  # LoRA / DoRA rank: small, replicated (A and B shard like the kernel)
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_vocab", "tensor"),
)


def config_rules(rules: Sequence[Sequence[Any]]) -> tuple[tuple[str, Any], ...]:
  """Logical axis rules as a config (or its JSON) holds them -> (name, axes) with axes a tuple
  where it lists several mesh axes."""
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def data_parallel_size(mesh: Mesh) -> int:
  """Number of ways the batch is split (data x fsdp)."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def split_rows(x: jax.Array, steps: int) -> jax.Array:
  """[n, ...] -> [steps, n // steps, ...]; step s takes rows s, s + steps, ... so each batch shard
  keeps its own rows (no communication when n // steps is divisible by the shard count)."""
  return jnp.swapaxes(x.reshape((x.shape[0] // steps, steps) + x.shape[1:]), 0, 1)


def split_batch(batch: Mapping[str, Any], steps: int) -> dict:
  """`split_rows` for every array of a (possibly nested) batch dict, by patch buffer: the rows a
  buffer serves (models/inputs.py) go to the same step as the buffer."""
  batch = dict(batch)
  buffers = batch["pixel_patches"].shape[0] if "pixel_patches" in batch else None

  def split(x):
    if isinstance(x, Mapping):
      return split_batch(x, steps)
    if buffers is None:
      return split_rows(x, steps)
    per_buffer = x.reshape((buffers, x.shape[0] // buffers) + x.shape[1:])  # [buffers, r or 1, ...]
    return split_rows(per_buffer, steps).reshape((steps, x.shape[0] // steps) + x.shape[1:])

  return {key: split(value) for key, value in batch.items()}


def merge_rows(x: jax.Array, rows_per_buffer: int = 1) -> jax.Array:
  """Inverse of `split_rows`, or of `split_batch` for rows that share patch buffers of
  `rows_per_buffer` rows: [steps, n // steps, ...] -> [n, ...]."""
  steps = x.shape[0]
  per_buffer = x.reshape((steps, x.shape[1] // rows_per_buffer, rows_per_buffer) + x.shape[2:])
  return jnp.swapaxes(per_buffer, 0, 1).reshape((-1,) + x.shape[2:])


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for a tree whose leaves are nn.Partitioned boxes (abstract or concrete)."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, list(rules))


def put_by_path(shardings: Any) -> Callable[[tuple, Any], jax.Array]:
  """put(path, array) -> the array placed with the sharding at `path` (a tuple of dict keys) of the
  tree `shardings`; for loaders that hand over one parameter at a time."""
  flat = {tuple(str(k.key) for k in path): s for path, s in jax.tree.leaves_with_path(
      shardings, is_leaf=lambda x: isinstance(x, NamedSharding))}
  return lambda path, array: jax.device_put(array, flat[path])


def replicated_report(abstract_params: Any, shardings: Any, min_size: int = 2**20
                      ) -> tuple[float, list[str]]:
  """(share of parameter values fully replicated, names of replicated tensors >= min_size values)."""
  total, replicated, names = 0, 0, []
  flat = jax.tree.leaves_with_path(abstract_params)
  flat_shardings = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  for (path, leaf), sharding in zip(flat, flat_shardings):
    size = math.prod(leaf.shape)
    total += size
    if sharding.is_fully_replicated:
      replicated += size
      if size >= min_size:
        names.append(f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)}")
  return (replicated / max(total, 1)), names


def check_replicated(abstract_params: Any, shardings: Any, mesh: Mesh, max_share: float,
                     min_size: int = 2**20) -> list[str]:
  """Raises when more than `max_share` of the parameter values are replicated on a mesh with fsdp or
  tensor axes (one device or pure data parallelism replicates every parameter by design)."""
  if math.prod(size for axis, size in mesh.shape.items() if axis != "data") == 1:
    return []
  share, names = replicated_report(abstract_params, shardings, min_size)
  if share > max_share:
    raise ValueError(f"{share:.1%} of parameter values are replicated on every device, more than "
                     f"sharding.max_replicated_share={max_share:.1%}; large ones: {names[:8]}; "
                     f"add logical axis rules that shard them")
  return names


def _dict_keys(path) -> tuple[str, ...]:
  return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def optimizer_state_shardings(abstract_opt_state: Any, abstract_params: Any, param_shardings: Any,
                              mesh: Mesh) -> Any:
  """Shardings for an optimiser state: a leaf shaped like a parameter (matched by its key path,
  e.g. Adam's mu/nu) is sharded like it; anything else (counts, scalars) is replicated."""
  by_path = {}
  for (path, leaf), sharding in zip(
      jax.tree.leaves_with_path(abstract_params),
      jax.tree.leaves(param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))):
    by_path[_dict_keys(path)] = (tuple(leaf.shape), sharding)
  replicated = NamedSharding(mesh, PartitionSpec())

  def choose(path, leaf):
    keys = _dict_keys(path)
    for start in range(len(keys)):
      shape, sharding = by_path.get(keys[start:], (None, None))
      if shape is not None and shape == tuple(leaf.shape):
        return sharding
    return replicated

  return jax.tree_util.tree_map_with_path(choose, abstract_opt_state)
