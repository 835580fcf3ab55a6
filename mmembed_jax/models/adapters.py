"""LoRA and DoRA adapters on the model's linear layers, with PEFT's semantics.

A `Linear` whose module path (e.g. 'language_model/layers_3/self_attn/q_proj'; under
`scan_layers` 'language_model/layers/self_attn/q_proj') matches `AdapterSpec.targets` (a regex,
searched) gets, next to its frozen kernel [in, *out]:

  lora_a          [in, rank]     Gaussian (std 1/rank) or Kaiming-uniform (bound 1/sqrt(in))
  lora_b          [rank, *out]   zeros, so a new adapter leaves the model unchanged
  lora_magnitude  [*out]         DoRA only: the base kernel's norm over its input axis

and computes, with s = alpha / rank and x' = dropout(x) (training only, when a 'dropout' rng is
given):

  LoRA  y = x W + b + s (x' A) B
  DoRA  y = x W + b + (g - 1) x' W + g s (x' A) B,   g = m / ||W + s A B||  (per output feature)

where the norm is a constant for differentiation (PEFT detaches it and the LoRA weight inside
it: DoRA paper, section 4.3). Without dropout x' = x and DoRA is y = g (x W + s x A B) + b.
Matched against peft 0.21.2 (`tuners/lora/layer.py` Linear.forward, `tuners/lora/variants.py`
DoraLinearVariant.forward, `tuners/lora/dora.py` DoraLinearLayer); `tests/models/test_adapters.py`
runs peft as the oracle.

The adapters live in the 'params' collection beside the kernel, so `nn.scan` stacks them, remat
and sharding treat them like any parameter: lora_a takes the kernel's input axis, lora_b and
the magnitude its output axes, the rank axis is replicated ('adapter_rank').
"""
import dataclasses
import math
import re
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

KINDS = ("lora", "dora")
INITS = ("gaussian", "kaiming")
LEAVES = ("lora_a", "lora_b", "lora_magnitude")  # parameter names the adapters add
RANK_AXIS = "adapter_rank"


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
  """Which linear layers get adapters and how (config section `adapters`)."""
  kind: str  # lora | dora
  rank: int
  alpha: float
  dropout: float
  targets: str  # regex searched in each Linear's module path
  init: str = "kaiming"  # gaussian (std 1/rank, PEFT init_lora_weights="gaussian") | kaiming

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"adapters.kind={self.kind!r}: expected one of {KINDS} (or 'none')")
    if self.init not in INITS:
      raise ValueError(f"adapters.init={self.init!r}: expected one of {INITS}")
    if not (isinstance(self.rank, int) and self.rank >= 1):
      raise ValueError(f"adapters.rank={self.rank!r}: expected an integer >= 1")
    if not self.alpha > 0:
      raise ValueError(f"adapters.alpha={self.alpha!r}: expected a number > 0")
    if not 0 <= self.dropout < 1:
      raise ValueError(f"adapters.dropout={self.dropout!r}: expected a number in [0, 1)")
    try:
      re.compile(self.targets)
    except re.error as e:
      raise ValueError(f"adapters.targets={self.targets!r} is not a valid regular expression "
                       f"({e})") from None

  @property
  def scale(self) -> float:
    """alpha / rank (PEFT's `scaling` without rsLoRA)."""
    return self.alpha / self.rank

  def targets_path(self, path: Sequence[str]) -> bool:
    """Whether the Linear at module path `path` gets an adapter."""
    return re.search(self.targets, "/".join(path)) is not None


def _init_a(spec: AdapterSpec) -> Callable:
  """Initialiser of lora_a [in, rank], PEFT's `reset_lora_parameters`: normal(std 1/rank), or
  torch's kaiming_uniform_(a=sqrt(5)) on lora_A.weight [rank, in], i.e. U(±1/sqrt(in))."""
  def init(key, shape, dtype):
    if spec.init == "gaussian":
      return (jax.random.normal(key, shape, jnp.float32) / spec.rank).astype(dtype)
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)
  return init


