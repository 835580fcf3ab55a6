"""Collective traffic of an optimised HLO program: bytes per chip per step, by collective kind.

Each collective's size is the whole tensor it moves, per chip: an all-gather's result (the
gathered tensor), a reduce-scatter's or all-reduce's operand (the tensor being reduced), an
all-to-all's or collective-permute's operand. A collective inside a while loop (a scanned layer
stack, GradCache's chunks, the LM head's chunks) counts once per iteration: loop bodies are
weighted by their `known_trip_count`, nested loops multiply. Asynchronous pairs count at their
`-start`. Loops without a `known_trip_count` (TPU programs, where the windowed einsums that
stream FSDP shards run as loops of collective-permutes) take the bound their condition compares
the counter against. This is the measure the FSDP minimum is written in: every parameter gathered in the
forward and again in the backward pass, every gradient reduce-scattered once.
"""
import collections
import re
from typing import Dict, Mapping, Tuple

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
               "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8,
               "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_DEFINITION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+[\w\-]+\(")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+(" + "|".join(KINDS)
                          + r")(-start)?\((.*)$")
_OPERAND = re.compile(r"%([\w.\-]+)")
_CALLEE = re.compile(r"\b(body|calls|to_apply|condition|branch_computations)=\{?%?([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CONSTANT = re.compile(r"%([\w.\-]+) = [su]\d+\[\][^ ]* constant\((\d+)\)")
_BOUND = re.compile(r"compare\(%[\w.\-]+, %([\w.\-]+)\), direction=LT")


def shape_bytes(text: str) -> int:
  """Bytes of every array shape written in `text` (a shape, or a tuple of shapes)."""
  total = 0
  for dtype, dims in _SHAPE.findall(text):
    size = 1
    for dim in filter(None, dims.split(",")):
      size *= int(dim)
    total += size * DTYPE_BYTES[dtype]
  return total


def _computations(hlo: str) -> Tuple[Dict[str, list], str]:
  """({computation name: its instruction lines}, the entry computation's name)."""
  computations, current, entry = {}, None, ""
  for line in hlo.splitlines():
    match = _COMPUTATION.match(line)
    if match and "=" not in line.split("(")[0]:
      current = computations.setdefault(match.group(1), [])
      entry = match.group(1) if line.startswith("ENTRY") else entry
    elif line.rstrip() == "}":  # (kernels' multi-line configs have lines starting with "}}")
      current = None
    elif current is not None:
      current.append(line)
  return computations, entry


def _trip_count(line: str, computations: Mapping[str, list]) -> int:
  """Iterations of the while loop on `line`: its known_trip_count, else the bound its condition
  compares the counter against (XLA's loops count from 0: scans, windowed einsums), else 1."""
  trip = _TRIP.search(line)
  if trip:
    return int(trip.group(1))
  condition = re.search(r"condition=%?([\w.\-]+)", line)
  text = "\n".join(computations.get(condition.group(1), [])) if condition else ""
  constants = dict(_CONSTANT.findall(text))
  for bound in _BOUND.findall(text):
    if bound in constants:
      return int(constants[bound])
  return 1


def _weights(computations: Mapping[str, list], entry: str) -> Dict[str, int]:
  """How many times each computation runs per execution of the entry (loop trip counts)."""
  weights = collections.Counter()

  def visit(name: str, weight: int, depth: int = 0):
    if name not in computations or depth > 64:
      return
    weights[name] += weight
    for line in computations[name]:
      trip = _trip_count(line, computations) if " while(" in line else 1
      for role, callee in _CALLEE.findall(line):
        if role == "condition":
          continue
        visit(callee, weight * (trip if role == "body" else 1), depth + 1)

  visit(entry, 1)
  return weights


def collective_bytes(hlo: str) -> Dict[str, int]:
  """{kind: bytes per chip per execution} of the collectives of one optimised HLO module."""
  computations, entry = _computations(hlo)
  weights = _weights(computations, entry)
  results = {}  # instruction name -> its result type (operands are often written by name only)
  for lines in computations.values():
    for line in lines:
      match = _DEFINITION.match(line)
      if match:
        results[match.group(1)] = match.group(2)
  totals = collections.Counter()
  for name, lines in computations.items():
    for line in lines:
      match = _INSTRUCTION.match(line)
      if not match or not weights[name]:
        continue
      result, kind, start, rest = match.groups()
      operands = rest.split(")")[0]  # the operand list, before the attributes
      if kind == "all-gather":  # the gathered tensors: a -start's results follow its operands
        shapes = [f"{dtype}[{dims}]" for dtype, dims in _SHAPE.findall(result)]
        moved = shape_bytes(" ".join(shapes[len(shapes) // 2:] if start else shapes))
      else:
        moved = shape_bytes(operands) or sum(shape_bytes(results.get(operand, ""))
                                             for operand in _OPERAND.findall(operands))
      totals[kind] += weights[name] * moved
  return dict(totals)
