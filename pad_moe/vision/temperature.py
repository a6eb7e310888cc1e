"""The DY-Conv softmax temperature: τ falls linearly from ``start`` to ``end`` over the first ``epochs`` epochs, updated
every optimizer step, then stays at ``end`` (Chen et al. 2020: 30 -> 1 over 10 epochs).

τ is a pure function of the global step, so an exact resume needs nothing but the step; ``state_dict`` records the
schedule and the last step applied so that a resumed run can check it continues the same schedule.
"""

from __future__ import annotations

from torch import nn

from pad_moe.vision.layers import set_temperature


class TemperatureSchedule:
    def __init__(self, start: float = 30.0, end: float = 1.0, epochs: float = 10.0):
        if start <= 0 or end <= 0:
            raise ValueError(f"temperature start={start} and end={end} must be > 0")
        if epochs < 0:
            raise ValueError(f"temperature epochs={epochs} must be >= 0")
        self.start, self.end, self.epochs = float(start), float(end), float(epochs)
        self.last_step: int | None = None

    def value(self, step: int, steps_per_epoch: int) -> float:
        """τ at optimizer step ``step`` (0-based)."""
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch={steps_per_epoch} must be >= 1")
        anneal_steps = self.epochs * steps_per_epoch
        if step >= anneal_steps:
            return self.end
        return self.start + (self.end - self.start) * step / anneal_steps

    def apply(self, model: nn.Module, step: int, steps_per_epoch: int) -> float:
        """Set τ of every attention in ``model`` for ``step``; returns it."""
        tau = self.value(step, steps_per_epoch)
        set_temperature(model, tau)
        self.last_step = step
        return tau

    def state_dict(self) -> dict:
        return {"start": self.start, "end": self.end, "epochs": self.epochs, "last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        saved = (state["start"], state["end"], state["epochs"])
        if saved != (self.start, self.end, self.epochs):
            raise ValueError(f"temperature schedule (start, end, epochs)={saved} in the checkpoint differs from the "
                             f"configured {(self.start, self.end, self.epochs)}")
        self.last_step = state["last_step"]
