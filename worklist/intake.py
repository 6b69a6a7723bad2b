"""What the HIS interfaces (HL7 v2, FHIR) share: an incoming order laid over the order the RIS already holds.

A change message from the HIS (ORC-1 XO, a FHIR PUT) often carries only what it knows: the RIS keeps the values the
message does not carry (the station AE title a scheduler chose, a study UID the worklist already gave), and takes
every value the message does carry. `Orders.place` then records what changed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, fields

from worklist.models import Order
from worklist.orders import OrderIn, StepIn

ORDER_FIELDS = tuple(f.name for f in fields(OrderIn) if f.name != "steps")
STEP_FIELDS = tuple(f.name for f in fields(StepIn))


def order_in(order: Order) -> OrderIn:
    """The order as the RIS holds it, in the shape interfaces deliver orders."""
    data = OrderIn(patient_id=order.patient_id, patient_name=order.patient_name)
    for name in ORDER_FIELDS:
        setattr(data, name, getattr(order, name) or "")
    data.steps = [StepIn(**{name: getattr(step, name) or "" for name in STEP_FIELDS}) for step in order.steps]
    return data


def overlay(
    existing: Order | None,
    values: Mapping[str, str],
    steps: Sequence[Mapping[str, str]] | None,
) -> OrderIn:
    """`existing` (or an empty order) with `values` set; `steps`, when given, replace the step list, each step
    keeping the values of the existing step at the same position that the message does not set."""
    unknown = set(values) - set(ORDER_FIELDS)
    if unknown:
        raise ValueError(f"not order fields: {sorted(unknown)}")
    base = order_in(existing) if existing is not None else OrderIn(patient_id="", patient_name="")
    for name, value in values.items():
        setattr(base, name, value)
    if steps is not None:
        old = base.steps
        new: list[StepIn] = []
        for i, step_values in enumerate(steps):
            step = StepIn(**asdict(old[i])) if i < len(old) else StepIn(modality="")
            for name, value in step_values.items():
                if name not in STEP_FIELDS:
                    raise ValueError(f"not a step field: {name}")
                setattr(step, name, value)
            new.append(step)
        base.steps = new
    return base
