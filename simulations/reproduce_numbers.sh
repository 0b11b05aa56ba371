#!/usr/bin/env bash
# Same config + same seed must give the same numbers, before and after a refactoring.
#
# Usage: simulations/reproduce_numbers.sh CHECKOUT OUTDIR
#
# Runs four short simulations with the code of CHECKOUT (a checkout of this repository, e.g. a
# git worktree of the commit before a redesign, or the current tree) and that checkout's configs:
#
#   quickstart  configs/quickstart.yaml, FedAvg, 3 rounds
#   aligned     configs/fmnist_mlp_aligned.yaml, align/fuse/repair pipeline, 2 rounds
#   pfnm        configs/quickstart.yaml as PFNM on an MLP 784-100-10, 2 rounds
#   fedma       configs/fmnist_lenet_fedma.yaml, 1 FedMA round (5 communication rounds),
#               5 of the 10 clients, 1 local epoch
#
# Each run goes to OUTDIR/<label>/<name>-<timestamp>/ (metrics.jsonl, summary.json, model...),
# its output to OUTDIR/<label>.log, its wall time to OUTDIR/timings.tsv, and what was run to
# OUTDIR/provenance.txt. The overrides below are the same for every checkout: change them only
# together with both sides' numbers. Compare two OUTDIRs with
#   simulations/compare_numbers.py BEFORE_OUTDIR AFTER_OUTDIR
#
# Python: $PYTHON, else the .venv beside this script's repository. PYTHONPATH=CHECKOUT makes
# the driver and the Ray workers import CHECKOUT's fedalign rather than the venv's editable one;
# the script checks that before it runs anything. RAY_ADDRESS is unset so that Ray starts locally.
# Needs Fashion-MNIST (`make data` installs Debian's dataset-fashion-mnist). Each run takes under
# a minute (fedma: about 2) on 2 cores. Exit status: 0 if all four runs finished, 1 if one failed,
# 2 for a usage error.
set -euo pipefail

usage() {
    echo "usage: $0 CHECKOUT OUTDIR" >&2
    exit 2
}
[[ $# -eq 2 ]] || usage
[[ -d "$1/fedalign" && -d "$1/configs" ]] || { echo "$1: not a fedalign checkout" >&2; exit 2; }

CHECKOUT=$(cd "$1" && pwd)
mkdir -p "$2"
OUT=$(cd "$2" && pwd)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PY=${PYTHON:-$(cd "$HERE/.." && pwd)/.venv/bin/python}
[[ -x "$PY" ]] || { echo "no python at $PY (set PYTHON)" >&2; exit 2; }

LABELS=(quickstart aligned pfnm fedma)
for label in "${LABELS[@]}"; do
    if [[ -e "$OUT/$label" ]]; then
        echo "$OUT/$label exists: use a new OUTDIR (or remove it) so each label has one run" >&2
        exit 2
    fi
done

export FLWR_TELEMETRY_ENABLED=0 RAY_USAGE_STATS_ENABLED=0 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
export PYTHONPATH="$CHECKOUT" PYTHONHASHSEED=0
unset RAY_ADDRESS

imported=$(cd "$CHECKOUT" \
    && "$PY" -c 'import fedalign, os; print(os.path.realpath(fedalign.__file__))')
if [[ "$imported" != "$(realpath "$CHECKOUT")/fedalign/__init__.py" ]]; then
    echo "python imports fedalign from $imported, not from $CHECKOUT" >&2
    exit 2
fi

{
    echo "checkout: $CHECKOUT"
    echo "commit: $(git -C "$CHECKOUT" rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "uncommitted changes: $(git -C "$CHECKOUT" status --porcelain 2>/dev/null | wc -l) paths"
    echo "python: $PY ($("$PY" --version 2>&1))"
    echo "fedalign imported from: $imported"
    echo "torch: $("$PY" -c 'import torch; print(torch.__version__)')"
    echo "host: $(hostname), $(nproc) cores"
    echo "started: $(date -Is)"
    echo "configs (sha256):"
    (cd "$CHECKOUT" && sha256sum configs/quickstart.yaml configs/fmnist_mlp_aligned.yaml \
        configs/fmnist_lenet_fedma.yaml | sed 's/^/  /')
} >"$OUT/provenance.txt"
printf 'label\tseconds\texit\n' >"$OUT/timings.tsv"

failed=0

# run_one LABEL CONFIG [KEY=VALUE ...]: one `fedalign run` from inside the checkout.
run_one() {
    local label=$1 config=$2
    shift 2
    local sets=() kv start end secs rc=0
    for kv in "$@"; do
        sets+=(--set "$kv")
    done
    echo "== $label: fedalign run $config ${sets[*]}" | tee -a "$OUT/provenance.txt"
    start=$(date +%s.%N)
    (cd "$CHECKOUT" && "$PY" -m fedalign.cli run "$config" --output "$OUT/$label" --no-progress \
        "${sets[@]}") >"$OUT/$label.log" 2>&1 || rc=$?
    end=$(date +%s.%N)
    secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
    printf '%s\t%s\t%s\n' "$label" "$secs" "$rc" >>"$OUT/timings.tsv"
    if [[ $rc -ne 0 ]]; then
        echo "   FAILED (exit $rc) after ${secs}s; last lines of $OUT/$label.log:"
        tail -n 20 "$OUT/$label.log" | sed 's/^/   | /'
        failed=1
    else
        echo "   ${secs}s; $(grep -E '^(final test accuracy|run folder)' "$OUT/$label.log" \
            | paste -sd ';' -)"
    fi
}

run_one quickstart configs/quickstart.yaml strategy.rounds=3
run_one aligned configs/fmnist_mlp_aligned.yaml strategy.rounds=2
run_one pfnm configs/quickstart.yaml name=quickstart-pfnm strategy.name=pfnm strategy.rounds=2 \
    'model.hidden=[100]'
run_one fedma configs/fmnist_lenet_fedma.yaml strategy.rounds=1 strategy.fraction_train=0.5 \
    train.local_epochs=1

echo "finished: $(date -Is)" >>"$OUT/provenance.txt"
echo
"$PY" "$HERE/compare_numbers.py" "$OUT" || failed=1
exit $failed
