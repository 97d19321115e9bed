#!/usr/bin/env bash
# shellcheck disable=SC2317  # step() calls functions by name
# scripts/device.sh: the whole CUDA backend on a GPU machine, in ONE prepared call (<= 8 min).
#
# The device machine (H200, 16 cores, nvcc 13.0, cmake, torch with cuDNN, no network) installs
# nothing. What it lacks travels in a dependency folder made here first:
#   bash scripts/device.sh --pack                 # -> build-device-deps/ (Catch2, nlohmann-json,
#                                                 #    CLI11, OpenBLAS headers + library, the
#                                                 #    cuDNN frontend headers from the venv)
# and the run itself (the device tool carries build-device-deps/):
#   bash scripts/device.sh [--deps DIR]           # -> $OUT (default /tmp/kept-device)
# The --no-run build takes ~6 min on 2 cores here (more with cuDNN's frontend: its two g++
# translation units take ~1 min each).
# Steps, each logged to its own file and summarised in summary.txt (ok/FAIL/SKIP, seconds):
#   1. environment: nvidia-smi, nvcc, cmake, compilers, torch             -> environment.txt
#   2. configure + build for sm_90 only: kept_ops_cuda (the op registry compiled by nvcc),
#      kept_cuda_tests (contract + the training comparison), kept (--device cuda) -> build.log
#   3. static checks: no register spills, 128-bit loads in the memory-bound kernels
#   4. kept_ops_cuda on the GPU: every op against Cpu64 and CpuBf16      -> kept_ops_cuda.txt
#   5. compute-sanitizer memcheck and racecheck on a subset of the registry
#   6. kept_cuda_tests: the loss kernels against CpuBf16, the optimizer's compact states against
#      CpuBf16 to the bit, cuDNN attention against kept's kernels, and the training comparison
#      (CUDA vs CpuBf16 vs Cpu)                                             -> kept_cuda_tests.txt
#      then kept_nccl_tests: the NCCL communicator on one rank, no MPI (bootstrap, every
#      collective in both sum modes, the order against the compute stream, argument errors,
#      messages above INT_MAX bytes; the rank-ordered sum kernel fed three ranks' pieces)
#                                                                           -> kept_nccl_tests.txt
#   7. bench_cuda_ops: norms, SwiGLU and add against the measured copy bandwidth, the bf16 GEMM
#      in TFLOP/s, causal attention at the 14B shape (kept's kernels, cuDNN) -> bench_cuda_ops.txt;
#      then bench/bench_torch_cuda.py: the same shapes in torch eager, torch.compile and SDPA on
#      cuDNN                                                                -> bench_torch_cuda.txt
#   8. a tiny `kept train --device cuda` run (cross-entropy, from scratch; attention on cuDNN
#      when the build found it, the line "attention: ..." says), then XKD from it with the
#      teacher resident vs streamed + host optimizer states: identical losses and weights
#                                                                           -> train.txt
#      then the XKD job as a 1-rank NCCL job (kept train --nccl, ZeRO stage 2) against the same
#      job without collectives: identical losses and weights              -> train-nccl.txt
#   9. a 1B-class `kept train --device cuda` run, 12 steps with the compact optimizer states:
#      tokens/s and MFU                                                     -> train-1b.txt
#  10. the 14B job (reference/jobs/orion14b-llamion.json) as `kept train --synthetic`: random
#      weights and tokens of its real shapes, 4 steps, under the 80 GB cap (--gpu h100-80g) and
#      uncapped, next to `kept plan`'s prediction                          -> synthetic-14b.txt
# cuDNN: the frontend headers travel in the dependency folder; libcudnn is the CUDA toolkit's,
# else the one in torch's nvidia-cudnn wheel (CUDNN_ROOT). Without it the build uses kept's
# attention kernels and says so in build.log. NCCL: the toolkit's, else the one in torch's
# nvidia-nccl wheel (NCCL_ROOT); without it kept_nccl_tests is not built and its step is skipped.
# summary.txt can be pasted into bench/RESULTS.md. Exit status 1 if any step failed.
#
# Options:
#   --pack [DIR]     gather the dependencies into DIR (default build-device-deps) and exit
#   --deps DIR       where the packed dependencies are (default build-device-deps)
#   --no-run         everything that needs no GPU (build, static checks), then list the rest
#   --jobs N         build parallelism (default: nproc)
#   --build-dir DIR  build directory (default: build-device)
set -euo pipefail

