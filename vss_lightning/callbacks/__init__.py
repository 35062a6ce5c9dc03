"""Lightning callbacks of the product shell (logging; the label writer lives in `io.writer`)."""

from vss_lightning.callbacks.wandb import WandbVideoLogger

__all__ = ["WandbVideoLogger"]
