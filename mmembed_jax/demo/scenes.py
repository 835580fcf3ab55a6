"""Synthetic scenes: 1-4 coloured shapes on a 3x3 grid, with a caption that pins every shape down.

A scene is a JSON-able metadata dict, a function of (seed, index) only (`item_rng`):
{"type": "scene", "width", "height", "background", "shapes": [{"kind", "colour", "size",
"cell"}]}. `scene_caption` names every shape's size, colour and kind and their spatial
relations ("a small red circle above a large blue square"); `render_scene` draws it;
`perturb_scene` changes exactly one attribute (colour, kind, size or position) so the caption
changes, for hard negatives.
"""
import copy
import math
import random
from typing import Any, Dict, List, Optional, Sequence, Tuple

COLOURS = {"red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 90, 200), "yellow": (240, 200, 20),
           "orange": (250, 127, 14), "purple": (130, 60, 170), "pink": (240, 110, 180),
           "brown": (140, 86, 55)}
KINDS = ("circle", "square", "triangle", "star", "hexagon", "diamond")
SIZES = {"small": 0.42, "medium": 0.64, "large": 0.88}  # radius / half the cell's shorter side
SCENE_ATTRIBUTES = ("colour", "kind", "size", "position")
_BACKGROUNDS = ((255, 255, 255), (246, 242, 232), (236, 236, 236), (232, 240, 248))
_GRID = 3
_LOCATIONS = (("the top left corner", "the top middle", "the top right corner"),
              ("the middle left", "the centre", "the middle right"),
              ("the bottom left corner", "the bottom middle", "the bottom right corner"))


def item_rng(seed: int, source: str, index: int) -> random.Random:
  """Returns the generator of item `index` of `source`: the same on every platform and run."""
  return random.Random(f"mmembed-demo/{seed}/{source}/{index}")


def _describe(shape: Dict[str, Any]) -> str:
  """Returns 'small red circle'."""
  return f"{shape['size']} {shape['colour']} {shape['kind']}"


def _relation(a: Dict[str, Any], b: Dict[str, Any]) -> str:
  """Returns where shape a lies relative to shape b: 'above', 'left of', 'below and to the right of'."""
  (ra, ca), (rb, cb) = a["position"], b["position"]
  vertical = "above" if ra < rb else "below" if ra > rb else ""
  horizontal = "left of" if ca < cb else "right of" if ca > cb else ""
  if vertical and horizontal:
    return f"{vertical} and to the {horizontal}"
  return vertical or horizontal


def _twins(shapes: Sequence[Dict[str, Any]]) -> Optional[Tuple[int, int, int]]:
  """Returns (i, j, k) if shapes are two identical ones in the same relation to a third, else None."""
  if len(shapes) != 3:
    return None
  for i, j, k in ((0, 1, 2), (0, 2, 1), (1, 2, 0)):
    if (_describe(shapes[i]) == _describe(shapes[j]) != _describe(shapes[k])
        and _relation(shapes[i], shapes[k]) == _relation(shapes[j], shapes[k])):
      return i, j, k
  return None


def scene_caption(scene: Dict[str, Any]) -> str:
  """Returns the caption naming every shape's size, colour, kind and the spatial relations."""
  shapes = scene["shapes"]
  if len(shapes) == 1:
    row, col = shapes[0]["position"]
    return f"a {_describe(shapes[0])} in {_LOCATIONS[row][col]}"
  twins = _twins(shapes)
  if twins:
    i, _, k = twins
    return f"two {_describe(shapes[i])}s {_relation(shapes[i], shapes[k])} a {_describe(shapes[k])}"
  caption = f"a {_describe(shapes[0])} {_relation(shapes[0], shapes[1])} a {_describe(shapes[1])}"
  for previous, shape in zip(shapes[1:], shapes[2:]):
    caption += f", which is {_relation(previous, shape)} a {_describe(shape)}"
  return caption


def _random_look(rng: random.Random, taken: Sequence[Tuple[str, str]]) -> Dict[str, str]:
  """Returns a random size, colour and kind whose (colour, kind) is not in taken."""
  while True:
    colour, kind = rng.choice(sorted(COLOURS)), rng.choice(KINDS)
    if (colour, kind) not in taken:
      return {"colour": colour, "kind": kind, "size": rng.choice(sorted(SIZES))}


def make_scene(rng: random.Random) -> Dict[str, Any]:
  """Returns a random scene: image size, background and 1-4 shapes in distinct grid cells."""
  width = rng.randint(112, 336)
  height = width if rng.random() < 0.3 else rng.randint(112, 336)
  background = list(rng.choice(_BACKGROUNDS))
  cells = [[r, c] for r in range(_GRID) for c in range(_GRID)]
  count = rng.choice((1, 2, 2, 3, 3, 4))
  if count == 3 and rng.random() < 0.35:  # two identical shapes in the same relation to a third
    anchor = rng.choice([cell for cell in cells if cell != [1, 1]])  # the centre has 1 cell per relation
    anchor_shape = {**_random_look(rng, ()), "position": anchor}
    by_relation: Dict[str, List[List[int]]] = {}
    for cell in cells:
      if cell != anchor:
        by_relation.setdefault(_relation({"position": cell}, anchor_shape), []).append(cell)
    relation = rng.choice(sorted(r for r, group in by_relation.items() if len(group) >= 2))
    look = _random_look(rng, [(anchor_shape["colour"], anchor_shape["kind"])])
    shapes = [{**look, "position": cell} for cell in rng.sample(by_relation[relation], 2)]
    shapes.append(anchor_shape)
  else:
    shapes = []
    for cell in rng.sample(cells, count):
      shapes.append({**_random_look(rng, [(s["colour"], s["kind"]) for s in shapes]), "position": cell})
  shapes = [{"colour": s["colour"], "kind": s["kind"], "size": s["size"], "position": s["position"]}
            for s in shapes]
  return {"type": "scene", "width": width, "height": height, "background": background,
          "shapes": shapes}