usage() { sed -n '3,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN=1
PACK=""
DEPS="$ROOT/build-device-deps"
BUILD="$ROOT/build-device"
JOBS="$(nproc 2>/dev/null || echo 4)"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --pack)
      PACK="$DEPS"
      if [[ $# -gt 1 && "$2" != --* ]]; then PACK="$2"; shift; fi
      ;;
    --deps) DEPS="$2"; shift ;;
    --no-run) RUN=0 ;;
    --jobs) JOBS="$2"; shift ;;
    --build-dir) BUILD="$2"; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "device.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# ---- --pack: the dependency folder (run on a build machine) ------------------------------------
if [[ -n "$PACK" ]]; then
  # A prefix CMake searches (CMAKE_PREFIX_PATH): packages' config files where they resolve their
  # include directories relative to themselves.
  rm -rf "$PACK" && mkdir -p "$PACK/include" "$PACK/lib/cmake" "$PACK/share/cmake"
  cp -r /usr/include/catch2 /usr/include/nlohmann /usr/include/CLI "$PACK/include/"
  cp -r /usr/lib/cmake/Catch2 "$PACK/lib/cmake/"
  cp -r /usr/share/cmake/nlohmann_json /usr/share/cmake/CLI11 "$PACK/share/cmake/"
  cp /usr/include/x86_64-linux-gnu/openblas-openmp/*.h "$PACK/include/"
  cp -L /usr/lib/x86_64-linux-gnu/openblas-openmp/libopenblas.so.0 "$PACK/lib/"
  ln -sf libopenblas.so.0 "$PACK/lib/libopenblas.so"
  cp -L /usr/lib/x86_64-linux-gnu/libgfortran.so.5 /usr/lib/x86_64-linux-gnu/libquadmath.so.0 \
    "$PACK/lib/" 2>/dev/null || true
  venv="${KEPT_VENV:-$HOME/.cache/kept/venv}"
  frontend=$(ls -d "$venv"/lib/python3*/site-packages/include 2>/dev/null | head -1)
  if [[ -f "$frontend/cudnn_frontend.h" ]]; then
    mkdir -p "$PACK/cudnn-frontend"
    cp -r "$frontend" "$PACK/cudnn-frontend/include"
  else
    echo "device.sh: no cuDNN frontend headers in $venv (bash scripts/python_env.sh installs" \
      "them); the device build will use kept's attention kernels" >&2
  fi
  echo "device.sh: packed $(du -sh "$PACK" | cut -f1) into $PACK"
  exit 0
fi

OUT="${OUT:-/tmp/kept-device}"
mkdir -p "$OUT" "$BUILD"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
STATUS=0
T0=$SECONDS
say() { echo "[device.sh] $*" | tee -a "$SUMMARY"; }
# step NAME LOG CMD...: runs CMD, output into LOG; records ok/FAIL and the seconds; never aborts.
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
  return 0
}
skip() { say "SKIP $*"; }

say "$(date -u +%FT%TZ) repo $ROOT, build $BUILD, deps $DEPS, out $OUT, jobs $JOBS, run=$RUN"

# ---- 1. environment ------------------------------------------------------------------------------
environment() {
  nvidia-smi || echo "(no nvidia-smi)"
  command -v nvcc && nvcc --version
  cmake --version | head -1
  c++ --version | head -1
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())' || true
  nproc
}
step "environment" "$OUT/environment.txt" environment

# ---- 2. build (sm_90 only) -----------------------------------------------------------------------
[[ -d /usr/local/cuda/bin ]] && export PATH="/usr/local/cuda/bin:$PATH"
prefix=""
if [[ -d "$DEPS" ]]; then
  DEPS="$(cd "$DEPS" && pwd)"
  prefix="$DEPS"
  export LD_LIBRARY_PATH="$DEPS/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
