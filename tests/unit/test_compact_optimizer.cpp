// AdamW's compact states (kept/train/adamw.hpp): the 8-bit dynamic-tree code against its
// definition and a brute-force nearest search; 8-bit blockwise moments against the fp32 path
// (the first step identical to the bit, the stored codes the nearest ones, a noisy quadratic
// still converging); bf16 weights without master copies, rounded stochastically, against the
// expectation that round-to-nearest would lose; save/load continuing bit-identically; and the
// errors when a saved state's form does not match the optimizer's.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <set>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "kept/backend/cpu.hpp"
#include "kept/backend/cpu_bf16.hpp"
#include "kept/core/dynamic_code.hpp"
#include "kept/core/random.hpp"
#include "kept/layers/parameter.hpp"
#include "kept/model/parameter_arena.hpp"
#include "kept/train/adamw.hpp"
#include "support/errors.hpp"
#include "support/tensors.hpp"

using namespace kept;
using namespace kept::test;
using Catch::Contains;

namespace {

// The code values by definition, in double: +-10^-z (0.1 + 0.9 (f + 0.5) / 2^F) for every
// (z, F) with z + F = bits - 1, plus 0 and 1. kept forms them in fp32 (10^-z rounded, one fma,
// one product): within 3 fp32 ulps.
std::vector<double> code_by_definition(bool is_signed) {
  const int bits = is_signed ? 7 : 8;
  std::vector<double> values{0.0, 1.0};
  for (int z = 0; z <= 6; ++z) {
    const int fraction_bits = bits - 1 - z;
    for (int f = 0; f < (1 << fraction_bits); ++f) {
      const double v =
          std::pow(10.0, -z) * (0.1 + 0.9 * (f + 0.5) / std::ldexp(1.0, fraction_bits));
      values.push_back(v);
      if (is_signed) values.push_back(-v);
    }
  }
  std::sort(values.begin(), values.end());
  return values;
}

std::uint8_t brute_force_nearest(const std::array<float, 256>& code, float x) {
  int best = 0;
  for (int k = 1; k < 256; ++k)
    if (std::fabs(x - code[static_cast<std::size_t>(k)]) <
        std::fabs(x - code[static_cast<std::size_t>(best)]))
      best = k;
  return static_cast<std::uint8_t>(best);
}

template <class B>
Parameter device_param(B& b, std::string name, ParamRole role, Shape shape, Random& random,
                       double scale) {
  Tensor host = Tensor::empty(DType::F32, shape);
  for (float& x : host.span<float>())
    x = static_cast<float>(scale * random.normal());
  Parameter p;
  p.name = std::move(name);
  p.role = role;
  p.value = b.zeros(B::Precision::param, shape);
  b.upload(host, p.value);
  p.grad = b.zeros(B::Precision::grad, shape);
  return p;
}

template <class B>
void random_grads(B& b, std::span<Parameter* const> params, Random& random) {
  for (Parameter* p : params) {
    Tensor g = Tensor::empty(DType::F32, p->value.shape());
    for (float& x : g.span<float>())
      x = static_cast<float>(random.normal());
    b.upload(g, p->grad);
  }
}

// Two parameters drawn from `seed` into `ps`: "big" [3, 333] (999 elements: four quantisation
// blocks, the last partial) and "small" [64] (a norm weight); pointers to them.
template <class B>
std::vector<Parameter*> big_and_small(B& b, std::vector<Parameter>& ps, std::uint64_t seed) {
  Random random(seed);
  ps.push_back(device_param(b, "big", ParamRole::Weight, {3, 333}, random, 0.3));
  ps.push_back(device_param(b, "small", ParamRole::NormWeight, {64}, random, 1.0));
  std::vector<Parameter*> ptrs;
  for (auto& p : ps)
    ptrs.push_back(&p);
  return ptrs;
}

std::vector<float> floats(const Tensor& t) {
  const Tensor f = t.to(DType::F32);
  return {f.data<float>(), f.data<float>() + f.numel()};
}

}  // namespace

