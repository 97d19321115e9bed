// Training building blocks: AdamW (against hand-computed steps and torch.optim.AdamW), gradient
// clipping, the cosine schedule (against hand-computed values and transformers), checkpoint
// state (atomic save, latest, pruning, a write failing part-way), and an end-to-end tiny
// language-model run that is killed and resumed and must reproduce the uninterrupted losses bit
// for bit.
#include <catch2/catch.hpp>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <numbers>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "kept/backend/cpu.hpp"
#include "kept/core/random.hpp"
#include "kept/core/tensor.hpp"
#include "kept/io/safetensors.hpp"
#include "kept/layers/parameter.hpp"
#include "kept/model/parameter_arena.hpp"
#include "kept/train/adamw.hpp"
#include "kept/train/checkpoint_state.hpp"
#include "kept/train/data.hpp"
#include "kept/train/schedule.hpp"
#include "support/errors.hpp"
#include "support/files.hpp"
#include "support/tensors.hpp"

using namespace kept;
using namespace kept::test;
using Catch::Contains;

namespace {
// The optimizer, clipping and checkpoints run their range ops on the fp32 CPU backend.
Cpu host_backend;
}  // namespace

namespace {

Tensor f32_tensor(Shape shape, const std::vector<float>& values) {
  Tensor t = Tensor::empty(DType::F32, shape);
  REQUIRE(static_cast<std::int64_t>(values.size()) == t.numel());
  std::copy(values.begin(), values.end(), t.data<float>());
  return t;
}

std::vector<float> values_of(const Tensor& t) {
  auto s = t.span<const float>();
  return {s.begin(), s.end()};
}

Parameter make_param(std::string name, ParamRole role, Shape shape, std::vector<float> values) {
  Parameter p;
  p.name = std::move(name);
  p.role = role;
  p.value = f32_tensor(shape, values);
  p.grad = Tensor::zeros(DType::F32, shape);
  return p;
}

void set_grad(Parameter& p, const std::vector<float>& g) {
  REQUIRE(p.grad.defined());
  std::copy(g.begin(), g.end(), p.grad.data<float>());
}

nlohmann::json load_reference() {
  std::ifstream in(std::string(KEPT_TEST_DATA_DIR) + "/train_reference.json");
  REQUIRE(in.good());
  return nlohmann::json::parse(in);
}

ParamRole role_from(const std::string& name) {
  if (name == "weight") return ParamRole::Weight;
  if (name == "bias") return ParamRole::Bias;
  if (name == "norm_weight") return ParamRole::NormWeight;
  if (name == "norm_bias") return ParamRole::NormBias;
  if (name == "embedding") return ParamRole::Embedding;
  FAIL("unknown role " << name);
  return ParamRole::Weight;
}

}  // namespace

// ---- AdamW -----------------------------------------------------------------------------------

TEST_CASE("AdamW matches the update written out in double", "[train][adamw]") {
  const double lr = 0.01, b1 = 0.9, b2 = 0.999, eps = 1e-8, wd = 0.1;
  const std::vector<std::vector<double>> grads = {{0.1, -0.2}, {-0.3, 0.4}, {0.05, 0.6}};
  Parameter p = make_param("w", ParamRole::Weight, {2}, {0.5f, -1.5f});
  std::vector<Parameter*> params = {&p};
  AdamW opt({.lr = lr, .beta1 = b1, .beta2 = b2, .eps = eps, .weight_decay = wd});

  double x[2] = {0.5, -1.5}, m[2] = {0, 0}, v[2] = {0, 0};
  for (int t = 1; t <= 3; ++t) {
    const auto& g = grads[static_cast<std::size_t>(t - 1)];
    for (int i = 0; i < 2; ++i) {
      x[i] -= lr * wd * x[i];  // decoupled decay first, on the pre-update value
      m[i] = b1 * m[i] + (1 - b1) * g[i];
      v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i];
      const double m_hat = m[i] / (1 - std::pow(b1, t));
      const double v_hat = v[i] / (1 - std::pow(b2, t));
      x[i] -= lr * m_hat / (std::sqrt(v_hat) + eps);
    }
    set_grad(p, {static_cast<float>(g[0]), static_cast<float>(g[1])});
    opt.step(host_backend, params);
    for (int i = 0; i < 2; ++i) {
      INFO("step " << t << " element " << i);
      CHECK(p.value.data<float>()[i] == Approx(x[i]).epsilon(1e-6));
      CHECK(opt.exp_avg("w")->data<float>()[i] == Approx(m[i]).epsilon(1e-6));
      CHECK(opt.exp_avg_sq("w")->data<float>()[i] == Approx(v[i]).epsilon(1e-6));
    }
    CHECK(opt.parameter_step("w") == t);
  }
  CHECK(opt.steps_taken() == 3);
}

TEST_CASE("AdamW weight decay follows the parameter role", "[train][adamw]") {
  const std::vector<float> init = {1.0f, -2.0f, 3.0f};
  const std::vector<float> grad = {0.25f, 0.5f, -1.0f};
  auto run = [&](const AdamWConfig& config, ParamRole role, const std::string& name = "p") {
    Parameter p = make_param(name, role, {3}, init);
    set_grad(p, grad);
    AdamW opt(config);
    std::vector<Parameter*> params = {&p};
    opt.step(host_backend, params);
    return values_of(p.value);
  };
  AdamWConfig decayed{.lr = 0.1, .weight_decay = 0.5};
  AdamWConfig undecayed = decayed;
  undecayed.weight_decay = 0.0;
  const auto no_decay_reference = run(undecayed, ParamRole::Weight);
  const auto decay_reference = [&] {
    AdamWConfig all = decayed;
    all.decay_predicate = [](const Parameter&) { return true; };
    return run(all, ParamRole::Bias);
  }();
  CHECK(decay_reference != no_decay_reference);

  // Which of Weight, Embedding, Bias, NormWeight, NormBias decay under `config`.
  auto check_roles = [&](const AdamWConfig& config, std::array<bool, 5> decays) {
    const ParamRole roles[] = {ParamRole::Weight, ParamRole::Embedding, ParamRole::Bias,
                               ParamRole::NormWeight, ParamRole::NormBias};
    for (std::size_t i = 0; i < decays.size(); ++i) {
      INFO("role " << i);
      CHECK(run(config, roles[i]) == (decays[i] ? decay_reference : no_decay_reference));
    }
  };
  SECTION("defaults: Weight and Embedding decay; Bias, NormWeight, NormBias do not") {
    check_roles(decayed, {true, true, false, false, false});
  }
  SECTION("per-role flags") {
    AdamWConfig flags = decayed;
    flags.decay = {
        .weight = false, .bias = true, .norm_weight = true, .norm_bias = false, .embedding = false};
    check_roles(flags, {false, false, true, true, false});
  }
  SECTION("a predicate overrides the roles") {
    AdamWConfig predicate = decayed;
    predicate.decay_predicate = [](const Parameter& p) { return p.name != "lm_head.weight"; };
    CHECK(run(predicate, ParamRole::Weight, "lm_head.weight") == no_decay_reference);
    CHECK(run(predicate, ParamRole::NormWeight, "model.norm.weight") == decay_reference);
  }
  SECTION("the decay is the multiplication by f32(1 - lr * wd) before the Adam update") {
    // The decayed result equals: decay the initial value, then the undecayed update.
    Parameter p = make_param("p", ParamRole::Weight, {3}, init);
    const float keep = static_cast<float>(1.0 - 0.1 * 0.5);
    for (float& x : p.value.span<float>())
      x *= keep;
    set_grad(p, grad);
    AdamW opt(undecayed);
    std::vector<Parameter*> params = {&p};
    opt.step(host_backend, params);
    CHECK(values_of(p.value) == decay_reference);
  }
}

