"""The `LightningCLI` of `vss-lightning`: predict/test/validate over `ZeroShotVSS` and `VideoShardDataModule`.

Every constructor argument is a config key (`--model.*`, `--data.*`, `--trainer.*`); on top of those,
each subcommand takes the output arguments of the command-line contract:

    --output_dir DIR              where labels, summaries and metrics go (required)
    --output_format png|shards    PNG per frame (default) or WebDataset tars
    --write_previews [true|false] colour preview PNG per frame (also `--no_write_previews`)
    --on_error skip|fail          bad videos are recorded and skipped (default) or stop the job;
                                  sets data.on_error and model.on_error
    --videos_per_shard N          videos per output tar with --output_format shards
    --lock_timeout_s S            a png video lock of a job on another host untouched this long is stale

which are linked to the init args of the writer, a plain callback declared as the config group
`writer` (`io.writer.PseudoLabelWriter`; its other arguments, e.g. `--writer.summary_timeout_s`, are
set there). Predict runs with `return_predictions=False` (labels go to the writer, nothing
accumulates in memory). A `VideoProgressBar` is added to `trainer.callbacks` unless the config lists a
progress bar or disables it. Only public LightningCLI hooks are overridden (`subcommands`,
`setup_parser`, `add_arguments_to_parser`, `before_instantiate_classes`).

With a logger (e.g. the W&B overlay `configs/logger/wandb.yaml`), the resolved config goes to every
logger's hyperparameters; a `WandbLogger` gets a `WandbVideoLogger` callback unless the config lists
one, and keeps its run under `<output_dir>/wandb/` unless its `save_dir` is set (other than ".").
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Literal, NoReturn

import yaml
from jsonargparse import ActionYesNo, Namespace
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from vss_lightning.callbacks import WandbVideoLogger
from vss_lightning.cli_schema import did_you_mean, unknown_init_arg  # stdlib only, shared with the fast path
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


SUBCOMMAND_HELP = {
    "predict": "Label the videos of the shards into --output_dir (resumable; no ground truth needed).",
    "test": "Label the videos and score them against the shards' ground truth (writes metrics.json).",
    "validate": "The same as test, logged under the val/ prefix.",
}
# Lines of third-party libraries that are noise to our users (product tips, known deprecations).
NOISE = ("💡 Tip:", "isinstance(treespec, LeafSpec)` is deprecated")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in NOISE)


def silence_third_party_noise() -> None:
    """Hide Lightning's product tips and known third-party deprecation warnings (idempotent)."""
    names = ("lightning.pytorch", "lightning.fabric", "lightning_utilities")
    for name in (*names, *(f"{n}.utilities.rank_zero" for n in names[:2])):  # where the tips are logged
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())
        for handler in logger.handlers:
            if not any(isinstance(f, _DropNoise) for f in handler.filters):
                handler.addFilter(_DropNoise())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated.*")


def _option_names(parser: Any) -> set[str]:
    """Every long option a parser (and its subcommand parsers) knows, e.g. `--model.label_mode`."""
    names: set[str] = set()
    for action in getattr(parser, "_actions", []):
        names.update(o for o in action.option_strings if o.startswith("--"))
        for sub in (
            (getattr(action, "choices", None) or {}).values() if hasattr(action, "_name_parser_map") else []
        ):
            names |= _option_names(sub)
    return names


def _init_arg_names() -> set[str]:
    """`--model.segmenter.init_args.<name>` options of the segmenter and its settings groups
    (`--model.segmenter.init_args.<group>.<field>`)."""
    import dataclasses
    import typing

    from vss_lightning.pipeline.segmenter import VideoSegmenter

    prefix = "--model.segmenter.init_args."
    names = set()
    for name, hint in typing.get_type_hints(VideoSegmenter.__init__).items():
        if name == "return":
            continue
        names.add(prefix + name)
        for group in typing.get_args(hint):  # `Settings | None`
            if dataclasses.is_dataclass(group):
                names |= {f"{prefix}{name}.{f.name}" for f in dataclasses.fields(group)}
    return names


