"""The CLI's fast path (issue 20): `--help` and misspelled option keys are answered from the committed
snapshot of the parser (`vss_lightning/cli_schema.json`) without importing torch, Lightning or
diffusers, exactly as the full parser answers them, and never from a snapshot that is stale."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from background import Command, register, result
from shards import CONFIGS, subprocess_env

from vss_lightning import cli, cli_schema, cli_schema_build

# In-process CLI calls pass `args` while pytest's own argv is set: Lightning warns, harmlessly.
# The full parser's answers come from a fresh interpreter started when collection ends (`_render`).
pytestmark = [
    pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning"),
    pytest.mark.background_job("cli_render"),
]

SMOKE = str(CONFIGS / "smoke.yaml")
HEAVY = ("torch", "lightning", "diffusers", "jsonargparse")

# Run in a fresh process (the help texts list the imported subclasses of Callback, Logger, ...; the
# test process has imported more): `predict --help` through `cli.main` while the snapshot is stale
# (the fallback to the full parser), then a snapshot rendered now.
RENDER = """
import contextlib, io, json, sys
from vss_lightning import cli, cli_schema_build
before = "torch" in sys.modules
helps = []  # the full parser's help for each command line of argv[2] (the first: `predict --help`)
for argv in json.loads(sys.argv[2]):
    out = io.StringIO()
    code = None
    with contextlib.redirect_stdout(out):
        try:
            cli.main(argv)
        except SystemExit as e:
            code = e.code
    helps.append([code, out.getvalue()])
after = "torch" in sys.modules
schema = cli_schema_build.build_schema() if sys.argv[4] == "build" else None
# The full parser's (exit status, stdout, stderr) for each command line of argv[1], and of argv[3] for
# our `lightning` script too (after build_schema, which renders the help texts before anything imports
# more classes).
from vss_lightning import lightning_cli
parser = cli_schema_build._grab_parser(lightning_cli, "vss-lightning", cli.epilog("vss-lightning"))
printed = [cli_schema_build.real_print_config(parser, argv) for argv in json.loads(sys.argv[1])]
parser = cli_schema_build._grab_parser(lightning_cli, "lightning", cli.epilog("lightning"))
lightning = [cli_schema_build.real_print_config(parser, argv) for argv in json.loads(sys.argv[3])]
print(json.dumps({"schema": schema, "help": helps[0][1], "code": helps[0][0], "helps": helps,
                  "before": before, "after": after, "printed": printed, "lightning": lightning}))
"""


SEG = "--model.segmenter.init_args."
TINY = "vss_lightning.pipeline.random_backbones.TinyStableDiffusion"
SVD = "vss_lightning.pipeline.svd.StableVideoDiffusion"
OVERLAY = """# batch size and a seed for the segmenter of the config before (its class stays)
model:
  segmenter:
    init_args:
      seed: 5
      context: {batch_size: 7}
      modulation: {strength: 50}
