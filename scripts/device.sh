#!/usr/bin/env bash
# shellcheck disable=SC2016,SC2317  # bash -c scripts take "$1"; step() calls functions by name
# scripts/device.sh: build and run kept's CUDA slice on a GPU machine, logs into "${OUT:-/tmp/kept-device}".
#
# Meant for the device machine (H100/H200, 16 cores, CUDA toolkit + cmake, NO network): run from
# anywhere as `bash scripts/device.sh`. It never installs anything. Steps:
#   1. environment: nvidia-smi, nvcc, cmake, compiler, dependencies found      -> environment.txt
#   2. configure + build with CMake (sm_90 only, -DCMAKE_CUDA_ARCHITECTURES=90): kept_cuda_tests,
#      kept_tests (CPU) and bench_cuda_ops when bench/CMakeLists.txt defines it -> configure.log,
#      build-<target>.log. If Catch2 is missing the tests are left out; if the project cannot be configured
#      at all (nlohmann-json / OpenBLAS / OpenMP missing), or a target is not defined, the CUDA
#      test and bench binaries are built with nvcc directly instead -> direct-*.log
#   3. run: the CUDA tests through ctest (KEPT_REQUIRE_CUDA=1: a missing GPU fails, never skips)
#      and directly with per-test timings, the CPU tests, compute-sanitizer memcheck/racecheck on
#      the CUDA tests, and the benchmark -> ctest-cuda.log, kept_cuda_tests.log, ctest-cpu.log,
#      memcheck.log, racecheck.log, bench_cuda_ops.txt
# summary.txt lists every step with ok/FAIL/SKIP; the exit status is 1 if any step failed.
#
# Options:
#   --no-run         configure and build only (works without a GPU)
#   --direct         skip CMake, build with nvcc directly
#   --no-cpu-tests   neither build nor run the CPU tests
#   --no-sanitizer   skip compute-sanitizer
#   --arch NN        CUDA architecture (default 90)
#   --jobs N         build parallelism (default: nproc)
#   --build-dir DIR  build directory (default: <repo>/build-device)
set -euo pipefail

usage() { sed -n '3,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

RUN=1
DIRECT=0
CPU_TESTS=1
SANITIZER=1
ARCH=90
JOBS="$(nproc 2>/dev/null || echo 4)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="$ROOT/build-device"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --no-run) RUN=0 ;;
    --direct) DIRECT=1 ;;
    --no-cpu-tests) CPU_TESTS=0 ;;
    --no-sanitizer) SANITIZER=0 ;;
    --arch) ARCH="$2"; shift ;;
    --jobs) JOBS="$2"; shift ;;
    --build-dir) BUILD="$2"; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "device.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

OUT="${OUT:-/tmp/kept-device}"
mkdir -p "$OUT" "$BUILD"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
STATUS=0
T0=$SECONDS

say() { echo "[device.sh] $*" | tee -a "$SUMMARY"; }
# step NAME LOG CMD...: runs CMD with output into LOG; records ok/FAIL; never aborts the script.
step() {
  local name="$1" log="$2" start=$SECONDS rc=0
  shift 2
  "$@" >"$log" 2>&1 || rc=$?
  if [[ $rc -eq 0 ]]; then
    say "ok   $name ($((SECONDS - start)) s, $(basename "$log"))"
  else
    say "FAIL $name (exit $rc, $((SECONDS - start)) s, $(basename "$log")); last lines:"
    tail -n 25 "$log" | sed 's/^/       /' | tee -a "$SUMMARY"
    STATUS=1
  fi
  return $rc
}
skip() { say "SKIP $*"; }

say "repo $ROOT, build $BUILD, out $OUT, arch sm_$ARCH, jobs $JOBS, run=$RUN direct=$DIRECT"

# ---- 1. environment ---------------------------------------------------------------------------------
NVCC="$(command -v nvcc || true)"
[[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]] && NVCC=/usr/local/cuda/bin/nvcc
if [[ -z "$NVCC" ]]; then
  say "FAIL nvcc not found (PATH or /usr/local/cuda/bin): cannot build the CUDA slice"
  exit 1
fi
CUDA_HOME="$(cd "$(dirname "$NVCC")/.." && pwd)"