class VSSArgumentParser(LightningArgumentParser):
    """LightningArgumentParser whose errors are one or two lines: the error, a "did you mean", and
    where the full list of options is (instead of the whole usage text). No option abbreviations: a
    prefix of an option is an error, never silently another option."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):  # internal parses raise
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        known = _option_names(parser) | _option_names(self)
        if any(k.startswith("--model.") for k in known) or "model" in message:
            known |= _init_arg_names()
        first = " ".join(str(message).split())  # one line
        unknown = unknown_init_arg(first)
        if unknown:  # jsonargparse lists every subtype's error; the one that matters is this
            first = f"`{unknown}` is not an option (on the command line or in a config file)."
        if len(first) > 600:
            first = first[:600] + " ..."
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"error: {first}{did_you_mean(message, known)}\n")
        sys.stderr.write(f"({prog} --help lists every option.)\n")
        self.exit(2)


class SaveConfigToOutput(SaveConfigCallback):
    """Saves the resolved config as `<output_dir>/config-<stage>.yaml` (rank 0, overwriting) and
    hands it to every logger's `log_hyperparams` (W&B: the run's config)."""

    def __init__(self, parser: LightningArgumentParser, config: Any, **kwargs: Any) -> None:
        super().__init__(parser, config, overwrite=True, save_to_log_dir=False)

    def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:
        out = Path(self.config["output_dir"]).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        # Checked when parsed: checking it again would only cost time (~0.1 s; the text is the same).
        text = self.parser.dump(self.config, skip_none=False, skip_link_targets=False, skip_validation=True)
        atomic_write(out / f"config-{getattr(stage, 'value', stage)}.yaml", text.encode())
        if trainer.loggers:  # plain types only (the YAML just written), as loggers expect
            config = yaml.safe_load(text)
            for logger in trainer.loggers:
                logger.log_hyperparams(config)


class VSSLightningCLI(LightningCLI):
    """LightningCLI with predict/test/validate only (no `fit`) and the output arguments.

    `subcommands` names the subcommands whose parsers are built (default: all three); `run_cli` builds
    only the one a command line asks for, ~0.3 s less per run than building the parsers of all three.
    """

    def __init__(self, *args: Any, subcommands: tuple[str, ...] = SUBCOMMANDS, **kwargs: Any) -> None:
        self._subcommand_names = subcommands
        super().__init__(*args, **kwargs)

    def subcommands(self) -> dict[str, set[str]]:  # type: ignore[override]  (Lightning calls it on self)
        # No `--ckpt_path`/`--weights_only` (issue #11): the model is training-free and its weights load
        # from safetensors; Lightning would unpickle a checkpoint and apply its hyperparameters.
        skip = {"model", "dataloaders", "datamodule", "ckpt_path", "weights_only"}
        return {name: set(skip) for name in self._subcommand_names}

    def setup_parser(
        self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]
    ) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        # `--help` lists each subcommand with one whole sentence of ours (Lightning's Trainer docstrings
        # would be cut mid-sentence and speak of training).
        for action in self.parser._actions:
            for choice in getattr(action, "_choices_actions", []):
                choice.help = SUBCOMMAND_HELP.get(choice.dest, choice.help)

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
        parser.add_argument(
            "--lock_timeout_s",
            type=float,
            default=6 * 3600.0,
            help="With png output: a video lock of a job on another host untouched this long is stale.",
        )
        parser.link_arguments("on_error", "data.on_error")
        parser.link_arguments("on_error", "model.on_error")
        # The writer is a config group of its own (`writer.*`, a callback of the trainer); the output
        # arguments above are its user-facing names.
        parser.add_lightning_class_args(PseudoLabelWriter, "writer")
        for key in ("output_format", "write_previews", "videos_per_shard", "lock_timeout_s"):
            parser.link_arguments(key, f"writer.{key}")
        parser.link_arguments("output_dir", "writer.output_dir", compute_fn=_output_dir)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        if not config.get("output_dir"):
            self.parser.error(f"Expected `--output_dir` to be set for `{self.subcommand}`, but got none.")
        out = Path(str(config["output_dir"])).expanduser()
        if out.exists() and not out.is_dir():
            self.parser.error(
                f"Expected `--output_dir` to be a folder, but {str(out)!r} is a file. Pass another path."
            )
        accelerator = str(config.get("trainer.accelerator") or "auto")
        if accelerator in ("gpu", "cuda"):
            import torch

            if not torch.cuda.is_available():
                self.parser.error(
                    f"Expected a CUDA GPU for `--trainer.accelerator {accelerator}` (set by the config), but "
                    "this machine has none. Add `--trainer.accelerator cpu` (slow: the real backbone takes "
                    "minutes per frame on a CPU) or try the tool with `--config configs/smoke.yaml`."
                )
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
        self._add_automatic_callbacks(config)

    def _add_automatic_callbacks(self, config: Namespace) -> None:
        """Add a `VideoProgressBar` (unless the config lists a progress bar or disables it) and, with a
        `WandbLogger`, a `WandbVideoLogger` (unless listed) to the config's `trainer.callbacks`."""
        callbacks = config.get("trainer.callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        listed = [_class_of(c) for c in callbacks]
        loggers = config.get("trainer.logger")
        loggers = loggers if isinstance(loggers, list) else [loggers]
        if any(issubclass(_class_of(lg) or object, WandbLogger) for lg in loggers) and not any(
            c is not None and issubclass(c, WandbVideoLogger) for c in listed
        ):
            callbacks.append(Namespace(class_path=_path_of(WandbVideoLogger), init_args=Namespace()))
        wants_bar = config.get("trainer.enable_progress_bar") in (None, True)
        if wants_bar and not any(c is not None and issubclass(c, ProgressBar) for c in listed):
            callbacks.append(Namespace(class_path=_path_of(VideoProgressBar), init_args=Namespace()))
        config["trainer.callbacks"] = callbacks


def _path_of(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _class_of(entry: Any) -> type | None:
    """The class a config entry (`class_path` namespace) or an instance names, None if unknown."""
    if isinstance(entry, Namespace) and isinstance(entry.get("class_path"), str):
        module, _, name = entry["class_path"].rpartition(".")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            return None
    return type(entry) if entry is not None and not isinstance(entry, (bool, str)) else None


def _output_dir(value: str | None) -> str:
    """`--output_dir` for the writer; "" when unset (`before_instantiate_classes` then says so)."""
    return "" if value is None else str(value)


def run_cli(args: list[str] | None = None, prog: str = "vss-lightning", epilog: str = "") -> VSSLightningCLI:
    """Parse `args` (default: `sys.argv[1:]`) and run the subcommand; returns the CLI object."""
    # Expected with one video per step from an IterableDataset (identity travels in the sample) and
    # with frames kept on the CPU (`ZeroShotVSS.transfer_batch_to_device`): not actionable, so hidden.
    warnings.filterwarnings("ignore", message=".*Couldn't infer the batch indices.*")
    warnings.filterwarnings("ignore", message=".*overridden `transfer_batch_to_device`.*")
    # Test/validate metrics are synced by torchmetrics before they are logged (rank 0 only).
    warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed setting.*")
    silence_third_party_noise()
    argv = sys.argv[1:] if args is None else args
    # `predict ...` needs the parser of `predict` alone; anything else (top-level help, a misspelled
    # subcommand) gets all three, so that it lists or suggests them.
    wanted = (argv[0],) if argv and argv[0] in SUBCOMMANDS else SUBCOMMANDS
    return VSSLightningCLI(
        ZeroShotVSS,
        VideoShardDataModule,
        save_config_callback=SaveConfigToOutput,
        seed_everything_default=0,
        auto_configure_optimizers=False,
        # Training-free, no checkpoints (`--ckpt_path` is refused): the hyperparameters need not be
        # the parsed config, which Lightning would dump once more per run (~1 s on 2 cores).
        load_from_checkpoint_support=False,
        parser_class=VSSArgumentParser,
        parser_kwargs={
            "prog": prog,
            "description": DESCRIPTION,
            "epilog": epilog,
            **{name: {"description": SUBCOMMAND_HELP[name]} for name in wanted},
        },
        args=args,
        subcommands=wanted,
    )


def failed_videos(cli: VSSLightningCLI) -> int:
    """How many videos the finished job could not label (this rank's merged view; 0 if unknown)."""
    trainer = getattr(cli, "trainer", None)
    for callback in getattr(trainer, "callbacks", []) or []:
        if isinstance(callback, PseudoLabelWriter):
            return callback.failed_videos
    return 0