"""


def print_config_cases(folder) -> dict[str, list[list[str]]]:
    """Command lines of `--print_config`: `fast` ones the snapshot answers, `deferred` ones it leaves to
    the full parser (classes it does not describe, values it cannot read or the parser refuses)."""
    overlay = folder / "overlay.yaml"
    overlay.write_text(OVERLAY, encoding="utf-8")
    configs = sorted(p for p in CONFIGS.glob("*.yaml") if p.name != "multinode.yaml")  # an overlay (DDP)
    vspw, svd = str(CONFIGS / "vspw.yaml"), str(CONFIGS / "smoke_svd.yaml")
    # every config once, the subcommands in turn (the snapshot reads a config the same way for each)
    subs = cli.SUBCOMMANDS
    fast = [[subs[i % len(subs)], "--config", str(c), "--print_config"] for i, c in enumerate(configs)]
    fast += [
        ["predict", "--print_config"],
        ["predict", "--print_config", "--config", SMOKE, "--data.num_workers", "3"],  # anywhere
        ["predict", "--config", SMOKE, "--config", str(overlay), "--print_config"],
        ["test", "--config", vspw, SEG + "backbone.class_path", TINY, SEG + "backbone.init_args.seed", "3",
         "--print_config"],
        ["predict", "--config", svd, SEG + "backbone.class_path", SVD, "--print_config"],
        ["predict", "--config", SMOKE, SEG + "context.batch_size", "9", SEG + "sampling.guidance_scale", "3",
         SEG + "features.blocks", "[5, 6]", "--model.label_mode", "first_frame_gt", "--print_config"],
        ["validate", "--config", SMOKE, SEG + "modulation.strength=2.5", "--output_dir", "out/x",
         "--write_previews", "--data.shards", "a/b", "--trainer.max_epochs", "null", "--print_config"],
    ]  # fmt: skip
    deferred = [
        ["predict", "--config", vspw, "--config", str(CONFIGS / "multinode.yaml"), "--print_config"],
        ["predict", "--config", vspw, "--config", str(CONFIGS / "logger" / "wandb.yaml"), "--print_config"],
        ["predict", "--config", SMOKE, "--output_dir", "123", "--trainer.devices", "2", "--print_config"],
        ["predict", "--config", SMOKE, SEG + "context.batch_size", "abc", "--print_config"],
        ["predict", "--config", SMOKE, "--model.label_mode", "nope", "--print_config"],
        ["predict", "--config", SMOKE, "--print_config=skip_default"],
        ["predict", "--config", SMOKE, SEG + "backbone.class_path", "my.Backbone", "--print_config"],
        ["predict", SEG + "context.batch_size", "5", "--print_config"],  # no segmenter class yet
    ]
    return {"fast": fast, "deferred": deferred}


def value_error_cases(folder) -> dict[str, list[list[str]]]:
    """Command lines with values the parser refuses: `refused` ones the snapshot answers (key kinds: int,
    float, bool, a `--flag/--no_flag`, Literals, unions, a settings-group field at the top and inside
    the segmenter, an init arg of the segmenter and of a backbone after a class_path switch), and
    `deferred` ones it leaves to the full parser."""
    overlay, vspw, broken = str(folder / "overlay.yaml"), str(CONFIGS / "vspw.yaml"), folder / "broken.yaml"
    broken.write_text("model: [1,\n", encoding="utf-8")  # not YAML
    refused = [
        ["predict", "--config", SMOKE, SEG + "context.batch_size", "abc"],  # truncated at 600 characters
        ["predict", "--config", SMOKE, "--model.label_mode", "clusters"],
        ["predict", "--config", SMOKE, "--trainer.max_epochs", "1.5"],
        ["test", "--config", SMOKE, "--trainer.num_nodes", "true"],
        ["validate", "--config", SMOKE, "--data.max_compression_ratio", "abc"],
        ["predict", "--config", SMOKE, "--trainer.inference_mode", "1"],
        ["predict", "--config", SMOKE, "--write_previews", "maybe"],
        ["predict", "--config", SMOKE, "--model.naming.normalize", "frames"],
        ["predict", "--config", SMOKE, SEG + "seed=x1"],
        ["predict", "--config", SMOKE, SEG + "sampling.guidance_scale", "high"],
        ["predict", "--config", vspw, SEG + "backbone.class_path", TINY, SEG + "backbone.init_args.seed",
         "1.5"],
        ["predict", "--config", SMOKE, SEG + "backbone.init_args.dtype", "float64"],
        ["predict", "--trainer.max_epochs", "a"],  # jsonargparse's union message drops " a "
        ["predict", "--seed_everything", "1.5"],
        ["predict", "--model.num_classes=-2.5"],
        ["predict", "--config", SMOKE, "--trainer.deterministic", "sometimes"],
        ["predict", "--config", SMOKE, "--config", overlay, "--model.matching", "null"],
        ["predict", "--config", SMOKE, "--model.label_mode", "clusters", "--trainer.num_nodes", "x"],  # first
        ["predict", "--config", SMOKE, "--trainer.num_nodes", "x", "--model.label_mode", "clusters"],
    ]  # fmt: skip
    deferred = [
        ["predict", "--config", SMOKE, "--trainer.max_epochs", "3"],  # nothing refused
        ["predict", "--config", SMOKE, SEG + "sampling.guidance_scale", "null"],  # null below a class: uneven
        ["predict", "--config", SMOKE, "--model.label_mode", "clusters", "--foo", "1"],  # an unknown key
        ["predict", "--config", SMOKE, "--trainer.num_nodes", "1e3"],  # a form not read for sure
        ["predict", "--config", "/nonexistent/config.yaml", "--trainer.num_nodes", "x"],
        ["predict", "--config", str(broken), "--trainer.num_nodes", "x"],
        ["predict", SEG + "seed", "x"],  # no segmenter class yet
        ["predict", "--config", SMOKE, "--trainer.devices", "x"],  # takes strings
    ]
    # the `lightning` script's answers (only its name differs) for a few kinds: a word and a bool for an
    # int, a Literal, a float for an int, a backbone init arg after a class_path switch, a union
    lightning = [refused[i] for i in (0, 1, 2, 3, 10, 12)]
    return {"refused": refused, "deferred": deferred, "lightning": lightning}


HELP_CASES = [  # the first is the plain help (`fresh["help"]`)
    ["predict", "--help"],
    ["predict", "--config", SMOKE, "--help"],
    ["test", "--config", str(CONFIGS / "smoke_svd.yaml"), SEG + "context.batch_size", "3", "-h"],
]


def _cases(folder: Path) -> tuple[dict, dict, list[list[str]]]:
    """The `--print_config` and refused-value cases (their files written in `folder`), and every
    command line of both that the full parser renders, in order."""
    cases, values = print_config_cases(folder), value_error_cases(folder)
    return cases, values, cases["fast"] + cases["deferred"] + values["refused"] + values["deferred"]


def _committed() -> dict | None:
    try:
        return json.loads(cli_schema.SCHEMA_FILE.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


@register("cli_render")
def _render(folder: Path) -> Command:
    """RENDER in a fresh interpreter, with a stale snapshot (so `cli.main` falls back to the full parser)."""
    stale = folder / "stale.json"
    stale.write_text(json.dumps({"format": cli_schema.FORMAT, "versions": {"lightning": "0.0"}}))
    env = subprocess_env(VSS_LIGHTNING_CACHE="off", VSS_LIGHTNING_SCHEMA=str(stale))
    env.pop("COLUMNS", None)
    cases, values, argvs = _cases(folder)
    # The committed snapshot when it describes this installation (its source hash and library versions
    # match: `test_the_committed_snapshot_is_current`); otherwise one rendered now (another resolution of
    # the dependencies, or a snapshot not yet rewritten), so these tests compare the fast path with the
    # full parser either way.
    build = "reuse" if cli_schema.stale_reason(_committed()) is None else "build"
    argv = [sys.executable, "-c", RENDER, json.dumps(argvs), json.dumps(HELP_CASES),
            json.dumps(values["lightning"]), build]  # fmt: skip
    return Command(argv, env)


@pytest.fixture(scope="module")
def fresh() -> dict:
    """A snapshot rendered now by the full parser (also saved as `path`), and the full path's output."""
    done = result("cli_render")
    assert done.returncode == 0, done.stderr[-3000:]
    folder = done.folder
    cases, values, argvs = _cases(folder)  # the job's command lines (its input files written again)
    rendered = json.loads(done.stdout.strip().splitlines()[-1])
    rendered["schema"] = rendered["schema"] or _committed()
    rendered["cases"], rendered["values"] = cases, values
    rendered["print_config"] = dict(zip(map(tuple, argvs), rendered.pop("printed"), strict=True))
    rendered["lightning"] = dict(zip(map(tuple, values["lightning"]), rendered["lightning"], strict=True))
    rendered["path"] = folder / "fresh.json"
    rendered["path"].write_text(cli_schema_build.dumps(rendered["schema"]), encoding="utf-8")
    return rendered