TEST_CASE("the 8-bit dynamic-tree codes are the defined 256 values, sorted", "[train][adamw8]") {
  const DynamicCodes& codes = dynamic_codes();
  for (bool is_signed : {true, false}) {
    INFO((is_signed ? "signed" : "unsigned"));
    const auto& code = is_signed ? codes.signed_code : codes.unsigned_code;
    const std::vector<double> want = code_by_definition(is_signed);
    REQUIRE(want.size() == 256);
    for (std::size_t k = 0; k < 256; ++k) {
      INFO("rank " << k);
      CHECK(std::fabs(code[k] - want[k]) <= 3 * 0x1p-23 * std::fabs(want[k]));
      if (k > 0) CHECK(code[k - 1] < code[k]);
    }
    CHECK(code[255] == 1.0f);  // the block's absmax element is stored exactly
    CHECK(std::count(code.begin(), code.end(), 0.0f) == 1);
  }
  CHECK(codes.unsigned_code[0] == 0.0f);
  CHECK(codes.signed_code[0] == -codes.signed_code[254]);  // symmetric but for the 1.0
}

TEST_CASE("quantize_nearest finds the nearest code value", "[train][adamw8]") {
  const DynamicCodes& codes = dynamic_codes();
  Random random(3);
  for (int i = 0; i < 20000; ++i) {
    // Uniform, and log-uniform down to 1e-8 to reach every decade.
    const double magnitude = i % 2 ? random.uniform() : std::pow(10.0, -8.0 * random.uniform());
    const float x = static_cast<float>(i % 4 < 2 ? magnitude : -magnitude);
    const std::uint8_t got = quantize_nearest(codes.signed_code.data(), x);
    const std::uint8_t want = brute_force_nearest(codes.signed_code, x);
    INFO("x = " << x);
    CHECK(std::fabs(x - codes.signed_code[got]) == std::fabs(x - codes.signed_code[want]));
    const float v = std::fabs(x);
    const std::uint8_t rank = quantize_second_moment(codes.unsigned_code.data(), v);
    CHECK(rank > 0);  // a positive second moment never becomes 0
    if (brute_force_nearest(codes.unsigned_code, v) != 0)
      CHECK(std::fabs(v - codes.unsigned_code[rank]) ==
            std::fabs(v - codes.unsigned_code[brute_force_nearest(codes.unsigned_code, v)]));
  }
  CHECK(quantize_nearest(codes.signed_code.data(), 1.0f) == 255);
  CHECK(codes.signed_code[quantize_nearest(codes.signed_code.data(), 0.0f)] == 0.0f);
  CHECK(quantize_second_moment(codes.unsigned_code.data(), 0.0f) == 0);
}

TEST_CASE("stochastic rounding is unbiased and its bits uniform", "[train][adamw8]") {
  // A value a quarter of the way between two bf16 neighbours rounds up a quarter of the time.
  const float down = 1.0f, up = 1.0f + 0x1p-7f;
  const float x = down + 0.25f * (up - down);
  constexpr int kDraws = 40000;
  int ups = 0;
  double bit_sum = 0;
  for (int i = 0; i < kDraws; ++i) {
    const std::uint32_t bits = rounding_bits(12345, static_cast<std::uint64_t>(i));
    REQUIRE(bits < 65536u);
    bit_sum += bits;
    const float rounded = float_from_bf16(bf16_stochastic(x, bits));
    REQUIRE((rounded == down || rounded == up));
    ups += rounded == up;
  }
  // Binomial(40000, 0.25): sigma = 87; 5 sigma.
  CHECK(std::abs(ups - kDraws / 4) < 435);
  // Uniform on [0, 65535]: mean 32767.5, sigma of the mean 18918 / sqrt(40000) = 95; 5 sigma.
  CHECK(std::fabs(bit_sum / kDraws - 32767.5) < 475);
}