TEST_CASE("AdamW leaves frozen parameters alone", "[train][adamw]") {
  Parameter trained = make_param("trained", ParamRole::Weight, {2}, {1.0f, 2.0f});
  Parameter frozen = make_param("frozen", ParamRole::Weight, {2}, {3.0f, 4.0f});
  frozen.trainable = false;  // still has a grad tensor: must be ignored anyway
  Parameter no_grad = make_param("no_grad", ParamRole::Weight, {2}, {5.0f, 6.0f});
  no_grad.grad = Tensor();
  set_grad(trained, {1.0f, -1.0f});
  set_grad(frozen, {1.0f, -1.0f});
  std::vector<Parameter*> params = {&trained, &frozen, &no_grad};
  AdamW opt({.lr = 0.1, .weight_decay = 0.5});
  for (int i = 0; i < 3; ++i)
    opt.step(host_backend, params);
  CHECK(values_of(frozen.value) == std::vector<float>{3.0f, 4.0f});
  CHECK(values_of(no_grad.value) == std::vector<float>{5.0f, 6.0f});
  CHECK(values_of(trained.value) != std::vector<float>{1.0f, 2.0f});
  CHECK(opt.exp_avg("frozen") == nullptr);
  CHECK(opt.exp_avg("no_grad") == nullptr);
  CHECK(opt.parameter_step("trained") == 3);
  CHECK(opt.parameter_step("frozen") == 0);
  // Unfrozen later, it starts its own bias correction at t = 1.
  frozen.trainable = true;
  opt.step(host_backend, params);
  CHECK(opt.parameter_step("frozen") == 1);
  CHECK(opt.parameter_step("trained") == 4);
  for (const NamedTensor& t : opt.state_tensors(host_backend))
    CHECK(t.name.find("no_grad") == std::string::npos);
}

TEST_CASE("AdamW refuses what it cannot update, naming the parameter", "[train][adamw]") {
  Parameter p = make_param("model.layers.0.mlp.up_proj.weight", ParamRole::Weight, {2}, {1, 2});
  SECTION("a non-F32 gradient") {
    p.grad = Tensor::zeros(DType::F64, {2});
    std::vector<Parameter*> params = {&p};
    AdamW opt;
    CHECK_THAT(error_of([&] { opt.step(host_backend, params); }),
               Contains("model.layers.0.mlp.up_proj.weight") && Contains("F64"));
  }
  SECTION("two parameters with one name") {
    Parameter q = make_param(p.name, ParamRole::Weight, {2}, {1, 2});
    std::vector<Parameter*> params = {&p, &q};
    AdamW opt;
    CHECK_THAT(error_of([&] { opt.step(host_backend, params); }),
               Contains("two parameters are named"));
  }
  SECTION("bad hyper-parameters") {
    CHECK_THAT(error_of([] { AdamW opt({.beta1 = 1.0}); }), Contains("beta1"));
    CHECK_THAT(error_of([] { AdamW opt({.weight_decay = -1}); }), Contains("weight_decay"));
  }
}

