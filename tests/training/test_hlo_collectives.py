"""Collective bytes read from optimised HLO: sizes, async pairs, operands by name, loop weights."""
import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from mmembed_jax.training import hlo_collectives

# TPU-style text: an async all-gather whose -start result is (operand, gathered), a reduce-scatter
# with inline operand shapes, an all-reduce whose operand is written by name, a loop of 28 around
# a loop of 3 that has no known_trip_count (its condition's bound says 3), a kernel whose
# multi-line config has lines starting with "}}", and a collective in the entry computation.
HLO = """
HloModule jit_update, entry_computation_layout={()->()}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%inner_body (p: (s32[], bf16[4,64])) -> (s32[], bf16[4,64]) {
  %p = (s32[], bf16[4,64]) parameter(0)
  %g = bf16[4,64]{1,0} get-tuple-element(%p), index=1
  %ag = (bf16[4,64]{1,0}, bf16[32,64]{1,0}) all-gather-start(bf16[4,64]{1,0} %g), dimensions={0}
  %agd = bf16[32,64]{1,0} all-gather-done(%ag)
  ROOT %t = (s32[], bf16[4,64]) tuple(%i, %g)
}

%inner_cond (p: (s32[], bf16[4,64])) -> pred[] {
  %bound = u32[]{:T(128)} constant(3)
  %p = (s32[], bf16[4,64]) parameter(0)
  %i = u32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %bound), direction=LT
}

%outer_body (q: (s32[], f32[128,64])) -> (s32[], f32[128,64]) {
  %q = (s32[], f32[128,64]) parameter(0)
  %grad = f32[128,64]{1,0} get-tuple-element(%q), index=1
  %rs = f32[16,64]{1,0} reduce-scatter(f32[128,64]{1,0} %grad), dimensions={0}, to_apply=%add
  %ar = f32[128,64]{1,0} all-reduce(%grad), to_apply=%add
  %w = (s32[], bf16[4,64]) while(%init), condition=%inner_cond, body=%inner_body
  ROOT %t = (s32[], f32[128,64]) tuple(%i, %grad)
}

%outer_cond (q: (s32[], f32[128,64])) -> pred[] {
  %q = (s32[], f32[128,64]) parameter(0)
  ROOT %lt = pred[] compare(%a, %b), direction=LT
}

ENTRY %main (param: f32[8,8]) -> f32[8,8] {
  %param = f32[8,8]{1,0} parameter(0)
  %kernel = f32[8,8]{1,0} custom-call(%param), custom_call_target="tpu_custom_call", backend_config={"custom_call_config": {"body": "x",
"xprof_metadata":"{\\"block_q\\": 512}"
}}, metadata={op_name="splash"}
  %cp = f32[8,8]{1,0} collective-permute(%param), source_target_pairs={{0,1},{1,0}}
  %loop = (s32[], f32[128,64]) while(%start), condition=%outer_cond, body=%outer_body, backend_config={"known_trip_count":{"n":"28"}}
  ROOT %out = f32[8,8]{1,0} copy(%cp)
}
"""


def test_bytes_by_kind_weighted_by_nested_loop_trip_counts():
  assert hlo_collectives.collective_bytes(HLO) == {
      "all-gather": 28 * 3 * 32 * 64 * 2,  # the gathered bf16 tensor, 84 times
      "reduce-scatter": 28 * 128 * 64 * 4,  # the tensor being reduced
      "all-reduce": 28 * 128 * 64 * 4,  # operand by name: its defining instruction's type
      "collective-permute": 8 * 8 * 4,  # once, in the entry
  }


def test_a_compiled_fsdp_scan_moves_each_layer_once_per_iteration():
  """A real program (8 CPU devices, weights sharded over fsdp, a scan over layers): doubling the
  layers doubles every collective's bytes, and the gathers move whole layers."""
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))

  def collectives(layers):
    weights = jax.ShapeDtypeStruct((layers, 256, 256), jnp.float32,
                                   sharding=NamedSharding(mesh, PartitionSpec(None, "fsdp")))
    inputs = jax.ShapeDtypeStruct((64, 256), jnp.float32,
                                  sharding=NamedSharding(mesh, PartitionSpec("fsdp")))

    def loss(w, x):
      h, _ = jax.lax.scan(lambda h, wl: (jnp.tanh(h @ wl), None), x, w)
      return (h**2).sum()

    step = jax.jit(jax.grad(loss), out_shardings=weights.sharding)
    return hlo_collectives.collective_bytes(step.lower(weights, inputs).compile().as_text())

  two, four = collectives(2), collectives(4)
  layer = 256 * 256 * 4
  assert four == {kind: 2 * value for kind, value in two.items()}
  assert four["all-gather"] % layer == 0 and four["all-gather"] >= 4 * layer
