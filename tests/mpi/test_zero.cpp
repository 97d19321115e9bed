// ZeRO's pieces over real MPI ranks (kept/train/zero.hpp), run by ctest under mpirun -np 2 and
// -np 3 (tests/mpi/CMakeLists.txt) and again under ASan + UBSan (scripts/test.sh).
//
// Every rank holds the same small "model" (parameters straddling the shard boundaries, one below
// a quantisation block, one of several blocks) in a parameter arena, and two optimizers: one
// sharded over the ranks (AdamW::shard_states with ZeroShards' ranges) and an unsharded
// reference. Each step both get the same gradients; the sharded one updates the rank's shard and
// the weights are all-gathered as kept train does. Checked against the reference, bit for bit:
// the weights after every step, the state gathered whole (gather_optimizer_state: every tensor
// and name of AdamW::state_tensors), and a sharded optimizer loaded from that state continuing
// as the reference does. bf16 weights with fp32 masters and 8-bit moments, so every kind of state
// (codes, absmax, fp32 moments of the small ones, masters) is cut and gathered.
//
// Stage 3 (ShardedLayerWeights) on a small decoder: every rank keeps its shard of the layers'
// weights; a forward and a layer-major backward with the layers gathered through the decoder's
// before-layer hook give the whole model's logits and gradients bit for bit, updates written back
// with store() are what the next gather brings, gather_whole() gives the writer the whole
// weights, and the layers' own allocations are gone (the arena holds only the rest).
//
// A plain main with counted checks (mpi_checks.hpp), so that every rank keeps making the same
// collective calls.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <map>
#include <string>
#include <vector>

#include "kept/backend/cpu_bf16.hpp"
#include "kept/core/random.hpp"
#include "kept/dist/mpi_communicator.hpp"
#include "kept/model/decoder.hpp"
#include "kept/model/init.hpp"
#include "kept/model/parameter_arena.hpp"
#include "kept/train/adamw.hpp"
#include "kept/train/zero.hpp"
#include "mpi_checks.hpp"
#include "support/tensors.hpp"

