#!/usr/bin/env bash
# The kernels and models under the sanitizers: any undefined behaviour or bad memory access
# aborts the test that causes it.
#
#   tests/sanitize.sh              # 9 min on 2 cores, the two builds included
#   JOBS=8 FUZZ_CASES=20000 tests/sanitize.sh
#
# 1. builds lfm_edge._C with -fsanitize=address,undefined,float-cast-overflow into
#    build/sanitize (gcc's "undefined" leaves float-cast-overflow out), and with
#    undefined,float-cast-overflow alone into build/sanitize-ub (the fuzzer limits its workers'
#    address space, which ASan's shadow memory cannot live in);
# 2. copies the package, with the sanitized module, into a temporary tree (the module built in
#    place in lfm_edge/ is never touched: other processes have it mapped);
# 3. runs there, with libasan preloaded into Python: the NaN/inf activation test, the kernel and
#    model tests, the AVX-512 and AVX-VNNI emulation harnesses built with the same sanitizers,
#    then (UBSan build) the GGUF fuzzer's regression files and FUZZ_CASES fresh fuzzed files,
#    whose tensor data mutations put NaN and inf through every layer.
# Prints one line per stage and exits non-zero if any failed; logs in build/sanitize/logs/.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
JOBS=${JOBS:-2}
FUZZ_CASES=${FUZZ_CASES:-2000}
PYTHON=${PYTHON:-python}
SANITIZE=address,undefined,float-cast-overflow
SANITIZE_UB=undefined,float-cast-overflow
LOGS=$ROOT/build/sanitize/logs
mkdir -p "$LOGS"
TMP=$(mktemp -d /tmp/lfm-edge-sanitize.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
FAILED=0
START=$SECONDS

stage() {  # stage NAME COMMAND...: runs it, logs it, prints one line
    local name=$1 t0=$SECONDS status
    shift
    "$@" >"$LOGS/$name.log" 2>&1
    status=$?
    local tail
    tail=$(grep -E "passed|failed|error|cases differ|cases, [0-9]+ s|replayed|runtime error|AddressSanitizer" \
           "$LOGS/$name.log" | tail -n 1)
    if [ $status -ne 0 ]; then
        FAILED=1
        printf 'FAIL %-14s %5ds  %s\n' "$name" $((SECONDS - t0)) "$tail"
        grep -m 3 -E "runtime error|ERROR: AddressSanitizer|SUMMARY" "$LOGS/$name.log" | sed 's/^/     /'
    else
        printf 'ok   %-14s %5ds  %s\n' "$name" $((SECONDS - t0)) "$tail"
    fi
    return $status
}

build() {  # build DIR SANITIZERS
    local pybind11_dir
    pybind11_dir=$("$PYTHON" -c "import pybind11; print(pybind11.get_cmake_dir())") || return 1
    cmake -S "$ROOT" -B "$ROOT/build/$1" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DLFM_EDGE_SANITIZE="$2" \
        -Dpybind11_DIR="$pybind11_dir" -DPython_EXECUTABLE="$(command -v "$PYTHON")" \
        -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$ROOT/build/$1/out" &&
        cmake --build "$ROOT/build/$1" -j "$JOBS"
}

tree() {  # tree DEST BUILD_DIR: the package (its quantize subpackage inside) and the tests
    mkdir -p "$1" &&
        cp -r "$ROOT/lfm_edge" "$ROOT/tests" "$ROOT/csrc" "$ROOT/pyproject.toml" "$1/" &&
        cp -r "$ROOT/quantize" "$1/lfm_edge/quantize" &&
        rm -f "$1"/lfm_edge/_C*.so "$1"/lfm_edge/_C.new &&
        find "$1" -name __pycache__ -type d -prune -exec rm -rf {} + &&
        cp "$ROOT/build/$2/out/"_C*.so "$1/lfm_edge/"
}

# libstdc++ too: else ASan cannot find the real __cxa_throw and a C++ exception aborts
ASAN_LIB="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so)"
asan_python() {  # a Python host for an ASan module: the runtime first, leaks not reported
    # (CPython frees little at exit), every Python object a malloc ASan sees
    LD_PRELOAD="$ASAN_LIB" ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1 \
        UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 PYTHONMALLOC=malloc \
        PYTHONPATH="$TMP/asan" "$PYTHON" "$@"
}
ub_python() {
    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 PYTHONPATH="$TMP/ub" "$PYTHON" "$@"
}
in_asan_tree() { (cd "$TMP/asan" && "$@"); }

check_module() {  # check_module TREE HOST: the tests import the sanitized copy, not the one in place
    local dir=$1
    shift
    (cd "$dir" && "$@" -c "import lfm_edge._C as c, sys; print(c.__file__); sys.exit('$TMP' not in c.__file__)")
}

# pytest --capture=sys: a sanitizer's report is written to fd 2 just before the process exits,
# which pytest's default fd capture would swallow
KERNEL_TESTS="tests/test_kernels.py tests/test_kernels_int8.py \
tests/test_quant_types.py tests/test_kquants.py tests/test_attention.py tests/test_threads.py"
MODEL_TESTS="tests/test_model.py tests/test_native_model.py tests/test_kquant_model.py \
tests/test_quant_mix_model.py tests/test_weight_cache.py"

emulated() {  # tests/test_$1_emulated.py's kernel harness (avx512 | avxvnni), built with the sanitizers
    local isa=$1 simde flags obj=()
    simde=$("$PYTHON" "$ROOT/tests/simde_headers.py") || return 1
    flags=(-std=c++17 -O1 -g -mavx2 -mfma -mf16c -w -fsanitize=$SANITIZE -fno-sanitize-recover=all
           -fno-omit-frame-pointer)
    for src in qmatmul_$isa.cpp qmatmul_scalar.cpp pack.cpp; do
        local extra=()
        [ $src = qmatmul_$isa.cpp ] && extra=(-I"$ROOT/tests/avx512_emulated" -I"$simde")
        g++ "${flags[@]}" "${extra[@]}" -I"$ROOT/csrc" -c "$ROOT/csrc/$src" -o "$TMP/$isa-$src.o" || return 1
        obj+=("$TMP/$isa-$src.o")
    done
    g++ "${flags[@]}" -DLFM_EDGE_EMULATED_ISA=$isa -I"$ROOT/csrc" "$ROOT/tests/avx512_emulated/harness.cpp" \
        "${obj[@]}" -o "$TMP/harness-$isa" &&
        ASAN_OPTIONS=detect_leaks=0 "$TMP/harness-$isa" | tail -n 3
}

echo "lfm-edge under $SANITIZE ($JOBS build jobs, $FUZZ_CASES fuzz cases); logs in $LOGS"
stage build-asan build sanitize "$SANITIZE" && stage tree-asan tree "$TMP/asan" sanitize &&
    stage import-asan check_module "$TMP/asan" asan_python &&
    {
        stage nonfinite in_asan_tree asan_python -m pytest -q --capture=sys -p no:cacheprovider tests/test_nonfinite.py
        # shellcheck disable=SC2086
        stage kernels in_asan_tree asan_python -m pytest -q --capture=sys -p no:cacheprovider $KERNEL_TESTS
        # shellcheck disable=SC2086
        stage models in_asan_tree asan_python -m pytest -q --capture=sys -p no:cacheprovider $MODEL_TESTS
    }
stage avx512-emu emulated avx512
stage avxvnni-emu emulated avxvnni
stage build-ub build sanitize-ub "$SANITIZE_UB" && stage tree-ub tree "$TMP/ub" sanitize-ub &&
    stage import-ub check_module "$TMP/ub" ub_python &&
    {
        stage fuzz-replay ub_python "$TMP/ub/tests/fuzz_gguf.py" --replay "$TMP/ub/tests/fuzz" --jobs "$JOBS"
        stage fuzz ub_python "$TMP/ub/tests/fuzz_gguf.py" --cases "$FUZZ_CASES" --seed 7 --jobs "$JOBS" \
            --lfm-edge "$TMP/ub"
    }
echo "total $((SECONDS - START)) s: $([ $FAILED = 0 ] && echo 'no sanitizer report, every stage passed' || echo 'FAILED (see above)')"
exit $FAILED
