"""The PyTorch embedder on an exported directory equals the JAX embeddings (fp32, <= 1e-4).

The JAX side is `make_embed_fn` on the collated rows (one padded batch); the PyTorch side is
`mmembed_jax.torch_embed.load(export_dir)` on the raw rows, in chunks of two, so one chunk
has no image at all and padding lengths differ between the two sides.
"""
import numpy as np
import pytest

from mmembed_jax import torch_embed
from mmembed_jax.convert.hf_export import export_hf
from mmembed_jax.convert.hf_import import import_hf
from mmembed_jax.data import collate as collate_lib
from mmembed_jax.data import rows as rows_lib
from mmembed_jax.data.images import ImageProcessingConfig
from mmembed_jax.models.embedder import make_embed_fn

from tiny_models import FAMILIES, TEST_PIXELS, VIDEO_ROWS, VIDEO_SETTINGS

TOLERANCE = 1e-4
ROWS = [
    {"text": "a short caption"},
    {"text": "a much longer plain text row about red circles, blue squares and green triangles"},
    {"text": "<image> a wide picture of a blue square", "image": "wide.png"},
    {"text": "left <image> and right <image> compared", "images": ["tall.png", "small.png"]},
    {"text": "a square page", "image": "square.png"},  # no marker: the image is prepended
]
BATCH_SIZE = 2  # PyTorch chunks: [text, text], [one image, two images], [one image]


@pytest.fixture(scope="module")
def jax_embeddings(tiny_hf_dirs, tokenizer, image_dir):
  """fn(family, attention, pooling) -> JAX embeddings [len(ROWS), embed] of ROWS (memoised)."""
  image_config = ImageProcessingConfig(**TEST_PIXELS)
  encoded = [rows_lib.encode_row(row, tokenizer, image_config, 512, image_dir) for row in ROWS]
  batch = collate_lib.collate(encoded, tokenizer.pad_token_id, *collate_lib.bucket_sizes(encoded))
  cache = {}

  def embeddings(family, attention, pooling):
    key = (family, attention, pooling)
    if key not in cache:
      config, params = import_hf(tiny_hf_dirs[family], attention=attention)
      cache[key] = np.asarray(make_embed_fn(config, pooling)(params, batch))
    return cache[key]

  return embeddings


def _export(source, out_dir, embedding):
  """Imports a tiny HF model into JAX and exports it with the given mmembed.json conventions."""
  config, params = import_hf(source)
  return str(export_hf(config, params, out_dir, source_dir=source, embedding=embedding))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_torch_embeddings_match_jax(family, attention, pooling, tiny_hf_dirs, image_dir,
                                    jax_embeddings, tmp_path):
  export_dir = _export(tiny_hf_dirs[family], str(tmp_path / "export"),
                       {"attention": attention, "pooling": pooling})
  embed = torch_embed.load(export_dir, batch_size=BATCH_SIZE)
  assert (embed.attention, embed.pooling) == (attention, pooling)  # from mmembed.json
  theirs = embed(ROWS, base_dir=image_dir)
  ours = jax_embeddings(family, attention, pooling)
  assert theirs.shape == ours.shape == (len(ROWS), 64)
  np.testing.assert_allclose(np.linalg.norm(theirs, axis=-1), 1.0, atol=1e-5)
  diff = np.abs(theirs - ours).max()
  print(f"{family} {attention} {pooling}: torch vs JAX embeddings max abs diff {diff:.2e}")
  assert diff <= TOLERANCE


def test_mmembed_json_defaults_are_honoured(tiny_hf_dirs, image_dir, jax_embeddings, tmp_path):
  export_dir = _export(tiny_hf_dirs["qwen2_5_vl"], str(tmp_path / "export"),
                       {"attention": "bidirectional", "pooling": "mean"})
  recorded = torch_embed.load(export_dir, batch_size=BATCH_SIZE)(ROWS, base_dir=image_dir)
  overridden = torch_embed.load(export_dir, attention="causal", pooling="last",
                                batch_size=BATCH_SIZE)(ROWS, base_dir=image_dir)
  bidirectional_mean = jax_embeddings("qwen2_5_vl", "bidirectional", "mean")
  causal_last = jax_embeddings("qwen2_5_vl", "causal", "last")
  assert np.abs(bidirectional_mean - causal_last).max() > 1e-2  # the settings do matter
  assert np.abs(recorded - bidirectional_mean).max() <= TOLERANCE
  assert np.abs(overridden - causal_last).max() <= TOLERANCE