TEST_CASE("AdamW state saved and loaded continues bit-identically", "[train][adamw]") {
  Random random(42);
  auto make_params = [] {
    std::vector<Parameter> ps;
    ps.push_back(make_param("a.weight", ParamRole::Weight, {2, 3}, {1, 2, 3, 4, 5, 6}));
    ps.push_back(make_param("a.bias", ParamRole::Bias, {3}, {0.1f, -0.1f, 0.2f}));
    ps.push_back(make_param("norm.weight", ParamRole::NormWeight, {2}, {1, 1}));
    return ps;
  };
  // The same gradient sequence for both runs.
  std::vector<std::vector<std::vector<float>>> grads(6);
  for (auto& step : grads)
    for (std::int64_t n : {6, 3, 2}) {
      std::vector<float> g(static_cast<std::size_t>(n));
      for (float& x : g)
        x = static_cast<float>(random.normal());
      step.push_back(g);
    }
  const AdamWConfig config{.lr = 0.05, .beta1 = 0.8, .beta2 = 0.99, .weight_decay = 0.1};
  auto run_steps = [&](std::vector<Parameter>& ps, AdamW& opt, int from, int to) {
    std::vector<Parameter*> ptrs;
    for (auto& p : ps)
      ptrs.push_back(&p);
    for (int s = from; s < to; ++s) {
      for (std::size_t i = 0; i < ps.size(); ++i)
        set_grad(ps[i], grads[static_cast<std::size_t>(s)][i]);
      opt.set_lr(0.05 * (1.0 - s / 10.0));
      opt.step(host_backend, ptrs);
    }
    return ptrs;
  };

  std::vector<Parameter> straight = make_params();
  AdamW straight_opt(config);
  run_steps(straight, straight_opt, 0, 6);

  TempDir dir("kept-train");
  std::vector<Parameter> first = make_params();
  AdamW first_opt(config);
  auto first_ptrs = run_steps(first, first_opt, 0, 3);
  write_safetensors(dir / "optimizer.safetensors", first_opt.state_tensors(host_backend));

  std::vector<Parameter> resumed = make_params();
  for (std::size_t i = 0; i < resumed.size(); ++i)
    resumed[i].value = first[i].value.clone();
  std::vector<Parameter*> resumed_ptrs;
  for (auto& p : resumed)
    resumed_ptrs.push_back(&p);
  AdamW resumed_opt(config);
  {
    SafetensorsFile file(dir / "optimizer.safetensors");
    std::vector<NamedTensor> state;
    for (const auto& name : file.names())
      state.push_back({name, file.tensor(name)});
    resumed_opt.load_state(host_backend, state, resumed_ptrs, file.path().string());
  }
  CHECK(resumed_opt.steps_taken() == 3);
  run_steps(resumed, resumed_opt, 3, 6);
  for (std::size_t i = 0; i < straight.size(); ++i) {
    INFO(straight[i].name);
    CHECK(same_bytes(resumed[i].value, straight[i].value));
    CHECK(same_bytes(*resumed_opt.exp_avg(straight[i].name),
                     *straight_opt.exp_avg(straight[i].name)));
    CHECK(same_bytes(*resumed_opt.exp_avg_sq(straight[i].name),
                     *straight_opt.exp_avg_sq(straight[i].name)));
  }

  SECTION("load errors name the parameter and leave the optimizer unchanged") {
    std::vector<NamedTensor> state = first_opt.state_tensors(host_backend);
    AdamW target(config);
    SECTION("shape mismatch") {
      for (auto& t : state)
        if (t.name == "exp_avg/a.bias") t.tensor = Tensor::zeros(DType::F32, {4});
      CHECK_THAT(
          error_of([&] { target.load_state(host_backend, state, first_ptrs, "opt.st"); }),
          Contains("opt.st") && Contains("exp_avg/a.bias") && Contains("[4]") && Contains("[3]"));
    }
    SECTION("state for a parameter the model lacks") {
      std::vector<Parameter*> fewer = {first_ptrs[0], first_ptrs[2]};
      CHECK_THAT(error_of([&] { target.load_state(host_backend, state, fewer, "opt.st"); }),
                 Contains("state for parameter a.bias"));
    }
    SECTION("a missing moment") {
      std::erase_if(state, [](const NamedTensor& t) { return t.name == "exp_avg_sq/a.weight"; });
      CHECK_THAT(error_of([&] { target.load_state(host_backend, state, first_ptrs, "opt.st"); }),
                 Contains("missing exp_avg_sq/a.weight"));
    }
    SECTION("different betas") {
      AdamWConfig other = config;
      other.beta2 = 0.999;
      AdamW different(other);
      CHECK_THAT(error_of([&] { different.load_state(host_backend, state, first_ptrs, "opt.st"); }),
                 Contains("adamw.beta2") && Contains("0.99"));
    }
    SECTION("an unknown tensor") {
      state.push_back({"momentum/a.weight", Tensor::zeros(DType::F32, {2, 3})});
      CHECK_THAT(error_of([&] { target.load_state(host_backend, state, first_ptrs, "opt.st"); }),
                 Contains("unexpected tensor momentum/a.weight"));
    }
    CHECK(target.steps_taken() == 0);
    CHECK(target.exp_avg("a.weight") == nullptr);
  }
}

namespace {
ParamList arena_params() {
  ParamList list;
  list.ps.push_back(make_param("a.weight", ParamRole::Weight, {2, 3}, {1, 2, 3, 4, 5, 6}));
  list.ps.push_back(make_param("a.bias", ParamRole::Bias, {3}, {0.1f, -0.1f, 0.2f}));
  std::vector<float> big(70);
  for (std::size_t i = 0; i < big.size(); ++i)
    big[i] = 0.01f * static_cast<float>(i);
  list.ps.push_back(make_param("b.weight", ParamRole::Weight, {7, 10}, big));
  list.ps.push_back(make_param("norm.weight", ParamRole::NormWeight, {2}, {1, 1}));
  return list;
}
}  // namespace

TEST_CASE("the parameter arena: one buffer per role, aligned named views, values kept",
          "[train][arena]") {
  ParamList model = arena_params();
  ParamList original = arena_params();
  model.ps[3].trainable = false;
  ParameterArena arena(host_backend, model);
  REQUIRE(arena.slots().size() == 4);
  std::int64_t expected_offset = 0;
  for (std::size_t i = 0; i < 4; ++i) {
    const ArenaSlot& slot = arena.slots()[i];
    const Parameter& p = model.ps[i];
    CHECK(slot.name == p.name);
    CHECK(slot.offset == expected_offset);
    CHECK(slot.offset % kArenaAlignment == 0);
    expected_offset += (slot.count + kArenaAlignment - 1) / kArenaAlignment * kArenaAlignment;
    // The value is a view into the one values buffer, and holds what the parameter held.
    CHECK(p.value.storage() == arena.values().storage());
    CHECK(p.value.raw() == static_cast<const float*>(arena.values().raw()) + slot.offset);
    CHECK(std::equal(p.value.span<const float>().begin(), p.value.span<const float>().end(),
                     original.ps[i].value.span<const float>().begin()));
    if (p.trainable)
      CHECK(p.grad.raw() == static_cast<const float*>(arena.grads().raw()) + slot.offset);
    else
      CHECK_FALSE(p.grad.defined());
  }
  CHECK(arena.elements() == expected_offset);
  CHECK(arena.find("b.weight") == &arena.slots()[2]);
  CHECK(arena.find("nope") == nullptr);

  // zero_grad: one fill; an unfrozen parameter gets its view back.
  set_grad(model.ps[0], {1, 1, 1, 1, 1, 1});
  model.ps[3].trainable = true;
  arena.zero_grad(host_backend, model);
  for (float g : arena.grads().span<const float>())
    CHECK(g == 0.0f);
  CHECK(model.ps[3].grad.raw() ==
        static_cast<const float*>(arena.grads().raw()) + arena.slots()[3].offset);

  ParamList other = arena_params();
  other.ps.pop_back();
  CHECK_THAT(error_of([&] { arena.zero_grad(host_backend, other); }), Contains("changed"));
}

