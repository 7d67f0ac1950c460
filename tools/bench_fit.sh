#!/usr/bin/env bash
# Whole-process speed of two or more vramplan builds, side by side in one run:
#   tools/bench_fit.sh BASE_BINARY NEW_BINARY [MORE_BINARIES...] [RUNS] [-- COMMAND ARGS...]
# Runs the binaries in turn, RUNS rounds (default 20), on the command (default: the fit
# of docs/performance.md, "planner speed"), and prints each one's median wall time and
# median peak RSS, and their ratios to the first (BASE). Wall time includes process start;
# RSS is GNU time's maximum resident set size; the load average is printed before and
# after. Then, for a `fit` command, checks that each binary gives the same answer as BASE
# on every request of tools/fit_cases.txt (the whole `--json` output and the full table).
set -euo pipefail
usage="usage: tools/bench_fit.sh BASE_BINARY NEW_BINARY [MORE_BINARIES...] [RUNS] [-- ARGS...]"
bins=()
while [[ $# -gt 0 && $1 != -- && ! $1 =~ ^[0-9]+$ ]]; do bins+=("$1"); shift; done
[[ ${#bins[@]} -ge 2 ]] || { echo "$usage" >&2; exit 2; }
runs=20
if [[ $# -gt 0 && $1 != -- ]]; then runs=$1; shift; fi
[[ $# -gt 0 && $1 == -- ]] && shift
args=("$@")
[[ ${#args[@]} -eq 0 ]] && args=(fit --gpu h100-80gb --model smollm2-1.7b --seq-len 2048 --global-batch 64)
cases=$(dirname "$0")/fit_cases.txt
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

one() { # binary, label: appends "seconds kib" to $tmp/label
    local start end
    start=$EPOCHREALTIME
    /usr/bin/time -f %M -o "$tmp/rss" "$1" "${args[@]}" >/dev/null
    end=$EPOCHREALTIME
    echo "$(echo "$end - $start" | bc -l) $(cat "$tmp/rss")" >>"$tmp/$2"
}
median() { # column of a file
    sort -g -k"$2" "$1" | awk -v c="$2" '{ v[NR] = $c } END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; print m }'
}
load() { cut -d' ' -f1-3 /proc/loadavg; }
echo "load average before: $(load)"
for _ in $(seq "$runs"); do
    for i in "${!bins[@]}"; do one "${bins[$i]}" "t$i"; done
done
echo "load average after:  $(load)"
echo "command: vramplan ${args[*]}"
bt=$(median "$tmp/t0" 1) br=$(median "$tmp/t0" 2)
for i in "${!bins[@]}"; do
    t=$(median "$tmp/t$i" 1) r=$(median "$tmp/t$i" 2)
    printf '%d %s: median %.1f ms, peak RSS %.1f MiB (%d runs); %.3f × the time, %.3f × the memory of binary 0\n' \
        "$i" "$(basename "${bins[$i]}")" "$(echo "$t * 1000" | bc -l)" "$(echo "$r / 1024" | bc -l)" "$runs" \
        "$(echo "$t / $bt" | bc -l)" "$(echo "$r / $br" | bc -l)"
done
[[ ${args[0]} == fit ]] || exit 0

# The same answer: the best candidate with its report and the plan written (`--json`); and
# whether the rest of the output (every candidate, the full table) is the same too.
best_differ=0
base=${bins[0]}
for new in "${bins[@]:1}"; do
while read -r line; do
    [[ -z $line || $line == \#* ]] && continue
    read -ra a <<<"$line"
    "$base" fit "${a[@]}" --json >"$tmp/b.json" 2>&1 || true
    "$new" fit "${a[@]}" --json >"$tmp/n.json" 2>&1 || true
    "$base" fit "${a[@]}" --top 1000 >"$tmp/b.txt" 2>&1 || true
    "$new" fit "${a[@]}" --top 1000 >"$tmp/n.txt" 2>&1 || true
    verdict=$(python3 - "$tmp" <<'PY'
import json, sys
t = sys.argv[1]
try:
    b, n = (json.load(open(f"{t}/{x}.json")) for x in "bn")
except ValueError:
    print("same" if open(f"{t}/b.json").read() == open(f"{t}/n.json").read() else "BEST DIFFERS")
    sys.exit()
same = b["best"] == n["best"] and b["plan_toml"] == n["plan_toml"]
rest = b == n and open(f"{t}/b.txt").read() == open(f"{t}/n.txt").read()
print(("same" if same else "BEST DIFFERS") + ("" if rest else f"; candidates {len(b['candidates'])} -> {len(n['candidates'])}, tables differ"))
PY
)
    [[ $verdict == BEST* ]] && best_differ=$((best_differ + 1))
    echo "$(basename "$new") vs $(basename "$base"): $verdict: fit $line"
done <"$cases"
done
echo "requests whose best differs: $best_differ"
