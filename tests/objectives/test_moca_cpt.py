"""MoCa CPT loss equals a plain reference computation; the MAE decoder starts as layer L//2."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmembed_jax.data import collate as collate_lib
from mmembed_jax.data import rows as rows_lib
from mmembed_jax.data.images import ImageProcessingConfig
from mmembed_jax.demo.tiny_model import tiny_config
from mmembed_jax.data.special_tokens import special_token_ids
from mmembed_jax.models.embedder import init_params
from mmembed_jax.models.llm import DecoderLayer, attention_mask, mrope_tables
from mmembed_jax.models.vlm import VisionLanguageModel
from mmembed_jax.objectives.moca_cpt import MAE_DECODER, MocaCpt

from tiny_models import TEST_PIXELS

ROWS = [{"text": "<image> a red circle above a blue square", "image": "wide.png"},
        {"text": "a passage of plain text only, with a few more words"},
        {"text": "<image> left and <image> right", "images": ["small.png", "square.png"]}]


@pytest.fixture(scope="module")
def setup(tokenizer, image_dir):
  ids = special_token_ids(tokenizer)
  config = tiny_config(attention="bidirectional", image_token_id=ids["image_token_id"],
                       vision_start_token_id=ids["vision_start_token_id"],
                       vision_end_token_id=ids["vision_end_token_id"])
  params = init_params(config, jax.random.key(0))
  encoded = [rows_lib.encode_row(row, tokenizer, ImageProcessingConfig(**TEST_PIXELS), 512, image_dir)
             for row in ROWS]
  length, patches, images = collate_lib.bucket_sizes(encoded)
  batch = collate_lib.collate(encoded, tokenizer.pad_token_id, length, patches, images)
  rng = np.random.default_rng(0)
  special = np.isin(batch["input_ids"], [ids[k] for k in ("image_token_id", "vision_start_token_id",
                                                         "vision_end_token_id")])
  batch["mlm_mask"] = ((rng.random(batch["input_ids"].shape) < 0.4) & ~special
                       & (batch["segment_ids"] > 0)).astype(np.int32)
  groups = rng.random((batch["pixel_patches"].shape[0], patches // 4)) < 0.5
  batch["mae_mask"] = (np.repeat(groups, 4, axis=1) & (batch["patch_image_ids"] > 0)).astype(np.int32)
  return config, params, batch


def _reference(objective, params, batch, rng):
  """The loss written out position by position with full logits and explicit loops."""
  config = objective.config
  model = VisionLanguageModel(config)
  patches = np.asarray(batch["pixel_patches"])
  if objective.noise == "shared":
    noise = np.broadcast_to(np.asarray(jax.random.normal(rng, (1, 1, patches.shape[-1]))),
                            patches.shape)
  else:
    noise = np.asarray(jax.random.normal(rng, patches.shape))
  mae_mask = np.asarray(batch["mae_mask"]).astype(bool)
  mlm_mask = np.asarray(batch["mlm_mask"]).astype(bool)
  ids = np.asarray(batch["input_ids"])
  masked = dict(batch, input_ids=np.where(mlm_mask, objective.mask_token_id, ids),
                pixel_patches=np.where(mae_mask[..., None], noise, patches))
  hidden = model.apply({"params": params}, masked)
  logits = np.asarray(model.apply({"params": params}, hidden, method=VisionLanguageModel.lm_logits))
  log_probs = np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1))
  losses = []
  for b in range(ids.shape[0]):
    for i in range(ids.shape[1]):
      if not mlm_mask[b, i]:
        continue
      source = i - 1 if objective.mlm_shift_labels else i
      if source < 0 or batch["segment_ids"][b, source] != batch["segment_ids"][b, i]:
        continue
      losses.append(-log_probs[b, source, ids[b, i]])
  mlm = np.mean(losses)

  decoder = params[MAE_DECODER]
  cos, sin = mrope_tables(jnp.asarray(batch["positions"]), config)
  decoded, _ = DecoderLayer(config).apply({"params": decoder["layer"]}, hidden, cos, sin,
                                          attention_mask(jnp.asarray(batch["segment_ids"]), False),
                                          None)
  decoded = np.asarray(decoded)
  kernel, bias = np.asarray(decoder["head"]["kernel"]), np.asarray(decoder["head"]["bias"])
  errors = []
  for b in range(ids.shape[0]):
    image_positions = np.flatnonzero(ids[b] == config.image_token_id)
    for k, position in enumerate(image_positions):
      output = decoded[b, position] @ kernel + bias  # [4 * 1176]
      if objective.mae_head_layout == "blocked":
        prediction = output.reshape(4, -1)  # patch p's value d at p * 1176 + d
      else:  # MoCa's released code: rearrange("b (d p) -> (b p) d", p=4): at d * 4 + p
        prediction = np.stack([output[p::4] for p in range(4)])
      for j in range(4):
        if mae_mask[b, 4 * k + j]:
          errors.append(np.mean((prediction[j] - patches[b, 4 * k + j]) ** 2))
  mae = np.mean(errors)
  return mlm + objective.mae_weight * mae, mlm, mae


@pytest.mark.parametrize("shift,noise,layout", [(True, "shared", "interleaved"),
                                                 (False, "per_patch", "interleaved"),
                                                 (True, "per_patch", "blocked"),
                                                 (False, "shared", "blocked")])
def test_loss_equals_plain_reference(setup, shift, noise, layout):
  """Both MAE head layouts: MoCa's released one (interleaved, the default) and blocked."""
  config, params, batch = setup
  objective = MocaCpt(config, mask_token_id=config.text.vocab_size - 1, mae_weight=0.5,
                      mlm_shift_labels=shift, noise=noise, logits_chunk=16,
                      mae_head_layout=layout)
  params = dict(params, **objective.init_extra(jax.random.key(1), params))
  rng = jax.random.key(7)
  loss, metrics = jax.jit(objective)(params, batch, rng)
  ref_loss, ref_mlm, ref_mae = _reference(objective, params, batch, rng)
  assert abs(float(metrics["mlm_loss"]) - ref_mlm) <= 1e-5 * max(1.0, ref_mlm)
  assert abs(float(metrics["mae_loss"]) - ref_mae) <= 1e-5 * max(1.0, ref_mae)
  assert abs(float(loss) - ref_loss) <= 1e-5 * max(1.0, ref_loss)
  assert int(metrics["masked_patches"]) == int(np.asarray(batch["mae_mask"]).sum())