TEST_CASE("8-bit moments: the first step equals the fp32 one, the codes are the nearest",
          "[train][adamw8]") {
  Cpu cpu;
  Random random(5);
  // 1000 elements: three full blocks and a partial one.
  Parameter a = device_param(cpu, "w", ParamRole::Weight, {10, 100}, random, 0.5);
  Parameter b = a;
  b.value = a.value.clone();
  b.grad = a.grad.clone();
  std::vector<Parameter*> pa{&a}, pb{&b};
  random_grads(cpu, pa, random);
  b.grad = a.grad.clone();
  AdamWConfig config{.lr = 1e-2, .weight_decay = 0.1};
  AdamW fp32(config);
  config.moment_bits = 8;
  config.min_8bit_size = 256;
  AdamW eight(config);
  fp32.step(cpu, pa);
  eight.step(cpu, pb);
  // From zero moments the dequantised state is 0 either way, so the values agree to the bit.
  CHECK(same_bytes(a.value, b.value));

  const Tensor& codes_m = *eight.exp_avg("w");
  const Tensor& codes_v = *eight.exp_avg_sq("w");
  REQUIRE(codes_m.dtype() == DType::U8);
  const std::vector<float> m = floats(*fp32.exp_avg("w")), v = floats(*fp32.exp_avg_sq("w"));
  const auto state = eight.state_tensors(cpu);
  auto find = [&](const std::string& name) -> const Tensor& {
    for (const NamedTensor& t : state)
      if (t.name == name) return t.tensor;
    FAIL("no " << name);
    return state.front().tensor;
  };
  const Tensor& absmax_m = find("exp_avg_absmax/w");
  const Tensor& absmax_v = find("exp_avg_sq_absmax/w");
  REQUIRE(absmax_m.numel() == 4);
  const DynamicCodes& codes = dynamic_codes();
  for (std::int64_t block = 0; block < 4; ++block) {
    const std::size_t begin = static_cast<std::size_t>(block * kQuantBlock);
    const std::size_t end = std::min<std::size_t>(begin + kQuantBlock, m.size());
    float m_max = 0, v_max = 0;
    for (std::size_t i = begin; i < end; ++i) {
      m_max = std::max(m_max, std::fabs(m[i]));
      v_max = std::max(v_max, v[i]);
    }
    CHECK(absmax_m.data<float>()[block] == m_max);
    CHECK(absmax_v.data<float>()[block] == v_max);
    for (std::size_t i = begin; i < end; ++i) {
      INFO("element " << i);
      const std::uint8_t qm = codes_m.data<std::uint8_t>()[i];
      const std::uint8_t qv = codes_v.data<std::uint8_t>()[i];
      const float nm = m[i] / m_max, nv = v[i] / v_max;
      CHECK(std::fabs(nm - codes.signed_code[qm]) ==
            std::fabs(nm - codes.signed_code[brute_force_nearest(codes.signed_code, nm)]));
      const std::uint8_t want_v =
          std::max<std::uint8_t>(1, brute_force_nearest(codes.unsigned_code, nv));
      CHECK(std::fabs(nv - codes.unsigned_code[qv]) == std::fabs(nv - codes.unsigned_code[want_v]));
    }
  }
}

TEST_CASE("8-bit and bf16 moments still minimise a noisy quadratic like fp32 moments",
          "[train][adamw8]") {
  // f(p) = 0.5 |p - target|^2 with gradient noise; the optimizers from the same start and
  // noise. The 8-bit and bf16 runs must get as close: within 1.25x the fp32 run's final distance
  // (the 8-bit relative error on m and v is below 1% in the top decade of each block; bf16's is
  // 0.4% an element, unbiased).
  Cpu cpu;
  auto run = [&](int bits) {
    Random random(9);
    Parameter p = device_param(cpu, "p", ParamRole::Weight, {4096}, random, 1.0);
    std::vector<float> target(4096);
    for (float& t : target)
      t = static_cast<float>(random.normal());
    AdamW opt({.lr = 0.05, .weight_decay = 0.0, .moment_bits = bits});
    std::vector<Parameter*> ps{&p};
    for (int step = 0; step < 300; ++step) {
      opt.set_lr(0.05 * (1.0 - step / 300.0));
      for (std::size_t i = 0; i < target.size(); ++i)
        p.grad.data<float>()[i] =
            p.value.data<float>()[i] - target[i] + static_cast<float>(0.3 * random.normal());
      opt.step(cpu, ps);
    }
    double distance = 0;
    for (std::size_t i = 0; i < target.size(); ++i)
      distance += std::pow(p.value.data<float>()[i] - target[i], 2);
    return std::sqrt(distance / 4096);
  };
  const double fp32 = run(32), eight = run(8), sixteen = run(16);
  INFO("rms distance to the optimum: fp32 moments " << fp32 << ", 8-bit " << eight << ", bf16 "
                                                    << sixteen);
  CHECK(fp32 < 0.1);  // all actually converge (from an rms distance of ~1.4)
  CHECK(eight < 1.25 * fp32);
  CHECK(sixteen < 1.25 * fp32);
}