def test_the_committed_snapshot_is_current():
    """The committed snapshot was written from this package source (its hash) with these library
    versions; the fast path uses it only then (tested below), and the tests here compare what it
    answers with what the full parser answers."""
    try:
        committed = json.loads(cli_schema.SCHEMA_FILE.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        committed = None
    reason = cli_schema.stale_reason(committed)
    if reason is not None and reason.startswith("library versions differ"):
        # Another resolution of the dependencies than the one it was rendered with: the fast path is
        # off here (the full parser answers, tested below), so there is nothing to compare.
        pytest.skip(f"snapshot rendered with other library versions ({reason}); `{cli_schema.WRITE_COMMAND}`")
    fix = f"run `{cli_schema.WRITE_COMMAND}` and commit it"
    assert reason is None, f"{cli_schema.SCHEMA_FILE} is stale ({reason}): {fix}."


@pytest.mark.slow
def test_a_snapshot_rendered_now_equals_the_committed_one():
    """Rendering is deterministic: the committed snapshot equals one rendered now in a fresh process
    (`cli_schema_build --check`; ~25 s on 2 cores, so in the slow set: the source hash above is what
    catches a snapshot that was not rewritten)."""
    done = subprocess.run([sys.executable, "-m", "vss_lightning.cli_schema_build", "--check"],
                          capture_output=True, text=True, env=subprocess_env(), timeout=600)  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]


