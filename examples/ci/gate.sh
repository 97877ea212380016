#!/usr/bin/env bash
# The model-budget gate, end to end: train -> compress -> export -> verify -> check.
# Run by examples/ci/github-actions.yml (and by tests/test_gate.py on every `make test`).
#
#   RECIPE   the recipe (its budget section is the gate)   [recipes/squeezenet-digits.yaml]
#   OUT      where artifacts go                            [artifacts/ci]
#   MODEL    an already trained checkpoint: skip training  [train one with RECIPE]
#   EXTRA    extra options for `edgesqueeze check`, e.g. "--max-size 30KB"
#
# Exit code: that of `edgesqueeze check`: 0 every budget holds, 1 one is broken, 2 bad input.
# An exported file that cannot be evaluated is an ERROR row in verify.json, and check still
# runs on it (exit 2, with gate.json / gate.xml / gate.md saying which), so the gate's files
# are always this run's: those of an earlier run are removed first.
set -euo pipefail
shopt -s nullglob  # a recipe that packs nothing has no export/*.esq: no literal '*.esq' passed on
RECIPE=${RECIPE:-recipes/squeezenet-digits.yaml}
OUT=${OUT:-artifacts/ci}
ES=${EDGESQUEEZE:-edgesqueeze}
rm -f "$OUT/gate.json" "$OUT/gate.xml" "$OUT/gate.md"

if [[ -z "${MODEL:-}" ]]; then
  $ES train -r "$RECIPE" --out "$OUT" --overwrite --no-progress
  MODEL="$OUT/model.pt"
fi
$ES compress "$MODEL" -r "$RECIPE" --out "$OUT/compressed" --no-progress
$ES export "$OUT/compressed/model.esq" -r "$RECIPE" --out "$OUT/export"
# verify.json, verify.md (the artifact table with batch-1 latency) and its two plots; it exits
# 2 when a file could not be evaluated, and check turns that row into ERROR verdicts
rm -f "$OUT/verify.json"
verify_rc=0
$ES verify "$MODEL" "$OUT/compressed/model.esq" "$OUT"/export/*.onnx "$OUT"/export/*.tflite "$OUT"/export/*.esq \
  --latency --out "$OUT/verify.json" || verify_rc=$?
if [[ ! -f "$OUT/verify.json" ]]; then
  echo "gate: verify wrote no report (exit $verify_rc); nothing to check" >&2
  exit 2
fi
# shellcheck disable=SC2086 # EXTRA is a list of options
$ES check "$OUT/verify.json" -r "$RECIPE" ${EXTRA:-} \
  --json "$OUT/gate.json" --junit "$OUT/gate.xml" --markdown "${GITHUB_STEP_SUMMARY:-$OUT/gate.md}"
