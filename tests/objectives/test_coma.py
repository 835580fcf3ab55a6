"""CoMa stage 1: the compression mask against transformers' layers, the guards that it bites, and
the loss against a plain reference loop.

The reference masks are built the released code's way (`_update_causal_mask_by_sep_indices`):
from token ids (sep1 = the first compression token, sep2 = sep1 + n, sep3 = the first
`<|im_end|>` + 2), accumulated layer by layer; ours come from the pipeline's region ids and
the objective's tables. Two examples are packed in one row, with padding after them.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

from mmembed_jax.convert.hf_import import import_hf
from mmembed_jax.data import coma_pipeline, packing
from mmembed_jax.data.images import ImageProcessingConfig
from mmembed_jax.models.vlm import VisionLanguageModel
from mmembed_jax.objectives.coma import ComaCompression, compression_mask

from tiny_models import TEST_PIXELS

NUM_CTOKENS = 8
TOLERANCE = 1e-4
RECORDS = [
    {"text": "a wide photo", "images": ["wide.png"],
     "dialogue": [{"q": "What colour is the circle?", "a": "red"},
                  {"q": "Where is it?", "a": "in the top left corner"}]},
    {"text": "", "images": ["tall.png"],
     "dialogue": [{"q": "How many shapes are there?", "a": "three shapes"}]},
]


@pytest.fixture(scope="module")
def setup(tiny_hf_dirs, image_dir):
  model_dir = tiny_hf_dirs["qwen2_5_vl"]
  budget = coma_pipeline.coma_budget(length=352, max_patches=512, max_images=2, max_segments=4)
  encoder = coma_pipeline.ComaEncoder(model_dir, budget, ImageProcessingConfig(**TEST_PIXELS),
                                      NUM_CTOKENS)
  examples = []
  for i, record in enumerate(RECORDS):
    record = dict(record, images=[f"{image_dir}/{name}" for name in record["images"]],
                  example_id=i, where=f"records:{i + 1}", error=None)
    examples.append(encoder.encode(record))
  batch = packing.layout_unit([examples], budget)
  assert batch["segment_ids"].max() == 2 and batch["segment_ids"][0, -1] == 0  # padding after them
  config, params = import_hf(model_dir, attention="causal")
  hf_model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
      model_dir, attn_implementation="eager", dtype=torch.float32).eval()
  seq = encoder.sequences
  ids = {"ctoken0": seq.token_id("<|ctoken_pad_0|>"), "im_end": seq.token_id("<|im_end|>"),
         "im_start": seq.token_id("<|im_start|>"), "assistant_header": seq.text_ids("assistant\n")}
  return config, params, hf_model, batch, ids


def _spans(input_ids, segment_ids, ids):
  """[(start, end, sep1, sep2, sep3)] per example, found from token ids as the released code does."""
  out = []
  for s in range(1, segment_ids.max() + 1):
    where = np.nonzero(segment_ids == s)[0]
    start, end = int(where[0]), int(where[-1]) + 1
    tokens = input_ids[start:end]
    sep1 = start + int(np.nonzero(tokens == ids["ctoken0"])[0][0])
    sep3 = start + int(np.nonzero(tokens == ids["im_end"])[0][0]) + 2
    out.append((start, end, sep1, sep1 + NUM_CTOKENS, sep3))
  return out


def released_masks(batch, ids, mode, split_layer, num_layers):
  """bool [num_layers, length, length] of the one packed row, the released code's way."""
  input_ids, segment_ids = batch["input_ids"][0], batch["segment_ids"][0]
  length = len(input_ids)
  mask = (segment_ids[:, None] == segment_ids[None, :]) & np.tril(np.ones((length, length), bool))
  layers = []
  for layer in range(num_layers):
    mask = mask.copy()
    for start, end, sep1, sep2, sep3 in _spans(input_ids, segment_ids, ids):
      if mode == "code":
        if layer == split_layer:
          mask[sep1:end, start:sep1] = False
        if split_layer > 0 and layer == 0:
          mask[sep3:end, start:sep2] = False
      elif split_layer >= 0 and layer >= split_layer:
        mask[sep2:end, start:sep1] = False
    layers.append(mask)
  return np.stack(layers)


def _hf_hidden(hf_model, batch, masks, hooks=()):
  """transformers' final hidden states with layer i's attention given the bool mask masks[i]."""
  additive = torch.where(torch.as_tensor(masks), 0.0, torch.finfo(torch.float32).min)[:, None, None]
  handles = []
  for i, layer in enumerate(hf_model.model.language_model.layers):
    def set_mask(module, args, kwargs, i=i):
      return args, dict(kwargs, attention_mask=additive[i])
    handles.append(layer.register_forward_pre_hook(set_mask, with_kwargs=True))
  handles += [module.register_forward_hook(hook) for module, hook in hooks]
  patches = int(np.prod(batch["image_grid_thw"][0], axis=-1).sum())
  grids = batch["image_grid_thw"][0][:len(RECORDS)]
  try:
    with torch.no_grad():
      out = hf_model.model(
          input_ids=torch.as_tensor(batch["input_ids"]).long(),
          attention_mask={"full_attention": additive[0]},
          position_ids=torch.as_tensor(batch["positions"]).long().permute(1, 0, 2),
          pixel_values=torch.as_tensor(batch["pixel_patches"][0][:patches]),
          image_grid_thw=torch.as_tensor(grids))
  finally:
    for handle in handles:
      handle.remove()
  return out.last_hidden_state[0].numpy()


