"""Model configuration: the architecture of a Qwen2-VL / Qwen2.5-VL backbone and how to run it."""
import dataclasses
from typing import Any, Literal, Optional

from mmembed_jax.models.adapters import AdapterSpec
from mmembed_jax.models.region_mask import RegionMask

FAMILIES = ("qwen2_5_vl", "qwen2_vl")
ARCHITECTURES = {
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
}


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """The vision tower: patch embedding, `depth` transformer blocks, 2x2 patch merger."""
  depth: int
  hidden_size: int  # vision width (HF: hidden_size for 2.5, embed_dim for 2)
  num_heads: int
  intermediate_size: int  # MLP width (2: embed_dim * mlp_ratio)
  out_hidden_size: int  # merger output = LLM width
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  in_channels: int = 3
  hidden_act: str = "silu"  # 2.5: silu (SwiGLU); 2: quick_gelu (plain MLP)
  window_size: int = 112  # pixels; 0 = no window attention (Qwen2-VL)
  fullatt_block_indexes: tuple[int, ...] = ()  # blocks with full attention when windowed
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  tokens_per_second: int = 2  # Qwen2.5-VL: M-RoPE time steps per second of video

  @property
  def head_dim(self) -> int:
    """Width of one attention head."""
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Values in one flattened patch vector (1176 for 3x2x14x14)."""
    return self.in_channels * self.temporal_patch_size * self.patch_size**2

  @property
  def window_merged_tokens(self) -> int:
    """Window side in merged tokens (Qwen2.5-VL: 112 // 2 // 14 = 4)."""
    return self.window_size // self.spatial_merge_size // self.patch_size

  @property
  def window_patches(self) -> int:
    """Patches in a whole attention window (Qwen2.5-VL: 4 x 4 merged tokens = 64)."""
    return (self.window_merged_tokens * self.spatial_merge_size)**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """The Qwen2 decoder: GQA with qkv bias, RMSNorm, SwiGLU, M-RoPE."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  rope_theta: float = 1000000.0
  mrope_section: tuple[int, ...] = (16, 24, 24)
  rms_norm_eps: float = 1e-6
  hidden_act: str = "silu"

  @property
  def head_dim(self) -> int:
    """Width of one attention head."""
    return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A whole VLM backbone plus run-time switches (attention mode, dtypes, layer scanning, remat)."""
  family: Literal["qwen2_5_vl", "qwen2_vl"]
  vision: VisionConfig
  text: TextConfig
  tie_word_embeddings: bool = False
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  bos_token_id: Optional[int] = None  # carried through import/export; unused by the model
  eos_token_id: Optional[int] = None
  pad_token_id: Optional[int] = None
  # Run-time switches: none of these change the parameter values.
  attention: Literal["causal", "bidirectional"] = "causal"
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  scan_layers: bool = False  # stack layers with nn.scan (faster compiles on deep models)
  remat_policy: str = "none"  # see models/remat.py
  # LLM attention: 'auto' (the splash kernel on TPU, XLA elsewhere), 'xla', 'splash', or
  # 'splash_interpret' (the kernel run by the Pallas interpreter, to check it on CPU).
  attention_impl: str = "auto"
  # The largest image or video frame the data holds, in patches (the image processor's
  # max_pixels / 14**2). On the XLA path the vision tower's full-attention layers then attend
  # block by block within frames; 0 = unknown: masked attention over the whole patch buffer.
  max_frame_patches: int = 0
  # LoRA / DoRA adapters on the linear layers it targets (models/adapters.py); None = none.
  adapter: Optional[AdapterSpec] = None
  # Depth-dependent attention between token regions (CoMa, models/region_mask.py); None = none.
  region_mask: Optional[RegionMask] = None
  # False: the decoder returns its hidden states before its final RMSNorm (embeddings pooled
  # there: mmembed.json's pooling_point "before_final_norm"); the LM head always needs True.
  final_norm: bool = True

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"unknown model family '{self.family}', expected one of {FAMILIES}")
    if self.attention not in ("causal", "bidirectional"):
      raise ValueError(f"attention must be 'causal' or 'bidirectional', got '{self.attention}'")
    if sum(self.text.mrope_section) * 2 != self.text.head_dim:
      raise ValueError(f"mrope_section {self.text.mrope_section} must sum to head_dim/2 = "
                       f"{self.text.head_dim // 2}")

  @property
  def windowed_vision(self) -> bool:
    """Whether the vision tower has window-attention blocks (Qwen2.5-VL with a window size)."""
    return self.family == "qwen2_5_vl" and self.vision.window_size > 0

  @property
  def video_tokens_per_second(self) -> Optional[int]:
    """M-RoPE time steps per second of video (Qwen2.5-VL), None where a frame pair is one step
    (Qwen2-VL)."""
    return self.vision.tokens_per_second if self.family == "qwen2_5_vl" else None

  def replace(self, **changes: Any) -> "ModelConfig":
    """Returns a copy with some top-level fields changed (e.g. attention='bidirectional')."""
    return dataclasses.replace(self, **changes)


