"""Console scripts: `vss-lightning`, `lightning` and `python -m vss_lightning`.

    vss-lightning predict --config configs/vspw.yaml [--data.shards PATTERN] [--output_dir DIR] ...
    lightning predict --config configs/vspw.yaml ...

Both run `lightning_cli.VSSLightningCLI` (subcommands predict, test, validate; there is no `fit`, the
method has no trainable parameter). Lightning AI's cloud SDK (`lightning-sdk`) also installs a script
named `lightning`; ours hands every subcommand it does not own to that SDK's CLI when the SDK is
installed, so both keep working. This module imports only the standard library at import time, so
handing over (and the errors below) cost no Lightning or diffusers import; neither do `--help` and a
misspelled option key or a value the parser refuses (a word for an int, `clusters` for a choice),
answered from the committed snapshot of the parser (`cli_schema`) when it matches the installed
libraries and this package's source, nor `--print_config` or `--help` after the config files and
overrides that snapshot can apply for sure.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import sys
from collections.abc import Callable
from typing import Any

SUBCOMMANDS = ("predict", "test", "validate")
SDK_ENTRY_POINT = "lightning_sdk.cli.entrypoint:main_cli"
NO_FIT = (
    "error: `{prog} fit` does not exist: the method is training-free (no trainable parameter). "
    "Use `{prog} predict --config configs/smoke.yaml ...` to label videos, or `{prog} test` to score them."
)
SDK_EPILOG = (
    "Any other subcommand is passed to Lightning AI's `lightning` CLI (package lightning-sdk) "
    "when it is installed."
)


# Exit statuses: 0 every video labelled or skipped as complete; 1 the job stopped on an error (the
# message names the input and the fix); 2 a command-line or config mistake; 3 the job finished but
# some videos failed (listed with their reasons under `failed` in summary.json).
EXIT_ERROR, EXIT_USAGE, EXIT_SOME_FAILED = 1, 2, 3
VERBOSE_FLAG = "--verbose"


def user_error_types() -> tuple[type[BaseException], ...]:
    """Errors a user causes (bad paths, values, a missing backbone): one line, no traceback."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from vss_lightning.pipeline.backbone import BackboneNotFoundError

    return (BackboneNotFoundError, MisconfigurationException, ValueError, OSError)


def epilog(prog: str) -> str:
    """The text under `prog --help`: the hand-over to lightning-sdk for our `lightning` script."""
    return SDK_EPILOG if prog == "lightning" else ""


def main(args: list[str] | None = None, prog: str = "vss-lightning") -> None:
    """Entry point of `vss-lightning` and `python -m vss_lightning` (args default to `sys.argv[1:]`).

    `--verbose` (anywhere on the command line) shows the traceback of an error instead of one line.
    `[SUBCOMMAND] --help`, `SUBCOMMAND [--config FILE ...] [overrides] --print_config|--help`,
    misspelled option keys and refused values are answered from the committed snapshot of the parser
    (`cli_schema`) and `--help`/`--print_config` seen before from the cache (`help_cache`), all
    without importing torch or Lightning; anything else builds the full parser.
    """
    argv = list(sys.argv[1:] if args is None else args)
    verbose = VERBOSE_FLAG in argv
    argv = [a for a in argv if a != VERBOSE_FLAG]
    if argv and argv[0] == "fit":
        print(NO_FIT.format(prog=prog), file=sys.stderr)
        raise SystemExit(EXIT_USAGE)
    from vss_lightning import cli_schema, help_cache

    asks_help = help_cache.is_help_request(argv)
    if asks_help:
        with help_cache.help_width() as columns:  # the key and the rendering use the same width
            text = cli_schema.print_config(argv, prog)
            if text is not None:
                help_cache.store(argv, prog, text)  # the full parser's output: kept as it would be
            if text is None:
                text = help_cache.lookup(argv, prog)
            if text is None:
                text = cli_schema.lookup_help(argv, prog, columns)
                if text is not None:
                    help_cache.store(argv, prog, text)
        if text is not None:
            sys.stdout.write(text)
            raise SystemExit(0)
    else:
        schema = cli_schema.load_schema()  # None: stale or disabled (the full parser answers)
        mistake = None
        if schema is not None:
            mistake = cli_schema.precheck(argv, prog, schema) or cli_schema.value_error(argv, prog, schema)
        if mistake is not None:
            sys.stderr.write(mistake)
            raise SystemExit(EXIT_USAGE)
    from vss_lightning.lightning_cli import failed_videos, run_cli

    if args is None:  # LightningCLI reads sys.argv itself (and warns when given both)
        sys.argv[1:] = argv
    user_errors = user_error_types()
    try:
        with contextlib.ExitStack() as help_request:
            if asks_help:
                help_request.enter_context(help_cache.help_width())
                help_request.enter_context(help_cache.recording(argv, prog))
            cli = run_cli(None if args is None else argv, prog=prog, epilog=epilog(prog))
    except user_errors as e:
        if verbose:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        print(f"({prog} ... {VERBOSE_FLAG} shows the traceback.)", file=sys.stderr)
        raise SystemExit(EXIT_ERROR) from None
    failed = failed_videos(cli)
    if failed:
        print(
            f"error: {failed} video(s) could not be labelled; the others were. Their ids and reasons are "
            "under `failed` in summary.json; fix them and rerun the same command (finished videos are "
            f"skipped). Exit status {EXIT_SOME_FAILED}.",
            file=sys.stderr,
        )
        raise SystemExit(EXIT_SOME_FAILED)


def _sdk_main() -> Callable[[], Any] | None:
    """The `lightning` entry point of lightning-sdk, or None when that package is not installed."""
    if importlib.util.find_spec("lightning_sdk") is None:
        return None
    target = SDK_ENTRY_POINT
    for ep in importlib.metadata.entry_points(group="console_scripts", name="lightning"):
        if ep.value.split(":")[0].split(".")[0] == "lightning_sdk":
            target = ep.value  # the installed SDK's own declaration wins over the known default
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _ours(argv: list[str]) -> bool:
    """Whether `lightning <argv>` is for this package: our subcommands, `fit`, help, top-level options."""
    if not argv:
        return True
    first = argv[0]
    return first in (*SUBCOMMANDS, "fit", "-h", "--help") or (first.startswith("-") and first != "--version")


def lightning_main() -> None:
    """Entry point of the `lightning` script: predict/test/validate here, anything else to lightning-sdk."""
    argv = sys.argv[1:]
    if _ours(argv):
        main(None if argv else ["--help"], prog="lightning")
        return
    try:
        sdk = _sdk_main()
    except (ImportError, AttributeError) as e:
        print(
            f"error: `lightning {argv[0]}` belongs to Lightning AI's CLI (lightning-sdk), which is "
            f"installed but failed to load: {type(e).__name__}: {e}. Reinstall it "
            "(`pip install -U lightning-sdk`).",
            file=sys.stderr,
        )
        raise SystemExit(1) from e
    if sdk is None:
        print(
            f"error: Expected a subcommand of this `lightning` script ({', '.join(SUBCOMMANDS)}), but got "
            f"{argv[0]!r}. Example: `lightning predict --config configs/smoke.yaml "
            "--data.shards 'shards/*.tar' --output_dir out`. (Other subcommands belong to Lightning AI's "
            "CLI: `pip install lightning-sdk`.)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    result = sdk()
    raise SystemExit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
