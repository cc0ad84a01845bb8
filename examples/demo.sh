#!/usr/bin/env bash
# The bundled demo: capture the Conformer reference, then compare ports of it against that capture.
set -uo pipefail
cd "$(dirname "$0")/.."
E=examples/conformer/specs.py
OUT=demo-out
mkdir -p "$OUT"

run() {  # run a compare, show its output, and check its exit code
  local expect=$1; shift
  echo; echo "\$ fxdiff $*"
  fxdiff "$@"
  local rc=$?
  [ "$rc" = "$expect" ] || { echo "demo: expected exit code $expect, got $rc" >&2; exit 1; }
}

echo "\$ fxdiff capture $E:reference --inputs $E:inputs --loss $E:loss -o $OUT/reference"
fxdiff capture $E:reference --inputs $E:inputs --loss $E:loss -o $OUT/reference || exit 1

# Same module names: the faithful port, then a port with a sign error in the relative shift.
run 0 compare $OUT/reference $E:port
run 1 compare $OUT/reference $E:port_bug_rel_shift --json $OUT/rel_shift.json \
  --svg $OUT/rel_shift.svg --html $OUT/rel_shift.html

# Different names, fused qkv, Linear for kernel-1 Conv1d: matched by structure and weight content.
run 0 map-params $OUT/reference $E:renamed -o $OUT/param_map.json
run 1 compare $OUT/reference $E:renamed_bug_qkv_order --json $OUT/qkv_order.json --html $OUT/qkv_order.html

echo
echo "demo outputs in $OUT/:"
ls -1 "$OUT" | sed 's/^/  /'
echo "open $OUT/rel_shift.html in a browser to explore the divergence"