def test_a_stale_snapshot_falls_back_to_the_full_parser_which_prints_the_same_help(fresh):
    assert fresh["code"] in (0, None)
    assert not fresh["before"] and fresh["after"]  # the full parser (and torch) answered
    assert fresh["help"] == "\n".join(fresh["schema"]["progs"]["vss-lightning"]["help"]["predict"])
    assert "--model.segmenter" in fresh["help"]


def test_the_snapshot_is_used_only_when_versions_and_source_match(fresh, tmp_path, monkeypatch):
    schema = fresh["schema"]
    monkeypatch.setenv(cli_schema.SCHEMA_ENV, str(fresh["path"]))
    assert cli_schema.stale_reason(schema) is None
    assert cli_schema.load_schema() == schema
    help_text = cli_schema.lookup_help(["predict", "--help"], "vss-lightning", columns=100)
    assert help_text == "\n".join(schema["progs"]["vss-lightning"]["help"]["predict"])
    mistake = ["predict", "--outptu_dir", "x"]
    assert cli_schema.precheck(mistake, "vss-lightning") is not None

    old = json.loads(json.dumps(schema))
    old["versions"]["lightning"] = "0.0.1"
    stale = tmp_path / "stale.json"
    stale.write_text(json.dumps(old))
    assert "lightning 0.0.1 (recorded)" in cli_schema.stale_reason(old)
    monkeypatch.setenv(cli_schema.SCHEMA_ENV, str(stale))
    assert cli_schema.load_schema() is None
    assert cli_schema.lookup_help(["predict", "--help"], "vss-lightning", columns=100) is None
    assert cli_schema.precheck(mistake, "vss-lightning") is None

    monkeypatch.setenv(cli_schema.SCHEMA_ENV, str(fresh["path"]))
    monkeypatch.setattr(cli_schema, "source_hash", lambda *a: "0" * 64)  # an edited source file
    assert "source changed" in cli_schema.stale_reason(schema)
    assert cli_schema.load_schema() is None
    assert cli_schema.precheck(mistake, "vss-lightning") is None
    monkeypatch.undo()
    monkeypatch.setenv(cli_schema.SCHEMA_ENV, "off")
    assert cli_schema.load_schema() is None


def test_help_width_is_fixed_unless_columns_is_set(monkeypatch, fresh):
    from vss_lightning import help_cache

    monkeypatch.delenv("COLUMNS", raising=False)
    assert help_cache.help_columns() == help_cache.HELP_COLUMNS == fresh["schema"]["columns"]  # not a tty
    with help_cache.help_width() as width:
        assert width == 100 and help_cache.help_columns() == 100
    assert "COLUMNS" not in os.environ  # restored
    monkeypatch.setenv("COLUMNS", "80")
    assert help_cache.help_columns() == 80
    assert cli_schema.lookup_help(["--help"], "vss-lightning", schema=fresh["schema"]) is None
    assert cli_schema.lookup_help(["--help"], "vss-lightning", 100, fresh["schema"]) is not None
    for argv in (["predict", "--print_config"], ["-h", "predict"], ["predict", "--help", "--config", SMOKE]):
        assert cli_schema.lookup_help(argv, "vss-lightning", 100, fresh["schema"]) is None


