#!/usr/bin/env bash
# `slotforge test` numbers: the example's upgrade matrix (examples/demo/upgrades.yaml: 3 paths,
# 7 steps) run with --jobs 1 and then --jobs 2, builds cached by the first run; time per boot
# and per step kind. Rewrites the `matrix` section of docs/benchmarks.md.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
[ -f out/demo-work/images/base/index.json ] || bash examples/demo/build.sh >/dev/null
j1=$(mktemp); j2=$(mktemp)
only=(--only "upgrade*" --only "power-cut*" --only "rollback*")   # crash: bench/crash-states.sh
bash examples/demo/test.sh "${only[@]}" --jobs 1 --json > "$j1" 2>/dev/null || true
bash examples/demo/test.sh "${only[@]}" --jobs 2 --json > "$j2" 2>/dev/null || true
python3 - "$j1" "$j2" <<'PY' | python3 "$repo/bench/section.py" matrix
import json, sys, datetime, os
r1, r2 = (json.load(open(p)) for p in sys.argv[1:3])
print("## Upgrade matrix: `slotforge test`\n")
print(f"Run on {datetime.date.today()}, {os.cpu_count()} cores, accelerator **{r1['accel']}**: `bash bench/matrix.sh`, the")
print("example's matrix (examples/demo/upgrades.yaml) after `examples/demo/build.sh`. Seconds per step include")
print("building the variant's disk or bundle the first time a path needs it (`--jobs 1` run first).\n")
print("| path | step | result | boots | seconds (--jobs 1) | s/boot |")
print("|---|---|---|---|---|---|")
for s in r1["steps"]:
    print(f"| {s['path']} | {s['label']} | {s['result']} | {s['boots']} | {s['seconds']:.1f} | {s['seconds']/max(s['boots'],1):.1f} |")
boots = sum(s["boots"] for s in r1["steps"])
print(f"\nWhole matrix: **{r1['seconds']:.0f} s with `--jobs 1`** ({boots} boots, {r1['passed']} passed, {r1['failed']} failed), "
      f"**{r2['seconds']:.0f} s with `--jobs 2`** ({r2['passed']} passed, {r2['failed']} failed; two TCG guests on {os.cpu_count()} cores).")
PY
rm -f "$j1" "$j2"
echo "updated docs/benchmarks.md (section matrix)"