TEST_CASE("AdamW over the arena is bit-identical to AdamW over separate tensors",
          "[train][arena][adamw]") {
  ParamList separate = arena_params(), flat = arena_params();
  ParameterArena arena(host_backend, flat);
  const AdamWConfig config{.lr = 0.05, .beta1 = 0.8, .beta2 = 0.99, .weight_decay = 0.1};
  AdamW plain(config), over_arena(config);
  over_arena.use_arena(&arena);
  Random random(9);
  std::vector<Parameter*> a = parameters_of(separate), b = parameters_of(flat);
  for (int step = 0; step < 5; ++step) {
    b[1]->trainable = a[1]->trainable = step != 2;  // frozen for one step, then back
    arena.zero_grad(host_backend, flat);            // gives b[1] its gradient view back
    for (std::size_t i = 0; i < a.size(); ++i) {
      if (!a[i]->trainable) continue;
      std::vector<float> g(static_cast<std::size_t>(a[i]->value.numel()));
      for (float& x : g)
        x = static_cast<float>(random.normal());
      set_grad(*a[i], g);
      set_grad(*b[i], g);
    }
    plain.step(host_backend, a);
    over_arena.step(host_backend, b);
  }
  for (std::size_t i = 0; i < a.size(); ++i)
    CHECK(std::memcmp(a[i]->value.raw(), b[i]->value.raw(), a[i]->value.nbytes()) == 0);
  const auto sa = plain.state_tensors(host_backend), sb = over_arena.state_tensors(host_backend);
  REQUIRE(sa.size() == sb.size());
  for (std::size_t i = 0; i < sa.size(); ++i) {
    CHECK(sa[i].name == sb[i].name);
    CHECK(std::memcmp(sa[i].tensor.raw(), sb[i].tensor.raw(), sa[i].tensor.nbytes()) == 0);
  }
  // The moments live in the arena's buffer, at the parameter's slot.
  const ArenaSlot& slot = *arena.find("b.weight");
  CHECK(over_arena.exp_avg("b.weight")->raw() == arena.exp_avg(slot).raw());

  // Loading state into an arena-backed optimizer writes the slots, and a bad file changes none.
  AdamW restored(config);
  restored.use_arena(&arena);
  std::vector<NamedTensor> broken = sa;
  broken.push_back({"master/a.weight", Tensor::zeros(DType::F32, {2, 3})});
  const Tensor before = arena.exp_avg(slot).clone();
  CHECK_THAT(error_of([&] { restored.load_state(host_backend, broken, b); }),
             Contains("keeps none"));
  CHECK(std::memcmp(before.raw(), arena.exp_avg(slot).raw(), before.nbytes()) == 0);
  restored.load_state(host_backend, sa, b);
  CHECK(std::memcmp(arena.exp_avg(slot).raw(), plain.exp_avg("b.weight")->raw(), before.nbytes()) ==
        0);
}

TEST_CASE("AdamW matches torch.optim.AdamW (tests/data/train_reference.json)", "[train][adamw]") {
  const nlohmann::json reference = load_reference();
  for (const auto& c : reference.at("adamw")) {
    const std::string case_name = c.at("name").get<std::string>();
    INFO("case " << case_name);
    AdamW opt({.lr = 0,
               .beta1 = c.at("beta1").get<double>(),
               .beta2 = c.at("beta2").get<double>(),
               .eps = c.at("eps").get<double>(),
               .weight_decay = c.at("weight_decay").get<double>()});
    std::vector<Parameter> ps;
    for (const auto& info : c.at("params")) {
      std::vector<std::int64_t> dims = info.at("shape").get<std::vector<std::int64_t>>();
      ps.push_back(make_param(info.at("name").get<std::string>(),
                              role_from(info.at("role").get<std::string>()), Shape(dims),
                              info.at("init").get<std::vector<float>>()));
      // The reference's two groups are exactly kept's default role rule.
      REQUIRE(opt.decays(ps.back()) == info.at("decay").get<bool>());
    }
    std::vector<Parameter*> ptrs;
    for (auto& p : ps)
      ptrs.push_back(&p);
    const auto& lrs = c.at("lr");
    const auto& trajectory = c.at("trajectory");
    double worst = 0;
    for (std::size_t step = 0; step < trajectory.size(); ++step) {
      for (std::size_t i = 0; i < ps.size(); ++i) {
        const auto& g = c.at("params")[i].at("grads")[step];
        if (g.is_null()) {
          ps[i].grad = Tensor();
        } else {
          ps[i].grad = f32_tensor(ps[i].value.shape(), g.get<std::vector<float>>());
        }
      }
      opt.set_lr(lrs[step].get<double>());
      opt.step(host_backend, ptrs);
      for (std::size_t i = 0; i < ps.size(); ++i) {
        const auto expected = trajectory[step][i].get<std::vector<float>>();
        const auto got = values_of(ps[i].value);
        for (std::size_t k = 0; k < got.size(); ++k) {
          const double diff = std::fabs(static_cast<double>(got[k]) - expected[k]);
          const double rel = diff / std::max(std::fabs(static_cast<double>(expected[k])), 1e-30);
          worst = std::max(worst, rel);
          INFO("step " << step << " " << ps[i].name << "[" << k << "]: kept " << got[k]
                       << ", torch " << expected[k]);
          CHECK(rel <= 1e-7);
        }
      }
    }
    // The moments depend only on the gradients and match torch to the bit (both use FMA).
    for (std::size_t i = 0; i < ps.size(); ++i) {
      const auto& final_state = c.at("final")[i];
      INFO(ps[i].name);
      CHECK(opt.parameter_step(ps[i].name) == final_state.at("step").get<std::int64_t>());
      if (final_state.at("exp_avg").is_null()) continue;
      CHECK(values_of(*opt.exp_avg(ps[i].name)) ==
            final_state.at("exp_avg").get<std::vector<float>>());
      CHECK(values_of(*opt.exp_avg_sq(ps[i].name)) ==
            final_state.at("exp_avg_sq").get<std::vector<float>>());
    }
    UNSCOPED_INFO("case " << case_name << ": worst relative parameter difference " << worst);
    CHECK(worst <= 1e-7);
  }
}

// ---- clipping, scaling, the finiteness guard -------------------------------------------------

