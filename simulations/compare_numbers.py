#!/usr/bin/env python3
"""Compare the numbers of two `reproduce_numbers.sh` output folders, round by round, exactly.

Why: a refactoring must not change any number. Same config + same seed must give bit-identical
test accuracy, test loss, training loss, client counts and bytes in every round, and the same
final model; only timings (``seconds_*``) may differ. This reads each run's ``metrics.jsonl``
(one JSON row per round) in BEFORE_DIR and AFTER_DIR, prints a table and exits 1 if any
compared value differs (or a run is missing on one side), 0 if all are equal.

    python simulations/compare_numbers.py BEFORE_DIR AFTER_DIR
    python simulations/compare_numbers.py OUTDIR          # only print one folder's numbers

Each folder holds one subfolder per run label (``quickstart``, ``aligned``, ``pfnm``, ``fedma``),
each holding exactly one run folder (``<name>-<timestamp>/``). Other per-round keys that differ
(``bytes_by_phase``, the strategies' extra info; Ray node ids always differ) and changed lines of
the resolved ``config.yaml`` (a new option with a default shows there) are listed as notes and
do not fail the comparison; timings nested in them are ignored.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

# Compared exactly; a difference in any of them fails the comparison.
EXACT_KEYS = (
    "test_accuracy",
    "test_loss",
    "val_accuracy",
    "train_loss",
    "clients_sampled",
    "clients_ok",
    "clients_failed",
    "bytes_down",
    "bytes_up",
)
# Neither compared nor noted: timings and Ray's random node ids.
IGNORED_KEYS = ("ray_nodes",)
MODEL_FILE = "model.safetensors"


def is_timing(key: str) -> bool:
    return key.startswith("seconds") or key.endswith("_seconds") or key == "seconds"


def strip_timings(value: Any) -> Any:
    """``value`` without timing entries at any depth (they legitimately differ)."""
    if isinstance(value, dict):
        return {k: strip_timings(v) for k, v in value.items() if not is_timing(str(k))}
    if isinstance(value, list):
        return [strip_timings(v) for v in value]
    return value


def run_folder(parent: Path) -> Path:
    """The single run folder (the one holding metrics.jsonl) under a label's folder."""
    found = sorted(p.parent for p in parent.glob("*/metrics.jsonl"))
    if len(found) != 1:
        raise SystemExit(
            f"{parent}: expected one run folder with metrics.jsonl, found {len(found)}"
        )
    return found[0]


def read_rows(run_dir: Path) -> dict[int, dict[str, Any]]:
    rows: dict[int, dict[str, Any]] = {}
    path = run_dir / "metrics.jsonl"
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise SystemExit(f"{path}:{number}: not a JSON line") from None
            rows[int(row["round"])] = row
    return rows


def labels(folder: Path) -> list[str]:
    """Run labels in ``folder``: subfolders that hold a run folder."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and any(p.glob("*/metrics.jsonl")))


def model_digest(run_dir: Path) -> str | None:
    path = run_dir / MODEL_FILE
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def config_diff(run_b: Path, run_a: Path, limit: int = 12) -> list[str]:
    """Changed lines of the two runs' resolved config.yaml (empty if equal or missing)."""
    files = [run / "config.yaml" for run in (run_b, run_a)]
    if not all(f.is_file() for f in files):
        return []
    lines = [f.read_text().splitlines() for f in files]
    diff = [
        d
        for d in difflib.unified_diff(*lines, "before", "after", n=0, lineterm="")
        if d[:1] in "+-" and not d.startswith(("+++", "---"))
    ]
    return diff[:limit] + ([f"... {len(diff) - limit} more"] if len(diff) > limit else [])


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6f}"
    return str(value)


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    for line in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())


def show(folder: Path) -> int:
    """Print one output folder's numbers per run and round."""
    table = []
    for label in labels(folder):
        for rnd, row in sorted(read_rows(run_folder(folder / label)).items()):
            table.append(
                [
                    label,
                    str(rnd),
                    fmt(row.get("test_accuracy")),
                    fmt(row.get("test_loss")),
                    fmt(row.get("train_loss")),
                    fmt(row.get("clients_ok")),
                    str(int(row.get("bytes_down", 0)) + int(row.get("bytes_up", 0))),
                ]
            )
    print_table(
        ["run", "round", "test acc", "test loss", "train loss", "clients ok", "bytes"], table
    )
    return 0