# cuDNN: the frontend headers from the dependency folder; libcudnn from the toolkit, else torch's.
cudnn_args=()
[[ -f "$DEPS/cudnn-frontend/include/cudnn_frontend.h" ]] &&
  cudnn_args+=("-DKEPT_CUDNN_FRONTEND_INCLUDE_DIR=$DEPS/cudnn-frontend/include")
if ! ls /usr/local/cuda/lib64/libcudnn.so* >/dev/null 2>&1 && [[ -z "${CUDNN_ROOT:-}" ]]; then
  torch_cudnn=$(python3 -c 'import nvidia.cudnn as m; print(list(m.__path__)[0])' 2>/dev/null || true)
  if [[ -n "$torch_cudnn" ]]; then
    export CUDNN_ROOT="$torch_cudnn"
    export LD_LIBRARY_PATH="$torch_cudnn/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
fi
# NCCL: the toolkit's, else torch's nvidia-nccl wheel (its include/ and lib/libnccl.so.2).
if ! ls /usr/local/cuda/lib64/libnccl.so* /usr/local/cuda/lib/libnccl.so* >/dev/null 2>&1 &&
  [[ -z "${NCCL_ROOT:-}" ]]; then
  torch_nccl=$(python3 -c 'import nvidia.nccl as m; print(list(m.__path__)[0])' 2>/dev/null || true)
  if [[ -n "$torch_nccl" ]]; then
    export NCCL_ROOT="$torch_nccl"
    export LD_LIBRARY_PATH="$torch_nccl/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
fi
# The `kept` command needs SentencePiece and libgd; without them the build leaves it out (and
# step 7 is skipped): the registry and the tests need neither.
REFERENCE=ON
pkg-config --exists sentencepiece gdlib 2>/dev/null || REFERENCE=OFF
targets=(kept_ops_cuda kept_cuda_tests bench_cuda_ops)
[[ $REFERENCE == ON ]] && targets+=(kept)
build() {
  cmake -S "$ROOT" -B "$BUILD" -G "$(command -v ninja >/dev/null && echo Ninja || echo 'Unix Makefiles')" \
    -DCMAKE_BUILD_TYPE=Release -DKEPT_CUDA=ON -DKEPT_CUDA_EMULATION=OFF \
    -DCMAKE_CUDA_ARCHITECTURES=90 -DKEPT_BUILD_BENCH=ON -DKEPT_BUILD_REFERENCE=$REFERENCE \
    ${prefix:+"-DCMAKE_PREFIX_PATH=$prefix"} "${cudnn_args[@]}"
  # kept_nccl_tests exists when the configure found NCCL (tests/cuda/CMakeLists.txt).
  local build_targets=("${targets[@]}")
  if grep -qE '^KEPT_NCCL_LIBRARY:FILEPATH=/' "$BUILD/CMakeCache.txt" &&
    grep -qE '^KEPT_NCCL_INCLUDE_DIR:PATH=/' "$BUILD/CMakeCache.txt"; then
    build_targets+=(kept_nccl_tests)
  fi
  cmake --build "$BUILD" -j "$JOBS" --target "${build_targets[@]}"
}
step "build (sm_90, $JOBS jobs)" "$OUT/build.log" build
grep -E "^-- kept: (cuDNN|NCCL)" "$OUT/build.log" | tee -a "$SUMMARY" || true

# ---- 3. static checks ----------------------------------------------------------------------------
step "static checks (spills, LDG.E.128)" "$OUT/static_checks.txt" \
  bash "$ROOT/tests/cuda/static_checks.sh" "$ROOT" "$BUILD/static_checks"

if [[ $RUN -eq 0 ]]; then
  say "--no-run: would now run kept_ops_cuda, compute-sanitizer memcheck/racecheck on it," \
      "kept_cuda_tests (loss kernels, training comparison) and a kept train --device cuda run"
  binaries=("$BUILD/tests/cuda/kept_ops_cuda" "$BUILD/tests/cuda/kept_cuda_tests"
            "$BUILD/bench/bench_cuda_ops")
  [[ $REFERENCE == ON ]] && binaries+=("$BUILD/reference/kept")
  [[ -x "$BUILD/tests/cuda/kept_nccl_tests" ]] && binaries+=("$BUILD/tests/cuda/kept_nccl_tests")
  for binary in "${binaries[@]}"; do
    [[ -x "$binary" ]] && say "built $binary" || { say "FAIL missing $binary"; STATUS=1; }
  done
  step "kept_ops_cuda --list (no GPU needed)" "$OUT/kept_ops_cuda_list.txt" \
    "$BUILD/tests/cuda/kept_ops_cuda" --list
  say "done in $((SECONDS - T0)) s, status $STATUS"
  exit $STATUS