TEST_CASE("clip_grad_norm is the global L2 norm and scales like torch", "[train][clip]") {
  Parameter a = make_param("a", ParamRole::Weight, {3}, {0, 0, 0});
  Parameter b = make_param("b", ParamRole::Bias, {2}, {0, 0});
  Parameter frozen = make_param("frozen", ParamRole::Weight, {1}, {0});
  frozen.trainable = false;
  const std::vector<float> ga = {3.0f, -4.0f, 1.5f}, gb = {0.25f, 2.0f};
  set_grad(a, ga);
  set_grad(b, gb);
  set_grad(frozen, {1000.0f});
  std::vector<Parameter*> params = {&a, &frozen, &b};
  double sum = 0;
  for (float g : ga)
    sum += double(g) * g;
  for (float g : gb)
    sum += double(g) * g;
  const double expected = std::sqrt(sum);

  SECTION("below max_norm: untouched") {
    CHECK(clip_grad_norm(host_backend, params, 100.0) == expected);
    CHECK(values_of(a.grad) == ga);
    CHECK(values_of(b.grad) == gb);
  }
  SECTION("above max_norm: scaled by max_norm / (norm + 1e-6)") {
    CHECK(clip_grad_norm(host_backend, params, 1.0) == expected);
    const float scale = static_cast<float>(1.0 / (expected + 1e-6));
    for (std::size_t i = 0; i < ga.size(); ++i)
      CHECK(a.grad.data<float>()[i] == ga[i] * scale);
    for (std::size_t i = 0; i < gb.size(); ++i)
      CHECK(b.grad.data<float>()[i] == gb[i] * scale);
    CHECK(frozen.grad.data<float>()[0] == 1000.0f);  // frozen: neither counted nor scaled
    double after = 0;
    for (Parameter* p : {&a, &b})
      for (float g : p->grad.span<const float>())
        after += double(g) * g;
    CHECK(std::sqrt(after) == Approx(1.0).epsilon(1e-6));
  }
  SECTION("no float overflow for huge gradients (accumulated in double)") {
    set_grad(a, {3e20f, 4e20f, 0.0f});
    set_grad(b, {0.0f, 0.0f});
    CHECK(clip_grad_norm(host_backend, params, 1.0) == Approx(5e20).epsilon(1e-7));
    CHECK(a.grad.data<float>()[0] == Approx(0.6).epsilon(1e-6));
  }
  SECTION("non-finite: reported, gradients untouched, all_finite says false") {
    CHECK(all_finite(host_backend, params));
    a.grad.data<float>()[1] = std::numeric_limits<float>::quiet_NaN();
    CHECK_FALSE(all_finite(host_backend, params));
    CHECK(std::isnan(clip_grad_norm(host_backend, params, 1.0)));
    CHECK(b.grad.data<float>()[1] == 2.0f);
    a.grad.data<float>()[1] = std::numeric_limits<float>::infinity();
    CHECK_FALSE(all_finite(host_backend, params));
    CHECK(std::isinf(clip_grad_norm(host_backend, params, 1.0)));
  }
  SECTION("a NaN in a frozen parameter's stale gradient does not count") {
    frozen.grad.data<float>()[0] = std::numeric_limits<float>::quiet_NaN();
    CHECK(all_finite(host_backend, params));
  }
  SECTION("scale_gradients multiplies every trainable gradient") {
    scale_gradients(host_backend, params, 0.5f);
    CHECK(values_of(a.grad) == std::vector<float>{1.5f, -2.0f, 0.75f});
    CHECK(values_of(b.grad) == std::vector<float>{0.125f, 1.0f});
    CHECK(frozen.grad.data<float>()[0] == 1000.0f);
  }
  SECTION("all_finite on a tensor") {
    CHECK(all_finite(a.value));
    a.value.data<float>()[0] = -std::numeric_limits<float>::infinity();
    CHECK_FALSE(all_finite(a.value));
  }
}

// ---- the schedule ----------------------------------------------------------------------------

TEST_CASE("cosine schedule: warmup, cosine, floor", "[train][schedule]") {
  CosineSchedule s{.peak_lr = 1e-3, .warmup_steps = 10, .total_steps = 110, .min_lr = 1e-4};
  s.validate();
  CHECK(s.lr(0) == 0.0);                                          // warmup starts at 0
  CHECK(s.lr(5) == Approx(5e-4).epsilon(1e-15));                  // half way up
  CHECK(s.lr(9) == Approx(9e-4).epsilon(1e-15));                  // last warmup step
  CHECK(s.lr(10) == 1e-3);                                        // the peak, exactly
  CHECK(s.lr(60) == Approx(1e-4 + 0.9e-3 * 0.5).epsilon(1e-15));  // mid-cosine
  CHECK(s.lr(35) ==
        Approx(1e-4 + 0.9e-3 * 0.5 * (1 + std::cos(std::numbers::pi * 0.25))).epsilon(1e-15));
  CHECK(s.lr(109) ==
        Approx(1e-4 + 0.9e-3 * 0.5 * (1 + std::cos(std::numbers::pi * 0.99))).epsilon(1e-15));
  CHECK(s.lr(109) > 1e-4);
  CHECK(s.lr(110) == 1e-4);   // the end: the floor
  CHECK(s.lr(5000) == 1e-4);  // and it stays there
  for (std::int64_t step = 11; step < 110; ++step)
    CHECK(s.lr(step) < s.lr(step - 1));  // strictly decreasing after the peak

  CosineSchedule with_init = s;
  with_init.warmup_init_lr = 1e-5;
  CHECK(with_init.lr(0) == 1e-5);
  CHECK(with_init.lr(5) == Approx(1e-5 + (1e-3 - 1e-5) * 0.5).epsilon(1e-15));

  CosineSchedule no_warmup{.peak_lr = 2.0, .warmup_steps = 0, .total_steps = 4};
  CHECK(no_warmup.lr(0) == 2.0);
  CHECK(no_warmup.lr(2) == Approx(1.0).epsilon(1e-15));

  CHECK_THAT(error_of([] { CosineSchedule{.warmup_steps = 5, .total_steps = 4}.validate(); }),
             Contains("warmup_steps"));
  CHECK_THAT(error_of([] { CosineSchedule{.peak_lr = 1e-4, .min_lr = 1e-3}.validate(); }),
             Contains("min_lr"));
}

TEST_CASE("cosine schedule matches transformers (tests/data/train_reference.json)",
          "[train][schedule]") {
  const nlohmann::json reference = load_reference();
  for (const auto& r : reference.at("schedules")) {
    CosineSchedule s{.peak_lr = r.at("peak_lr").get<double>(),
                     .warmup_steps = r.at("warmup_steps").get<std::int64_t>(),
                     .total_steps = r.at("total_steps").get<std::int64_t>(),
                     .min_lr = r.at("min_lr").get<double>()};
    s.validate();
    const auto values = r.at("values").get<std::vector<double>>();
    REQUIRE(static_cast<std::int64_t>(values.size()) == s.total_steps);
    std::int64_t exact = 0;
    for (std::int64_t step = 0; step < s.total_steps; ++step) {
      const double expected = values[static_cast<std::size_t>(step)];
      INFO("warmup " << s.warmup_steps << " total " << s.total_steps << " min " << s.min_lr
                     << " step " << step);
      CHECK(s.lr(step) == Approx(expected).epsilon(1e-15).margin(1e-300));
      exact += s.lr(step) == expected;
    }
    // With min_lr = 0 the formula is transformers' to the bit (same operations, same order);
    // allow one value off by an ulp in case this libm's cos differs from the generator's.
    if (s.min_lr == 0.0) CHECK(exact >= s.total_steps - 1);
  }
}

// ---- checkpoint state ------------------------------------------------------------------------

namespace {

struct TinyRun {
  std::vector<Parameter> params;
  AdamW optimizer{AdamWConfig{.lr = 0.01, .weight_decay = 0.1}};