PROBE = """
import contextlib, io, json, sys
from vss_lightning import cli
results = []
for prog, argv in json.loads(sys.argv[1]):
    out, err, code = io.StringIO(), io.StringIO(), None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main(argv, prog=prog)
        except SystemExit as e:
            code = e.code
    results.append([code, out.getvalue(), err.getvalue()])
print(json.dumps({"results": results, "heavy": [m for m in sys.argv[2:] if m in sys.modules]}))
"""


def _probe(fresh: dict, cwd: Path, calls: list) -> dict:
    """Run `calls` ([prog, argv] each) in a fresh interpreter with the fresh snapshot; its answers and the
    heavy libraries it imported."""
    env = subprocess_env(VSS_LIGHTNING_CACHE="off", VSS_LIGHTNING_SCHEMA=str(fresh["path"]))
    env.pop("COLUMNS", None)
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(calls), *HEAVY], capture_output=True,
                          text=True, env=env, timeout=120, cwd=cwd)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_help_and_a_misspelled_key_import_no_heavy_library(fresh, tmp_path):
    """A fresh process answers `--help`, `predict --help` and a misspelled key from the snapshot: no
    torch, Lightning, jsonargparse or diffusers import, the full parser's texts, exit statuses 0 and 2."""
    misspelled = ["predict", "--config", SMOKE, "--model.segmenter.init_args.context.batch_sise", "3"]
    calls = [
        ["vss-lightning", ["--help"]],
        ["vss-lightning", ["predict", "--help"]],
        ["lightning", ["test", "-h"]],
        ["vss-lightning", misspelled],
    ]
    answer = _probe(fresh, tmp_path, calls)
    assert answer["heavy"] == []
    helps = fresh["schema"]["progs"]
    for (prog, argv), (code, out, err) in zip(calls[:3], answer["results"][:3], strict=True):
        sub = argv[0] if len(argv) == 2 else ""
        assert code == 0 and err == "" and out == "\n".join(helps[prog]["help"][sub])
    code, out, err = answer["results"][3]
    assert code == cli.EXIT_USAGE and out == ""
    assert err == cli_schema.precheck(misspelled, "vss-lightning", fresh["schema"])
    assert err.splitlines()[0].endswith("Did you mean `--model.segmenter.init_args.context.batch_size`?")


ANSWERED = [
    ["predict", "--config", SMOKE, "--model.segmenter.init_args.context.batch_sise", "3"],
    ["predict", "--outptu_dir", "x"],
    ["predict", "--outptu_dir=x", "--foo", "y"],
    ["test", "--model.label_mod", "cluster"],
    ["validate", "--model.segmenter.init_args.modulation.strenght", "3"],
    ["predict", "--model.segmenter.num_cluster=3"],
    ["predict", "--outptu_dir", "x", "--model.segmenter.init_args.context.num_cluster", "3",
     "--model.segmenter.init_args.context.batch_sise", "3"],
    ["predict", "stray", "--write_previews", "--trainer.max_epoch", "3"],
    ["predict", "-c", SMOKE, "--model.segmenterr", "x", "--data.num_workers", "0"],
]  # fmt: skip
DEFERRED = [  # the snapshot cannot decide these: the full parser answers
    ["predict", "--model.segmenter.init_args.backbone.init_args.sed", "3"],
    ["predict", "--trainer.max_epochs.foo", "3"],
    ["predict", "--model.segmenter", "my.Seg", "--model.segmenter.init_args.context.batch_sise", "3"],
    ["predict", "--config", "/nonexistent/config.yaml", "--outptu_dir", "x"],
    ["predict", "--model.segmenter.init_args.zzzzzzzzzzzzzzzzzzzz", "3"],  # no close match
]


