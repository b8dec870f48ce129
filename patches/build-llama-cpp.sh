#!/usr/bin/env bash
# build-llama-cpp.sh — llama.cpp's own tools (llama-server, llama-mtmd-cli) with trimcpp's image row
# selection, built from the llama.cpp that llama-cpp-python 0.3.36 vendors (commit 0c1e570) with the
# series in patches/llama.cpp applied. Needs: python3 with pip, git, cmake, a C++17 compiler (ninja
# and ccache are used when installed). Only the package registry is contacted (pip download).
#
#   patches/build-llama-cpp.sh [--out DIR] [--jobs N] [--no-class-token-fix] [-- CMAKE_ARGS...]
#       the two tools in DIR/bin (default: build/llama.cpp/bin in this checkout); CMAKE_ARGS are
#       passed to llama.cpp's CMake, e.g. -DGGML_METAL=ON (Apple), -DGGML_CUDA=ON, -DGGML_NATIVE=ON;
#       --no-class-token-fix leaves out 0001 (LLaVA's image rows then stay as stock libmtmd makes them)
#   patches/build-llama-cpp.sh --python [--out DIR]
#       builds and installs llama-cpp-python 0.3.36 into the current Python from the same sdist with
#       the class-token fix (0001) applied (pip's own build: 10-15 minutes on 2 cores)
#
# The build is CPU-portable by default (no -march=native, no web UI download, no network but pip's).
# The sdist is kept in $TRIMCPP_DOWNLOADS (default: ~/.cache/trimcpp/downloads, or $TRIMCPP_CACHE/downloads).
set -euo pipefail

VERSION=0.3.36
SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
OUT=$ROOT/build/llama.cpp
JOBS=$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)
PYTHON_MODE=0
CLASS_TOKEN_FIX=1
EXTRA=()

die() { echo "build-llama-cpp.sh: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --jobs) JOBS=$2; shift 2 ;;
    --python) PYTHON_MODE=1; shift ;;
    --no-class-token-fix) CLASS_TOKEN_FIX=0; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
for tool in git cmake "$PY"; do
  command -v "$tool" >/dev/null || die "'$tool' is not installed"
done

# 1. The sdist, from the package registry (once), checked against its known sha256.
DOWNLOADS=${TRIMCPP_DOWNLOADS:-${TRIMCPP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/trimcpp}/downloads}
SDIST=$DOWNLOADS/llama_cpp_python-$VERSION.tar.gz
if [ ! -f "$SDIST" ]; then
  echo "== fetching the llama-cpp-python $VERSION sdist with pip"
  mkdir -p "$DOWNLOADS"
  "$PY" -m pip download --quiet --no-deps --no-binary :all: --dest "$DOWNLOADS" "llama-cpp-python==$VERSION" \
    || die "pip could not download the llama-cpp-python $VERSION sdist"
fi
GOT=$("$PY" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$SDIST")
[ "$GOT" = "$SHA256" ] || die "$SDIST has sha256 $GOT, expected $SHA256 (delete it to download again)"

# 2. A pristine tree, as its own git work tree so that `git apply` applies relative to it.
# apply_series DIR PATCH...: applies each patch to DIR or stops, naming the patch that does not apply.
apply_series() {
  local dir=$1; shift
  git -C "$dir" init -q
  for patch in "$@"; do
    if ! git -C "$dir" apply --check "$patch" 2>"$OUT/apply.log"; then
      cat "$OUT/apply.log" >&2
      die "$(basename "$patch") does not apply to llama.cpp 0c1e570 in $dir (see the lines above)"
    fi
    git -C "$dir" apply "$patch"
    echo "   applied $(basename "$patch")"
  done
}

if [ "$PYTHON_MODE" = 1 ]; then
  SRC=$OUT/python/llama_cpp_python-$VERSION
  rm -rf "$OUT/python" && mkdir -p "$OUT/python"
  tar -xzf "$SDIST" -C "$OUT/python"
  rm -rf "$SRC/.git" "$SRC/vendor/llama.cpp/.git"
  echo "== applying the class-token fix to llama-cpp-python's vendored llama.cpp"
  apply_series "$SRC/vendor/llama.cpp" "$HERE"/llama.cpp/0001-*.patch
  echo "== building and installing llama-cpp-python $VERSION from $SRC (pip's build, 10-15 minutes)"
  "$PY" -m pip install --force-reinstall --no-deps "$SRC"
  exit 0
fi

SRC=$OUT/src
rm -rf "$SRC" && mkdir -p "$SRC"
tar -xzf "$SDIST" -C "$SRC" --strip-components=3 "llama_cpp_python-$VERSION/vendor/llama.cpp"
rm -f "$SRC/.git"
echo "== applying patches/llama.cpp to llama.cpp 0c1e570"
SERIES=("$HERE"/llama.cpp/*.patch)
[ "$CLASS_TOKEN_FIX" = 1 ] || SERIES=("${SERIES[@]:1}")
apply_series "$SRC" "${SERIES[@]}"

# 3. Configure and build the two tools. trimcpp's selection core comes from this checkout's csrc/.
GENERATOR=()
command -v ninja >/dev/null && GENERATOR=(-G Ninja)
echo "== configuring ($OUT/build)"
cmake -S "$SRC" -B "$OUT/build" ${GENERATOR[@]+"${GENERATOR[@]}"} \
  -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_NUMBER=1 -DLLAMA_BUILD_COMMIT=0c1e570 \
  -DLLAMA_TRIMCPP_DIR="$ROOT" ${EXTRA[@]+"${EXTRA[@]}"} >"$OUT/configure.log" 2>&1 \
  || { tail -30 "$OUT/configure.log" >&2; die "CMake could not configure llama.cpp (full log: $OUT/configure.log)"; }
echo "== building llama-server and llama-mtmd-cli with $JOBS jobs"
cmake --build "$OUT/build" --target llama-server llama-mtmd-cli -j "$JOBS" >"$OUT/build.log" 2>&1 \
  || { grep -m 20 -B2 -A8 "error" "$OUT/build.log" >&2 || tail -40 "$OUT/build.log" >&2
       die "the build failed (full log: $OUT/build.log)"; }
mkdir -p "$OUT/bin"
ln -sf "$OUT/build/bin/llama-server" "$OUT/build/bin/llama-mtmd-cli" "$OUT/bin/"
echo "== done: $OUT/bin/llama-server, $OUT/bin/llama-mtmd-cli"
