"""The device mesh: axes (data, fsdp, tensor), sizes within a slice (ICI) and across slices (DCN).

A size of -1 means "all the devices left". One slice: `create_device_mesh` (topology aware on
TPU); several slices: `create_hybrid_device_mesh`, with the DCN sizes outermost so only the
data-parallel gradient reduction crosses slices.
"""
import math
from typing import Mapping, Optional, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor")


def resolve_axis_sizes(sizes: Mapping[str, int], total: int, what: str) -> tuple[int, ...]:
  """Sizes per MESH_AXES with one -1 filled so their product is `total`; errors say what is wrong."""
  unknown = sorted(set(sizes) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"{what}: unknown mesh axes {unknown}, expected a subset of {MESH_AXES}")
  values = [int(sizes.get(axis, 1)) for axis in MESH_AXES]
  if sum(v == -1 for v in values) > 1:
    raise ValueError(f"{what}: at most one axis may be -1, got {dict(zip(MESH_AXES, values))}")
  if any(v == 0 or v < -1 for v in values):
    raise ValueError(f"{what}: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, values))}")
  known = math.prod(v for v in values if v != -1)
  if -1 in values:
    if total % known:
      raise ValueError(f"{what}: {dict(zip(MESH_AXES, values))} cannot fill {total} devices "
                       f"({total} is not a multiple of {known})")
    values[values.index(-1)] = total // known
  if math.prod(values) != total:
    raise ValueError(f"{what}: mesh {dict(zip(MESH_AXES, values))} has {math.prod(values)} devices, "
                     f"but {total} are available")
  return tuple(values)


def num_slices(devices: Sequence[jax.Device]) -> int:
  """How many TPU slices the devices span (1 off TPU or on a single slice)."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(ici: Mapping[str, int], dcn: Optional[Mapping[str, int]] = None,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Mesh over `devices` (default all) with axes MESH_AXES; sizes per axis = ici * dcn."""
  devices = list(devices if devices is not None else jax.devices())
  slices = num_slices(devices)
  dcn_sizes = resolve_axis_sizes(dcn or {}, slices, "mesh.dcn")
  ici_sizes = resolve_axis_sizes(ici, len(devices) // slices, "mesh.ici")
  if slices > 1:
    array = mesh_utils.create_hybrid_device_mesh(ici_sizes, dcn_sizes, devices,
                                                 allow_split_physical_axes=True)
  elif devices[0].platform == "tpu":
    array = mesh_utils.create_device_mesh(ici_sizes, devices, allow_split_physical_axes=True)
  else:
    array = np.asarray(devices).reshape(ici_sizes)
  return Mesh(array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
