"""The `LightningCLI` of `vss-lightning`: predict/test/validate over `ZeroShotVSS` and `VideoShardDataModule`.

Every constructor argument is a config key (`--model.*`, `--data.*`, `--trainer.*`); on top of those,
each subcommand takes the output arguments of the command-line contract:

    --output_dir DIR              where labels, summaries and metrics go (required)
    --output_format png|shards    PNG per frame (default) or WebDataset tars
    --write_previews [true|false] colour preview PNG per frame (also `--no_write_previews`)
    --on_error skip|fail          bad videos are recorded and skipped (default) or stop the job;
                                  sets data.on_error and model.on_error
    --videos_per_shard N          videos per output tar with --output_format shards

and builds the `PseudoLabelWriter` and the progress bar from them. Predict runs with
`return_predictions=False` (labels go to the writer, nothing accumulates in memory).

With a logger (e.g. the W&B overlay `configs/logger/wandb.yaml`), the resolved config goes to every
logger's hyperparameters; a `WandbLogger` gets a `WandbVideoLogger` callback unless the config lists
one, and keeps its run under `<output_dir>/wandb/` unless its `save_dir` is set (other than ".").
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from jsonargparse import ActionYesNo, Namespace
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from vss_lightning.callbacks import WandbVideoLogger
from vss_lightning.data.datamodule import VideoShardDataModule
from vss_lightning.io.progress import VideoProgressBar
from vss_lightning.io.summary import atomic_write
from vss_lightning.io.writer import PseudoLabelWriter
from vss_lightning.module import ZeroShotVSS

SUBCOMMANDS = ("predict", "test", "validate")
DESCRIPTION = (
    "Zero-shot video semantic segmentation with a pre-trained diffusion model: label videos from "
    "WebDataset shards (predict) or score the labels against ground truth (test, validate)."
)


class SaveConfigToOutput(SaveConfigCallback):
    """Saves the resolved config as `<output_dir>/config-<stage>.yaml` (rank 0, overwriting) and
    hands it to every logger's `log_hyperparams` (W&B: the run's config)."""

    def __init__(self, parser: LightningArgumentParser, config: Any, **kwargs: Any) -> None:
        super().__init__(parser, config, overwrite=True, save_to_log_dir=False)

    def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:
        out = Path(self.config["output_dir"]).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        text = self.parser.dump(self.config, skip_none=False, skip_link_targets=False)
        atomic_write(out / f"config-{getattr(stage, 'value', stage)}.yaml", text.encode())
        if trainer.loggers:  # plain types only (the YAML just written), as loggers expect
            config = yaml.safe_load(text)
            for logger in trainer.loggers:
                logger.log_hyperparams(config)


class VSSLightningCLI(LightningCLI):
    """LightningCLI with predict/test/validate only (no `fit`) and the output arguments."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # No `--ckpt_path`/`--weights_only` (issue #11): the model is training-free and its weights load
        # from safetensors; Lightning would unpickle a checkpoint and apply its hyperparameters.
        skip = {"model", "dataloaders", "datamodule", "ckpt_path", "weights_only"}
        return {name: set(skip) for name in SUBCOMMANDS}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--output_dir",
            type=str | None,
            default=None,
            help="Output folder for labels, summary.json and metrics.json (required).",
        )
        parser.add_argument(
            "--output_format",
            type=Literal["png", "shards"],
            default="png",
            help="png: <output_dir>/<video>/<frame>.png; shards: labels-rank<r>-<n>.tar.",
        )
        parser.add_argument(
            "--write_previews",
            action=ActionYesNo,
            nargs="?",
            default=False,
            help="Also write a colour preview PNG per frame.",
        )
        parser.add_argument(
            "--on_error",
            type=Literal["skip", "fail"],
            default="skip",
            help="skip: record unreadable/failing videos in summary.json and go on; fail: stop.",
        )
        parser.add_argument(
            "--videos_per_shard",
            type=int,
            default=100,
            help="With --output_format shards: videos per output tar.",
        )
        parser.link_arguments("on_error", "data.on_error")
        parser.link_arguments("on_error", "model.on_error")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        if not config.get("output_dir"):
            self.parser.error(f"Expected `--output_dir` to be set for `{self.subcommand}`, but got none.")
        if self.subcommand == "predict" and config.get("return_predictions") is None:
            config["return_predictions"] = False
        logger = config.get("trainer.logger")
        if (
            isinstance(logger, Namespace)
            and str(logger.get("class_path", "")).endswith("WandbLogger")
            and isinstance(logger.get("init_args"), Namespace)
            and str(logger.get("init_args.save_dir", ".")) in ("", ".")
        ):
            logger["init_args.save_dir"] = config["output_dir"]  # the W&B run beside the labels

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        config = self.config[self.subcommand]
        writer = PseudoLabelWriter(
            output_dir=config["output_dir"],
            output_format=config["output_format"],
            write_previews=config["write_previews"],
            videos_per_shard=config["videos_per_shard"],
        )
        callbacks = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        user = trainer_config.get("callbacks") or []
        user = user if isinstance(user, list) else [user]
        callbacks.append(writer)
        loggers = trainer_config.get("logger")
        loggers = loggers if isinstance(loggers, list) else [loggers]
        if any(isinstance(lg, WandbLogger) for lg in loggers) and not any(
            isinstance(c, WandbVideoLogger) for c in user + callbacks
        ):
            callbacks.append(WandbVideoLogger())
        wants_bar = trainer_config.get("enable_progress_bar") in (None, True)
        if wants_bar and not any(isinstance(c, ProgressBar) for c in user + callbacks):
            callbacks.append(VideoProgressBar())
        return self._instantiate_trainer(trainer_config, callbacks)


def run_cli(args: list[str] | None = None, prog: str = "vss-lightning", epilog: str = "") -> VSSLightningCLI:
    """Parse `args` (default: `sys.argv[1:]`) and run the subcommand; returns the CLI object."""
    # Expected with one video per step from an IterableDataset (identity travels in the sample) and
    # with frames kept on the CPU (`ZeroShotVSS.transfer_batch_to_device`): not actionable, so hidden.
    warnings.filterwarnings("ignore", message=".*Couldn't infer the batch indices.*")
    warnings.filterwarnings("ignore", message=".*overridden `transfer_batch_to_device`.*")
    # Test/validate metrics are synced by torchmetrics before they are logged (rank 0 only).
    warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed setting.*")
    return VSSLightningCLI(
        ZeroShotVSS,
        VideoShardDataModule,
        save_config_callback=SaveConfigToOutput,
        seed_everything_default=0,
        auto_configure_optimizers=False,
        parser_kwargs={"prog": prog, "description": DESCRIPTION, "epilog": epilog},
        args=args,
    )
