"""``fedalign run | bench | report | config | merge | pretrain | partition | data prepare``:
the command line.

``--plugin FILE.py`` runs a Python file the user chose before the config is read, so the models,
datasets and rules it registers can be named in the config (a config itself never names code).
The simulation modules (Flower, Ray) are imported only by the commands that simulate.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
from pathlib import Path

import numpy as np

from fedalign.config.bundled import resolve_config
from fedalign.config.load import apply_overrides, from_dict, load_config, parse_override, to_yaml
from fedalign.core.errors import ConfigError, RoundFailedError, RunFolderError, RunInterrupted
from fedalign.core.plugins import load_plugin
from fedalign.data import DataError, format_histogram
from fedalign.report.results import markdown_table, plot_runs, read_json, read_rows
from fedalign.runs.checkpoint import CheckpointError
from fedalign.runs.interrupts import EXIT_CODES, exit_now, resume_advice

EXIT_USAGE = 2


def _load_plugins(args: argparse.Namespace) -> None:
    for path in args.plugin:
        load_plugin(path)


def _show_bar(args: argparse.Namespace) -> bool:
    """A progress bar on a terminal only: in a log file (nohup, Slurm, CI) its redraws are noise,
    and the one line per round says everything it does."""
    return not args.no_progress and sys.stderr.isatty()


def _cmd_run(args: argparse.Namespace) -> int:
    _load_plugins(args)
    if args.resume:
        if args.config or args.set:
            raise ConfigError(
                "--resume RUN_DIR continues a run with its own config.yaml; give no CONFIG or --set"
            )
        cfg = load_config(Path(args.resume) / "config.yaml")
    elif not args.config:
        raise ConfigError("give a CONFIG file (or --resume RUN_DIR)")
    else:
        cfg = load_config(args.config, args.set)
    from fedalign.runs.runner import run

    outcome = run(
        cfg,
        output_dir=args.output,
        verbose=args.verbose,
        progress=_show_bar(args),
        resume_dir=args.resume,
    )
    s = outcome.summary
    if outcome.already_finished:
        print(
            f"fedalign: {outcome.run_dir} already finished all {s.get('rounds')} rounds; "
            "nothing to resume",
            file=sys.stderr,
        )
    if "final_accuracy" in s:
        print(
            f"final test accuracy: {100 * s['final_accuracy']:.2f}% "
            f"(best {100 * s['best_accuracy']:.2f}% at round {s['best_round']}), "
            f"{s['bytes_total'] / 2**20:.1f} MiB communicated, {s['wall_seconds']:.1f} s"
        )
    print(f"run folder: {outcome.run_dir}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    runs = {}
    for run_dir in args.runs:
        path = Path(run_dir)
        label = path.name if path.name not in runs else str(path)  # same name, other folder
        runs[label] = read_rows(path)
    table = markdown_table(runs)
    print(table, end="")
    if args.out:
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out}: is a file; give a folder for report.md and the plot")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file of that name, a read-only or full disk
            raise ConfigError(
                f"--out {out}: cannot make the report folder ({exc.strerror})"
            ) from None
        (out / "report.md").write_text(table)
        plot_runs(runs, out / "comparison.png")
        print(f"wrote {out / 'report.md'} and {out / 'comparison.png'}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from fedalign.runs.bench import load_suite, run_suite, summarise_suite

    _load_plugins(args)
    suite = load_suite(resolve_config(args.suite), args.output, args.set, args.seeds, args.baseline)
    if not args.summary_only:
        print(f"suite {suite.name}: {len(suite.runs)} runs into {suite.output}", flush=True)
        run_suite(suite, verbose=args.verbose, progress=_show_bar(args))
    summarise_suite(suite)
    print(f"wrote {suite.output / 'summary.md'}, summary.csv and the accuracy plots")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from fedalign.config.reference import defaults_yaml, json_schema

    _load_plugins(args)
    if args.schema:
        print(json.dumps(json_schema(), indent=2))
    elif args.config:
        print(to_yaml(load_config(args.config, args.set)), end="")
    elif args.set:  # the defaults with these overrides, resolved and validated
        print(to_yaml(from_dict(apply_overrides({}, args.set))), end="")
    else:
        print(defaults_yaml(), end="")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from fedalign.runs.merge import MergeRequest, held_out_accuracies, merge, write_state

    _load_plugins(args)
    steps = {k: getattr(args, k) for k in ("align", "solver", "fuse", "repair")}
    request = MergeRequest(
        paths=args.checkpoints,
        model=args.model,
        model_options=_key_values(args.model_opt, "--model-opt"),
        aggregation={
            **{k: v for k, v in steps.items() if v is not None},
            "options": _key_values(args.opt, "--opt"),
        },
        data=args.data,
        data_dir=args.data_dir,
        samples=args.samples,
        weights=args.weights,
        seed=args.seed,
        out=args.out,
    )
    if args.eval and args.data is None:
        raise ConfigError("--eval needs --data NAME: the dataset whose test split to score")
    state, outcome = merge(request)
    write_state(state, args.out)
    info = outcome.info
    print(
        f"merged {len(args.checkpoints)} checkpoints (align {info['align']}, fuse "
        f"{info['fuse']}, repair {info['repair']}, reference {args.checkpoints[info['reference']]})"
        f" -> {args.out}"
    )
    if args.eval:
        scores = held_out_accuracies(request, state)
        print(f"test accuracy on {args.data}:")
        for label, accuracy in scores.items():
            print(f"  {accuracy:7.2%}  {label}")
    return 0


def _key_values(items: list[str], flag: str) -> dict[str, object]:
    """``["hidden=[200]", "ridge=0.1"]`` -> ``{"hidden": [200], "ridge": 0.1}`` (YAML values)."""
    values = {}
    for text in items:
        path, value = parse_override(text)
        if len(path) != 1:
            raise ConfigError(f"{flag} {text!r}: expected NAME=VALUE")
        values[path[0]] = value
    return values


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from fedalign.runs.pretrain import pretrain, pretrain_config

    _load_plugins(args)
    cfg, init = pretrain_config(args.config, args.set)
    out = args.out or init
    if not out:
        raise ConfigError("give --out FILE.safetensors (the config has no model.init to write)")
    try:
        result = pretrain(
            cfg,
            out,
            fraction=args.fraction,
            epochs=args.epochs,
            outside_federation=args.outside_federation,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    print(
        f"pre-trained {cfg.model.name} on {result.examples} examples of {cfg.data.dataset} for "
        f"{args.epochs} epoch(s): train loss {result.train_loss:.4f}, test loss "
        f"{result.test_loss:.4f}, test accuracy {100 * result.test_accuracy:.2f}% -> {out}"
    )
    return 0


def _cmd_partition(args: argparse.Namespace) -> int:
    path = Path(args.run) / "partition.json"
    summary = read_json(path, "partition.json")
    histogram = summary.get("label_histogram") if isinstance(summary, dict) else None
    try:
        counts = np.asarray(histogram, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        counts = np.zeros(0)
    if counts.ndim != 2 or counts.size == 0 or (counts < 0).any():
        raise RunFolderError(
            f"{path}: no label_histogram (a table of counts, one row per client) in it"
        )
    print(
        f"{summary.get('dataset')} / {summary.get('scheme')} {summary.get('options', {})}, "
        f"seed {summary.get('seed')}"
    )
    print(format_histogram(counts))
    return 0


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from fedalign.data import prepare

    data_dir = prepare(args.name, args.to)
    print(
        f"{args.name}: stored under {args.to}; runs find it with data.data_dir={data_dir} "
        f"or FEDALIGN_DATA_DIR={data_dir}"
    )
    return 0


def _version() -> str:
    """The installed distribution's version (a source tree that is not installed says so)."""
    try:
        return importlib.metadata.version("fedalign")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedalign", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fedalign {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a federated simulation from a YAML config")
    run.add_argument(
        "config", nargs="?", help="path of the YAML config, or a shipped one's name (quickstart)"
    )
    run.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue an interrupted run from its last intact checkpoint",
    )
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config entry, e.g. --set strategy.rounds=5 (repeatable)",
    )
    run.add_argument("--output", help="parent folder of the run folder (default: output.dir)")
    run.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (there is none off a terminal); one line per round still shows",
    )
    run.add_argument("-v", "--verbose", action="store_true", help="show Flower's and Ray's logs")
    run.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="FILE.py",
        help="run this Python file first (it may register models, datasets, rules)",
    )
    run.set_defaults(func=_cmd_run)

    bench = sub.add_parser(
        "bench", help="run a suite (strategies x partitions x seeds) and summarise it"
    )
    bench.add_argument("suite", help="path of the suite YAML, or a shipped one's name")
    bench.add_argument("--output", help="suite folder (default: the suite's output)")
    bench.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config entry in every run (after the suite's own overrides)",
    )
    bench.add_argument(
        "--seeds",
        type=int,
        metavar="N",
        help="run every cell with seeds 0..N-1 instead of the suite's seeds (a suite without: 3)",
    )
    bench.add_argument(
        "--baseline",
        metavar="STRATEGY",
        help="compare every strategy with this one, seed by seed (default: the suite's baseline)",
    )
    bench.add_argument(
        "--summary-only", action="store_true", help="rebuild the summary from finished runs"
    )
    bench.add_argument("--no-progress", action="store_true", help="no progress bars")
    bench.add_argument("-v", "--verbose", action="store_true", help="show Flower's and Ray's logs")
    bench.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="FILE.py",
        help="run this Python file first (it may register models, datasets, rules)",
    )
    bench.set_defaults(func=_cmd_bench)

    report = sub.add_parser("report", help="compare run folders: markdown table and plots")
    report.add_argument("runs", nargs="+", help="run folders")
    report.add_argument("--out", help="folder for report.md and comparison.png")
    report.set_defaults(func=_cmd_report)

    config = sub.add_parser(
        "config",
        help="print the default config with a comment per key, a JSON Schema, or a config resolved",
    )
    config.add_argument("config", nargs="?", help="a YAML config to validate and print resolved")
    config.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config entry"
    )
    shown = config.add_mutually_exclusive_group()
    shown.add_argument(
        "--defaults", action="store_true", help="the full default config, commented (the default)"
    )
    shown.add_argument("--schema", action="store_true", help="a JSON Schema of the config")
    config.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="FILE.py",
        help="run this Python file first (its registered names become choices)",
    )
    config.set_defaults(func=_cmd_config)

    merge = sub.add_parser(
        "merge",
        help="align and fuse saved models (safetensors) with the server's pipeline, offline",
    )
    merge.add_argument("checkpoints", nargs="+", help="two or more .safetensors state dicts")
    merge.add_argument("--model", required=True, help="the registered model they are")
    merge.add_argument(
        "--model-opt", action="append", default=[], metavar="K=V", help="a model option"
    )
    for step in ("align", "solver", "fuse", "repair"):
        merge.add_argument(f"--{step}", help=f"aggregation.{step} (default: the config's)")
    merge.add_argument(
        "--opt", action="append", default=[], metavar="K=V", help="a step's option, e.g. ridge=0.1"
    )
    merge.add_argument("--data", help="dataset for the statistics the steps need")
    merge.add_argument("--data-dir", help="its folder (default: the dataset's)")
    merge.add_argument("--samples", type=int, default=500, help="examples for the statistics")
    merge.add_argument("--weights", type=float, nargs="+", help="one weight per checkpoint")
    merge.add_argument("--seed", type=int, default=0, help="seeds alignment and sampling")
    merge.add_argument("--out", required=True, help="the merged .safetensors file")
    merge.add_argument(
        "--eval",
        action="store_true",
        help="print the test accuracy of each input and of the result on --data",
    )
    merge.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="FILE.py",
        help="run this Python file first (it may register models, datasets, rules)",
    )
    merge.set_defaults(func=_cmd_merge)

    pre = sub.add_parser(
        "pretrain",
        help="train a config's model centrally on part of its data: the base model.init names",
    )
    pre.add_argument("config", help="path of the YAML config, or a shipped one's name")
    pre.add_argument(
        "--out", help="the .safetensors file written (default: the config's model.init)"
    )
    pre.add_argument(
        "--fraction", type=float, default=1.0, help="fraction of the training examples (seeded)"
    )
    pre.add_argument("--epochs", type=int, default=1, help="epochs over them")
    pre.add_argument(
        "--outside-federation",
        action="store_true",
        help="only examples no client of the federation holds (natural partition, other groups)",
    )
    pre.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config entry"
    )
    pre.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="FILE.py",
        help="run this Python file first (it may register models, datasets, rules)",
    )
    pre.set_defaults(func=_cmd_pretrain)

    part = sub.add_parser("partition", help="print a run's per-client label histogram")
    part.add_argument("run", help="run folder")
    part.set_defaults(func=_cmd_partition)

    data = sub.add_parser("data", help="prepare datasets for machines without a network")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prepare = data_sub.add_parser(
        "prepare",
        help="download a hub dataset (cifar10, femnist, shakespeare, hf:<org>/<name>) once "
        "and store it in DIR/NAME",
    )
    prepare.add_argument("name", help="dataset name")
    prepare.add_argument("--to", required=True, metavar="DIR", help="parent folder of the copy")
    prepare.set_defaults(func=_cmd_data_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"fedalign: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, DataError, CheckpointError, RunFolderError) as exc:
        print(f"fedalign: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RoundFailedError as exc:
        advice = resume_advice(exc.run_dir or Path("RUN_DIR"), exc.resumable)
        print(f"fedalign: run stopped: {exc}\nFinished rounds are kept; {advice}.", file=sys.stderr)
        return 1
    except RunInterrupted as exc:
        advice = resume_advice(exc.run_dir or Path("RUN_DIR"), exc.resumable)
        print(f"fedalign: {exc}; {advice}", file=sys.stderr)
        code = EXIT_CODES.get(exc.signal, 130)
        if argv is None:  # the command itself (not a caller in Python): end the process now
            exit_now(code)
        return code
