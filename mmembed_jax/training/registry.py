"""Objectives and inputs by the names configs give them, and the typed check of their sections.

A config's `objective` and `input` sections are `name` plus the fields of the class that name
registers (frozen dataclasses: `Objective` in objectives/base.py, `InputSpec` in
data/input_specs.py). An unknown or misspelt field, or a value of the wrong type, is one error
line listing the valid fields. The demo's inputs (synthetic tokens) come through the demo entry.
"""
import dataclasses
import typing
from typing import Any, Dict, Mapping

from mmembed_jax.data.input_specs import ComaInput, CptInput, InputSpec, PairInput
from mmembed_jax.objectives.base import Objective
from mmembed_jax.objectives.coma import ComaCompression
from mmembed_jax.objectives.contrastive_objective import Contrastive
from mmembed_jax.objectives.masked_lm import MaskedLm
from mmembed_jax.objectives.moca_cpt import MocaCpt
from mmembed_jax.training import demo_entry

OBJECTIVES = {cls.name: cls for cls in (MaskedLm, MocaCpt, ComaCompression, Contrastive)}
INPUTS = {cls.name: cls for cls in (CptInput, ComaInput, PairInput)}


def objective_class(name: str) -> type:
  """The Objective subclass registered as `name`."""
  if name not in OBJECTIVES:
    raise ValueError(f"unknown objective '{name}', expected one of {sorted(OBJECTIVES)}")
  return OBJECTIVES[name]


def input_class(name: str) -> type:
  """The InputSpec subclass registered as `name` (the demo's through the demo entry)."""
  if name in INPUTS:
    return INPUTS[name]
  demo_inputs = demo_entry.demo().INPUTS
  if name in demo_inputs:
    return demo_inputs[name]
  raise ValueError(f"unknown input '{name}', expected one of {sorted(INPUTS) + sorted(demo_inputs)}")


def _type_ok(value: Any, annotation: Any) -> bool:
  """Whether a config value fits a field's annotation (int for float; Any and the rest pass)."""
  if annotation is bool:
    return isinstance(value, bool)
  if annotation is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if annotation is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if annotation is str:
    return isinstance(value, str)
  return True


def section_values(kind: str, cls: type, section: Mapping[str, Any]) -> Dict[str, Any]:
  """The section's fields (all but `name`), checked against `cls.section_fields()`: ValueError
  (one line) naming an unknown field or a value of the wrong type, and the valid fields."""
  fields = cls.section_fields()
  values = {k: v for k, v in dict(section).items() if k != "name"}
  hints = typing.get_type_hints(cls)
  unknown = sorted(set(values) - set(fields))
  missing = sorted(name for name, field in fields.items() if name not in values
                   and field.default is dataclasses.MISSING
                   and field.default_factory is dataclasses.MISSING)
  problems = ([f"unknown field(s) {unknown}"] if unknown else []) + (
      [f"missing field(s) {missing}"] if missing else [])
  if problems:
    raise ValueError(f"{kind} '{cls.name}': {'; '.join(problems)}; its fields are "
                     f"{sorted(fields)}")
  for name, value in values.items():
    if not _type_ok(value, hints.get(name)):
      raise ValueError(f"{kind} '{cls.name}': field {name}={value!r} should be of type "
                       f"{getattr(hints[name], '__name__', hints[name])}")
  return values


def check_sections(config: Any) -> None:
  """Checks the objective and input sections and the objective's own demands on the run."""
  objective = objective_class(config.objective.name)
  section_values("objective", objective, config.objective)
  section_values("input", input_class(config.input.name), config.input)
  if config.input.name not in objective.inputs:
    raise ValueError(f"objective '{objective.name}' trains on input {list(objective.inputs)}, "
                     f"not '{config.input.name}'")
  objective.check_run(config)


def build_objective(config: Any, model_config: Any, tokenizer_dir: str) -> Objective:
  """The run's objective, from its checked `objective` section."""
  cls = objective_class(config.objective.name)
  return cls.from_config(model_config, section_values("objective", cls, config.objective),
                         tokenizer_dir)


def build_input_spec(config: Any) -> InputSpec:
  """The run's input, from its checked `input` section."""
  cls = input_class(config.input.name)
  return cls(**section_values("input", cls, config.input))
