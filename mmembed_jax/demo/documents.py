"""Synthetic document pages (receipts, reports, tables) and passages (a shop, a town, a person).

Each item is a JSON-able metadata dict, a function of its random generator only. Pages have
lines of text (`document_text`), a rendering (`render_document`: a banner in the colour of the
store or town that the page's questions name, above black text on white) and questions with
answers (`document_qa`: "What is the total?" -> "42.50"); passages have a few sentences (`passage_text`)
and questions (`passage_qa`). `perturb_document` / `perturb_passage` change exactly one field that
the questions name, for hard negatives.
"""
import copy
import random
from typing import Any, Dict, List, Optional, Sequence, Tuple

from mmembed_jax.demo.scenes import COLOURS, KINDS

STORES = ("Green Market", "Corner Bakery", "Blue Fish Cafe", "Oak Hardware", "Sun Pharmacy",
          "City Books", "Red Door Deli", "Hill Farm Shop")
ITEMS = ("apples", "bread", "coffee", "milk", "eggs", "cheese", "rice", "tea", "pears", "soap",
         "pens", "paper")
TOWNS = ("Riverton", "Oakdale", "Millbrook", "Stonebridge", "Fairview", "Lakeside", "Westfield",
         "Ashford")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")
PEOPLE = ("Anna", "Ben", "Clara", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas")
_TOPICS = {"visitors": "visitors", "sales": "units sold", "deliveries": "parcels delivered",
           "rainfall": "mm of rain", "energy": "kWh used"}
_JOBS = ("baker", "teacher", "painter", "engineer", "doctor", "farmer", "pilot", "writer")
_HOBBIES = ("drawing", "reading", "cycling", "cooking", "gardening", "swimming", "chess", "singing")
_REGIONS = ("north", "south", "east", "west", "hills", "valley")
_RIVERS = ("Ash", "Bell", "Crane", "Dove", "Elm", "Fern")
_KNOWN_FOR = ("apples", "blue pottery", "old bridge", "cheese", "summer market", "paper mill")
_FILLERS = ("It is busy on Saturday mornings.", "The streets nearby are quiet at night.",
            "Many visitors come by train.", "The local paper wrote about it last year.", "")
# Each store's and town's colour, printed as the banner of its pages: at the demo's image sizes
# (about 30 merged tokens a page) the text is illegible, and the banner is what a tiny vision tower
# can match to the store or town a question names.
STORE_COLOURS = {"Green Market": "green", "Corner Bakery": "orange", "Blue Fish Cafe": "blue",
                 "Oak Hardware": "brown", "Sun Pharmacy": "yellow", "City Books": "purple",
                 "Red Door Deli": "red", "Hill Farm Shop": "pink"}
TOWN_COLOURS = dict(zip(TOWNS, ("blue", "brown", "purple", "red", "yellow", "green", "pink", "orange")))
BANNER_HEIGHT = 72  # px above the page's text
# Fields a document's or passage's queries name, so changing one makes a hard negative.
IDENTITY_FIELDS = {"receipt": ("store", "date"), "report": ("town", "month"), "table": ("store", "year"),
                   "store": ("name", "town"), "town": ("name", "region"), "person": ("name", "job")}
# (type, field) -> the values a hard negative may give that field (dates and years are drawn).
_FIELD_POOLS = {("receipt", "store"): STORES, ("report", "town"): TOWNS, ("report", "month"): MONTHS,
                ("table", "store"): STORES, ("store", "name"): STORES, ("store", "town"): TOWNS,
                ("town", "name"): TOWNS, ("town", "region"): _REGIONS, ("person", "name"): PEOPLE,
                ("person", "job"): _JOBS}

# Instructions baked into the pair rows, VLM2Vec/MoCa style; override with write_demo_pairs(prompts=...).


# --- documents -----------------------------------------------------------------------------------


def _money(cents: int) -> str:
  """Returns '12.05' for 1205."""
  return f"{cents // 100}.{cents % 100:02d}"


def _random_date(rng: random.Random) -> str:
  """Returns a date such as '2024-03-17'."""
  return f"{rng.randint(2021, 2025)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def _unique_max(values: Sequence[int]) -> Optional[int]:
  """Returns the index of the largest value if it is unique, else None."""
  best = max(values)
  return values.index(best) if values.count(best) == 1 else None


def _receipt_totals(fields: Dict[str, Any]) -> Tuple[int, int, int]:
  """Returns the receipt's (subtotal, tax, total) in cents."""
  subtotal = sum(cents for _, _, cents in fields["items"])
  tax = (subtotal * fields["tax_percent"] + 50) // 100
  return subtotal, tax, subtotal + tax


def make_document(rng: random.Random) -> Dict[str, Any]:
  """Returns a random document page: a receipt, report or table, and the keys of its 1-3 questions."""
  kind = rng.choice(("receipt", "report", "table"))
  if kind == "receipt":
    width, height = rng.choice(((224, 308), (196, 336), (252, 336)))
    items = [[name, rng.randint(1, 4), rng.randint(50, 1500)] for name in rng.sample(ITEMS, rng.randint(2, 6))]
    fields = {"store": rng.choice(STORES), "date": _random_date(rng), "number": rng.randint(1000, 9999),
              "items": items, "tax_percent": rng.choice((5, 8, 10))}
    keys = ["total", "tax", "count"] + [f"item:{i}" for i in range(len(items))]
  elif kind == "report":
    width, height = rng.choice(((224, 308), (252, 336)))
    weeks = [rng.randint(10, 400) for _ in range(4)]
    fields = {"town": rng.choice(TOWNS), "month": rng.choice(MONTHS), "topic": rng.choice(sorted(_TOPICS)),
              "author": rng.choice(PEOPLE), "weeks": weeks}
    keys = ["total", "author"] + [f"week:{k}" for k in range(4)]
    keys += ["best"] if _unique_max(weeks) is not None else []
  else:
    width, height = rng.choice(((308, 224), (336, 252), (280, 224)))
    columns = ["Q1", "Q2", "Q3", "Q4"][:rng.randint(3, 4)]
    rows = [[name] + [rng.randint(0, 60) for _ in columns] for name in rng.sample(ITEMS, rng.randint(3, 5))]
    fields = {"store": rng.choice(STORES), "year": rng.randint(2019, 2025), "columns": columns, "rows": rows}
    keys = [f"sum:{c}" for c in range(len(columns))]
    keys += [f"cell:{r}:{c}" for r in range(len(rows)) for c in range(len(columns))]
    keys += [f"max:{c}" for c in range(len(columns)) if _unique_max([row[c + 1] for row in rows]) is not None]
  height += BANNER_HEIGHT  # the sizes above are the text's
  return {"type": kind, "width": width, "height": height, "fields": fields,
          "qa": rng.sample(keys, rng.randint(1, 3))}


def document_lines(doc: Dict[str, Any]) -> List[Tuple[str, List[str]]]:
  """Returns the page's lines as (style, cells): style 'title', 'text', 'header' or 'rule'."""
  f = doc["fields"]
  if doc["type"] == "receipt":
    subtotal, tax, total = _receipt_totals(f)
    return ([("title", [f["store"].upper()]), ("text", ["Date", f["date"]]),
             ("text", ["Receipt no.", str(f["number"])]), ("rule", [])]
            + [("text", [f"{name} x{qty}", _money(cents)]) for name, qty, cents in f["items"]]
            + [("rule", []), ("text", ["Subtotal", _money(subtotal)]),
               ("text", [f"Tax {f['tax_percent']}%", _money(tax)]), ("title", ["Total", _money(total)]),
               ("text", ["Thank you for shopping with us!"])])
  if doc["type"] == "report":
    unit, weeks = _TOPICS[f["topic"]], f["weeks"]
    lines = [("title", [f"{f['topic'].capitalize()} report"]), ("text", [f"{f['town']}, {f['month']}"]),
             ("text", [f"Prepared by {f['author']}"]), ("rule", [])]
    lines += [("text", [f"In week {k + 1}, we counted {n} {unit}."]) for k, n in enumerate(weeks)]
    lines += [("rule", []), ("text", ["Total", str(sum(weeks))])]
    best = _unique_max(weeks)
    return lines + ([("text", ["Best week", f"week {best + 1}"])] if best is not None else [])
  if doc["type"] == "table":
    sums = [str(sum(row[c + 1] for row in f["rows"])) for c in range(len(f["columns"]))]
    return ([("title", [f"Stock at {f['store']}"]), ("text", [f"Year {f['year']}, boxes per quarter"]),
             ("rule", []), ("header", ["Item"] + f["columns"]), ("rule", [])]
            + [("text", [row[0]] + [str(v) for v in row[1:]]) for row in f["rows"]]
            + [("rule", []), ("header", ["Total"] + sums)])
  raise ValueError(f"document_lines: unknown document type {doc['type']!r}; expected receipt, report or table")


def document_text(doc: Dict[str, Any]) -> str:
  """Returns the page's text, one line per line: 'Total: 42.50', 'apples | 12 | 7 | 30'."""
  out = []
  for style, cells in document_lines(doc):
    if style != "rule":
      out.append(": ".join(cells) if len(cells) == 2 else " | ".join(cells))
  return "\n".join(out)


def document_qa(doc: Dict[str, Any]) -> List[Dict[str, str]]:
  """Returns the page's questions: short 'question', 'query' naming the page, and 'answer'."""
  f, out = doc["fields"], []
  for key in doc["qa"]:
    name, *args = key.split(":")
    if doc["type"] == "receipt":
      where = f"on the {f['store']} receipt from {f['date']}"
      _, tax, total = _receipt_totals(f)
      if name == "item":
        item = f["items"][int(args[0])]
        q, a = f"How much did the {item[0]} cost", _money(item[2])
      else:
        q, a = {"total": ("What is the total", _money(total)), "tax": ("How much tax was paid", _money(tax)),
                "count": ("How many different products were bought", str(len(f["items"])))}[name]
    elif doc["type"] == "report":
      where, unit = f"in the {f['month']} {f['topic']} report for {f['town']}", _TOPICS[f["topic"]]
      if name == "week":
        q, a = f"How many {unit} were counted in week {int(args[0]) + 1}", str(f["weeks"][int(args[0])])
      else:
        q, a = {"total": ("What is the total", str(sum(f["weeks"]))),
                "author": ("Who prepared the report", f["author"]),
                "best": (f"Which week had the most {unit}", f"week {(_unique_max(f['weeks']) or 0) + 1}")}[name]
    else:
      where = f"in the {f['year']} stock table of {f['store']}"
      column = int(args[-1])
      values = [row[column + 1] for row in f["rows"]]
      col_name = f["columns"][column]
      if name == "cell":
        row = f["rows"][int(args[0])]
        q, a = f"What is the {col_name} value for {row[0]}", str(row[column + 1])
      elif name == "sum":
        q, a = f"What is the {col_name} total", str(sum(values))
      else:
        q, a = f"Which item has the highest {col_name} value", f["rows"][_unique_max(values) or 0][0]
    out.append({"question": f"{q}?", "query": f"{q} {where}?", "answer": a})
  return out


def brand(doc: Dict[str, Any]) -> Tuple[str, str]:
  """Returns (name, colour) of the store (receipts, tables) or town (reports) a page belongs to."""
  f = doc["fields"]
  return (f["town"], TOWN_COLOURS[f["town"]]) if doc["type"] == "report" else (f["store"], STORE_COLOURS[f["store"]])


def render_document(doc: Dict[str, Any]) -> Any:
  """Returns the page drawn as an RGB PIL image: a banner in its store's or town's colour, then
  black text on white, long lines wrapped."""
  from PIL import Image, ImageDraw, ImageFont  # pylint: disable=g-import-not-at-top
  width, height, margin = doc["width"], doc["height"], 12
  fonts = {"title": ImageFont.load_default(size=14), "text": ImageFont.load_default(size=10)}
  fonts["header"] = fonts["text"]
  image = Image.new("RGB", (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(image)
  name, colour = brand(doc)
  draw.rectangle([0, 0, width, BANNER_HEIGHT], fill=COLOURS[colour])
  draw.text((margin, BANNER_HEIGHT // 2 - 8), name, font=fonts["title"], fill=(255, 255, 255))
  y = BANNER_HEIGHT + margin
  for style, cells in document_lines(doc):
    if style == "rule":
      draw.line([(margin, y + 2), (width - margin, y + 2)], fill=(120, 120, 120))
      y += 6
      continue
    font, step = fonts[style], (18 if style == "title" else 14)
    fill = (90, 90, 90) if style == "header" else (0, 0, 0)
    if len(cells) == 1:  # free text, wrapped at word boundaries
      words, line = cells[0].split(" "), ""
      for word in words:
        if line and font.getlength(f"{line} {word}") > width - 2 * margin:
          draw.text((margin, y), line, font=font, fill=fill)
          line, y = word, y + step
        else:
          line = f"{line} {word}" if line else word
      draw.text((margin, y), line, font=font, fill=fill)
    else:  # first cell left-aligned, the others right-aligned at evenly spaced stops
      draw.text((margin, y), cells[0], font=font, fill=fill)
      first = 0.45 if len(cells) > 2 else 1.0
      for k, cell in enumerate(cells[1:], start=1):
        stop = margin + (width - 2 * margin) * (first + (1 - first) * (k - 1) / max(1, len(cells) - 2))
        draw.text((stop - font.getlength(cell), y), cell, font=font, fill=fill)
    y += step
  if y > height:
    raise ValueError(f"render_document: a {doc['type']} needs {y} px, more than the page height {height}")
  return image


def perturb_fields(meta: Dict[str, Any], rng: random.Random, field: Optional[str],
                    what: str) -> Tuple[Dict[str, Any], str]:
  """Returns (meta with one identity field given another value, what changed)."""
  identity = IDENTITY_FIELDS[meta["type"]]
  field = field if field is not None else rng.choice(identity)
  if field not in identity:
    raise ValueError(f"{what}: field {field!r} is not an identity field of a {meta['type']}; "
                     f"expected one of {identity}")
  old = meta["fields"][field]
  if field == "date":
    value = old
    while value == old:
      value = _random_date(rng)
  elif field == "year":
    value = rng.choice([y for y in range(2019, 2026) if y != old])
  else:
    value = rng.choice([v for v in _FIELD_POOLS[meta["type"], field] if v != old])
  new = copy.deepcopy(meta)
  new["fields"][field] = value
  return new, f"fields.{field}: {old} -> {value}"


def perturb_document(doc: Dict[str, Any], rng: random.Random,
                     field: Optional[str] = None) -> Tuple[Dict[str, Any], str]:
  """Returns (page with one field its queries name, e.g. the store or date, changed; what changed)."""
  return perturb_fields(doc, rng, field, "perturb_document")


# --- passages ------------------------------------------------------------------------------------


def make_passage(rng: random.Random) -> Dict[str, Any]:
  """Returns a random passage: facts about a store, a town or a person, and its 1-2 question keys."""
  kind = rng.choice(("store", "town", "person"))
  if kind == "store":
    fields = {"name": rng.choice(STORES), "town": rng.choice(TOWNS), "opens": rng.randint(6, 10),
              "closes": rng.randint(5, 9), "products": rng.sample(ITEMS, 3), "staff": rng.randint(2, 40)}
    keys = ["opens", "closes", "products", "staff"]
  elif kind == "town":
    fields = {"name": rng.choice(TOWNS), "region": rng.choice(_REGIONS), "river": rng.choice(_RIVERS),
              "population": rng.randint(2, 90), "founded": rng.randint(1200, 1900),
              "known_for": rng.choice(_KNOWN_FOR)}
    keys = ["river", "population", "founded", "known_for"]
  else:
    fields = {"name": rng.choice(PEOPLE), "job": rng.choice(_JOBS), "town": rng.choice(TOWNS),
              "hobby": rng.choice(_HOBBIES), "colour": rng.choice(sorted(COLOURS)),
              "shape": rng.choice(KINDS), "age": rng.randint(19, 80)}
    keys = ["town", "hobby", "colour", "age"]
  fields["filler"] = rng.choice(_FILLERS)
  return {"type": kind, "fields": fields, "qa": rng.sample(keys, rng.randint(1, 2))}


def passage_text(passage: Dict[str, Any]) -> str:
  """Returns the passage: a few sentences stating its facts."""
  f = passage["fields"]
  if passage["type"] == "store":
    p = f["products"]
    text = (f"The {f['name']} is a shop in {f['town']}. It opens at {f['opens']} am and closes at "
            f"{f['closes']} pm. It sells {p[0]}, {p[1]} and {p[2]}. {f['staff']} people work there.")
  elif passage["type"] == "town":
    text = (f"{f['name']} is a town in the {f['region']}. The river {f['river']} runs through it. "
            f"About {f['population']} thousand people live there. It was founded in {f['founded']} "
            f"and is known for its {f['known_for']}.")
  else:
    text = (f"{f['name']} is a {f['job']} who lives in {f['town']}. On weekends {f['name']} enjoys "
            f"{f['hobby']}. {f['name']} likes the colour {f['colour']} and the {f['shape']} shape best. "
            f"{f['name']} is {f['age']} years old.")
  return f"{text} {f['filler']}".strip()


def passage_qa(passage: Dict[str, Any]) -> List[Dict[str, str]]:
  """Returns the passage's questions (each naming its identity fields) and answers."""
  f, out = passage["fields"], []
  for key in passage["qa"]:
    if passage["type"] == "store":
      who = f"the {f['name']} in {f['town']}"
      q, a = {"opens": (f"When does {who} open?", f"{f['opens']} am"),
              "closes": (f"When does {who} close?", f"{f['closes']} pm"),
              "products": (f"What does {who} sell?", ", ".join(f["products"][:2]) + f" and {f['products'][2]}"),
              "staff": (f"How many people work at {who}?", str(f["staff"]))}[key]
    elif passage["type"] == "town":
      who = f"{f['name']} in the {f['region']}"
      q, a = {"river": (f"Which river runs through {who}?", f"the {f['river']}"),
              "population": (f"How many people live in {who}?", f"about {f['population']} thousand"),
              "founded": (f"When was {who} founded?", str(f["founded"])),
              "known_for": (f"What is {who} known for?", f"its {f['known_for']}")}[key]
    else:
      who = f"{f['name']} the {f['job']}"
      q, a = {"town": (f"Where does {who} live?", f["town"]), "hobby": (f"What does {who} enjoy?", f["hobby"]),
              "colour": (f"Which colour does {who} like best?", f["colour"]),
              "age": (f"How old is {who}?", f"{f['age']} years")}[key]
    out.append({"question": q, "answer": a})
  return out


def perturb_passage(passage: Dict[str, Any], rng: random.Random,
                    field: Optional[str] = None) -> Tuple[Dict[str, Any], str]:
  """Returns (passage with one field its questions name, e.g. the name or town, changed; what changed)."""
  return perturb_fields(passage, rng, field, "perturb_passage")
