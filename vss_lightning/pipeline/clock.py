"""Stage clocks: wall-clock seconds of the pipeline's stages, added to a dict by name.

The segmenter clocks its stages (`VideoSegmenter.iter_segment`) and the modulation the parts of its
stage (`Modulation.labels`) with the same `StageClock`. On CUDA a reading synchronises the device
(the queued kernels must be finished for the time to be theirs); without a dict there is neither a
reading nor a synchronisation.
"""

from __future__ import annotations

import time

import torch


class StageClock:
    """Adds the wall-clock seconds since the previous reading to named entries of a dict.

    Args:
        seconds: stage name -> seconds to add to, or None for no clock.
        device: the device whose kernels are timed.
    """

    def __init__(self, seconds: dict[str, float] | None, device: torch.device) -> None:
        self.seconds = seconds
        self.device = torch.device(device)
        self._t = self._now() if seconds is not None else 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def restart(self) -> None:
        """Start the next lap now (the time since the previous reading counts for no stage)."""
        if self.seconds is not None:
            self._t = self._now()

    def lap(self, stage: str) -> float:
        """Add the seconds since the previous reading to `stage`; returns them (0.0 without a clock)."""
        if self.seconds is None:
            return 0.0
        now = self._now()
        elapsed = now - self._t
        self._t = now
        self.add(stage, elapsed)
        return elapsed

    def add(self, stage: str, elapsed: float) -> None:
        """Add `elapsed` seconds to `stage` without reading the clock (e.g. a stage's parts' sum)."""
        if self.seconds is not None:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + elapsed