TEST_CASE("bf16 moments: stochastic rounding keeps v moving where nearest rounding freezes it",
          "[train][adamw8]") {
  // A constant gradient g: v_t = (1 - b2^t) g^2 exactly. Its per-step change near the end is
  // far below half a bf16 ulp of v, so round-to-nearest would stop it early; stochastic rounding
  // must track it on average. Checked over 4096 elements after 2000 steps (b2 = 0.999: v at
  // 86.5% of g^2), mean within 0.5% of the exact value.
  Cpu cpu;
  Random random(3);
  Parameter p = device_param(cpu, "p", ParamRole::Weight, {4096}, random, 1.0);
  AdamW opt({.lr = 0.0, .weight_decay = 0.0, .moment_bits = 16});
  std::vector<Parameter*> ps{&p};
  for (float& g : p.grad.span<float>())
    g = 0.5f;
  const int steps = 2000;
  for (int step = 0; step < steps; ++step)
    opt.step(cpu, ps);
  const Tensor& v = *opt.exp_avg_sq("p");
  REQUIRE(v.dtype() == DType::BF16);
  double mean = 0;
  for (const bf16 x : v.span<const bf16>())
    mean += to_float(x);
  mean /= static_cast<double>(v.numel());
  const double exact = (1.0 - std::pow(0.999, steps)) * 0.25;
  INFO("mean v " << mean << ", exact " << exact);
  CHECK(std::fabs(mean / exact - 1) < 0.005);
  // Round-to-nearest from the same recurrence stalls well below it.
  float nearest = 0;
  for (int step = 0; step < steps; ++step)
    nearest = to_float(to_bf16(std::fma(0.001f * 0.5f, 0.5f, nearest * 0.999f)));
  INFO("round-to-nearest v " << nearest);
  CHECK(nearest < 0.9 * exact);
}

TEST_CASE(
    "bf16 weights without masters: stochastic rounding keeps the steps nearest rounding loses",
    "[train][adamw8]") {
  // Every element starts at 1.0 (bf16 ulp 2^-7 = 0.0078) and sees a constant gradient, so
  // each AdamW step moves it by ~lr = 1e-4, a seventy-eighth of an ulp: with round-to-nearest
  // and no master it would never move. With fp32 masters and with stochastic rounding the mean
  // over 4096 elements after 100 steps is 1 - 0.01; the stochastic spread of the mean is
  // sqrt(100 * ulp^2 / 4 / 4096) ~ 0.0006, so within 0.003 (5 sigma).
  CpuBf16 cpu;
  auto run = [&](bool master) {
    Parameter p;
    p.name = "w";
    p.role = ParamRole::Weight;
    Tensor ones = Tensor::empty(DType::F32, {4096});
    std::fill(ones.data<float>(), ones.data<float>() + 4096, 1.0f);
    p.value = cpu.zeros(DType::BF16, {4096});
    cpu.upload(ones, p.value);
    p.grad = cpu.zeros(DType::F32, {4096});
    cpu.upload(ones, p.grad);
    AdamW opt({.lr = 1e-4, .weight_decay = 0.0, .master_weights = master});
    std::vector<Parameter*> ps{&p};
    for (int step = 0; step < 100; ++step)
      opt.step(cpu, ps);
    const std::vector<float> values = floats(p.value);
    double mean = 0;
    for (float x : values)
      mean += x;
    return mean / 4096;
  };
  const double with_master = run(true), stochastic = run(false);
  INFO("mean value: fp32 masters " << with_master << ", stochastic rounding " << stochastic);
  CHECK(std::fabs(with_master - 0.99) < 0.004);  // round(master): master moved 0.01
  CHECK(std::fabs(stochastic - 0.99) < 0.003);
}