def compare(before: Path, after: Path) -> int:
    """Print the round-by-round comparison; the number of differing rounds and runs."""
    table: list[list[str]] = []
    details: list[str] = []
    notes: list[str] = []
    bad = 0
    all_labels = sorted(set(labels(before)) | set(labels(after)))
    if not all_labels:
        raise SystemExit(f"no run folders (*/*/metrics.jsonl) in {before} or {after}")
    for label in all_labels:
        missing = [
            side
            for side, folder in (("BEFORE", before), ("AFTER", after))
            if label not in labels(folder)
        ]
        if missing:
            table.append([label, "-", "", "", "", "", f"NO: missing in {' and '.join(missing)}"])
            bad += 1
            continue
        run_b, run_a = run_folder(before / label), run_folder(after / label)
        rows_b, rows_a = read_rows(run_b), read_rows(run_a)
        for rnd in sorted(set(rows_b) | set(rows_a)):
            b, a = rows_b.get(rnd), rows_a.get(rnd)
            if b is None or a is None:
                side = "BEFORE" if b is None else "AFTER"
                table.append(
                    [
                        label,
                        str(rnd),
                        fmt((b or {}).get("test_accuracy")),
                        fmt((a or {}).get("test_accuracy")),
                        fmt((b or {}).get("test_loss")),
                        fmt((a or {}).get("test_loss")),
                        f"NO: round missing in {side}",
                    ]
                )
                bad += 1
                continue
            differing = [k for k in EXACT_KEYS if b.get(k) != a.get(k)]
            if differing:
                bad += 1
                for k in differing:
                    details.append(
                        f"{label} round {rnd} {k}: before {b.get(k)!r}, after {a.get(k)!r}"
                    )
            other = sorted((set(b) | set(a)) - set(EXACT_KEYS) - set(IGNORED_KEYS) - {"round"})
            for k in other:
                if not is_timing(k) and strip_timings(b.get(k)) != strip_timings(a.get(k)):
                    notes.append(
                        f"{label} round {rnd} {k}: before {json.dumps(b.get(k))}, "
                        f"after {json.dumps(a.get(k))}"
                    )
            table.append(
                [
                    label,
                    str(rnd),
                    fmt(b.get("test_accuracy")),
                    fmt(a.get("test_accuracy")),
                    fmt(b.get("test_loss")),
                    fmt(a.get("test_loss")),
                    "yes" if not differing else "NO: " + ", ".join(differing),
                ]
            )
        changed = config_diff(run_b, run_a)
        if changed:
            notes.append(f"{label}: resolved config.yaml differs: " + "; ".join(changed))
        digest_b, digest_a = model_digest(run_b), model_digest(run_a)
        if digest_b is None or digest_a is None:
            notes.append(f"{label}: {MODEL_FILE} missing on one side, final models not compared")
        elif digest_b != digest_a:
            bad += 1
            table.append([label, "model", "", "", "", "", f"NO: final {MODEL_FILE} differs"])
        else:
            table.append([label, "model", "", "", "", "", f"yes: final {MODEL_FILE} identical"])
    print_table(
        ["run", "round", "before acc", "after acc", "before loss", "after loss", "equal?"], table
    )
    if details:
        print("\nDifferences (exact values):")
        print("\n".join(f"  {d}" for d in details))
    if notes:
        print("\nNotes (not counted):")
        print("\n".join(f"  {n}" for n in notes))
    print(f"\n{'ALL EQUAL' if not bad else f'{bad} DIFFERENCE(S)'}: {before} vs {after}")
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path, help="output folder of reproduce_numbers.sh (before)")
    parser.add_argument(
        "after",
        type=Path,
        nargs="?",
        help="output folder of reproduce_numbers.sh (after); omit to only show",
    )
    args = parser.parse_args(argv)
    for folder in (args.before, args.after):
        if folder is not None and not folder.is_dir():
            parser.error(f"{folder} is not a folder")
    if args.after is None:
        return show(args.before)
    return 1 if compare(args.before, args.after) else 0


if __name__ == "__main__":
    sys.exit(main())
