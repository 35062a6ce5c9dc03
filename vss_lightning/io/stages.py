"""`StageCallback`: one method per moment of predict, test and validate, instead of three hooks each.

Lightning calls `on_predict_start`, `on_test_start`, `on_validation_start` (and `_batch_end`, `_end`)
separately; the callbacks of this package do the same thing in all three stages, so they implement
`on_stage_start`, `on_stage_batch_end` and `on_stage_end` once, told the stage ("predict", "test" or
"validate"). Each Lightning hook also calls the next class's hook (`super()`), so the mixin can sit
in front of a Lightning callback with hooks of its own (e.g. `TQDMProgressBar`): its start hook runs
before `on_stage_start`, its batch-end and end hooks after ours.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
from lightning.pytorch.callbacks import Callback

Stage = Literal["predict", "test", "validate"]


class StageCallback(Callback):
    """A callback with one hook per moment of the predict, test and validate loops (see the module)."""

    def on_stage_start(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: Stage) -> None:
        """The loop of `stage` starts."""

    def on_stage_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, stage: Stage
    ) -> None:
        """A step of `stage` returned `outputs` for `batch`."""

    def on_stage_end(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: Stage) -> None:
        """The loop of `stage` ends."""

    # -- Lightning's hooks, mapped ----------------------------------------------------------------
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_predict_start(trainer, pl_module)
        self.on_stage_start(trainer, pl_module, "predict")

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_test_start(trainer, pl_module)
        self.on_stage_start(trainer, pl_module, "test")

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_start(trainer, pl_module)
        self.on_stage_start(trainer, pl_module, "validate")

    def on_predict_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        self.on_stage_batch_end(trainer, pl_module, outputs, batch, "predict")
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        self.on_stage_batch_end(trainer, pl_module, outputs, batch, "test")
        super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        self.on_stage_batch_end(trainer, pl_module, outputs, batch, "validate")
        super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.on_stage_end(trainer, pl_module, "predict")
        super().on_predict_end(trainer, pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.on_stage_end(trainer, pl_module, "test")
        super().on_test_end(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.on_stage_end(trainer, pl_module, "validate")
        super().on_validation_end(trainer, pl_module)
