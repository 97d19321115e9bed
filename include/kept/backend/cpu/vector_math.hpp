// kept/backend/cpu/vector_math.hpp: elementwise math written so that the compiler vectorises it.
//
// glibc's expf is a scalar call: a loop over it runs one element at a time (libmvec's vector
// variants are only used under -ffast-math). vexp below is plain C++ with no branches, no
// calls and no tables, so `#pragma omp simd` loops over it vectorise at the baseline ISA
// (SSE2: 4 lanes; more where a caller compiles for AVX2 or AVX-512).
//
// vexp(float): Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2, with ln2 split in two
// (the high part has 9 significant bits so n * ln2_hi is exact for |n| < 2^15), then the
// degree-6 polynomial of Cephes' expf for e^r, then the scaling by 2^n built from exponent
// bits, in two factors so that results in the subnormal range are still right. Measured error
// against double exp over [-104, 89] (every 2^12th float pattern, plus a dense sweep of
// [-20, 20]): at most 1 ulp, with or without FMA contraction; overflow gives +inf, x < -104
// gives 0, NaN propagates.
// For double, vexp is std::exp: the float64 path is the reference and stays exact.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string_view>
#include <type_traits>

namespace kept::cpu {

#if defined(_OPENMP)
#define KEPT_PRAGMA_SIMD _Pragma("omp simd")
#else
#define KEPT_PRAGMA_SIMD
#endif

// Runtime ISA dispatch. The library is compiled for the baseline x86-64 ISA (SSE2), which runs
// everywhere; there the elementwise kernels with real arithmetic per byte (exp in SwiGLU and
// softmax, the norm backward) cannot keep up with the memory. So the fp32 kernels are also
// instantiated for AVX2 + FMA and for AVX-512 (F, VL, BW, DQ; 512-bit vectors) through
// __attribute__((target(...))): the same C++ source, force-inlined into one entry point per
// ISA, picked at run time by what the CPU supports (cpu_isa()). The environment variable
// KEPT_CPU_ISA=baseline|avx2|avx512 caps the choice (to test every path on one machine).
// The paths differ in the last bit (vector widths change the order of the partial sums, FMA
// contracts a * b + c); each is deterministic. Off on other architectures and when the
// compiler already targets AVX-512; nvcc passes the attributes to its host compiler, so .cu and
// .cpp translation units see the same definitions.
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && !defined(__AVX512F__)
#define KEPT_CPU_DISPATCH 1
#define KEPT_TARGET_AVX2 __attribute__((target("avx2,fma")))
#if defined(__clang__)
#define KEPT_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq")))
#else
#define KEPT_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,prefer-vector-width=512")))
#endif
#else
#define KEPT_CPU_DISPATCH 0
#endif
// KEPT_ALWAYS_INLINE: force-inlined functions (the bodies of the dispatched kernels, which
// must be compiled inside each entry point); KEPT_LAMBDA_INLINE the same for a lambda.
#if defined(__GNUC__) || defined(__clang__)
#define KEPT_ALWAYS_INLINE __attribute__((always_inline)) inline
#define KEPT_LAMBDA_INLINE __attribute__((always_inline))
#else
#define KEPT_ALWAYS_INLINE inline
#define KEPT_LAMBDA_INLINE
#endif

enum class CpuIsa : int { Baseline = 0, Avx2 = 1, Avx512 = 2 };

// The widest ISA with entry points that this CPU (and OS) supports, capped by KEPT_CPU_ISA.
inline CpuIsa cpu_isa() {
#if KEPT_CPU_DISPATCH
  static const CpuIsa isa = [] {
    CpuIsa best = CpuIsa::Baseline;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = CpuIsa::Avx2;
    if (best == CpuIsa::Avx2 && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq"))
      best = CpuIsa::Avx512;
    if (const char* cap = std::getenv("KEPT_CPU_ISA")) {
      const std::string_view name(cap);
      const CpuIsa limit = name == "baseline" ? CpuIsa::Baseline
                           : name == "avx2"   ? CpuIsa::Avx2
                                              : CpuIsa::Avx512;
      if (static_cast<int>(limit) < static_cast<int>(best)) best = limit;
    }
    return best;
  }();
  return isa;
#else
  return CpuIsa::Baseline;
#endif
}

inline const char* cpu_isa_name(CpuIsa isa) {
  return isa == CpuIsa::Avx512 ? "avx512" : isa == CpuIsa::Avx2 ? "avx2" : "baseline";
}

// KEPT_CPU_ENTRY_POINTS(name, body, (parameters), (arguments)) defines name_avx2 and
// name_avx512, which run `body arguments` compiled for that ISA; KEPT_CPU_DISPATCH_TO(T, isa,
// name, (arguments)) calls the one for `isa` when T is float and sets `dispatched`.
#if KEPT_CPU_DISPATCH
#define KEPT_CPU_ENTRY_POINTS(name, body, parameters, arguments) \
  KEPT_TARGET_AVX2 inline void name##_avx2 parameters {          \
    body arguments;                                              \
  }                                                              \
  KEPT_TARGET_AVX512 inline void name##_avx512 parameters {      \
    body arguments;                                              \
  }
#define KEPT_CPU_DISPATCH_TO(T, isa, name, arguments) \
  if constexpr (std::is_same_v<T, float>) {           \
    if ((isa) == ::kept::cpu::CpuIsa::Avx512) {       \
      name##_avx512 arguments;                        \
      dispatched = true;                              \
    } else if ((isa) == ::kept::cpu::CpuIsa::Avx2) {  \
      name##_avx2 arguments;                          \
      dispatched = true;                              \
    }                                                 \
  }
