"""MoCa's host-side masks for one example, deterministic from (seed, example id).

Text: each token is masked with probability `text_mask_prob`, except ids in `never_mask`
(vision start/end, image/video pad, chat tokens, padding, `<|mask|>`). Image: the unit is one
merged LLM token = `merge_unit` (2x2 = 4) consecutive patches; each unit is masked with
probability `image_mask_prob`, all its patches together.

Only the masks are made here: the objective swaps ids for `<|mask|>` and patches for noise
inside the jitted step (`objectives/moca_cpt.py`). The draws come from
`np.random.default_rng([seed, example_id])`: one draw per token, then one per merged token. So
an example seen again (a later epoch) gets the same masks.
"""
from typing import Iterable, Optional, Tuple

import numpy as np


def mask_example(seed: int, example_id: int, input_ids: np.ndarray, num_patches: int,
                 never_mask: Iterable[int], text_mask_prob: float, image_mask_prob: float,
                 merge_unit: int = 4, maskable_patches: Optional[np.ndarray] = None
                 ) -> Tuple[np.ndarray, np.ndarray]:
  """Returns (mlm_mask int32 [n], mae_mask int32 [num_patches]) for input_ids [n];
  maskable_patches bool [num_patches] (None: all) keeps the others unmasked (MoCa's switch for
  video patches) without changing the draws."""
  for name, prob in (("text_mask_prob", text_mask_prob), ("image_mask_prob", image_mask_prob)):
    if not 0.0 <= prob <= 1.0:
      raise ValueError(f"{name} must be in [0, 1], found {prob}")
  if seed < 0 or example_id < 0:
    raise ValueError(f"mask seed and example id must be >= 0, found seed {seed}, id {example_id}")
  if num_patches % merge_unit:
    raise ValueError(f"example {example_id}: {num_patches} patches do not split into merged tokens "
                     f"of {merge_unit} patches")
  input_ids = np.asarray(input_ids)
  rng = np.random.default_rng([int(seed), int(example_id)])
  maskable = ~np.isin(input_ids, np.fromiter(never_mask, np.int64))  # [n]
  mlm_mask = (rng.random(input_ids.shape[0]) < text_mask_prob) & maskable  # [n]
  unit_mask = rng.random(num_patches // merge_unit) < image_mask_prob  # [num_patches / unit]
  mae_mask = np.repeat(unit_mask, merge_unit)  # [num_patches]
  if maskable_patches is not None:
    mae_mask &= np.asarray(maskable_patches, bool)
  return mlm_mask.astype(np.int32), mae_mask.astype(np.int32)
