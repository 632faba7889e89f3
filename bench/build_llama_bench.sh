#!/usr/bin/env bash
# Build llama.cpp's llama-bench (or llama-batched-bench) from the llama-cpp-python sdist on PyPI,
# for bench/compare.py.
#
#   bench/build_llama_bench.sh            # prints the path of the llama-bench binary
#   bench/build_llama_bench.sh llama-batched-bench   # the same tree and build dir, that tool
#   LLAMA_BENCH_NO_AMX=1 bench/build_llama_bench.sh   # the same native build without AMX
#
# Nothing is vendored: the sdist is downloaded (or taken from $LLAMA_CPP_SRC, a llama.cpp source
# tree) and built under $LFM_EDGE_CACHE (default ~/.cache/lfm-edge/llama.cpp), outside the repo.
# A native build (-DGGML_NATIVE=ON) is llama.cpp at its real speed on this CPU, AMX repacking
# of Q4_0/Q8_0 included. Takes 5-10 minutes on 2 cores the first time; then it is cached.
set -euo pipefail

TARGET="${1:-llama-bench}"
case "$TARGET" in
    llama-bench|llama-batched-bench) ;;
    *) echo "build_llama_bench.sh: the target is llama-bench or llama-batched-bench, not $TARGET" >&2; exit 2 ;;
esac
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${LFM_EDGE_CACHE:-$HOME/.cache/lfm-edge/llama.cpp}"
BUILD="$CACHE/build-$VERSION"
FLAGS=()
if [[ -n "${LLAMA_BENCH_NO_AMX:-}" ]]; then
    # -march=native minus AMX (GCC keeps explicit -mno-* over what -march implies): llama.cpp's
    # AVX-512 and Q4_0/Q8_0 repacking stay, its AMX kernels are not compiled
    BUILD="$BUILD-noamx"
    NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    FLAGS=(-DCMAKE_C_FLAGS="$NO_AMX" -DCMAKE_CXX_FLAGS="$NO_AMX")
fi
BIN="$BUILD/bin/$TARGET"

if [[ -x "$BIN" ]]; then
    echo "$BIN"
    exit 0
fi
mkdir -p "$CACHE"

SRC="${LLAMA_CPP_SRC:-}"
if [[ -z "$SRC" ]]; then
    SRC="$CACHE/llama_cpp_python-$VERSION/vendor/llama.cpp"
    if [[ ! -f "$SRC/CMakeLists.txt" ]]; then
        # the sdist only: --no-binary :all: would also build cmake etc. from source
        python -m pip download "llama-cpp-python==$VERSION" --no-deps --no-binary llama-cpp-python \
            -d "$CACHE/sdist" >&2
        tar -xzf "$CACHE/sdist/llama_cpp_python-$VERSION.tar.gz" -C "$CACHE"
    fi
fi
[[ -f "$SRC/CMakeLists.txt" ]] || { echo "build_llama_bench.sh: no llama.cpp source at $SRC" >&2; exit 1; }

cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DBUILD_SHARED_LIBS=OFF ${FLAGS[@]+"${FLAGS[@]}"} >&2
cmake --build "$BUILD" --target "$TARGET" -j "$(nproc)" >&2
[[ -x "$BIN" ]] || { echo "build_llama_bench.sh: the build did not produce $BIN" >&2; exit 1; }
echo "$BIN"
