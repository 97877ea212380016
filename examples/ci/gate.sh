#!/usr/bin/env bash
# The model-budget gate, end to end: train -> compress -> export -> verify -> check.
# Run by examples/ci/github-actions.yml (and by tests/test_gate.py on every `make test`).
#
#   RECIPE   the recipe (its budget section is the gate)   [recipes/squeezenet-digits.yaml]
#   OUT      where artifacts go                            [artifacts/ci]
#   MODEL    an already trained checkpoint: skip training  [train one with RECIPE]
#   EXTRA    extra options for `edgesqueeze check`, e.g. "--max-size 30KB"
#   TRAIN_ARGS  extra options for `edgesqueeze train`, e.g. "--set train.epochs=2" (a quick run)
#
# Exit code: that of `edgesqueeze check`: 0 every budget holds, 1 one is broken, 2 bad input;
# a step before it that fails ends the gate with its own code (2 for bad input), and the job
# summary ($GITHUB_STEP_SUMMARY) says which step.
# An exported file that cannot be evaluated is an ERROR row in verify.json, and check still
# runs on it (exit 2, with gate.json / gate.xml / gate.md saying which), so the gate's files
# are always this run's: those of an earlier run are removed first.
set -euo pipefail
shopt -s nullglob  # a recipe that packs nothing has no export/*.esq: no literal '*.esq' passed on
RECIPE=${RECIPE:-recipes/squeezenet-digits.yaml}
OUT=${OUT:-artifacts/ci}
ES=${EDGESQUEEZE:-edgesqueeze}
rm -f "$OUT/gate.json" "$OUT/gate.xml" "$OUT/gate.md"

step=setup
failed() {  # a step before check failed: its own error is in the log; the summary says which step
  local rc=$?
  echo "gate: $step failed (exit $rc); nothing was checked" >&2
  if [[ -n "${GITHUB_STEP_SUMMARY:-}" ]]; then
    printf '## edgesqueeze gate: %s failed (exit %s)\n\nNothing was checked; the job log has its error.\n' \
      "$step" "$rc" >> "$GITHUB_STEP_SUMMARY"
  fi
  exit "$rc"
}
trap failed ERR
if [[ "${MODEL:-}" == *.esq ]]; then  # the drop would be measured against the compressed model itself
  step="MODEL=$MODEL"
  echo "gate: MODEL is a compressed archive; give the float checkpoint (.pt) it was compressed from" >&2
  (exit 2)
fi
if [[ -z "${MODEL:-}" ]]; then
  step=train
  # shellcheck disable=SC2086 # TRAIN_ARGS is a list of options
  $ES train -r "$RECIPE" --out "$OUT" --overwrite --no-progress ${TRAIN_ARGS:-}
  MODEL="$OUT/model.pt"
fi
step=compress
$ES compress "$MODEL" -r "$RECIPE" --out "$OUT/compressed" --no-progress
step=export
$ES export "$OUT/compressed/model.esq" -r "$RECIPE" --out "$OUT/export"
# verify.json, verify.md (the artifact table with batch-1 latency) and its two plots; it exits
# 2 when a file could not be evaluated, and check turns that row into ERROR verdicts
rm -f "$OUT/verify.json"
verify_rc=0
$ES verify "$MODEL" "$OUT/compressed/model.esq" "$OUT"/export/*.onnx "$OUT"/export/*.tflite "$OUT"/export/*.esq \
  --latency --out "$OUT/verify.json" || verify_rc=$?
if [[ ! -f "$OUT/verify.json" ]]; then
  step=verify
  echo "gate: verify wrote no report (exit $verify_rc)" >&2
  (exit 2)
fi
trap - ERR  # check's own exit code is the gate's, and its outputs say why
# shellcheck disable=SC2086 # EXTRA is a list of options
$ES check "$OUT/verify.json" -r "$RECIPE" ${EXTRA:-} \
  --json "$OUT/gate.json" --junit "$OUT/gate.xml" --markdown "${GITHUB_STEP_SUMMARY:-$OUT/gate.md}"