TEST_CASE("compact states save, load and continue bit-identically; mismatched forms are refused",
          "[train][adamw8]") {
  CpuBf16 cpu;
  const AdamWConfig config{.lr = 0.02,
                           .beta1 = 0.8,
                           .beta2 = 0.99,
                           .weight_decay = 0.1,
                           .master_weights = false,
                           .moment_bits = 8,
                           .min_8bit_size = 300};
  auto make = [&](std::vector<Parameter>& ps) { return big_and_small(cpu, ps, 21); };
  auto steps = [&](std::vector<Parameter*>& ps, AdamW& opt, int from, int to) {
    for (int s = from; s < to; ++s) {
      Random random(100 + static_cast<std::uint64_t>(s));
      random_grads(cpu, ps, random);
      opt.step(cpu, ps);
    }
  };
  std::vector<Parameter> straight_params, first_params, resumed_params;
  auto straight = make(straight_params);
  AdamW straight_opt(config);
  steps(straight, straight_opt, 0, 6);

  auto first = make(first_params);
  AdamW first_opt(config);
  steps(first, first_opt, 0, 3);
  const std::vector<NamedTensor> saved = first_opt.state_tensors(cpu);
  std::set<std::string> names;
  for (const NamedTensor& t : saved)
    names.insert(t.name);
  CHECK(names.count("exp_avg_absmax/big") == 1);
  CHECK(names.count("exp_avg_absmax/small") == 0);  // below min_8bit_size: fp32 moments
  CHECK(names.count("master/big") == 0);

  auto resumed = make(resumed_params);
  for (std::size_t i = 0; i < resumed.size(); ++i)
    cpu.upload(cpu.download(first[i]->value), resumed[i]->value);
  AdamW resumed_opt(config);
  resumed_opt.load_state(cpu, saved, resumed, "saved");
  steps(resumed, resumed_opt, 3, 6);
  for (std::size_t i = 0; i < resumed.size(); ++i) {
    INFO(resumed[i]->name);
    CHECK(same_bytes(cpu.download(resumed[i]->value), cpu.download(straight[i]->value)));
    CHECK(same_bytes(cpu.download(*resumed_opt.exp_avg(resumed[i]->name)),
                     cpu.download(*straight_opt.exp_avg(resumed[i]->name))));
  }

  SECTION("8-bit state into fp32 or bf16 moments") {
    for (const auto& [bits, dtype] : {std::pair{32, "F32"}, std::pair{16, "BF16"}}) {
      AdamWConfig other = config;
      other.moment_bits = bits;
      AdamW opt(other);
      CHECK_THROWS_WITH(opt.load_state(cpu, saved, resumed, "saved"),
                        Contains(std::string("saved: exp_avg/big is U8, expected ") + dtype) &&
                            Contains("optimizer_states"));
      CHECK(opt.steps_taken() == 0);
    }
  }
  SECTION("a state without masters into an optimizer that keeps them") {
    AdamWConfig other = config;
    other.master_weights = true;
    AdamW opt(other);
    CHECK_THROWS_WITH(opt.load_state(cpu, saved, resumed, "saved"),
                      Contains("saved: missing master/big"));
  }
  SECTION("a state with masters into an optimizer without") {
    AdamWConfig other = config;
    other.master_weights = true;
    AdamW with_master(other);
    steps(resumed, with_master, 0, 1);
    AdamW opt(config);
    CHECK_THROWS_WITH(opt.load_state(cpu, with_master.state_tensors(cpu), resumed, "saved"),
                      Contains("unexpected tensor master/") && Contains("master_weights"));
  }
  SECTION("moment_bits must be 32, 16 or 8") {
    AdamWConfig other = config;
    other.moment_bits = 4;
    CHECK_THROWS_WITH(AdamW(other), Contains("moment_bits must be 32, 16 or 8, got 4"));
  }
}

TEST_CASE("compact states in the parameter arena: the same bits as separate allocations",
          "[train][adamw8]") {
  CpuBf16 cpu;
  const AdamWConfig config{
      .lr = 0.01, .master_weights = false, .moment_bits = 8, .min_8bit_size = 500};
  auto make = [&] {
    ParamList model;
    Random random(8);
    model.ps.push_back(device_param(cpu, "a", ParamRole::Weight, {700}, random, 0.2));
    model.ps.push_back(device_param(cpu, "b", ParamRole::NormWeight, {20}, random, 1.0));
    model.ps.push_back(device_param(cpu, "c", ParamRole::Weight, {2, 300}, random, 0.2));
    return model;
  };
  ParamList loose = make(), packed = make();
  AdamW loose_opt(config), packed_opt(config);
  ParameterArena arena(cpu, packed, packed_opt.arena_layout());
  CHECK(arena.has_quantized_moments());
  CHECK_FALSE(arena.has_master());
  packed_opt.use_arena(&arena);
  std::vector<Parameter*> lp, pp;
  for (std::size_t i = 0; i < 3; ++i) {
    lp.push_back(&loose.ps[i]);
    pp.push_back(&packed.ps[i]);
  }
  for (int s = 0; s < 4; ++s) {
    Random r1(50 + static_cast<std::uint64_t>(s)), r2(50 + static_cast<std::uint64_t>(s));
    random_grads(cpu, lp, r1);
    random_grads(cpu, pp, r2);
    loose_opt.step(cpu, lp);
    packed_opt.step(cpu, pp);
  }
  for (std::size_t i = 0; i < 3; ++i) {
    INFO(lp[i]->name);
    CHECK(same_bytes(lp[i]->value, pp[i]->value));
    CHECK(same_bytes(*loose_opt.exp_avg(lp[i]->name), *packed_opt.exp_avg(pp[i]->name)));
  }
  // The 8-bit codes of "a" live in the arena's byte buffer; "b" (below min_8bit_size) has its
  // own fp32 moments.
  CHECK(packed_opt.exp_avg("a")->dtype() == DType::U8);
  CHECK(packed_opt.exp_avg("a")->storage() == arena.exp_avg(*arena.find("a")).storage());
  CHECK(packed_opt.exp_avg("b")->dtype() == DType::F32);
}

