"""Synthetic video clips: one or two coloured shapes that move, change colour or appear in turn.

A clip is a JSON-able metadata dict, a function of (seed, index) only:
{"type": "clip", "event": "moves" | "turns" | "appears", "frames", "fps", "size", "background",
 "shapes": [{"colour", "kind"}, ...], "direction": "left" | "right" | "up" | "down" (moves)}.

  moves    a red circle moves to the right        (one shape crossing the frame)
  turns    a square turns from green to blue      (the colour changes half way)
  appears  a red circle appears, then a blue star (the second shape joins half way)

`clip_caption` says it; `render_clip` draws the frames (uint8 [frames, size, size, 3]);
`perturb_clip` changes exactly one attribute for hard negatives: the direction (reversed), the
order (colours swapped, or which shape comes first) or a colour. What tells a clip from its
negatives is in time, not in any single frame, for the direction and order negatives.
"""
import copy
import random
from typing import Any, Dict, Tuple

import numpy as np

from mmembed_jax.demo.scenes import COLOURS, _shape_points

EVENTS = ("moves", "turns", "appears")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
_OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
_KINDS = ("circle", "square", "triangle", "star")  # distinct at 56 px
_BACKGROUND = (240, 240, 240)
CLIP_ATTRIBUTES = ("order", "colour")  # "order" reverses time: direction or sequence


def make_clip(rng: random.Random, frames: int = 8, fps: float = 4.0, size: int = 64
              ) -> Dict[str, Any]:
  """A random clip of `frames` frames of `size` x `size` pixels."""
  event = rng.choice(EVENTS)
  colours = rng.sample(sorted(COLOURS), 2)
  kinds = rng.sample(_KINDS, 2)
  clip = {"type": "clip", "event": event, "frames": frames, "fps": fps, "size": size,
          "background": list(_BACKGROUND)}
  if event == "moves":
    clip.update(shapes=[{"colour": colours[0], "kind": kinds[0]}],
                direction=rng.choice(sorted(DIRECTIONS)))
  elif event == "turns":
    clip.update(shapes=[{"colour": colours[0], "kind": kinds[0]},
                        {"colour": colours[1], "kind": kinds[0]}])
  else:
    clip.update(shapes=[{"colour": colours[0], "kind": kinds[0]},
                        {"colour": colours[1], "kind": kinds[1]}])
  return clip


def clip_caption(clip: Dict[str, Any]) -> str:
  """What happens in the clip, in words."""
  first, *rest = clip["shapes"]
  if clip["event"] == "moves":
    return f"a {first['colour']} {first['kind']} moves {_direction_words(clip['direction'])}"
  if clip["event"] == "turns":
    return f"a {first['kind']} turns from {first['colour']} to {rest[0]['colour']}"
  return f"a {first['colour']} {first['kind']} appears, then a {rest[0]['colour']} {rest[0]['kind']}"


def _direction_words(direction: str) -> str:
  return {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}[direction]


def perturb_clip(clip: Dict[str, Any], rng: random.Random,
                 attribute: str) -> Tuple[Dict[str, Any], str]:
  """(the clip with its time order or one colour changed, what changed); the caption changes."""
  if attribute not in CLIP_ATTRIBUTES:
    raise ValueError(f"perturb_clip: attribute {attribute!r} not in {CLIP_ATTRIBUTES}")
  new = copy.deepcopy(clip)
  if attribute == "order":
    if clip["event"] == "moves":
      new["direction"] = _OPPOSITE[clip["direction"]]
      return new, f"direction: {clip['direction']} -> {new['direction']}"
    new["shapes"] = new["shapes"][::-1]
    return new, "order reversed"
  used = {s["colour"] for s in clip["shapes"]}
  k = rng.randrange(len(clip["shapes"]))
  colour = rng.choice(sorted(set(COLOURS) - used))
  new["shapes"][k]["colour"] = colour
  return new, f"shapes[{k}].colour: {clip['shapes'][k]['colour']} -> {colour}"


def render_clip(clip: Dict[str, Any]) -> np.ndarray:
  """uint8 [frames, size, size, 3]: the clip's frames."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  n, size = clip["frames"], clip["size"]
  r = size * 0.2
  out = []
  for t in range(n):
    image = Image.new("RGB", (size, size), tuple(clip["background"]))
    draw = ImageDraw.Draw(image)
    progress = t / max(n - 1, 1)
    half = t >= n // 2
    if clip["event"] == "moves":
      dx, dy = DIRECTIONS[clip["direction"]]
      offset = (progress - 0.5) * (size - 2 * r - 4)
      placed = [(clip["shapes"][0], size / 2 + dx * offset, size / 2 + dy * offset)]
    elif clip["event"] == "turns":
      placed = [(clip["shapes"][1 if half else 0], size / 2, size / 2)]
    else:
      placed = [(clip["shapes"][0], size * 0.3, size / 2)]
      if half:
        placed.append((clip["shapes"][1], size * 0.7, size / 2))
    for shape, cx, cy in placed:
      fill = COLOURS[shape["colour"]]
      if shape["kind"] == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
      else:
        draw.polygon(_shape_points(shape["kind"], cx, cy, r), fill=fill)
    out.append(np.asarray(image))
  return np.stack(out)
