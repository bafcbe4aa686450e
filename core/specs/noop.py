from __future__ import annotations

from pydantic import Field

from core.specs.base import Spec


class NoopSpec(Spec):
    """A job that does nothing but report progress: the README's first demo and the queue benchmark."""

    steps: int = Field(default=0, ge=0, le=100_000, description="progress steps to report")
    sleep_s: float = Field(default=0.0, ge=0, le=3600, description="seconds to sleep per step")
    fail: bool = Field(default=False, description="fail at the end (tests)")
    queue: str = Field(default="cpu", pattern="^(cpu|gpu)$", description="which queue runs it")
