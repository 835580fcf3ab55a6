"""Rematerialisation policies chosen by name; model code tags activations with checkpoint_name."""
import flax.linen as nn
import jax

# Names the model tags: "attention_out" (attention before its output projection), "block_out".
POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.checkpoint_dots,
    "save_dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "save_attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
    "save_block_out": jax.checkpoint_policies.save_only_these_names("block_out"),
}


def wrap(module_class: type, policy: str, scanned: bool) -> type:
  """Returns `module_class` rematerialised per layer with the named policy ('none' = unchanged)."""
  if policy == "none":
    return module_class
  if policy not in POLICIES:
    raise ValueError(f"unknown remat_policy '{policy}', expected 'none' or one of {sorted(POLICIES)}")
  # Under scan, CSE across iterations is impossible anyway; outside it the barrier is needed.
  return nn.remat(module_class, policy=POLICIES[policy], prevent_cse=not scanned)