def test_decoder_starts_as_the_middle_layer(setup):
  config, params, _ = setup
  objective = MocaCpt(config, mask_token_id=config.text.vocab_size - 1)
  decoder = objective.init_extra(jax.random.key(1), params)[MAE_DECODER]
  middle = params["language_model"][f"layers_{config.text.num_layers // 2}"]
  for a, b in zip(jax.tree.leaves(decoder["layer"]), jax.tree.leaves(middle)):
    np.testing.assert_array_equal(a, b)
  kernel = np.asarray(decoder["head"]["kernel"])
  assert kernel.shape == (config.text.hidden_size, 4 * 1176)
  assert abs(kernel.std() - 0.02) < 0.002 and not np.asarray(decoder["head"]["bias"]).any()


def test_gradients_reach_backbone_and_decoder(setup):
  config, params, batch = setup
  objective = MocaCpt(config, mask_token_id=config.text.vocab_size - 1)
  params = dict(params, **objective.init_extra(jax.random.key(1), params))
  grads = jax.jit(jax.grad(lambda p: objective(p, batch, jax.random.key(0))[0]))(params)
  for key in ("visual", "language_model", "embed_tokens", MAE_DECODER):
    assert float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(grads[key]))) > 0, key


def test_mask_token_must_fit_the_vocabulary(setup):
  config, _, _ = setup
  with pytest.raises(ValueError, match="outside the vocabulary"):
    MocaCpt(config, mask_token_id=config.text.vocab_size)