  TinyRun() {
    params.push_back(make_param("model.embed_tokens.weight", ParamRole::Embedding, {4, 3},
                                {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11}));
    params.push_back(make_param("model.norm.weight", ParamRole::NormWeight, {3}, {1, 1, 1}));
    params.push_back(make_param("frozen.weight", ParamRole::Weight, {2}, {7, 8}));
    params.back().trainable = false;
  }
  std::vector<Parameter*> ptrs() {
    std::vector<Parameter*> out;
    for (auto& p : params)
      out.push_back(&p);
    return out;
  }
  void train(int steps, float seed = 1.0f) {
    auto ps = ptrs();
    for (int s = 0; s < steps; ++s) {
      for (auto& p : params)
        if (p.has_grad())
          for (std::int64_t i = 0; i < p.grad.numel(); ++i)
            p.grad.data<float>()[i] = std::sin(seed * static_cast<float>(s * 7 + i));
      optimizer.step(host_backend, ps);
    }
  }
};

TrainerState tiny_state(std::int64_t step) {
  TrainerState state;
  state.step = step;
  state.tokens_seen = step * 1024;
  state.loader = {.seed = 17,
                  .epoch = 2,
                  .position = 8,
                  .batches_served = 40,
                  .fingerprint = 0x0123456789abcdefull};
  state.seeds = {{"data", 17}, {"init", 18446744073709551557ull}};
  state.config_hash = config_hash("{\"lr\":0.01}");
  state.extra = {{"last_loss", 2.718281828459045}, {"note", "tiny"}};
  return state;
}

}  // namespace

TEST_CASE("checkpoint state saves and loads every bit", "[train][checkpoint]") {
  TempDir dir("kept-train");
  TinyRun run;
  run.train(3);
  const TrainerState state = tiny_state(3);
  const auto path = save_checkpoint(host_backend, dir / "run", state, run.ptrs(), run.optimizer);
  CHECK(path == dir / "run" / "step-000003");
  CHECK(listing(path) ==
        std::vector<std::string>{"model.safetensors", "optimizer.safetensors", "trainer.json"});
  CHECK(listing(dir / "run") == std::vector<std::string>{"step-000003"});
  {
    SafetensorsFile model(path / "model.safetensors");
    CHECK(model.size() == 3);  // frozen parameters are part of the model
    CHECK(model.metadata().at("format") == "pt");
  }

  TinyRun fresh;
  const TrainerState loaded =
      load_checkpoint(host_backend, path, fresh.ptrs(), fresh.optimizer, state.config_hash);
  for (std::size_t i = 0; i < run.params.size(); ++i) {
    INFO(run.params[i].name);
    CHECK(same_bytes(fresh.params[i].value, run.params[i].value));
  }
  CHECK(fresh.optimizer.steps_taken() == 3);
  CHECK(same_bytes(*fresh.optimizer.exp_avg("model.norm.weight"),
                   *run.optimizer.exp_avg("model.norm.weight")));
  CHECK(loaded.step == 3);
  CHECK(loaded.tokens_seen == 3072);
  CHECK(loaded.loader == state.loader);
  CHECK(loaded.seeds == state.seeds);
  CHECK(loaded.config_hash == state.config_hash);
  CHECK(loaded.extra == state.extra);
  CHECK(std::bit_cast<std::uint64_t>(loaded.extra.at("last_loss").get<double>()) ==
        std::bit_cast<std::uint64_t>(2.718281828459045));

  // Continuing both gives the same parameters, bit for bit.
  run.train(2, 2.0f);
  fresh.train(2, 2.0f);
  for (std::size_t i = 0; i < run.params.size(); ++i)
    CHECK(same_bytes(fresh.params[i].value, run.params[i].value));

  SECTION("a different configuration is refused") {
    TinyRun other;
    CHECK_THAT(error_of([&] {
                 load_checkpoint(host_backend, path, other.ptrs(), other.optimizer,
                                 config_hash("other"));
               }),
               Contains(path.string()) && Contains(state.config_hash) &&
                   Contains("different configuration"));
  }
  SECTION("a model without one of the saved parameters is refused, naming it") {
    TinyRun other;
    other.params.pop_back();
    CHECK_THAT(
        error_of([&] { load_checkpoint(host_backend, path, other.ptrs(), other.optimizer); }),
        Contains("model.safetensors") && Contains("frozen.weight") && Contains("not a parameter"));
  }
  SECTION("a parameter of another shape is refused, naming it, and nothing is written") {
    TinyRun other;
    other.params[1] = make_param("model.norm.weight", ParamRole::NormWeight, {4}, {5, 5, 5, 5});
    CHECK_THAT(
        error_of([&] { load_checkpoint(host_backend, path, other.ptrs(), other.optimizer); }),
        Contains("model.norm.weight") && Contains("[3]") && Contains("[4]"));
    CHECK(other.params[0].value.data<float>()[1] == 1.0f);
    CHECK(other.optimizer.steps_taken() == 0);
  }
  SECTION("trainer.json whose step disagrees with the directory name") {
    auto text = detail::read_text_file(path / "trainer.json", 1 << 20);
    auto json = nlohmann::json::parse(text);
    json["step"] = 4;
    write_file_atomically(path / "trainer.json", json.dump());
    TinyRun other;
    CHECK_THAT(
        error_of([&] { load_checkpoint(host_backend, path, other.ptrs(), other.optimizer); }),
        Contains("trainer.json") && Contains("step 3"));
  }
  SECTION("trainer.json with a broken loader state") {
    auto json = nlohmann::json::parse(detail::read_text_file(path / "trainer.json", 1 << 20));
    json["loader"].erase("position");
    write_file_atomically(path / "trainer.json", json.dump());
    TinyRun other;
    CHECK_THAT(
        error_of([&] { load_checkpoint(host_backend, path, other.ptrs(), other.optimizer); }),
        Contains("trainer.json") && Contains("\"position\""));
  }
}

