#!/usr/bin/env bash
# Run the example's upgrade matrix (examples/demo/upgrades.yaml) with `slotforge test`: each
# path installs 0.1.0 on a fresh virtual disk, boots it under QEMU and upgrades it; prints the
# table and writes out/demo-test.xml (JUnit). Needs examples/demo/build.sh to have run.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
work="$repo/out/demo-work"
[ -d "$work/images/base" ] || { echo "run examples/demo/build.sh first" >&2; exit 1; }
cp "$here/system.yml" "$here/system-v2.yml" "$here/upgrades.yaml" "$work/"
"$repo/target/release/slotforge" test "$work/upgrades.yaml" --junit "$repo/out/demo-test.xml" --keep "$repo/out/demo-test" "$@"