def _get(config: Any, *names: str, default: Any = None) -> Any:
  for name in names:
    value = getattr(config, name, None)
    if value is not None:
      return value
  return default


def _token_id(value: Any) -> Any:
  """Token ids may be lists in config.json; tuples keep ModelConfig hashable."""
  return tuple(value) if isinstance(value, list) else value


def from_hf_config(hf_config: Any, **run_options: Any) -> ModelConfig:
  """Builds a ModelConfig from a transformers Qwen2(.5)-VL config object (either save format)."""
  family = hf_config.model_type
  if family not in FAMILIES:
    raise ValueError(f"unsupported architecture: model_type '{family}' (config.json "
                     f"architectures={getattr(hf_config, 'architectures', None)}); "
                     f"supported: {FAMILIES}")
  text_cfg, vision_cfg = hf_config.text_config, hf_config.vision_config
  rope = dict(_get(text_cfg, "rope_parameters", "rope_scaling", default={}) or {})
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in ("default", "mrope"):
    raise ValueError(f"unsupported rope_type '{rope_type}' in text config: only M-RoPE is implemented")
  text = TextConfig(
      vocab_size=text_cfg.vocab_size,
      hidden_size=text_cfg.hidden_size,
      intermediate_size=text_cfg.intermediate_size,
      num_layers=text_cfg.num_hidden_layers,
      num_heads=text_cfg.num_attention_heads,
      num_kv_heads=text_cfg.num_key_value_heads or text_cfg.num_attention_heads,
      rope_theta=float(rope.get("rope_theta", _get(text_cfg, "rope_theta", default=1000000.0))),
      mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
      rms_norm_eps=text_cfg.rms_norm_eps,
      hidden_act=text_cfg.hidden_act,
  )
  if text.hidden_act != "silu":
    raise ValueError(f"text hidden_act '{text.hidden_act}' unsupported (expected silu)")
  vision_rope = dict(_get(vision_cfg, "rope_parameters", default={}) or {})
  common = dict(depth=vision_cfg.depth, num_heads=vision_cfg.num_heads,
                patch_size=vision_cfg.patch_size, temporal_patch_size=vision_cfg.temporal_patch_size,
                spatial_merge_size=vision_cfg.spatial_merge_size, in_channels=vision_cfg.in_channels,
                hidden_act=vision_cfg.hidden_act,
                rope_theta=float(vision_rope.get("rope_theta", 10000.0)))
  if family == "qwen2_5_vl":
    vision = VisionConfig(hidden_size=vision_cfg.hidden_size,
                          intermediate_size=vision_cfg.intermediate_size,
                          out_hidden_size=vision_cfg.out_hidden_size,
                          window_size=vision_cfg.window_size,
                          fullatt_block_indexes=tuple(vision_cfg.fullatt_block_indexes),
                          tokens_per_second=int(_get(vision_cfg, "tokens_per_second", default=2)),
                          **common)
  else:  # Qwen2-VL names the vision width embed_dim and the merger output hidden_size
    vision = VisionConfig(hidden_size=vision_cfg.embed_dim,
                          intermediate_size=int(vision_cfg.embed_dim * vision_cfg.mlp_ratio),
                          out_hidden_size=vision_cfg.hidden_size, window_size=0, **common)
  return ModelConfig(
      family=family,
      vision=vision,
      text=text,
      tie_word_embeddings=bool(hf_config.tie_word_embeddings),
      image_token_id=hf_config.image_token_id,
      video_token_id=hf_config.video_token_id,
      vision_start_token_id=hf_config.vision_start_token_id,
      vision_end_token_id=_get(hf_config, "vision_end_token_id", default=151653),
      bos_token_id=_token_id(_get(text_cfg, "bos_token_id")),
      eos_token_id=_token_id(_get(text_cfg, "eos_token_id")),
      pad_token_id=_token_id(_get(text_cfg, "pad_token_id")),
      **run_options,
  )


