"""The held-out PFNM rows of docs/fidelity.md (issue 27, eighth session), from the files here.

Per row: the reference's run (its sweep seed = the client-set seed), fedalign's default pick
before d568e23 (the fifth and sixth sessions' files: 4 sweep orders, seed + 0..3) and after it
(this folder). "yes": at least the reference's test accuracy at no more width in any layer.
Run from the repository root: python docs/results/pfnm_cap_s8/compare.py
"""

import json
from pathlib import Path

EARLIER = Path("docs/results/pfnm_cap")
HERE = Path(__file__).parent
ROWS = [(3, 10), (4, 20), (5, 30), (6, 10), (7, 20), (8, 30)]
ROWS += [(9, 10), (10, 20), (11, 30), (12, 10), (13, 20), (14, 30)]


def pick(path: Path, side: str, sweep_seeds: set[int] | None = None) -> dict:
    """The side's pick in a pfnm_reference.py file, or the best training accuracy among the
    candidates of the given sweep seeds (the pick 4 orders would have made)."""
    result = json.loads(path.read_text())
    if sweep_seeds is None:
        return next(p for p in result["picks"] if p["side"] == side)
    rows = [r for r in result["rows"] if r["side"] == side and r["sweep_seed"] in sweep_seeds]
    return max(rows, key=lambda r: r["train"])


def fmt(p: dict) -> str:
    return f"{p['test']:.4f} ({' / '.join(map(str, p['widths']))})"


def cell(p: dict, reference: dict) -> str:
    meets = p["test"] >= reference["test"] and all(
        a <= b for a, b in zip(p["widths"], reference["widths"])
    )
    return fmt(p) + (" **yes**" if meets else "")


def main() -> None:
    print("| hidden | seed | J | reference | fedalign before | fedalign after | after - ref |")
    print("|---|---|---|---|---|---|---|")
    for hidden in ("h50", "h50-50"):
        for seed, J in ROWS:
            stem = f"{hidden}-s{seed}-J{J}"
            if seed <= 8:
                reference = pick(EARLIER / f"heldout-{stem}.json", "reference")
                before = pick(EARLIER / f"heldout-{stem}-orders4.json", "fedalign")
            else:
                reference = pick(EARLIER / f"heldout2-{stem}.json", "reference")
                orders = set(range(seed, seed + 4))
                before = pick(EARLIER / f"heldout2-{stem}-orders8-off0.json", "fedalign", orders)
            after = pick(HERE / f"{stem}-orders4.json", "fedalign")
            cells = [cell(p, reference) for p in (before, after)]
            gap = 100 * (after["test"] - reference["test"])
            row = [hidden[1:], str(seed), str(J), fmt(reference)]
            print("| " + " | ".join(row + cells + [f"{gap:+.2f}"]) + " |")


if __name__ == "__main__":
    main()