def _adapted_kernel(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  """W + s A B in float32 [in, *out]."""
  return kernel.astype(jnp.float32) + scale * jnp.tensordot(
      a.astype(jnp.float32), b.astype(jnp.float32), axes=1)


def weight_norm(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  """||W + s A B|| over the input axis, float32 [*out] (PEFT's `get_weight_norm`)."""
  return jnp.sqrt(jnp.sum(jnp.square(_adapted_kernel(kernel, a, b, scale)), axis=0))


def adapt(module: nn.Module, spec: AdapterSpec, x: jax.Array, kernel: jax.Array,
          base: jax.Array, contract: Callable[[jax.Array, jax.Array], jax.Array],
          kernel_axes: tuple[Optional[str], ...], dtype: Any, param_dtype: Any) -> jax.Array:
  """`base` = contract(x, kernel) [..., *out] (no bias yet) with the adapter's output added;
  declares the adapter's parameters in `module` (a Linear, inside its compact __call__)."""
  in_axis, out_axes = kernel_axes[0], tuple(kernel_axes[1:])
  out_shape = kernel.shape[1:]
  a = module.param("lora_a", nn.with_logical_partitioning(_init_a(spec), (in_axis, RANK_AXIS)),
                   (kernel.shape[0], spec.rank), param_dtype)
  b = module.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros,
                                                          (RANK_AXIS,) + out_axes),
                   (spec.rank,) + out_shape, param_dtype)
  dropped = x
  if spec.dropout > 0 and module.has_rng("dropout"):
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - spec.dropout, x.shape)
    dropped = jnp.where(keep, x / (1.0 - spec.dropout), 0).astype(x.dtype)
  # The adapter branch runs in float32 whatever the compute dtype, as PEFT's (its
  # autocast_adapter_dtype keeps adapters in float32 on a bfloat16 base); the sum is cast back.
  f32 = jnp.float32
  lora = contract(jnp.einsum("...i,ir->...r", dropped.astype(f32), a.astype(f32)),
                  b.astype(f32)) * spec.scale  # [..., *out]
  if spec.kind == "lora":
    return (base.astype(f32) + lora).astype(dtype)
  magnitude = module.param(
      "lora_magnitude",
      nn.with_logical_partitioning(lambda *_: weight_norm(kernel, a, b, spec.scale), out_axes),
      out_shape, param_dtype)
  gain = magnitude.astype(f32) / jax.lax.stop_gradient(weight_norm(kernel, a, b, spec.scale))
  dropped_base = base if dropped is x else contract(dropped.astype(dtype), kernel.astype(dtype))
  return (base.astype(f32) + (gain - 1) * dropped_base.astype(f32) + gain * lora).astype(dtype)


def is_adapter_path(path: str) -> bool:
  """Whether the parameter at 'a/b/.../name' is an adapter parameter."""
  return path.rsplit("/", 1)[-1] in LEAVES


def merge(params: Any, spec: AdapterSpec) -> Any:
  """The parameters with every adapter folded into its kernel (PEFT's merge_and_unload):
  LoRA W + s A B; DoRA (m / ||W + s A B||) (W + s A B); the adapter leaves are dropped."""
  def walk(tree):
    if not isinstance(tree, dict):
      return tree
    if "lora_a" in tree and "kernel" in tree:
      kernel, a, b = tree["kernel"], tree["lora_a"], tree["lora_b"]
      batched = jnp.ndim(a) == 3  # stacked by scan: [layers, in, rank]
      merge_one = lambda k, a, b, m: _merged_kernel(k, a, b, m, spec)  # pylint: disable=unnecessary-lambda-assignment
      magnitude = tree.get("lora_magnitude")
      if batched:
        merged = jax.vmap(merge_one)(kernel, a, b, magnitude)
      else:
        merged = merge_one(kernel, a, b, magnitude)
      rest = {k: v for k, v in tree.items() if k not in LEAVES}
      return dict(rest, kernel=merged.astype(kernel.dtype))
    return {k: walk(v) for k, v in tree.items()}
  return walk(params)


def _merged_kernel(kernel, a, b, magnitude, spec: AdapterSpec) -> jax.Array:
  merged = _adapted_kernel(kernel, a, b, spec.scale)
  if spec.kind == "lora":
    return merged
  return merged * (magnitude.astype(jnp.float32) / weight_norm(kernel, a, b, spec.scale))


def has_adapters(params: Any) -> bool:
  """Whether a parameter tree holds adapter parameters."""
  return any(is_adapter_path("/".join(str(getattr(k, "key", k)) for k in path))
             for path, _ in jax.tree.leaves_with_path(params))