namespace {

using kept::test::ParamList;
using kept::test::same_bytes;

kept::test::MpiChecks checks;

void expect(bool ok, const std::string& what) {
  checks.expect(ok, what);
}

// The same model on every rank: 300 + 64 + 1299 + 7 + 1300 elements in 16 blocks of 256: "w"
// straddles the shard boundary of 2 ranks (block 8) and of 3 (block 6), "head" that of 3 (11).
ParamList make_model(kept::CpuBf16& cpu) {
  ParamList model;
  kept::Random random(5);
  const std::vector<std::pair<std::string, kept::Shape>> shapes{
      {"embed", {3, 100}}, {"norm", {64}}, {"w", {3, 433}}, {"bias", {7}}, {"head", {13, 100}}};
  for (const auto& [name, shape] : shapes) {
    kept::Tensor host = kept::Tensor::empty(kept::DType::F32, shape);
    for (float& x : host.span<float>())
      x = static_cast<float>(0.3 * random.normal());
    kept::Parameter p;
    p.name = name;
    p.role = name == "norm"   ? kept::ParamRole::NormWeight
             : name == "bias" ? kept::ParamRole::Bias
                              : kept::ParamRole::Weight;
    p.value = cpu.zeros(kept::CpuBf16::Precision::param, shape);
    cpu.upload(host, p.value);
    model.ps.push_back(std::move(p));
  }
  return model;
}

void gradients(kept::CpuBf16& cpu, std::vector<kept::Parameter*>& params, int step) {
  kept::Random random(100 + static_cast<std::uint64_t>(step));  // the same on every rank
  for (kept::Parameter* p : params) {
    kept::Tensor g = kept::Tensor::empty(kept::DType::F32, p->value.shape());
    for (float& x : g.span<float>())
      x = static_cast<float>(random.normal());
    cpu.upload(g, p->grad);
  }
}

std::vector<kept::Parameter*> pointers(ParamList& model) {
  std::vector<kept::Parameter*> out;
  for (kept::Parameter& p : model.ps)
    out.push_back(&p);
  return out;
}

using Model = kept::Decoder<kept::RMSNorm, kept::CpuBf16>;

// Five layers, so a forward evicts layers from both regions; hidden 48 and intermediate 72 give
// slots below, at and above one 256-element block, so shard boundaries fall inside parameters.
Model small_decoder(kept::CpuBf16& cpu) {
  kept::ModelConfig config =
      kept::ModelConfig::decoder(kept::Architecture::Llama, 41, 48, 72, 5, 4);
  config.rope_theta = 1e4;
  Model model(cpu, config);
  kept::init_parameters(cpu, model, {.seed = 7, .std = 0.2});
  return model;
}

// Logits of a training forward and every gradient of a layer-major backward of two micro-batches.
std::vector<kept::Tensor> forward_backward(kept::CpuBf16& cpu, Model& model) {
  std::vector<std::int32_t> tokens;
  for (int i = 0; i < 2 * 7; ++i)
    tokens.push_back((i * 5 + 2) % 41);
  Model::Activations acts[2];
  std::vector<kept::Tensor> out;
  kept::Tensor d_hidden[2];
  for (int m = 0; m < 2; ++m) {
    model.forward(cpu, tokens, 2, 7, acts[m], kept::ForwardMode::Training);
    kept::Tensor logits;
    model.logits(cpu, acts[m], logits);
    out.push_back(cpu.download(logits));
    kept::Tensor grad = kept::Tensor::empty(kept::DType::F32, acts[m].hidden.shape());
    kept::Random random(40 + static_cast<std::uint64_t>(m));
    for (float& x : grad.span<float>())
      x = static_cast<float>(random.normal());
    d_hidden[m] = cpu.zeros(acts[m].hidden.dtype(), acts[m].hidden.shape());
    cpu.upload(grad, d_hidden[m]);
  }
  model.zero_grad(cpu);
  Model::Activations* micro_acts[] = {&acts[0], &acts[1]};
  const kept::Tensor* micro_d_hidden[] = {&d_hidden[0], &d_hidden[1]};
  const std::vector<kept::Tensor>* micro_d_states[] = {nullptr, nullptr};
  model.backward(cpu, micro_acts, micro_d_hidden, micro_d_states);
  model.visit_parameters([&](kept::Parameter& p) { out.push_back(cpu.download(p.grad)); });
  return out;
}

void stage3(kept::MpiCommunicator& comm) {
  kept::CpuBf16 cpu;
  Model reference = small_decoder(cpu), model = small_decoder(cpu);
  kept::ArenaLayout layout;
  layout.optimizer_state = false;
  layout.layer_values = false;
  kept::ParameterArena arena(cpu, model, layout);
  expect(arena.values().numel() < arena.elements() / 2,
         "the arena without the layers' values still holds most of the model");
  kept::ShardedLayerWeights<kept::CpuBf16> weights(cpu, comm, arena, model);
  model.set_before_layer([&](std::size_t l) { weights.bring(l); });

  const std::vector<kept::Tensor> want = forward_backward(cpu, reference);
  const std::vector<kept::Tensor> got = forward_backward(cpu, model);
  expect(got.size() == want.size(), "stage 3: another number of logits and gradients");
  for (std::size_t i = 0; i < std::min(got.size(), want.size()); ++i)
    expect(same_bytes(got[i], want[i]),
           kept::detail::concat("stage 3: output ", i, " (logits, then gradients) differs"));
  // Two forwards of five layers, then the backward (the last two layers still there).
  expect(weights.gathers() == 2 * 5 + 3,
         kept::detail::concat("stage 3: ", weights.gathers(), " gathers, expected 13"));

  // An update of the owned part: every rank adds 1/8 to its own elements of layer 3, in the
  // region, stores it, and the next gather brings everyone's.
  const kept::ZeroShards shards(arena, comm.rank(), comm.size());
  weights.bring(3);
  model.layers[3].visit([&](kept::Parameter& p) {
    const kept::AdamW::OwnedRange owned = shards.owned(*arena.find(p.name));
    kept::Tensor host = cpu.download(p.value).to(kept::DType::F32);
    for (std::int64_t e = owned.first; e < owned.first + owned.count; ++e)
      host.span<float>()[static_cast<std::size_t>(e)] += 0.125f;
    cpu.upload(host, p.value);
  });
  weights.store(3);
  reference.layers[3].visit([&](kept::Parameter& p) {
    kept::Tensor host = cpu.download(p.value).to(kept::DType::F32);
    for (float& x : host.span<float>())
      x += 0.125f;
    cpu.upload(host, p.value);
  });
  weights.gather_whole(/*keep=*/comm.rank() == 0);
  if (comm.rank() == 0) {
    std::vector<kept::Tensor> whole, expected;
    model.visit_parameters([&](kept::Parameter& p) { whole.push_back(p.value); });
    reference.visit_parameters([&](kept::Parameter& p) { expected.push_back(p.value); });
    for (std::size_t i = 0; i < whole.size(); ++i)
      expect(same_bytes(whole[i], expected[i]),
             kept::detail::concat("stage 3: whole weight ", i, " on the writer differs"));
  }
  weights.release();
  const std::vector<kept::Tensor> after = forward_backward(cpu, model);
  const std::vector<kept::Tensor> after_want = forward_backward(cpu, reference);
  for (std::size_t i = 0; i < std::min(after.size(), after_want.size()); ++i)
    expect(same_bytes(after[i], after_want[i]),
           kept::detail::concat("stage 3 after an update: output ", i, " differs"));
  model.set_before_layer({});
}

int run() {
  kept::MpiCommunicator comm;
  checks.rank = comm.rank();
  checks.context = "ZeRO over " + std::to_string(comm.size()) + " ranks";
  kept::CpuBf16 cpu;
  const kept::AdamWConfig config{.lr = 0.01,
                                 .weight_decay = 0.1,
                                 .master_weights = true,
                                 .moment_bits = 8,
                                 .min_8bit_size = 200};
  ParamList sharded_model = make_model(cpu), reference_model = make_model(cpu);
  kept::AdamW sharded(config), reference(config);
  kept::ArenaLayout layout = sharded.arena_layout();
  layout.optimizer_state = false;
  kept::ParameterArena arena(cpu, sharded_model, layout);
  kept::ParameterArena reference_arena(cpu, reference_model, reference.arena_layout());
  reference.use_arena(&reference_arena);
  const kept::ZeroShards shards(arena, comm.rank(), comm.size());
  sharded.shard_states(shards.owned_ranges());
  std::vector<kept::Parameter*> params = pointers(sharded_model),
                                reference_params = pointers(reference_model);

  auto step = [&](kept::AdamW& optimizer, int s) {
    gradients(cpu, params, s);
    gradients(cpu, reference_params, s);
    optimizer.step(cpu, params);
    reference.step(cpu, reference_params);
    const kept::Tensor& values = arena.values();
    comm.all_gather_bytes(const_cast<void*>(values.raw()), shards.layout(),
                          kept::dtype_size(values.dtype()));
    for (std::size_t i = 0; i < params.size(); ++i)
      expect(same_bytes(params[i]->value, reference_params[i]->value),
             kept::detail::concat("step ", s, ": ", params[i]->name,
                                  " after the all-gather differs from the unsharded update"));
  };
  for (int s = 0; s < 3; ++s)
    step(sharded, s);

  const std::vector<kept::NamedTensor> gathered =
      kept::gather_optimizer_state(cpu, comm, arena, sharded, params);
  std::map<std::string, const kept::Tensor*> got;
  for (const kept::NamedTensor& named : gathered)
    got[named.name] = &named.tensor;
  const std::vector<kept::NamedTensor> want = reference.state_tensors(cpu);
  expect(got.size() == want.size(),
         kept::detail::concat("gathered ", got.size(), " state tensors, the reference has ",
                              want.size()));
  for (const kept::NamedTensor& named : want) {
    auto found = got.find(named.name);
    expect(found != got.end() && same_bytes(*found->second, named.tensor),
           "gathered state tensor " + named.name + " differs from the unsharded one");
  }

  // Gathered to rank 0 only (what kept train writes): the same tensors there, none elsewhere.
  const std::vector<kept::NamedTensor> to_root =
      kept::gather_optimizer_state(cpu, comm, arena, sharded, params, /*root=*/0);
  if (comm.rank() == 0) {
    expect(to_root.size() == gathered.size(), "the state gathered to rank 0 has another count");
    for (std::size_t i = 0; i < std::min(to_root.size(), gathered.size()); ++i)
      expect(
          to_root[i].name == gathered[i].name && same_bytes(to_root[i].tensor, gathered[i].tensor),
          "the state gathered to rank 0 differs at " + gathered[i].name);
  } else {
    expect(to_root.empty(), "a rank other than the root received the gathered state");
  }

  // The whole state into a fresh sharded optimizer: it continues as the reference does.
  kept::AdamW resumed(config);
  resumed.shard_states(shards.owned_ranges());
  resumed.load_state(cpu, gathered, params, "gathered");
  step(resumed, 3);

  stage3(comm);
  return checks.finish("test_zero");
}

}  // namespace

int main(int argc, char** argv) {
  return kept::test::run_under_mpi(&argc, &argv, "test_zero", run);
}