def _full(capsys, argv: list[str], prog: str) -> tuple[int, str]:
    code = 0
    try:
        cli.main(argv, prog=prog)
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("prog", ["vss-lightning", "lightning"])
def test_a_misspelled_key_gets_the_full_parsers_answer(fresh, capsys, monkeypatch, prog):
    monkeypatch.setenv(cli_schema.SCHEMA_ENV, "off")  # the full parser
    for argv in ANSWERED:
        fast = cli_schema.precheck(argv, prog, fresh["schema"])
        code, full = _full(capsys, argv, prog)
        assert code == cli.EXIT_USAGE and fast == full, argv
        assert full.startswith("error: ") and f"{prog} {argv[0]} --help lists every option" in full
    for argv in DEFERRED if prog == "vss-lightning" else []:
        assert cli_schema.precheck(argv, prog, fresh["schema"]) is None, argv
        assert _full(capsys, argv, prog)[0] == cli.EXIT_USAGE, argv
    for argv in (["predict", "--output_dir", "x", "--data.shards", "s"], ["predict", "--help"], ["fit"]):
        assert cli_schema.precheck(argv, prog, fresh["schema"]) is None  # nothing to refuse here


def test_the_fast_path_and_the_full_parser_share_one_did_you_mean(fresh):
    from vss_lightning import lightning_cli

    assert lightning_cli.did_you_mean is cli_schema.did_you_mean
    assert lightning_cli.unknown_init_arg is cli_schema.unknown_init_arg
    known = set(fresh["schema"]["known_sets"][0])
    expected = {
        "unrecognized arguments: --outptu_dir x --model.label_mod y": " Did you mean `--output_dir`?",
        "unrecognized arguments: --zzzz": "",
        "Parser key \"model.segmenter\":\n  Problem with given class_path 'x':\n"
        "    Parser key \"modulation\":\n      Option 'strenght' is not accepted":
            " Did you mean `--model.segmenter.init_args.modulation.strength`?",
        "Key 'model.label_mod' is not expected": " Did you mean `--model.label_mode`?",
    }  # fmt: skip
    for message, suggestion in expected.items():
        assert cli_schema.did_you_mean(message, known) == suggestion, message


def test_print_config_from_the_snapshot_is_the_full_parsers_byte_for_byte(fresh, monkeypatch):
    """Every config (each subcommand) and overrides of a nested int, a float, a list, a Literal, null, a
    flag, a backbone class switch with its init_args, an overlay config: the snapshot prints exactly
    what the full parser printed; what it cannot apply for sure is left to the full parser."""
    schema = fresh["schema"]
    for argv in fresh["cases"]["fast"]:
        code, out, err = fresh["print_config"][tuple(argv)]
        assert code == 0 and err == "", (argv, err)
        for prog in cli_schema.PROGS:
            assert cli_schema.print_config(argv, prog, schema) == out, argv
    for argv in fresh["cases"]["deferred"]:
        assert cli_schema.print_config(argv, "vss-lightning", schema) is None, argv
    codes = [fresh["print_config"][tuple(argv)][0] for argv in fresh["cases"]["deferred"]]
    assert codes == [0, 0, 0, 2, 2, 0, 2, 0]  # refused values: the full parser's error
    argv = fresh["cases"]["fast"][0]
    monkeypatch.setenv("JSONARGPARSE_DEFAULT_ENV", "true")  # defaults from the environment
    assert cli_schema.print_config(argv, "vss-lightning", schema) is None
    monkeypatch.delenv("JSONARGPARSE_DEFAULT_ENV")
    assert cli_schema.print_config(argv, "vss-lightning", schema) is not None
    for other in (["predict", "--config", SMOKE, "--print_config", "--help"], ["--print_config"], argv[:-1]):
        assert cli_schema.print_config(other, "vss-lightning", schema) is None


def test_print_config_imports_no_heavy_library(fresh, tmp_path):
    fast = fresh["cases"]["fast"]
    calls = [["vss-lightning", fast[0]], ["lightning", fast[-3]], ["vss-lightning", fast[-1]]]
    answer = _probe(fresh, tmp_path, calls)
    assert answer["heavy"] == []
    for (_, argv), (code, out, err) in zip(calls, answer["results"], strict=True):
        assert code == 0 and err == "" and out == fresh["print_config"][tuple(argv)][1], argv


