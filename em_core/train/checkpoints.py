"""When a training run saves its checkpoints (the schedule and the TrainerCallback that keeps it)."""
from __future__ import annotations

import math

from transformers import TrainerCallback


def checkpoint_schedule(total_steps: int, steps_per_epoch: int, in_first_epoch: int = 4,
                        every_epoch: bool = True, explicit: list[int] | None = None) -> list[int]:
    """Training steps at which to save.

    EM emerges early, so the default is `in_first_epoch` evenly spaced saves inside epoch 1,
    then one at the end of each later epoch. `explicit` replaces both. The final step is
    always included so the last adapter is a checkpoint too.
    """
    if total_steps <= 0:
        return []
    steps: set[int] = set()
    if explicit:
        steps.update(s for s in explicit if 0 < s <= total_steps)
    else:
        first = min(steps_per_epoch, total_steps) if steps_per_epoch > 0 else total_steps
        for k in range(1, in_first_epoch + 1):
            steps.add(max(1, math.ceil(first * k / in_first_epoch)))
        if every_epoch and steps_per_epoch > 0:
            steps.update(range(steps_per_epoch, total_steps + 1, steps_per_epoch))
    steps.add(total_steps)
    return sorted(steps)


class ScheduledCheckpoints(TrainerCallback):
    """Saves exactly at the scheduled steps (save_strategy stays "no")."""

    def __init__(self, in_first_epoch: int, every_epoch: bool, explicit: list[int] | None):
        self.in_first_epoch, self.every_epoch, self.explicit = in_first_epoch, every_epoch, explicit
        self.steps: list[int] = []

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if train_dataloader is not None:
            per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
        else:
            per_epoch = math.ceil(state.max_steps / max(state.num_train_epochs, 1))
        self.steps = checkpoint_schedule(state.max_steps, per_epoch, self.in_first_epoch,
                                         self.every_epoch, self.explicit)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            control.should_save = True
        return control
