#!/usr/bin/env bash
# tests/cuda/static_checks.sh REPO_ROOT WORK_DIR [CUOBJDUMP]: what can be checked about kept's
# kernels without a GPU (a ctest when nvcc is present; scripts/device.sh runs it too).
#   1. ptxas -v: no kernel spills registers to local memory;
#   2. SASS: the memory-bound kernels in their 16-byte-pack instantiation (add and the SwiGLU
#      gate, accumulate, swiglu backward, the norms forward/backward) load with LDG.E.128.
# tests/cuda/kernel_static_checks.cu instantiates every kernel; sm_90. CUOBJDUMP defaults to the
# one PyPI's nvidia-cuda-cuobjdump put in the test venv (scripts/python_env.sh).
set -euo pipefail
root="$1"
work="$2"
cuobjdump="${3:-}"
mkdir -p "$work"
"${NVCC:-nvcc}" -std=c++20 -arch=sm_90 -cubin --expt-relaxed-constexpr -Xptxas -v -I "$root/include" \
  -o "$work/kernels.cubin" "$root/tests/cuda/kernel_static_checks.cu" 2>"$work/ptxas.txt"
entries=$(grep -c "Compiling entry function" "$work/ptxas.txt" || true)
echo "static_checks: ptxas compiled $entries kernel entries for sm_90"
[[ "$entries" -ge 30 ]] || { echo "static_checks: expected >= 30 kernels, got $entries" >&2; exit 1; }
# ptxas -v: "Compiling entry function 'NAME' for 'sm_90'" ... "N bytes spill stores, M bytes spill loads"
spills=$(awk '/Compiling entry function/ { name = $4 }
              /bytes spill stores/ { if ($1 != 0 || $5 != 0) print name ": " $0 }' "$work/ptxas.txt" |
         c++filt || true)
if [[ -n "$spills" ]]; then
  echo "static_checks: FAIL: kernels spill registers:" >&2
  echo "$spills" >&2
  exit 1
fi
echo "static_checks: ok: no kernel spills registers"

if [[ -z "$cuobjdump" ]]; then
  cuobjdump=$(ls "${KEPT_VENV:-$HOME/.cache/kept/venv}"/lib/python3*/site-packages/nvidia/cu*/bin/cuobjdump 2>/dev/null | head -1 || true)
fi
[[ -x "$cuobjdump" ]] || { echo "static_checks: FAIL: no cuobjdump (scripts/python_env.sh installs PyPI's nvidia-cuda-cuobjdump)" >&2; exit 1; }
"$cuobjdump" --dump-sass "$work/kernels.cubin" >"$work/sass.txt"
# One block per function: "Function : MANGLED" then its SASS; demangle the names.
awk '/Function : / { name = $3; print "FUNCTION " name; next } { print }' "$work/sass.txt" |
  c++filt >"$work/sass-demangled.txt"
fail=0
for kernel in "binary_map_kernel<8, __nv_bfloat16, kept::cuda::detail::AddOp>" \
              "binary_map_kernel<8, __nv_bfloat16, kept::cuda::detail::SiluGateOp>" \
              "accumulate_kernel<8," "swiglu_backward_kernel<8," "norm_forward_kernel<true, 8," "norm_forward_kernel<false, 8," \
              "norm_backward_kernel<true, 8," "norm_backward_kernel<false, 8," "scale_kernel<4,"; do
  body=$(awk -v k="$kernel" '/^FUNCTION / { inside = index($0, k) > 0; next } inside' "$work/sass-demangled.txt")
  if [[ -z "$body" ]]; then
    echo "static_checks: FAIL: no SASS for a kernel matching '$kernel'" >&2
    fail=1
  elif grep -q "LDG\.E\.128" <<<"$body"; then
    echo "static_checks: ok: $kernel... loads with LDG.E.128"
  else
    echo "static_checks: FAIL: $kernel... has no 128-bit global load (LDG.E.128):" >&2
    grep "LDG" <<<"$body" | head -5 >&2
    fail=1
  fi
done
exit $fail
