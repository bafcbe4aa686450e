"""A training run's time budget (`train.max_minutes`): how many optimizer steps fit in what is left of it.

The PEFT loop measures its first steps and its first validation, then asks `planned_steps` for the schedule's
length; it asks again at each validation (the machine's speed moves), and `out_of_time` stops it should a
plan have been too long. A plain function of measured seconds, so the plan can be tested without a model.
"""
from __future__ import annotations

import math

PROBE_STEPS = 5  # steps measured before the first plan (the first one, slower, is left out of the mean)
SAFETY = 0.97  # plan for 97% of what is left: checkpoints and the odd slow step take the rest
FINAL_SAVE_S = 3.0  # saving the adapter and the last checkpoint at the end (a few MB: ~1 s here)


def planned_steps(*, budget_s: float, elapsed_s: float, step: int, step_s: float, val_s: float, eval_every: int,
                  final_s: float, cap: int | None = None) -> int:
    """The step at which to end: steps at `step_s` plus a validation every `eval_every` steps (`val_s` each)
    fill what is left of `budget_s` after `elapsed_s`, less `final_s` for saving the result; at least one step
    more than `step`, at most `cap`.

    Raises:
        ValueError: a step time that is not positive.
    """
    if step_s <= 0:
        raise ValueError(f"step_s must be positive (got {step_s})")
    left = (budget_s - elapsed_s - final_s) * SAFETY
    per_step = step_s + max(0.0, val_s) / max(1, eval_every)
    end = step + max(1, math.floor(left / per_step))
    return min(end, cap) if cap else end


def out_of_time(*, budget_s: float, elapsed_s: float, step_s: float, final_s: float) -> bool:
    """Whether one more step (at `step_s`) would end past the budget (less `final_s` for saving)."""
    return elapsed_s + step_s + final_s > budget_s