def _shape_points(kind: str, cx: float, cy: float, r: float) -> List[Tuple[float, float]]:
  """Returns the polygon of a shape of radius r centred at (cx, cy); y grows downwards."""
  if kind == "star":
    corners = [(r if k % 2 == 0 else 0.45 * r, math.pi / 2 + k * math.pi / 5) for k in range(10)]
  else:
    sides, start = {"triangle": (3, math.pi / 2), "hexagon": (6, 0.0), "diamond": (4, math.pi / 2),
                    "square": (4, math.pi / 4)}[kind]
    corners = [(r, start + 2 * math.pi * k / sides) for k in range(sides)]
  return [(cx + radius * math.cos(angle), cy - radius * math.sin(angle)) for radius, angle in corners]


def render_scene(scene: Dict[str, Any]) -> Any:
  """Returns the scene drawn as an RGB PIL image: each shape filled, centred in its grid cell."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  width, height = scene["width"], scene["height"]
  image = Image.new("RGB", (width, height), tuple(scene["background"]))
  draw = ImageDraw.Draw(image)
  cell_w, cell_h = width / _GRID, height / _GRID
  for i, shape in enumerate(scene["shapes"]):
    if shape["colour"] not in COLOURS or shape["kind"] not in KINDS or shape["size"] not in SIZES:
      raise ValueError(f"render_scene: shapes[{i}] has unknown colour, kind or size {shape}; expected "
                       f"colour in {sorted(COLOURS)}, kind in {KINDS}, size in {sorted(SIZES)}")
    row, col = shape["position"]
    cx, cy = (col + 0.5) * cell_w, (row + 0.5) * cell_h
    r = SIZES[shape["size"]] * min(cell_w, cell_h) / 2
    fill = COLOURS[shape["colour"]]
    if shape["kind"] == "circle":
      draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
      draw.polygon(_shape_points(shape["kind"], cx, cy, r), fill=fill)
  return image


def perturb_scene(scene: Dict[str, Any], rng: random.Random,
                  attribute: Optional[str] = None) -> Tuple[Dict[str, Any], str]:
  """Returns (scene with one shape's colour, kind, size or position changed, what changed).

  The change always changes the caption, and a changed colour, kind or size gives the shape a
  description no other shape has, so the old caption does not describe the new scene.
  attribute=None tries the attributes in a random order; ValueError if none can change.
  """
  if attribute is not None and attribute not in SCENE_ATTRIBUTES:
    raise ValueError(f"perturb_scene: attribute {attribute!r} not in {SCENE_ATTRIBUTES}")
  attributes = [attribute] if attribute else rng.sample(SCENE_ATTRIBUTES, len(SCENE_ATTRIBUTES))
  caption = scene_caption(scene)
  shapes = scene["shapes"]
  for name in attributes:
    candidates = []
    for i, shape in enumerate(shapes):
      if name == "position":
        taken = [s["position"] for s in shapes]
        values = [[r, c] for r in range(_GRID) for c in range(_GRID) if [r, c] not in taken]
      else:
        values = [v for v in {"colour": sorted(COLOURS), "kind": KINDS, "size": sorted(SIZES)}[name]
                  if v != shape[name]]
      for value in values:
        new = copy.deepcopy(scene)
        new["shapes"][i][name] = value
        others = [_describe(s) for j, s in enumerate(new["shapes"]) if j != i]
        if scene_caption(new) != caption and (name == "position" or _describe(new["shapes"][i]) not in others):
          candidates.append((new, f"shapes[{i}].{name}: {shape[name]} -> {value}"))
    if candidates:
      return rng.choice(candidates)
  raise ValueError(f"perturb_scene: no valid change of {attributes} for scene {scene}")


_COUNTS = ("no", "one", "two", "three", "four")


def scene_dialogue(scene: Dict[str, Any], rng: random.Random) -> List[Dict[str, str]]:
  """3-4 questions whose answers only the image gives (CoMa's stage-1 dialogues): the number of
  shapes, a shape's colour, what lies in a cell, where a shape is."""
  shapes = scene["shapes"]
  turns = [{"q": "How many shapes are in the picture?", "a": _COUNTS[len(shapes)]}]
  kinds = [s["kind"] for s in shapes]
  unique = [s for s in shapes if kinds.count(s["kind"]) == 1]
  if unique:
    shape = rng.choice(unique)
    turns.append({"q": f"What colour is the {shape['kind']}?", "a": shape["colour"]})
  shape = rng.choice(shapes)
  row, col = shape["position"]
  turns.append({"q": f"What is in {_LOCATIONS[row][col]}?", "a": f"a {_describe(shape)}"})
  looks = [(s["colour"], s["kind"]) for s in shapes]
  shape = rng.choice([s for s in shapes if looks.count((s["colour"], s["kind"])) == 1] or shapes)
  row, col = shape["position"]
  turns.append({"q": f"Where is the {shape['colour']} {shape['kind']}?", "a": _LOCATIONS[row][col]})
  return turns