find_first() { # find_first PATTERN DIRS...: first file whose path matches PATTERN
  local pattern="$1"
  shift
  local dir
  for dir in "$@"; do
    [[ -d "$dir" ]] || continue
    find "$dir" -path "$pattern" -print -quit 2>/dev/null
  done | head -n 1
}
CATCH_HEADER="$(find_first '*/catch2/catch.hpp' /usr/include /usr/local/include /opt)"
CATCH_MAIN_LIB="$(find_first '*/libCatch2WithMain.a' /usr/lib /usr/local/lib /usr/lib64 /opt)"
JSON_HEADER="$(find_first '*/nlohmann/json.hpp' /usr/include /usr/local/include /opt)"
OPENBLAS="$( (ldconfig -p 2>/dev/null | grep -o '/[^ ]*libopenblas[^ ]*\.so[^ ]*' | head -n 1) || true)"
HAVE_OPENMP=0
echo 'int main() { return 0; }' | g++ -fopenmp -x c++ - -o "$BUILD/.openmp-check" >/dev/null 2>&1 && HAVE_OPENMP=1

{
  echo "date: $(date -u +%FT%TZ)"
  echo "host: $(hostname), $(nproc) cores, $(free -g 2>/dev/null | awk '/Mem:/ {print $2 " GiB"}')"
  echo "--- nvidia-smi"
  nvidia-smi 2>&1 || echo "(nvidia-smi failed or absent)"
  echo "--- nvcc ($NVCC)"
  "$NVCC" --version
  echo "--- cmake"
  cmake --version 2>&1 | head -n 1 || echo "(cmake absent)"
  echo "--- ninja: $(ninja --version 2>/dev/null || echo absent)"
  echo "--- g++"
  g++ --version | head -n 1
  echo "--- compute-sanitizer: $(command -v compute-sanitizer || ls "$CUDA_HOME/bin/compute-sanitizer" 2>/dev/null || echo absent)"
  echo "--- dependencies"
  echo "Catch2 header:       ${CATCH_HEADER:-missing}"
  echo "Catch2 main library: ${CATCH_MAIN_LIB:-missing}"
  echo "nlohmann/json:       ${JSON_HEADER:-missing}"
  echo "OpenBLAS:            ${OPENBLAS:-missing}"
  echo "OpenMP (g++):        $([[ $HAVE_OPENMP == 1 ]] && echo yes || echo missing)"
  echo "--- git"
  git -C "$ROOT" log -1 --oneline 2>/dev/null || echo "(not a git checkout)"
  git -C "$ROOT" status --short 2>/dev/null | head -n 50 || true
} >"$OUT/environment.txt" 2>&1
found() { if [[ -n "$1" ]]; then echo found; else echo MISSING; fi; }
say "environment -> environment.txt (Catch2 $(found "$CATCH_HEADER"), nlohmann-json" \
  "$(found "$JSON_HEADER"), OpenBLAS $(found "$OPENBLAS"), OpenMP $([[ $HAVE_OPENMP == 1 ]] && echo found || echo MISSING))"

# ---- 2. build ---------------------------------------------------------------------------------------------
TEST_BIN=""   # the CUDA test binary
BENCH_BIN=""  # the CUDA benchmark
CTEST_DIR=""  # set when ctest can run the tests
CMAKE_OK=0