def to_hf_config_dict(config: ModelConfig, dtype: Optional[str] = None) -> dict:
  """The config.json dict transformers needs to rebuild this architecture."""
  text, vision = config.text, config.vision
  text_dict = {
      "vocab_size": text.vocab_size,
      "hidden_size": text.hidden_size,
      "intermediate_size": text.intermediate_size,
      "num_hidden_layers": text.num_layers,
      "num_attention_heads": text.num_heads,
      "num_key_value_heads": text.num_kv_heads,
      "hidden_act": text.hidden_act,
      "rms_norm_eps": text.rms_norm_eps,
      "rope_parameters": {"rope_type": "default", "rope_theta": text.rope_theta,
                          "mrope_section": list(text.mrope_section)},
      "tie_word_embeddings": config.tie_word_embeddings,
      "bos_token_id": config.bos_token_id,
      "eos_token_id": config.eos_token_id,
      "pad_token_id": config.pad_token_id,
  }
  common_vision = {
      "depth": vision.depth,
      "num_heads": vision.num_heads,
      "hidden_act": vision.hidden_act,
      "patch_size": vision.patch_size,
      "temporal_patch_size": vision.temporal_patch_size,
      "spatial_merge_size": vision.spatial_merge_size,
      "in_channels": vision.in_channels,
  }
  if config.family == "qwen2_5_vl":
    vision_dict = dict(common_vision, hidden_size=vision.hidden_size,
                       intermediate_size=vision.intermediate_size,
                       out_hidden_size=vision.out_hidden_size, window_size=vision.window_size,
                       fullatt_block_indexes=list(vision.fullatt_block_indexes),
                       tokens_per_second=vision.tokens_per_second)
  else:
    if vision.intermediate_size % vision.hidden_size:
      raise ValueError("Qwen2-VL vision MLP width must be a multiple of its width (mlp_ratio)")
    vision_dict = dict(common_vision, embed_dim=vision.hidden_size, hidden_size=vision.out_hidden_size,
                       mlp_ratio=vision.intermediate_size // vision.hidden_size)
  out = {
      "architectures": [ARCHITECTURES[config.family]],
      "model_type": config.family,
      "text_config": text_dict,
      "vision_config": vision_dict,
      "image_token_id": config.image_token_id,
      "video_token_id": config.video_token_id,
      "vision_start_token_id": config.vision_start_token_id,
      "vision_end_token_id": config.vision_end_token_id,
      "tie_word_embeddings": config.tie_word_embeddings,
  }
  if dtype:
    out["dtype"] = dtype
  return out


def hf_config_object(config: ModelConfig) -> Any:
  """A transformers config object for this architecture (transformers' config classes need no torch)."""
  import transformers  # pylint: disable=g-import-not-at-top
  cls = {"qwen2_5_vl": transformers.Qwen2_5_VLConfig, "qwen2_vl": transformers.Qwen2VLConfig}
  return cls[config.family](**to_hf_config_dict(config))