def test_export_without_embedding_records_config_attention(tiny_hf_dirs, tmp_path):
  source = tiny_hf_dirs["qwen2_vl"]
  config, params = import_hf(source, attention="bidirectional")
  export_dir = str(export_hf(config, params, str(tmp_path / "export"), source_dir=source))
  embed = torch_embed.load(export_dir)
  assert (embed.attention, embed.pooling) == ("bidirectional", "last")


def test_compression_token_embeddings_match_jax(tiny_hf_dirs, image_dir, tmp_path):
  """CoMa's export: mmembed.json's compression tokens are appended to every row and 'ctoken'
  pooling averages them, in PyTorch (`torch_embed`) as in JAX (`JaxEmbedder`); the exported
  tokenizer holds them, at ids inside the model's vocabulary, and a plain transformers
  tokenizer reads them back."""
  import json
  import transformers
  from mmembed_jax.embedding import JaxEmbedder
  from mmembed_jax.data.special_tokens import compression_tokens
  export_dir = _export(tiny_hf_dirs["qwen2_5_vl"], str(tmp_path / "export"),
                       {"attention": "causal", "pooling": "ctoken", "compression_tokens": 4})
  tokenizer = transformers.AutoTokenizer.from_pretrained(export_dir)
  ids = tokenizer.convert_tokens_to_ids(compression_tokens(4))
  vocab = json.load(open(f"{export_dir}/config.json"))["text_config"]["vocab_size"]
  assert ids == list(range(ids[0], ids[0] + 4)) and ids[-1] < vocab
  theirs = torch_embed.load(export_dir, batch_size=BATCH_SIZE)(ROWS, base_dir=image_dir)
  jax_embedder = JaxEmbedder.from_pretrained(export_dir, batch_size=8)
  assert (jax_embedder.pooling, jax_embedder.num_ctokens) == ("ctoken", 4)
  ours = jax_embedder.embed_items([(f"row {i}", row) for i, row in enumerate(ROWS)], image_dir)
  last = torch_embed.load(export_dir, pooling="last", batch_size=BATCH_SIZE)(ROWS, base_dir=image_dir)
  assert np.abs(last - theirs).max() > 1e-2  # the released eval's "eos" pooling differs
  diff = np.abs(theirs - ours).max()
  print(f"ctoken pooling: torch vs JAX embeddings max abs diff {diff:.2e}")
  assert diff <= TOLERANCE