if [[ $DIRECT == 0 ]] && command -v cmake >/dev/null; then
  GENERATOR=()
  command -v ninja >/dev/null && GENERATOR=(-G Ninja)
  # A build directory configured with another generator cannot be reused.
  if [[ -f "$BUILD/CMakeCache.txt" ]] && ! grep -q "CMAKE_GENERATOR:INTERNAL=${GENERATOR[1]:-Unix Makefiles}" "$BUILD/CMakeCache.txt"; then
    rm -rf "$BUILD/CMakeCache.txt" "$BUILD/CMakeFiles"
  fi
  TESTS_FLAG=ON
  [[ -z "$CATCH_HEADER" ]] && TESTS_FLAG=OFF
  configure() {
    cmake -S "$ROOT" -B "$BUILD" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=Release -DKEPT_CUDA=ON \
      -DCMAKE_CUDA_ARCHITECTURES="$ARCH" -DCMAKE_CUDA_COMPILER="$NVCC" -DKEPT_BUILD_TESTS="$1" \
      -DKEPT_BUILD_BENCH=ON -DKEPT_BUILD_REFERENCE=OFF
  }
  STATUS_BEFORE=$STATUS
  if step "cmake configure (tests $TESTS_FLAG)" "$OUT/configure.log" configure "$TESTS_FLAG"; then
    CMAKE_OK=1
  elif [[ $TESTS_FLAG == ON ]] &&
    step "cmake configure (tests OFF)" "$OUT/configure-notests.log" configure OFF; then
    CMAKE_OK=1
    TESTS_FLAG=OFF
  fi
  # A missing dependency is not a failure of kept's code: note it and build what we can.
  STATUS=$STATUS_BEFORE
  if [[ $CMAKE_OK == 1 ]]; then
    TARGETS="$(cmake --build "$BUILD" --target help 2>/dev/null || true)"
    has_target() { grep -qE "(^|[ :/])$1(:|$| )" <<<"$TARGETS"; }
    # One target per step, so that a broken CPU target cannot block the CUDA ones.
    if has_target kept_cuda_tests; then
      if step "cmake build kept_cuda_tests" "$OUT/build-kept_cuda_tests.log" \
        cmake --build "$BUILD" -j "$JOBS" --target kept_cuda_tests; then
        TEST_BIN="$BUILD/tests/cuda/kept_cuda_tests"
        CTEST_DIR="$BUILD"
      fi
    else
      skip "kept_cuda_tests is not a CMake target (tests OFF: Catch2 missing?)"
    fi
    if [[ $CPU_TESTS == 1 ]] && has_target kept_tests; then
      step "cmake build kept_tests (CPU)" "$OUT/build-kept_tests.log" \
        cmake --build "$BUILD" -j "$JOBS" --target kept_tests || true
    fi
    if has_target bench_cuda_ops; then
      if step "cmake build bench_cuda_ops" "$OUT/build-bench_cuda_ops.log" \
        cmake --build "$BUILD" -j "$JOBS" --target bench_cuda_ops; then
        BENCH_BIN="$(find "$BUILD" -name bench_cuda_ops -type f -perm -u+x | head -n 1)"
      fi
    else
      say "note: bench/CMakeLists.txt defines no bench_cuda_ops target; building it with nvcc"
    fi
  else
    say "note: the CMake configure failed (see configure*.log; a dependency is missing?): building with nvcc directly"
  fi
elif [[ $DIRECT == 0 ]]; then
  say "cmake not found: building with nvcc directly"
fi

# Direct nvcc builds: whatever CMake did not produce (needs only the CUDA toolkit, and Catch2 for tests).
# shellcheck disable=SC2054  # the commas belong to -Xcompiler
NVCC_FLAGS=(-std=c++20 -O3 -I"$ROOT/include" --expt-relaxed-constexpr
  "-gencode=arch=compute_$ARCH,code=sm_$ARCH" -Werror=all-warnings -Xcompiler=-Wall,-Wextra,-Werror)
DIRECT_DIR="$BUILD/direct"
mkdir -p "$DIRECT_DIR"
if [[ -z "$BENCH_BIN" ]]; then
  if step "nvcc bench_cuda_ops" "$OUT/direct-bench.log" "$NVCC" "${NVCC_FLAGS[@]}" \
    "$ROOT/bench/bench_cuda_ops.cu" -o "$DIRECT_DIR/bench_cuda_ops" -lcublasLt -lcublas; then
    BENCH_BIN="$DIRECT_DIR/bench_cuda_ops"
  fi
fi
if [[ -z "$TEST_BIN" ]]; then
  if [[ -z "$CATCH_HEADER" ]]; then
    skip "CUDA tests: Catch2 (catch2/catch.hpp) not found on this machine; only the benchmark runs"
  elif [[ $HAVE_OPENMP == 0 ]]; then
    skip "CUDA tests: g++ -fopenmp does not work (the CPU reference needs OpenMP)"
  else
    CATCH_INCLUDE="$(dirname "$(dirname "$CATCH_HEADER")")"
    build_direct_tests() {
      local main_obj=()
      if [[ -n "$CATCH_MAIN_LIB" ]]; then
        main_obj=("$CATCH_MAIN_LIB")
      else # header-only Catch2: compile a main (slow, ~30 s)
        printf '#define CATCH_CONFIG_MAIN\n#include <catch2/catch.hpp>\n' >"$DIRECT_DIR/catch_main.cpp"
        g++ -std=c++20 -O1 -I"$CATCH_INCLUDE" -c "$DIRECT_DIR/catch_main.cpp" \
          -o "$DIRECT_DIR/catch_main.o" || return 1
        main_obj=("$DIRECT_DIR/catch_main.o")
      fi
      "$NVCC" "${NVCC_FLAGS[@]}" -I"$CATCH_INCLUDE" -Xcompiler=-fopenmp \
        "$ROOT/tests/cuda/test_cuda_backend.cu" "${main_obj[@]}" -o "$DIRECT_DIR/kept_cuda_tests" \
        -lcublasLt -lcublas -lgomp || return 1
    }
    if step "nvcc kept_cuda_tests" "$OUT/direct-tests.log" build_direct_tests; then
      TEST_BIN="$DIRECT_DIR/kept_cuda_tests"
    fi
  fi
