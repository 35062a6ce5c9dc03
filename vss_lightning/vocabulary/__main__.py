"""`python -m vss_lightning.vocabulary fit|apply|name`: fit a corpus vocabulary, relabel a corpus with
it, or name its classes from the labels' class scores."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from .apply import apply_vocabulary
from .fit import fit_vocabulary
from .name import name_vocabulary


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vss_lightning.vocabulary", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="cluster the prototypes of labelled output folders into global classes")
    fit.add_argument(
        "--labels", nargs="+", required=True, help="output folders of `predict` (png or label shards)"
    )
    fit.add_argument("--num_classes", type=int, required=True, help="G, the number of global classes")
    fit.add_argument("--out", required=True, help="vocabulary folder to write")
    fit.add_argument(
        "--shards", nargs="+", default=None, help="the corpus's input shards: real frames on the naming sheet"
    )
    fit.add_argument(
        "--wandb_project", default=None, help="also log the naming sheet as a W&B table to this project"
    )
    fit.add_argument("--seed", type=int, default=0, help="seed of the sample and the k-means++ draws")
    fit.add_argument("--passes", type=int, default=10, help="most Lloyd passes over the whole corpus")
    fit.add_argument("--sample_size", type=int, default=200_000, help="prototypes the initialisation uses")
    apply = sub.add_parser("apply", help="rewrite a labelled output folder in global class ids")
    apply.add_argument("--labels", required=True, help="output folder of `predict` (png or label shards)")
    apply.add_argument("--vocab", required=True, help="vocabulary folder made by `fit`")
    apply.add_argument("--out", required=True, help="new output folder for the global-id labels")
    apply.add_argument(
        "--output_format",
        choices=("png", "shards"),
        default=None,
        help="png folders or label shards (default: the format of --labels; png when it holds both)",
    )
    name = sub.add_parser("name", help="name a vocabulary's classes from the labels' class scores")
    name.add_argument(
        "--labels", nargs="+", required=True, help="output folders of `predict --model.class_names`"
    )
    name.add_argument("--vocab", required=True, help="vocabulary folder made by `fit`")
    name.add_argument("--out", default=None, help="names.yaml to write (default: VOCAB/names.yaml)")
    name.add_argument(
        "--normalize",
        choices=("video", "frame", "none"),
        default="video",
        help="as the run's naming.normalize",
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "fit":
            record = fit_vocabulary(
                args.labels, args.num_classes, args.out, seed=args.seed, passes=args.passes,
                sample_size=args.sample_size, shards=args.shards, wandb_project=args.wandb_project,
            )  # fmt: skip
            print(json.dumps({k: v for k, v in record.items() if k != "classes"}, indent=2))
        elif args.command == "name":
            named = name_vocabulary(args.labels, args.vocab, args.out, args.normalize)
            print(json.dumps({"named": len(named), "names": args.out or f"{args.vocab}/names.yaml"}))
        else:
            summary = apply_vocabulary(args.labels, args.vocab, args.out, args.output_format)
            print(json.dumps({"written": len(summary.written), "skipped": len(summary.skipped)}))
    except (ValueError, OSError) as e:
        parser.exit(2 if isinstance(e, ValueError) else 1, f"error: {e}\n")


if __name__ == "__main__":
    main()