def test_videos_embed_alike_in_jax_and_torch(tiny_hf_dirs, video_row_dir, tmp_path):
  """Rows with videos (files, a frame list, an image and a video together) through the export
  of Qwen2.5-VL (whose time axis depends on the sampled fps; both families' models equal
  transformers' in tests/models/test_parity.py): JaxEmbedder and torch_embed both read the video
  settings from mmembed.json and agree <= 1e-4; transformers' video processor loads the exported
  video_preprocessor_config.json and processes frames as we do."""
  family = "qwen2_5_vl"
  from mmembed_jax.data import video  # pylint: disable=g-import-not-at-top
  from mmembed_jax.embedding import JaxEmbedder  # pylint: disable=g-import-not-at-top
  settings = video.VideoSettings.from_spec(VIDEO_SETTINGS).to_record()
  export_dir = _export(tiny_hf_dirs[family], str(tmp_path / "export"),
                       {"attention": "bidirectional", "pooling": "mean", "video": settings})
  ours = JaxEmbedder.from_pretrained(export_dir, batch_size=8).embed_rows(VIDEO_ROWS,
                                                                     base_dir=video_row_dir)
  theirs = torch_embed.load(export_dir, batch_size=2)(VIDEO_ROWS, base_dir=video_row_dir)
  diff = np.abs(theirs - ours).max()
  print(f"{family} videos: torch vs JAX embeddings max abs diff {diff:.2e}")
  assert diff <= TOLERANCE
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  processor = transformers.AutoVideoProcessor.from_pretrained(export_dir)
  frames = np.random.default_rng(0).integers(0, 256, (3, 3, 50, 70)).astype(np.float32)
  out = processor(videos=[torch.from_numpy(frames)], return_tensors="np")
  config = video.VideoSettings.from_spec(VIDEO_SETTINGS).processor_config(
      ImageProcessingConfig.from_preprocessor_config(export_dir))
  patches, grid = video.preprocess_video(frames, config)
  np.testing.assert_array_equal(np.asarray(out["video_grid_thw"]).reshape(3), grid)
  np.testing.assert_allclose(np.asarray(out["pixel_values_videos"]), patches, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_pooling_before_the_final_norm(family, tiny_hf_dirs, image_dir, jax_embeddings, tmp_path):
  """mmembed.json's pooling_point: JAX (JaxEmbedder, final_norm=False) and PyTorch (the input
  of transformers' final RMSNorm) agree, and differ from pooling after the norm (guard)."""
  from mmembed_jax.embedding import JaxEmbedder  # pylint: disable=g-import-not-at-top
  export_dir = _export(tiny_hf_dirs[family], str(tmp_path / "export"),
                       {"attention": "causal", "pooling": "last",
                        "pooling_point": "before_final_norm"})
  theirs = torch_embed.load(export_dir, batch_size=BATCH_SIZE)(ROWS, base_dir=image_dir)
  jax_embedder = JaxEmbedder.from_pretrained(export_dir, max_length=512)
  assert not jax_embedder.config.final_norm
  ours = jax_embedder.embed_rows(ROWS, base_dir=image_dir)
  assert np.abs(theirs - ours).max() <= TOLERANCE
  after_norm = jax_embeddings(family, "causal", "last")
  assert np.abs(ours - after_norm).max() > 1e-2
  with pytest.raises(ValueError, match="pooling_point"):
    torch_embed.load(_export(tiny_hf_dirs[family], str(tmp_path / "bad"),
                             {"pooling_point": "middle"}))


@pytest.mark.parametrize("family", FAMILIES)
def test_bare_vision_tokens_match_transformers_own_positions(family, tiny_hf_dirs, image_dir,
                                                             jax_embeddings, tmp_path):
  """mmembed.json vision_tokens "bare" + positions "sequential" (VLM2Vec's prompts: an image pad
  without a vision start): JAX equals transformers' Qwen2.5-VL computing the positions itself
  from such ids (it finds no vision start, so every token gets its index; today's Qwen2-VL
  class asks for token types instead, so it gets those 1-D positions given), and the exported
  directory embeds alike in PyTorch; "wrapped" + "sequential" (UNITE's) equals transformers
  given 1-D positions."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from mmembed_jax.data.sequences import VISION_START, SequenceEncoder  # pylint: disable=g-import-not-at-top
  from mmembed_jax.embedding import JaxEmbedder  # pylint: disable=g-import-not-at-top
  rows = [ROWS[2], ROWS[3]]  # one image; two images between text
  hf_model = transformers.AutoModel.from_pretrained(tiny_hf_dirs[family]).eval()
  for vision_tokens in ("bare", "wrapped"):
    layout = {"vision_tokens": vision_tokens, "positions": "sequential"}
    export_dir = _export(tiny_hf_dirs[family], str(tmp_path / vision_tokens),
                         {"attention": "causal", "pooling": "last", **layout})
    jax_embedder = JaxEmbedder.from_pretrained(export_dir, max_length=512)
    ours = jax_embedder.embed_rows(rows, base_dir=image_dir)
    np.testing.assert_allclose(torch_embed.load(export_dir)(rows, base_dir=image_dir), ours,
                               atol=TOLERANCE, rtol=0)
    encoder = SequenceEncoder(jax_embedder.tokenizer, jax_embedder.image_config, **layout)
    for row, vector in zip(rows, ours):
      encoded = rows_lib.encode_row(row, encoder, jax_embedder.image_config, 512, image_dir)
      has_start = encoder.vision_ids[VISION_START] in encoded.input_ids
      assert has_start == (vision_tokens == "wrapped")
      input_ids = torch.as_tensor(encoded.input_ids[None]).long()
      positions = None  # Qwen2.5-VL, bare: transformers computes them, finding no image
      if vision_tokens == "wrapped" or family == "qwen2_vl":  # (its Qwen2-VL wants token types)
        positions = torch.arange(input_ids.shape[1])[None, None].expand(3, 1, -1)
      with torch.no_grad():
        hidden = hf_model(input_ids=input_ids, position_ids=positions,
                          pixel_values=torch.as_tensor(encoded.patches),
                          image_grid_thw=torch.as_tensor(encoded.grid_thw)).last_hidden_state
      theirs = torch.nn.functional.normalize(hidden[0, -1], dim=-1).numpy()
      assert np.abs(theirs - vector).max() <= TOLERANCE, (vision_tokens, row["text"])
  wrapped_mrope = jax_embeddings(family, "causal", "last")[2:4]
  # 1-D positions change the embeddings, by far more than the two sides differ.
  assert np.abs(ours - wrapped_mrope).max() > 10 * TOLERANCE