fi

say "built: tests ${TEST_BIN:-none}, bench ${BENCH_BIN:-none} ($((SECONDS - T0)) s so far)"
if [[ $RUN == 0 ]]; then
  say "--no-run: stopping before the steps that need a GPU"
  say "done in $((SECONDS - T0)) s, status $STATUS"
  exit $STATUS
fi

# ---- 3. run ---------------------------------------------------------------------------------------------------
if command -v nvidia-smi >/dev/null && ! nvidia-smi -L >/dev/null 2>&1; then
  say "FAIL nvidia-smi -L fails: no usable GPU here; the run steps need one (use --no-run to only build)"
  exit 1
fi
export KEPT_REQUIRE_CUDA=1 # a missing device is a failure here, not a skip
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

if [[ -n "$TEST_BIN" ]]; then
  if [[ -n "$CTEST_DIR" ]]; then
    step "ctest -L cuda" "$OUT/ctest-cuda.log" \
      bash -c 'cd "$1" && ctest -L cuda --output-on-failure --timeout 300' _ "$CTEST_DIR" || true
  fi
  step "kept_cuda_tests (per-test durations)" "$OUT/kept_cuda_tests.log" \
    timeout 300 "$TEST_BIN" --durations yes || true
else
  skip "CUDA tests were not built"
fi

if [[ $CPU_TESTS == 1 && -n "$CTEST_DIR" && -x "$BUILD/tests/kept_tests" ]]; then
  step "ctest CPU tests (-LE cuda)" "$OUT/ctest-cpu.log" \
    bash -c 'cd "$1" && ctest -LE cuda -j "$2" --output-on-failure --timeout 300' _ "$CTEST_DIR" "$JOBS" || true
elif [[ $CPU_TESTS == 1 ]]; then
  skip "CPU tests (kept_tests not built: the CMake configure needs Catch2, nlohmann-json, OpenBLAS)"
fi

SANITIZER_BIN="$(command -v compute-sanitizer || true)"
[[ -z "$SANITIZER_BIN" && -x "$CUDA_HOME/bin/compute-sanitizer" ]] && SANITIZER_BIN="$CUDA_HOME/bin/compute-sanitizer"
if [[ $SANITIZER == 1 && -n "$TEST_BIN" && -n "$SANITIZER_BIN" ]]; then
  step "compute-sanitizer memcheck (all CUDA tests)" "$OUT/memcheck.log" \
    timeout 240 "$SANITIZER_BIN" --tool memcheck --error-exitcode 99 "$TEST_BIN" || true
  step "compute-sanitizer racecheck (norm kernels)" "$OUT/racecheck.log" \
    timeout 180 "$SANITIZER_BIN" --tool racecheck --error-exitcode 99 "$TEST_BIN" "[norm]" || true
elif [[ $SANITIZER == 1 ]]; then
  skip "compute-sanitizer (${SANITIZER_BIN:-not found} / tests ${TEST_BIN:-not built})"
fi

if [[ -n "$BENCH_BIN" ]]; then
  step "bench_cuda_ops" "$OUT/bench_cuda_ops.txt" timeout 300 "$BENCH_BIN" || true
  if grep -q "no CUDA device" "$OUT/bench_cuda_ops.txt"; then
    say "FAIL bench_cuda_ops found no CUDA device"
    STATUS=1
  fi
  sed 's/^/       /' "$OUT/bench_cuda_ops.txt" | tee -a "$SUMMARY" >/dev/null
else
  say "FAIL the benchmark was not built"
  STATUS=1
fi

say "done in $((SECONDS - T0)) s, status $STATUS"
exit $STATUS