TEST_CASE("sharded states: the owners' updates are one optimizer's, bit for bit", "[train][zero]") {
  // Two owners split "big" at element 512 (a multiple of kQuantBlock); owner 0 also holds all of
  // "small" and owner 1 none of it. bf16 weights without masters round stochastically, with bits
  // indexed by the element's place in the whole parameter: the case an offset would break.
  CpuBf16 cpu;
  for (const bool master : {false, true}) {
    for (const int bits : {8, 32}) {
      INFO("master weights " << master << ", " << bits << "-bit moments");
      const AdamWConfig config{.lr = 0.02,
                               .weight_decay = 0.1,
                               .master_weights = master,
                               .moment_bits = bits,
                               .min_8bit_size = 300};
      auto make = [&](std::vector<Parameter>& ps) { return big_and_small(cpu, ps, 33); };
      std::vector<Parameter> whole_params, params0, params1;
      auto whole = make(whole_params);
      auto owner0 = make(params0);
      auto owner1 = make(params1);
      AdamW whole_opt(config), opt0(config), opt1(config);
      opt0.shard_states({{"big", {0, 512}}, {"small", {0, 64}}});
      opt1.shard_states({{"big", {512, 999 - 512}}});
      for (int s = 0; s < 4; ++s) {
        for (auto* ps : {&whole, &owner0, &owner1}) {
          Random random(70 + static_cast<std::uint64_t>(s));
          random_grads(cpu, *ps, random);
        }
        whole_opt.step(cpu, whole);
        opt0.step(cpu, owner0);
        opt1.step(cpu, owner1);
        // The all-gather: each owner's elements to both.
        Tensor big = cpu.download(owner0[0]->value), big1 = cpu.download(owner1[0]->value);
        std::copy(big1.data<bf16>() + 512, big1.data<bf16>() + 999, big.data<bf16>() + 512);
        for (auto* ps : {&owner0, &owner1}) {
          cpu.upload(big, (*ps)[0]->value);
          cpu.upload(cpu.download(owner0[1]->value), (*ps)[1]->value);
        }
      }
      for (std::size_t i = 0; i < 2; ++i) {
        INFO(whole[i]->name);
        CHECK(same_bytes(cpu.download(owner0[i]->value), cpu.download(whole[i]->value)));
      }
      CHECK(opt1.exp_avg("small") == nullptr);  // owns none of it: no state
      CHECK(opt1.exp_avg("big")->numel() == 999 - 512);

      // The whole state loads into an owner as its range of every tensor.
      AdamW loaded(config);
      loaded.shard_states({{"big", {512, 999 - 512}}});
      loaded.load_state(cpu, whole_opt.state_tensors(cpu), owner1, "whole");
      const Tensor want = cpu.download(*whole_opt.exp_avg_sq("big"));
      const Tensor got = cpu.download(*loaded.exp_avg_sq("big"));
      const std::size_t width = dtype_size(want.dtype());
      REQUIRE(got.nbytes() == (999 - 512) * width);
      CHECK(std::equal(static_cast<const char*>(got.raw()),
                       static_cast<const char*>(got.raw()) + got.nbytes(),
                       static_cast<const char*>(want.raw()) + 512 * width));
      CHECK(loaded.parameter_step("big") == 4);
      CHECK(loaded.parameter_step("small") == 0);
      // ... and continues as the owner that never stopped.
      for (auto* ps : {&owner1}) {
        Random random(99);
        random_grads(cpu, *ps, random);
      }
      std::vector<Parameter> again_params;
      auto again = make(again_params);
      cpu.upload(cpu.download(owner1[0]->value), again[0]->value);
      Random same(99);
      random_grads(cpu, again, same);
      loaded.step(cpu, again);
      opt1.step(cpu, owner1);
      CHECK(same_bytes(cpu.download(again[0]->value), cpu.download(owner1[0]->value)));
    }
  }
  AdamW opt(AdamWConfig{});
  CHECK_THROWS_WITH(opt.shard_states({{"big", {100, 10}}}),
                    Contains("owned range [100, +10) of big does not start on a multiple of 256"));
}