fi

export KEPT_REQUIRE_CUDA=1 OMP_NUM_THREADS=8
# ---- 4. the op registry on the GPU ---------------------------------------------------------------
step "kept_ops_cuda (every op vs Cpu64 and CpuBf16)" "$OUT/kept_ops_cuda.txt" \
  "$BUILD/tests/cuda/kept_ops_cuda"
grep -E "^[0-9]+ passed" "$OUT/kept_ops_cuda.txt" | tee -a "$SUMMARY" || true

# ---- 5. compute-sanitizer on a subset ------------------------------------------------------------
if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    step "compute-sanitizer $tool (norms, attention, swiglu)" "$OUT/$tool.txt" \
      compute-sanitizer --tool "$tool" --error-exitcode 1 \
      "$BUILD/tests/cuda/kept_ops_cuda" --filter norm_
  done
else
  skip "compute-sanitizer not found"
fi

# ---- 6. the training comparison ------------------------------------------------------------------
step "kept_cuda_tests (contract, loss kernels, optimizer states, cuDNN attention, training comparison)" \
  "$OUT/kept_cuda_tests.txt" "$BUILD/tests/cuda/kept_cuda_tests" -s \
  "[train],[contract],[loss],[adamw],[cudnn],[collective]"
grep -E "step [0-9]+:" "$OUT/kept_cuda_tests.txt" | sort -u | head -12 | tee -a "$SUMMARY" || true
# The NCCL communicator, one rank (a few seconds: one ncclCommInitRank per case and section).
if [[ -x "$BUILD/tests/cuda/kept_nccl_tests" ]]; then
  step "kept_nccl_tests (NCCL communicator, 1 rank: collectives, stream order, errors, > INT_MAX)" \
    "$OUT/kept_nccl_tests.txt" env NCCL_DEBUG=WARN timeout 180 \
    "$BUILD/tests/cuda/kept_nccl_tests" --durations yes
  grep -E "NCCL [0-9]+ \(headers|^All tests passed|^test cases:" "$OUT/kept_nccl_tests.txt" |
    tee -a "$SUMMARY" || true
else
  skip "kept_nccl_tests: NCCL was not found at build time (build.log)"
fi

# ---- 7. per-op speed against the device's copy bandwidth and the cuBLAS GEMM ----------------------
step "bench_cuda_ops (norms, SwiGLU, add vs copy bandwidth; GEMM TFLOP/s)" "$OUT/bench_cuda_ops.txt" \
  "$BUILD/bench/bench_cuda_ops" --iters 20
cat "$OUT/bench_cuda_ops.txt" >>"$SUMMARY" 2>/dev/null || true
# The same shapes in torch (eager, torch.compile, SDPA on cuDNN), right after, for the ratios.
if python3 -c 'import torch' 2>/dev/null; then
  step "bench_torch_cuda.py (the same shapes in torch)" "$OUT/bench_torch_cuda.txt" \
    timeout 150 python3 "$ROOT/bench/bench_torch_cuda.py" --iters 20
  cat "$OUT/bench_torch_cuda.txt" >>"$SUMMARY" 2>/dev/null || true
else
  skip "bench_torch_cuda.py: no torch here"
fi

# ---- 8. kept train --device cuda -----------------------------------------------------------------
# same_runs RUN_A RUN_B LABEL: whether two training runs logged the same losses (the exact
# decimal of each step's loss) and wrote the same final weights, byte for byte; prints one line.
same_runs() {
  python3 - "$1" "$2" "$3" <<'PY'
import json, sys
from pathlib import Path
runs, label = [Path(a) for a in sys.argv[1:3]], sys.argv[3]
def trace(run):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss_exact"]) for r in map(json.loads, lines) if r["type"] == "train"]
same_loss = trace(runs[0]) == trace(runs[1])
weights = [(run / "final" / "model.safetensors").read_bytes() for run in runs]
print(f"{label}: losses identical {same_loss}, final weights identical {weights[0] == weights[1]}")
sys.exit(0 if same_loss and weights[0] == weights[1] else 1)
PY
}