def _ours(config, params, batch, mode, split_layer):
  config = config.replace(region_mask=compression_mask(mode, split_layer))
  return np.asarray(VisionLanguageModel(config).apply({"params": params}, batch))[0]


@pytest.mark.parametrize("mode", ["code", "paper"])
def test_compression_mask_matches_transformers_layers(setup, mode):
  config, params, hf_model, batch, ids = setup
  num_layers = config.text.num_layers
  valid = batch["segment_ids"][0] > 0
  for split_layer in (1, 0):
    reference = _hf_hidden(hf_model, batch, released_masks(batch, ids, mode, split_layer,
                                                           num_layers))
    errors = np.abs(_ours(config, params, batch, mode, split_layer) - reference)
    error = errors[valid].max()
    answers = np.asarray(batch["answer_mask"][0], bool)
    print(f"{mode} split_layer={split_layer}: hidden max abs diff {error:.2e} "
          f"({errors[answers].max():.2e} at the answers)")
    assert error <= TOLERANCE


@pytest.mark.parametrize("mode", ["code", "paper"])
def test_compression_mask_bites(setup, mode):
  """Before the first compression token: plain causal; at the answers: not."""
  config, params, _, batch, ids = setup
  plain = _ours(config, params, batch, mode, -1)
  masked = _ours(config, params, batch, mode, 1)
  before, answers = [], np.asarray(batch["answer_mask"][0], bool)
  for start, _, sep1, _, _ in _spans(batch["input_ids"][0], batch["segment_ids"][0], ids):
    before += range(start, sep1)
  assert np.abs(masked[before] - plain[before]).max() <= 1e-6
  assert np.abs(masked[answers] - plain[answers]).max(axis=-1).min() > 1e-2


def test_paper_mask_answers_see_the_image_only_through_the_compression_tokens(setup):
  """Paper mode, split_layer 0: perturbing one image patch changes the answers, and leaves them
  unchanged once the compression tokens' keys and values are held at the unperturbed run's."""
  config, _, hf_model, batch, ids = setup
  masks = released_masks(batch, ids, "paper", 0, config.text.num_layers)
  ctokens = np.zeros(batch["input_ids"].shape[1], bool)
  for _, _, sep1, sep2, _ in _spans(batch["input_ids"][0], batch["segment_ids"][0], ids):
    ctokens[sep1:sep2] = True
  recorded = {}

  def record(name):
    def hook(module, args, out):
      recorded[name] = out.detach().clone()
    return hook

  def hold(name):
    def hook(module, args, out):
      out = out.clone()
      out[:, ctokens] = recorded[name][:, ctokens]
      return out
    return hook

  projections = [(getattr(layer.self_attn, p), f"{i}.{p}")
                 for i, layer in enumerate(hf_model.model.language_model.layers)
                 for p in ("k_proj", "v_proj")]
  original = _hf_hidden(hf_model, batch, masks, [(m, record(n)) for m, n in projections])
  perturbed_batch = dict(batch, pixel_patches=batch["pixel_patches"].copy())
  perturbed_batch["pixel_patches"][0, :4] += 10.0  # the first merged token of the first image
  answers = np.asarray(batch["answer_mask"][0], bool)
  free = _hf_hidden(hf_model, perturbed_batch, masks)
  held = _hf_hidden(hf_model, perturbed_batch, masks, [(m, hold(n)) for m, n in projections])
  first_answers = answers & (batch["segment_ids"][0] == 1)
  print(f"answers moved by {np.abs(free[first_answers] - original[first_answers]).max():.2e} "
        f"free, {np.abs(held[answers] - original[answers]).max():.2e} held")
  assert np.abs(free[first_answers] - original[first_answers]).max() > 1e-4
  assert np.abs(held[answers] - original[answers]).max() <= 1e-6


def _reference_loss(config, params, batch, ids, loss_on):
  """Per-example mean next-token CE over full logits, the targets found from token ids."""
  logits = np.asarray(VisionLanguageModel(config).apply({"params": params}, batch,
                                                        method=VisionLanguageModel.logits))[0]
  input_ids = batch["input_ids"][0]
  losses = []
  for start, end, _, sep2, _ in _spans(input_ids, batch["segment_ids"][0], ids):
    targets = []
    if loss_on == "after_ctokens":
      targets = list(range(sep2, end))
    else:  # the tokens after each "<|im_start|>assistant\n" up to and including its <|im_end|>
      header = [ids["im_start"]] + list(ids["assistant_header"])
      for t in range(start, end):
        if list(input_ids[t:t + len(header)]) == header:
          u = t + len(header)
          while input_ids[u] != ids["im_end"]:
            targets.append(u)
            u += 1
          targets.append(u)
    ce = [float(optax.softmax_cross_entropy_with_integer_labels(
        jnp.asarray(logits[t - 1]), int(input_ids[t]))) for t in targets]
    losses.append(np.mean(ce))
  return float(np.mean(losses))


@pytest.mark.parametrize("loss_on", ["after_ctokens", "answers"])
def test_loss_equals_reference_loop(setup, loss_on):
  config, params, _, batch, ids = setup
  objective = ComaCompression(config, loss_on=loss_on, mask="code", split_layer=1, logits_chunk=32)
  loss, metrics = objective(params, batch, jax.random.key(0))
  expected = _reference_loss(objective.model_config, params, batch, ids, loss_on)
  print(f"{loss_on}: loss {float(loss):.6f}, reference {expected:.6f}, diff {abs(float(loss) - expected):.1e}")
  assert abs(float(loss) - expected) <= 1e-5
  assert float(metrics["examples"]) == pytest.approx(2.0)
