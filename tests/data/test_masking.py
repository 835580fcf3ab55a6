"""Tests of MoCa's host-side masks (mmembed_jax.data.masking)."""
import math

import numpy as np
import pytest

from mmembed_jax.data import masking

SPECIAL = (500, 501, 502, 503)  # vision start/end, image pad, chat token of the fake ids below


def _ids(example_id: int, n: int = 300) -> np.ndarray:
  """Token ids [n]: ordinary ids 0..499 with special ids sprinkled in (about 1 in 5)."""
  rng = np.random.default_rng(example_id + 1000)
  ids = rng.integers(0, 500, size=n)
  special = rng.random(n) < 0.2
  ids[special] = rng.choice(SPECIAL, size=int(special.sum()))
  return ids.astype(np.int32)


def _within(observed: float, p: float, trials: int, sigmas: float = 5.0) -> bool:
  """Whether a rate over `trials` Bernoulli(p) draws is within `sigmas` standard errors of p."""
  return abs(observed - p) <= sigmas * math.sqrt(p * (1 - p) / trials)


@pytest.mark.parametrize("text_prob,image_prob", [(0.4, 0.5), (0.6, 0.6), (0.15, 0.25)])
def test_mask_rates_match_probabilities_over_many_examples(text_prob, image_prob):
  maskable = masked = units = masked_units = 0
  for example_id in range(400):
    ids = _ids(example_id)
    mlm, mae = masking.mask_example(7, example_id, ids, 64, SPECIAL, text_prob, image_prob)
    is_maskable = ~np.isin(ids, SPECIAL)
    maskable += int(is_maskable.sum())
    masked += int(mlm.sum())
    units += 16
    masked_units += int(mae.reshape(16, 4)[:, 0].sum())
  # ~96K maskable tokens and 6.4K merged tokens: 5 standard errors is ~0.8 and ~3 points.
  assert _within(masked / maskable, text_prob, maskable), (masked / maskable, text_prob)
  assert _within(masked_units / units, image_prob, units), (masked_units / units, image_prob)


def test_special_tokens_are_never_masked():
  for example_id in range(200):
    ids = _ids(example_id)
    mlm, _ = masking.mask_example(0, example_id, ids, 0, SPECIAL, 1.0, 0.5)
    assert not mlm[np.isin(ids, SPECIAL)].any()
    np.testing.assert_array_equal(mlm, (~np.isin(ids, SPECIAL)).astype(np.int32))  # p = 1


def test_image_masking_is_by_whole_2x2_groups():
  for example_id in range(100):
    _, mae = masking.mask_example(3, example_id, _ids(example_id, 10), 4 * 37, SPECIAL, 0.4, 0.5)
    groups = mae.reshape(37, 4)
    assert (groups == groups[:, :1]).all()
    assert mae.dtype == np.int32 and mae.shape == (148,)


def test_masks_are_deterministic_per_seed_and_example_id():
  ids = _ids(5)
  a = masking.mask_example(11, 5, ids, 40, SPECIAL, 0.4, 0.5)
  b = masking.mask_example(11, 5, ids.copy(), 40, set(SPECIAL), 0.4, 0.5)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  other_id = masking.mask_example(11, 6, ids, 40, SPECIAL, 0.4, 0.5)
  other_seed = masking.mask_example(12, 5, ids, 40, SPECIAL, 0.4, 0.5)
  assert not np.array_equal(a[0], other_id[0]) and not np.array_equal(a[0], other_seed[0])
  # The draws are np.random.default_rng([seed, example_id]): text first, then merged tokens.
  rng = np.random.default_rng([11, 5])
  expected_text = (rng.random(ids.shape[0]) < 0.4) & ~np.isin(ids, SPECIAL)
  np.testing.assert_array_equal(a[0], expected_text)
  np.testing.assert_array_equal(a[1], np.repeat(rng.random(10) < 0.5, 4))


def test_text_only_example_has_an_empty_patch_mask():
  mlm, mae = masking.mask_example(0, 1, _ids(1, 20), 0, SPECIAL, 0.5, 0.5)
  assert mlm.shape == (20,) and mae.shape == (0,) and mae.dtype == np.int32


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="text_mask_prob"):
    masking.mask_example(0, 1, _ids(1), 8, SPECIAL, 1.5, 0.5)
  with pytest.raises(ValueError, match="7 patches"):
    masking.mask_example(0, 1, _ids(1), 7, SPECIAL, 0.5, 0.5)
  with pytest.raises(ValueError, match="example id"):
    masking.mask_example(0, -1, _ids(1), 8, SPECIAL, 0.5, 0.5)