train_run() {
  local work="$OUT/train"
  rm -rf "$work" && mkdir -p "$work"
  python3 - "$work" <<'PY'
import json, random, sys
from pathlib import Path
work = Path(sys.argv[1])
words = [f"w{i}" for i in range(300)]
random.seed(0)
# 200 documents (a blank line ends one), so the held-out split leaves plenty to train on.
(work / "corpus.txt").write_text("\n\n".join(" ".join(random.choice(words) for _ in range(60)) for _ in range(200)))
(work / "config.json").write_text(json.dumps({
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512,
    "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "bfloat16"}))
PY
  "$BUILD/reference/kept" tokenizer --input "$work/corpus.txt" --vocab-size 512 --output "$work/tok"
  cat >"$work/job.json" <<JSON
{"objective": "ce", "device": "cuda", "init": {"config": "$work/config.json"},
 "tokenizer": "$work/tok/tokenizer.model", "data": {"train": "$work/corpus.txt", "seq_len": 128},
 "batch_size": 8, "steps": 30, "checkpoint": {"every": 10, "keep": 2},
 "eval": {"every": 0, "max_batches": 2}, "output": "$work/run"}
JSON
  "$BUILD/reference/kept" train "$work/job.json"
  # The memory strategies that must not change one bit, with the GPU's real streams (the emulator
  # runs every stream in order): a random student distilled from the run above, teacher resident
  # vs streamed (the next layer copied on a second stream) with the states on the device vs in
  # host memory; the losses and the final weights must be identical.
  local variant
  for variant in resident streamed; do
    local memory='{}'
    [[ $variant == streamed ]] && memory='{"teacher": "streamed", "states_on": "host"}'
    cat >"$work/xkd-$variant.json" <<JSON
{"objective": "xkd-logit", "device": "cuda", "init": {"config": "$work/config.json", "seed": 5},
 "teacher": "$work/run/final", "tokenizer": "$work/tok/tokenizer.model",
 "data": {"train": "$work/corpus.txt", "seq_len": 128}, "batch_size": 8, "grad_accum": 2,
 "steps": 6, "memory": $memory, "eval": {"every": 0, "max_batches": 2},
 "output": "$work/xkd-$variant"}
JSON
    "$BUILD/reference/kept" train "$work/xkd-$variant.json" || return 1
  done
  same_runs "$work/xkd-resident" "$work/xkd-streamed" "streamed teacher + host states vs resident"
}
if [[ $REFERENCE == ON ]]; then
  step "kept train --device cuda (tiny ce job)" "$OUT/train.txt" train_run
else
  skip "kept train --device cuda: no SentencePiece/libgd here, the kept command was not built"
fi
grep -E "^device cuda|^attention:|^optimizer:|trained|^streamed teacher" "$OUT/train.txt" |
  tee -a "$SUMMARY" || true
# One GPU, the collectives through NCCL (kept train --nccl: bootstrap over a local communicator,
# ZeRO stage 2: each layer's gradients reduce-scattered inside backward, the weights all-gathered,
# all on NCCL's own stream ordered against the compute stream by events) against the same job
# without collectives: with clipping off the losses and final weights must be identical.
nccl_run() {
  local work="$OUT/train" name
  for name in plain nccl; do
    local flags=()
    [[ $name == nccl ]] && flags=(--nccl)
    "$BUILD/reference/kept" train "$work/xkd-resident.json" --output "$work/xkd-$name" \
      --set zero_stage=2 --set memory.gradients=none --set clip_grad_norm=0 "${flags[@]}" ||
      return 1
  done
  same_runs "$work/xkd-plain" "$work/xkd-nccl" "1-rank NCCL job (ZeRO 2) vs no collectives"
}
if [[ $REFERENCE == ON && -x "$BUILD/tests/cuda/kept_nccl_tests" && -f "$OUT/train/xkd-resident.json" ]]; then
  step "kept train --device cuda --nccl (1-rank NCCL job, ZeRO 2)" "$OUT/train-nccl.txt" nccl_run
  grep -E "^collectives:|^1-rank NCCL" "$OUT/train-nccl.txt" | tee -a "$SUMMARY" || true
else
  skip "kept train --nccl: no kept command, no NCCL at build time, or step 8 made no job"
fi

# ---- 9. a 1B-class training step: throughput and MFU ------------------------------------------------
# hidden 2048, 22 layers, 16 heads x 128, intermediate 5504 (1.11e9 parameters outside the
# embedding; vocab 512 from the tiny tokenizer), batch 8 x 1024 tokens, the compact optimizer
# states (bf16 weights rounded stochastically, 8-bit moments). Steady state between step 4 and the
# last; MFU = 6 N tokens/s / 989e12 (dense bf16 peak of an H100/H200).
train_1b() {
  local work="$OUT/train" big="$OUT/train-1b"
  rm -rf "$big" && mkdir -p "$big"
  python3 - "$big" <<'PY'
import json, sys
from pathlib import Path
Path(sys.argv[1], "config.json").write_text(json.dumps({
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512,
    "hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 22,
    "num_attention_heads": 16, "num_key_value_heads": 16, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "bfloat16"}))
PY
  cat >"$big/job.json" <<JSON
{"objective": "ce", "device": "cuda", "init": {"config": "$big/config.json"},
 "tokenizer": "$work/tok/tokenizer.model", "data": {"train": "$work/corpus.txt", "seq_len": 1024},
 "batch_size": 8, "steps": 12, "memory": {"master_weights": "none", "optimizer_states": "int8"},
 "eval": {"every": 0, "max_batches": 1}, "output": "$big/run"}
JSON
  timeout 150 "$BUILD/reference/kept" train "$big/job.json"
  python3 - "$big/run/metrics.jsonl" <<'PY'
import json, sys
steps = [r for r in map(json.loads, open(sys.argv[1])) if r.get("type") == "train"]
a, b = steps[3], steps[-1]
seconds = b["tokens"] / b["tokens_per_second"] - a["tokens"] / a["tokens_per_second"]
rate = (b["tokens"] - a["tokens"]) / seconds
n = 22 * (4 * 2048 * 2048 + 3 * 2048 * 5504)
print(f"1B-class step: {rate:.0f} tokens/s, MFU {6 * n * rate / 989e12:.1%} (N = {n / 1e9:.2f}e9)")
PY
}
if [[ $REFERENCE == ON && -f "$OUT/train/tok/tokenizer.model" ]]; then
  step "kept train --device cuda (1B-class, 12 steps: tokens/s, MFU)" "$OUT/train-1b.txt" train_1b
  grep -E "^attention:|^optimizer:|1B-class step" "$OUT/train-1b.txt" | tee -a "$SUMMARY" || true
else
  skip "1B-class training step: needs the kept command and step 8's tokenizer"
fi

# ---- 10. the 14B job, synthetic: step time, MFU, peak memory, hours, against the plan ----------------
synthetic_14b() {
  local job="$ROOT/reference/jobs/orion14b-llamion.json"
  for gpu in h100-80g h200-141g; do
    echo "== kept plan --gpu $gpu"
    "$BUILD/reference/kept" plan "$job" --gpu "$gpu" --host-memory 120 | head -30
  done
  echo "== kept train --synthetic --gpu h100-80g (kept's allocator capped at the H100's budget)"
  timeout 90 "$BUILD/reference/kept" train "$job" --synthetic --steps 4 --gpu h100-80g || true
  echo "== kept train --synthetic (uncapped)"
  timeout 90 "$BUILD/reference/kept" train "$job" --synthetic --steps 4
}
if [[ $REFERENCE == ON ]]; then
  step "kept train --synthetic: the 14B job's real shapes (capped at 80 GB, and uncapped)" \
    "$OUT/synthetic-14b.txt" synthetic_14b
  grep -E "^memory plan|^synthetic:|^planned:|^memory:|^projected:|does not fit" \
    "$OUT/synthetic-14b.txt" | tee -a "$SUMMARY" || true
else
  skip "14B synthetic step: needs the kept command"
fi

say "done in $((SECONDS - T0)) s, status $STATUS"
exit $STATUS