TEST_CASE("latest_checkpoint picks the newest complete checkpoint", "[train][checkpoint]") {
  TempDir dir("kept-train");
  const auto run_dir = dir / "run";
  CHECK_FALSE(latest_checkpoint(run_dir).has_value());  // no run directory yet: a fresh start
  TinyRun run;
  for (std::int64_t step : {5, 20, 100})
    save_checkpoint(host_backend, run_dir, tiny_state(step), run.ptrs(), run.optimizer);
  CHECK(latest_checkpoint(run_dir) == run_dir / "step-000100");

  // Things that are not complete checkpoints do not count.
  std::filesystem::create_directory(run_dir / "step-000200");  // incomplete: one file only
  std::filesystem::copy_file(run_dir / "step-000100" / "model.safetensors",
                             run_dir / "step-000200" / "model.safetensors");
  std::filesystem::create_directory(run_dir / ".step-000300.tmp-123-0-99");  // crashed save
  std::filesystem::create_directory(run_dir / "step-abc");
  std::ofstream(run_dir / "step-000400") << "a file";
  CHECK(latest_checkpoint(run_dir) == run_dir / "step-000100");

  // Steps are compared as numbers, not as names.
  save_checkpoint(host_backend, run_dir, tiny_state(1234567), run.ptrs(), run.optimizer);
  CHECK(latest_checkpoint(run_dir) == run_dir / "step-1234567");
  std::vector<std::int64_t> steps;
  for (const auto& entry : list_checkpoints(run_dir))
    steps.push_back(entry.step);
  CHECK(steps == std::vector<std::int64_t>{5, 20, 100, 1234567});
  CHECK(parse_checkpoint_name("step-000042") == 42);
  CHECK_FALSE(parse_checkpoint_name("step-").has_value());
  CHECK_FALSE(parse_checkpoint_name("step-12x").has_value());
  CHECK_FALSE(parse_checkpoint_name(".step-000042.tmp-1").has_value());
}

TEST_CASE("save_checkpoint keeps the last K", "[train][checkpoint]") {
  TempDir dir("kept-train");
  TinyRun run;
  for (std::int64_t step = 1; step <= 5; ++step)
    save_checkpoint(host_backend, dir / "run", tiny_state(step), run.ptrs(), run.optimizer, 2);
  CHECK(listing(dir / "run") == std::vector<std::string>{"step-000004", "step-000005"});
  // Re-saving an existing step replaces it atomically.
  TrainerState again = tiny_state(5);
  again.tokens_seen = 1;
  save_checkpoint(host_backend, dir / "run", again, run.ptrs(), run.optimizer, 2);
  CHECK(listing(dir / "run") == std::vector<std::string>{"step-000004", "step-000005"});
  TinyRun fresh;
  CHECK(load_checkpoint(host_backend, dir / "run" / "step-000005", fresh.ptrs(), fresh.optimizer)
            .tokens_seen == 1);
}

TEST_CASE("a checkpoint write failing part-way leaves the previous one intact",
          "[train][checkpoint]") {
  TempDir dir("kept-train");
  const auto run_dir = dir / "run";
  // A model big enough that its file alone exceeds the limit below.
  TinyRun run;
  run.params.push_back(
      make_param("big.weight", ParamRole::Weight, {64, 256}, std::vector<float>(64 * 256, 0.5f)));
  run.train(1);
  save_checkpoint(host_backend, run_dir, tiny_state(1), run.ptrs(), run.optimizer);
  const auto before = listing(run_dir / "step-000001");
  const std::string model_bytes =
      detail::read_text_file(run_dir / "step-000001" / "model.safetensors", 1 << 20);
  run.train(1, 3.0f);

  SECTION("a new step") {
    std::string message;
    {
      FileSizeLimit limit(16 << 10);
      message = error_of([&] {
        save_checkpoint(host_backend, run_dir, tiny_state(2), run.ptrs(), run.optimizer, 1);
      });
    }
    CHECK_THAT(message, Contains("File too large"));
    CHECK(listing(run_dir) == std::vector<std::string>{"step-000001"});  // no debris
  }
  SECTION("a new step, failing on the second file (model written, optimizer state not)") {
    // model.safetensors is ~66 KB, optimizer.safetensors ~132 KB (m and v of big.weight).
    std::string message;
    {
      FileSizeLimit limit(100 << 10);
      message = error_of([&] {
        save_checkpoint(host_backend, run_dir, tiny_state(2), run.ptrs(), run.optimizer, 1);
      });
    }
    CHECK_THAT(message, Contains("optimizer.safetensors") && Contains("File too large"));
    CHECK(listing(run_dir) == std::vector<std::string>{"step-000001"});
  }
  SECTION("re-saving the same step") {
    std::string message;
    {
      FileSizeLimit limit(16 << 10);
      message = error_of([&] {
        save_checkpoint(host_backend, run_dir, tiny_state(1), run.ptrs(), run.optimizer);
      });
    }
    CHECK_THAT(message, Contains("File too large"));
    CHECK(listing(run_dir) == std::vector<std::string>{"step-000001"});
  }
  CHECK(latest_checkpoint(run_dir) == run_dir / "step-000001");
  CHECK(listing(run_dir / "step-000001") == before);
  CHECK(detail::read_text_file(run_dir / "step-000001" / "model.safetensors", 1 << 20) ==
        model_bytes);
  TinyRun fresh;
  fresh.params.push_back(
      make_param("big.weight", ParamRole::Weight, {64, 256}, std::vector<float>(64 * 256, 0.0f)));
  CHECK(
      load_checkpoint(host_backend, run_dir / "step-000001", fresh.ptrs(), fresh.optimizer).step ==
      1);
}

// ---- end to end: kill and resume -------------------------------------------------------------

namespace {

// A tiny language model, logits = (E[x] * g) U + c, trained with everything above: the loader,
// AdamW with role-based decay, the schedule, gradient accumulation, clipping, the NaN guard and
// checkpoints. Its loss sequence is the observable a resumed run must reproduce bit for bit.
class TinyLanguageModelRun {
 public:
  static constexpr std::int64_t kVocab = 11, kDim = 4;

  explicit TinyLanguageModelRun(const std::filesystem::path& run_dir)
      : run_dir_(run_dir), loader_(corpus(), data_config()) {
    Random random(Random::derive(kInitSeed, "init"));
    auto init = [&](std::string name, ParamRole role, Shape shape, double scale, double offset) {
      std::vector<float> values(static_cast<std::size_t>(shape.numel()));
      for (float& v : values)
        v = static_cast<float>(offset + scale * random.normal());
      params_.push_back(make_param(std::move(name), role, shape, values));
    };
    init("embed.weight", ParamRole::Embedding, {kVocab, kDim}, 0.5, 0.0);
    init("norm.weight", ParamRole::NormWeight, {kDim}, 0.1, 1.0);
    init("head.weight", ParamRole::Weight, {kDim, kVocab}, 0.5, 0.0);
    init("head.bias", ParamRole::Bias, {kVocab}, 0.0, 0.0);
    for (auto& p : params_)
      ptrs_.push_back(&p);
  }