#else
#define KEPT_CPU_ENTRY_POINTS(name, body, parameters, arguments)
#define KEPT_CPU_DISPATCH_TO(T, isa, name, arguments) (void)(isa);
#endif

namespace detail {
// All-ones when `condition`, else zero.
KEPT_ALWAYS_INLINE std::uint32_t mask_of(bool condition) {
  return 0u - static_cast<std::uint32_t>(condition);
}
// mask ? a : b on the bits.
KEPT_ALWAYS_INLINE float select_bits(std::uint32_t mask, float a, float b) {
  return std::bit_cast<float>((std::bit_cast<std::uint32_t>(a) & mask) |
                              (std::bit_cast<std::uint32_t>(b) & ~mask));
}

// ---- blocked reductions ----------------------------------------------------------------------
// Row reductions sum kReductionBlock elements at a time in the element type, in vector lanes
// (`#pragma omp simd reduction`), then add the block's sum to a double: the fp32 rounding error
// is that of short sums, and the lanes keep the loop at vector speed. The lane count is the
// vector width of the instantiation (4 for SSE2, 8 for AVX2), so an SSE2 and an AVX2 machine
// may differ in the last bit; one machine gives the same result every run.
inline constexpr std::int64_t kReductionBlock = 256;

}  // namespace detail

KEPT_ALWAYS_INLINE float vexp(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  // Clamp x to [-104, 88.9] so that n stays in [-150, 128], and remember NaNs. The tests are
  // integer compares on the bits, with selects on the bits: GCC vectorises a loop only if it
  // can if-convert its branches, and under the default -ftrapping-math it will not evaluate
  // float comparisons speculatively (SSE2 has no quiet ordered compare either); with float
  // selects it also threads the clamp constants through the arithmetic and makes it
  // conditional. Positive floats order as signed integers, negative ones as unsigned.
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(x);
  const std::uint32_t nan = detail::mask_of((bits & 0x7fffffffu) > 0x7f800000u);
  const std::uint32_t above =
      detail::mask_of(static_cast<std::int32_t>(bits) > std::bit_cast<std::int32_t>(88.9f));
  const std::uint32_t below = detail::mask_of(bits > std::bit_cast<std::uint32_t>(-104.0f));
  const float clamped = detail::select_bits(above, 88.9f, detail::select_bits(below, -104.0f, x));
  // n = round(x / ln2) via the 1.5 * 2^23 trick: the low bits of `shifted` hold n, read back
  // as an integer.
  constexpr float kRound = 12582912.0f;
  const float shifted = clamped * kLog2e + kRound;
  const float n = shifted - kRound;
  const float r = (clamped - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = (p * (r * r) + r) + 1.0f;
  // 2^n = 2^a * 2^b with a = floor(n / 2), b = n - a: both factors are normal floats for
  // n in [-150, 128], so the product rounds once into the subnormals and overflows to inf.
  const std::int32_t ni = static_cast<std::int32_t>(std::bit_cast<std::uint32_t>(shifted) -
                                                    std::bit_cast<std::uint32_t>(kRound));
  const std::int32_t a = ni >> 1, b = ni - a;
  const float scale_a = std::bit_cast<float>(static_cast<std::uint32_t>(a + 127) << 23);
  const float scale_b = std::bit_cast<float>(static_cast<std::uint32_t>(b + 127) << 23);
  return detail::select_bits(nan, x, (e * scale_a) * scale_b);
}
inline double vexp(double x) {
  return std::exp(x);
}

// max_j x[j] (n >= 1). For fp32 the comparison runs on integer keys (the float's bits with the
// magnitude bits flipped for negative values order like the floats), because neither GCC nor
// Clang vectorise a float max reduction without -ffast-math; an integer max they do. A NaN
// sorts above +inf (or below -inf when its sign bit is set).
KEPT_ALWAYS_INLINE std::int32_t float_order_key(float x) {
  const std::int32_t bits = std::bit_cast<std::int32_t>(x);
  return bits ^ ((bits >> 31) & 0x7fffffff);
}
KEPT_ALWAYS_INLINE float row_max(const float* __restrict x, std::int64_t n) {
  std::int32_t best = float_order_key(x[0]);
#pragma omp simd reduction(max : best)
  for (std::int64_t j = 1; j < n; ++j) {
    const std::int32_t key = float_order_key(x[j]);
    best = key > best ? key : best;
  }
  return std::bit_cast<float>(best ^ ((best >> 31) & 0x7fffffff));
}
inline double row_max(const double* x, std::int64_t n) {
  double best = x[0];
  for (std::int64_t j = 1; j < n; ++j)
    best = x[j] > best ? x[j] : best;
  return best;
}

// sigmoid(x) = 1 / (1 + e^-x), from e^-|x| in (0, 1] so nothing overflows:
// x >= 0: 1 / (1 + e), x < 0: e / (1 + e). The sign is read from the bits (see vexp).
KEPT_ALWAYS_INLINE float vsigmoid(float x) {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(x);
  const std::uint32_t negative = detail::mask_of((bits >> 31) != 0u);
  const float e = vexp(std::bit_cast<float>(bits | 0x80000000u));  // e^-|x|
  const float inverse = 1.0f / (1.0f + e);
  return detail::select_bits(negative, e * inverse, inverse);
}
inline double vsigmoid(double x) {
  return 1.0 / (1.0 + std::exp(-x));
}

}  // namespace kept::cpu
