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

  return checks.finish("test_zero");
}

}  // namespace

int main(int argc, char** argv) {
  return kept::test::run_under_mpi(&argc, &argv, "test_zero", run);
}