  // Resumes from the newest checkpoint if there is one. Returns the step it starts from.
  std::int64_t resume() {
    auto latest = latest_checkpoint(run_dir_);
    if (!latest) return 0;
    TrainerState state = load_checkpoint(host_backend, *latest, ptrs_, optimizer_, kConfigHash);
    loader_.restore(state.loader, (*latest / "trainer.json").string());
    step_ = state.step;
    return step_;
  }

  // Trains until `until` steps are done; returns each step's loss.
  std::vector<float> train(std::int64_t until) {
    std::vector<float> losses;
    while (step_ < until) {
      for (auto& p : params_)
        std::fill(p.grad.span<float>().begin(), p.grad.span<float>().end(), 0.0f);
      double loss_sum = 0;
      std::int64_t targets = 0;
      for (int micro = 0; micro < kAccumulation; ++micro) {
        Batch batch = loader_.next_batch();
        loss_sum += forward_backward(batch);
        targets += batch.target_count();
      }
      scale_gradients(host_backend, ptrs_, 1.0f / static_cast<float>(targets));
      REQUIRE(all_finite(host_backend, ptrs_));
      clip_grad_norm(host_backend, ptrs_, 0.5);
      optimizer_.set_lr(schedule_.lr(step_));
      optimizer_.step(host_backend, ptrs_);
      ++step_;
      losses.push_back(static_cast<float>(loss_sum / static_cast<double>(targets)));
      if (step_ % 3 == 0) {
        TrainerState state;
        state.step = step_;
        state.loader = loader_.state();
        state.seeds = {{"init", kInitSeed}, {"data", kDataSeed}};
        state.config_hash = kConfigHash;
        save_checkpoint(host_backend, run_dir_, state, ptrs_, optimizer_, 2);
      }
    }
    return losses;
  }

  const std::vector<Parameter>& params() const { return params_; }

 private:
  static constexpr std::uint64_t kInitSeed = 5, kDataSeed = 9;
  static constexpr int kAccumulation = 2;
  inline static const std::string kConfigHash = config_hash("tiny-lm-v1");

  static std::vector<TokenDocument> corpus() {
    std::vector<TokenDocument> docs;
    Random random(1234);
    for (int d = 0; d < 23; ++d) {
      TokenDocument doc(static_cast<std::size_t>(1 + random.below(9)));
      for (auto& t : doc)
        t = static_cast<std::int32_t>(1 + random.below(kVocab - 1));
      docs.push_back(doc);
    }
    return docs;
  }
  static DataConfig data_config() {
    return {.seq_len = 5,
            .batch_size = 3,
            .eos_id = 0,
            .seed = kDataSeed,
            .held_out_fraction = 0.1,
            .vocab_size = kVocab};
  }

  // Sum over targets of cross-entropy; accumulates gradients (of the sum) into the params.
  double forward_backward(const Batch& batch) {
    Parameter &embed = params_[0], &norm = params_[1], &head = params_[2], &bias = params_[3];
    double total = 0;
    for (std::size_t i = 0; i < batch.inputs.size(); ++i) {
      if (batch.targets[i] == kIgnoreTarget) continue;
      const std::int32_t x = batch.inputs[i], y = batch.targets[i];
      float e[kDim], h[kDim], logits[kVocab];
      for (int d = 0; d < kDim; ++d) {
        e[d] = embed.value.data<float>()[x * kDim + d];
        h[d] = e[d] * norm.value.data<float>()[d];
      }
      float max_logit = -1e30f;
      for (int v = 0; v < kVocab; ++v) {
        float z = bias.value.data<float>()[v];
        for (int d = 0; d < kDim; ++d)
          z += h[d] * head.value.data<float>()[d * kVocab + v];
        logits[v] = z;
        max_logit = std::max(max_logit, z);
      }
      double denominator = 0;
      for (int v = 0; v < kVocab; ++v)
        denominator += std::exp(static_cast<double>(logits[v] - max_logit));
      total += std::log(denominator) - (logits[y] - max_logit);
      float dh[kDim] = {};
      for (int v = 0; v < kVocab; ++v) {
        const float p = static_cast<float>(std::exp(logits[v] - max_logit) / denominator);
        const float dz = p - (v == y ? 1.0f : 0.0f);
        bias.grad.data<float>()[v] += dz;
        for (int d = 0; d < kDim; ++d) {
          head.grad.data<float>()[d * kVocab + v] += h[d] * dz;
          dh[d] += head.value.data<float>()[d * kVocab + v] * dz;
        }
      }
      for (int d = 0; d < kDim; ++d) {
        norm.grad.data<float>()[d] += dh[d] * e[d];
        embed.grad.data<float>()[x * kDim + d] += dh[d] * norm.value.data<float>()[d];
      }
    }
    return total;
  }

  std::filesystem::path run_dir_;
  DataLoader loader_;
  std::vector<Parameter> params_;
  std::vector<Parameter*> ptrs_;
  AdamW optimizer_{AdamWConfig{.lr = 0, .beta1 = 0.9, .beta2 = 0.95, .weight_decay = 0.1}};
  CosineSchedule schedule_{.peak_lr = 0.05, .warmup_steps = 3, .total_steps = 20, .min_lr = 0.005};
  std::int64_t step_ = 0;
};

}  // namespace

TEST_CASE("a run killed and resumed reproduces the uninterrupted losses bit for bit",
          "[train][data][resume]") {
  TempDir dir("kept-train");
  TinyLanguageModelRun straight(dir / "straight");
  const std::vector<float> expected = straight.train(20);
  REQUIRE(expected.size() == 20);
  CHECK(expected.back() < expected.front());  // it learns something

  for (std::int64_t kill_after : {1, 3, 7, 14}) {
    INFO("killed after step " << kill_after);
    const auto run_dir = dir / ("resumed-" + std::to_string(kill_after));
    std::vector<float> losses;
    {
      TinyLanguageModelRun first(run_dir);
      losses = first.train(kill_after);
    }  // "killed": everything in memory is gone
    TinyLanguageModelRun second(run_dir);
    const std::int64_t from = second.resume();
    CHECK(from == kill_after / 3 * 3);
    losses.resize(static_cast<std::size_t>(from));  // steps after the checkpoint are redone
    for (float loss : second.train(20))
      losses.push_back(loss);
    REQUIRE(losses.size() == expected.size());
    for (std::size_t i = 0; i < losses.size(); ++i) {
      INFO("step " << i);
      CHECK(std::bit_cast<std::uint32_t>(losses[i]) == std::bit_cast<std::uint32_t>(expected[i]));
    }
    for (std::size_t i = 0; i < straight.params().size(); ++i)
      CHECK(same_bytes(second.params()[i].value, straight.params()[i].value));
    // keep_last = 2
    CHECK(list_checkpoints(run_dir).size() == 2);
  }
}