def test_a_refused_value_gets_the_full_parsers_answer(fresh, monkeypatch):
    """Bad values of every kind of key: the snapshot prints exactly the full parser's two lines (the
    first refused value in command-line order), for both scripts; what it cannot decide is left to
    the full parser."""
    monkeypatch.delenv("JSONARGPARSE_DEFAULT_ENV", raising=False)
    schema = fresh["schema"]
    for argv in fresh["values"]["refused"]:
        answers = [("vss-lightning", fresh["print_config"][tuple(argv)])]
        if tuple(argv) in fresh["lightning"]:
            answers.append(("lightning", fresh["lightning"][tuple(argv)]))
        for prog, (code, out, err) in answers:
            assert code == cli.EXIT_USAGE and out == "" and err.startswith("error: "), (prog, argv, err)
            assert cli_schema.value_error(argv, prog, schema) == err, (prog, argv)
            assert cli_schema.precheck(argv, prog, schema) is None  # no misspelled key on these lines
    for argv in fresh["values"]["deferred"]:
        assert cli_schema.value_error(argv, "vss-lightning", schema) is None, argv
    codes = [fresh["print_config"][tuple(argv)][0] for argv in fresh["values"]["deferred"]]
    assert codes == [0, 2, 2, 2, 2, 2, 2, 0]
    refused = fresh["values"]["refused"][1]
    for argv in ([*refused, "--print_config"], [*refused, "--help"], ["fit", *refused[1:]]):
        assert cli_schema.value_error(argv, "vss-lightning", schema) is None  # help, print_config: not here
    monkeypatch.setenv("JSONARGPARSE_DEFAULT_ENV", "true")
    assert cli_schema.value_error(refused, "vss-lightning", schema) is None


def test_help_after_config_files_is_the_plain_help(fresh):
    """`SUB --config FILE [overrides] --help` prints SUB's help (config values are not shown as
    defaults): answered from the snapshot once every config file and override applies for sure."""
    helps = fresh["schema"]["progs"]["vss-lightning"]["help"]
    for argv, (code, out) in zip(HELP_CASES, fresh["helps"], strict=True):
        assert code in (0, None) and out == "\n".join(helps[argv[0]]), argv
        assert cli_schema.lookup_help(argv, "vss-lightning", 100, fresh["schema"]) == out, argv
    for argv in (
        ["predict", "--config", SMOKE, "--model.label_mode", "clusters", "--help"],  # an error first
        ["predict", "--config", "/nonexistent/config.yaml", "--help"],
        [*fresh["values"]["deferred"][5][:3], "--help"],  # a config file that is not YAML
        ["predict", "--config", SMOKE, "--print_config", "--help"],
        ["predict", "--config", SMOKE, "--trainer.devices", "x", "--help"],  # not applied for sure
    ):
        assert cli_schema.lookup_help(argv, "vss-lightning", 100, fresh["schema"]) is None, argv


def test_a_refused_value_and_help_after_a_config_import_no_heavy_library(fresh, tmp_path):
    refused = fresh["values"]["refused"]
    calls = [["vss-lightning", refused[0]], ["lightning", refused[10]], ["vss-lightning", HELP_CASES[1]]]
    answer = _probe(fresh, tmp_path, calls)
    assert answer["heavy"] == []
    (code0, out0, err0), (code1, out1, err1), (code2, out2, err2) = answer["results"]
    assert (code0, out0, err0) == (cli.EXIT_USAGE, "", fresh["print_config"][tuple(refused[0])][2])
    assert (code1, out1, err1) == (cli.EXIT_USAGE, "", fresh["lightning"][tuple(refused[10])][2])
    assert (code2, out2, err2) == (0, fresh["helps"][1][1], "")


def test_the_seed_everything_variables_do_not_turn_the_fast_print_config_off(monkeypatch):
    """`seed_everything` (an earlier run in the process) sets PL_GLOBAL_SEED and PL_SEED_WORKERS; they do
    not shape the parser, so `--print_config` still answers from the snapshot; other PL_* variables defer."""
    schema = cli_schema.load_schema()
    if schema is None:
        pytest.skip("the committed snapshot does not match this installation")
    argv = ["predict", "--config", str(CONFIGS / "camvid.yaml"), "--print_config"]
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    monkeypatch.setenv("PL_SEED_WORKERS", "0")
    assert cli_schema.print_config(argv, "vss-lightning", schema) is not None
    monkeypatch.setenv("PL_TRAINER_ACCELERATOR", "cpu")
    assert cli_schema.print_config(argv, "vss-lightning", schema) is None
