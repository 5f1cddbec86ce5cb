#!/usr/bin/env bash
# scripts/gpu_check.sh [RESULTS_DIR]: moekit's CUDA paths checked in one command, on a machine with a CUDA GPU.
#
#   1. installs what is missing (moekit itself, editable and without touching the machine's CUDA torch; the test
#      dependencies where a package registry is reachable, else it says which are missing),
#   2. runs every CUDA test (`pytest -m cuda`: tests/test_cuda.py and the CUDA cases of the backend and bench tests),
#   3. runs `moekit bench layer --device cuda` and `moekit bench model --device cuda` (both bf16 on CUDA),
#   4. writes everything to RESULTS_DIR (default: $OUT where set, else gpu_check/<UTC time>), with summary.txt last.
#
# Each step has its own time limit so the whole check ends within 8 minutes. Exit status: 0 when every step passed,
# 1 when one failed (summary.txt names it), 2 when no CUDA device is visible (nothing was run).
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS="${1:-${OUT:-gpu_check/$(date -u +%Y%m%dT%H%M%SZ)}}"
mkdir -p "$RESULTS"
PY="${PYTHON:-python3}"
SUMMARY="$RESULTS/summary.txt"
: > "$SUMMARY"
failed=0

say() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$SUMMARY"; }

# step NAME LIMIT_S COMMAND...: runs COMMAND with its output in RESULTS/NAME.txt, records pass/fail and time
step() {
    local name="$1" limit="$2"; shift 2
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$RESULTS/$name.txt" 2>&1
    local rc=$?
    local took=$((SECONDS - start))
    if [ "$rc" -eq 0 ]; then
        say "PASS $name (${took} s)"
    else
        [ "$rc" -eq 124 ] && say "FAIL $name: over its ${limit} s limit" || say "FAIL $name: exit $rc (${took} s)"
        tail -n 20 "$RESULTS/$name.txt" | sed 's/^/    /' | tee -a "$SUMMARY"
        failed=1
    fi
}

# 0. the device
if ! "$PY" - > "$RESULTS/device.txt" 2>&1 <<'EOF'
import torch
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
p = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); {p.name}, {p.total_memory / 2**30:.0f} GiB, "
      f"sm_{p.major}{p.minor}, bf16 {torch.cuda.is_bf16_supported()}")
EOF
then
    cat "$RESULTS/device.txt"
    say "no CUDA device visible to $PY: nothing was checked (run this on a machine with an NVIDIA GPU)"
    exit 2
fi
say "device: $(tail -n 1 "$RESULTS/device.txt")"
command -v nvidia-smi > /dev/null && nvidia-smi > "$RESULTS/nvidia-smi.txt" 2>&1

# 1. install what is missing; the machine's own torch (a CUDA build) is never replaced
if ! "$PY" -c "import moekit" 2> /dev/null; then
    if ! "$PY" -m pip install -q --no-deps --no-build-isolation -e . > "$RESULTS/install.txt" 2>&1; then
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
        say "moekit could not be pip-installed here (see install.txt); using it from $PWD via PYTHONPATH"
    fi
fi
missing=$("$PY" - <<'EOF'
import importlib.util
needs = {"yaml": "pyyaml", "safetensors": "safetensors", "tokenizers": "tokenizers", "tqdm": "tqdm",
         "transformers": "transformers", "pytest": "pytest", "hypothesis": "hypothesis", "matplotlib": "matplotlib"}
print(" ".join(pip for module, pip in needs.items() if importlib.util.find_spec(module) is None))
EOF
)
if [ -n "$missing" ]; then
    # shellcheck disable=SC2086
    "$PY" -m pip install -q $missing >> "$RESULTS/install.txt" 2>&1 \
        || say "could not install: $missing (no package registry reachable?); tests that need them will skip"
fi
"$PY" -c "import torch, transformers, moekit; print('moekit', moekit.__version__, 'transformers', transformers.__version__)" \
    >> "$RESULTS/device.txt" 2>&1

# 2. every CUDA test
step cuda_tests 270 "$PY" -m pytest -q -m cuda -p no:cacheprovider --junitxml "$RESULTS/cuda_tests.xml"
# 3. the benchmarks on CUDA (bf16)
step bench_layer 150 "$PY" -m moekit bench layer --device cuda --json "$RESULTS/bench_layer.json"
step bench_model 120 "$PY" -m moekit bench model --device cuda --json "$RESULTS/bench_model.json"

if [ "$failed" -eq 0 ]; then say "all checks passed; results in $RESULTS"; else say "some checks failed; results in $RESULTS"; fi
exit "$failed"
