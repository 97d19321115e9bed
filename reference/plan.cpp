#include "plan.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "kept/core/dynamic_code.hpp"
#include "kept/core/error.hpp"
#include "kept/dist/shard_layout.hpp"
#include "kept/io/hf_config.hpp"
#include "kept/model/parameter_arena.hpp"
#include "kept/train/adamw.hpp"

namespace kept::cli {

namespace fs = std::filesystem;

namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
constexpr double kMiB = 1024.0 * 1024.0;

// Efficiencies of the time model (see plan.hpp): fractions of the data-sheet peaks. They are
// assumptions until bench/RESULTS.md holds GPU measurements of kept's own kernels.
constexpr double kGemmEfficiency = 0.75;       // cuBLASLt bf16 GEMMs at 4096-token shapes
constexpr double kAttentionEfficiency = 0.45;  // flash-style causal attention, forward + backward
constexpr double kBandwidthEfficiency = 0.80;  // memory-bound kernels, of HBM bandwidth
constexpr double kLinkEfficiency = 0.78;       // pinned host <-> device copies, of the PCIe link
// What one op costs beyond its bytes and FLOPs: a kernel launch (no CUDA graphs), or on the CPU
// one op's dispatch and thread fork/join. It is what a small model's step is made of.
constexpr double kLaunchSeconds = 5e-6;
constexpr double kCpuOpSeconds = 2e-6;
// The device memory the CUDA runtime, cuBLAS/cuDNN handles and fragmentation take outside kept's
// own allocations: left out of the budget.
constexpr double kRuntimeReserve = 2.0 * kGiB;
constexpr double kGemmWorkspace = 32.0 * kMiB;  // Cuda::kDefaultWorkspaceBytes

// clang-format off
const TargetSpec kGpus[] = {
  // name         description                          memory (as reported)   bf16 dense  HBM       PCIe
  {"h100-80g",  "NVIDIA H100 SXM 80 GB (HBM3)",        81559.0 * kMiB,        989.4e12,   3.35e12,  64e9,  false, ""},
  {"h200-141g", "NVIDIA H200 SXM 141 GB (HBM3e)",      143771.0 * kMiB,       989.4e12,   4.8e12,   64e9,  false, ""},
  {"a100-80g",  "NVIDIA A100 SXM 80 GB (HBM2e)",       81920.0 * kMiB,        312e12,     2.039e12, 32e9,  false, ""},
  {"a100-40g",  "NVIDIA A100 SXM 40 GB (HBM2)",        40960.0 * kMiB,        312e12,     1.555e12, 32e9,  false, ""},
};
// clang-format on

// Links between ranks: the bus bandwidth (what one rank sends per second in a large collective,
// nccl-tests' "busbw", so a collective moving B bytes per rank takes B / busbw) and a latency per
// collective call. Stated from vendor figures and published nccl-tests runs, not measured by kept:
//   NVLink 4 (H100 / H200 SXM, NVSwitch): 450 GB/s per direction per GPU; all-reduce reaches
//     ~360 GB/s bus bandwidth on 8 GPUs (NVLS / SHARP off, as kept's point-to-point sums are).
//   NVLink 3 (A100 SXM): 300 GB/s per direction; ~230 GB/s bus bandwidth.
//   InfiniBand, one NIC per GPU: NDR 400 Gb/s = 50 GB/s (DGX H100 / H200), ~40 GB/s effective;
//     HDR 200 Gb/s = 25 GB/s (DGX A100), ~20 GB/s. kept's collectives send each piece point to
//     point (every rank to every other, kept/dist/communicator.hpp), so over nodes of 8 the
//     share of a rank's bytes bound for other nodes, (N - 8) / (N - 1), crosses its NIC while
//     the rest goes over NVLink at the same time (Interconnect::seconds).
//   Latency: ~20 us a call inside a node (small-message collectives on 8 GPUs), ~50 us across
//     nodes; kept's rank-ordered sums send every piece point to point, so no tree shortcut.
struct GpuLinks {
  const char* gpu;
  double nvlink, ib;
  const char *nvlink_text, *ib_text;
};
// clang-format off
const GpuLinks kGpuLinks[] = {
  {"h100-80g",  360e9, 40e9, "NVLink 4 via NVSwitch (450 GB/s a direction)", "InfiniBand NDR, 400 Gb/s a GPU"},
  {"h200-141g", 360e9, 40e9, "NVLink 4 via NVSwitch (450 GB/s a direction)", "InfiniBand NDR, 400 Gb/s a GPU"},
  {"a100-80g",  230e9, 20e9, "NVLink 3 via NVSwitch (300 GB/s a direction)", "InfiniBand HDR, 200 Gb/s a GPU"},
  {"a100-40g",  230e9, 20e9, "NVLink 3 via NVSwitch (300 GB/s a direction)", "InfiniBand HDR, 200 Gb/s a GPU"},
};
// clang-format on
constexpr double kNvlinkLatency = 20e-6;
constexpr double kIbLatency = 50e-6;
// MPI between processes of one host (Open MPI's shared-memory transport, kept's MPI
// communicator): each message is copied once (a read and a write of every byte, CMA single copy
// for large messages), and all N ranks copy at the same time through the host's one memory
// system, so a rank's rate is the host's copy bandwidth (at kBandwidthEfficiency) / (2 N).
// Latency ~10 us a call (N - 1 point-to-point messages of a few us each).
constexpr double kShmLatency = 10e-6;
// The GPUs of one node: NVLink's reach.
constexpr std::int64_t kGpusPerNode = 8;

double host_memory_total() {
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  double kib = 0;
  while (meminfo >> key >> kib) {
    if (key == "MemTotal:") return kib * 1024.0;
    meminfo.ignore(256, '\n');
  }
  return 0;
}

// Every parameter tensor's element count, in visiting order.
std::vector<std::int64_t> parameter_sizes(const ModelConfig& c) {
  const bool ln = c.norm_kind() == NormKind::LayerNorm;
  const std::int64_t h = c.hidden_size, i = c.intermediate_size, v = c.vocab_size;
  std::vector<std::int64_t> sizes{v * h};
  auto norm = [&] {
    sizes.push_back(h);
    if (ln) sizes.push_back(h);
  };
  auto linear = [&](std::int64_t in, std::int64_t out, bool bias) {
    sizes.push_back(in * out);
    if (bias) sizes.push_back(out);
  };
  for (std::int64_t l = 0; l < c.num_layers; ++l) {
    norm();
    for (int p = 0; p < 4; ++p)
      linear(h, h, c.attention_bias);
    norm();
    linear(h, i, c.mlp_bias);
    linear(h, i, c.mlp_bias);
    linear(i, h, c.mlp_bias);
  }
  norm();
  linear(h, v, false);
  return sizes;
}

double sum(const std::vector<std::int64_t>& sizes) {
  double total = 0;
  for (std::int64_t n : sizes)
    total += static_cast<double>(n);
  return total;
}

// One decoder layer's parameters.
double layer_parameters(const ModelConfig& c) {
  const double h = static_cast<double>(c.hidden_size), i = static_cast<double>(c.intermediate_size);
  const double ln = c.norm_kind() == NormKind::LayerNorm ? 1 : 0;
  return 2 * h * (1 + ln) + 4 * h * h + (c.attention_bias ? 4 * h : 0) + 3 * h * i +
         (c.mlp_bias ? 2 * i + h : 0);
}

struct Bytes {
  double act, param, grad, master, stat;
  bool separate_master;
};

Bytes backend_bytes(bool cuda) {
  return cuda ? Bytes{2, 2, 4, 4, 4, true} : Bytes{4, 4, 4, 4, 4, false};
}

// What one block's forward cache holds (kept/model/block.hpp, kept/layers/*.hpp): the two norm
// outputs and the residual mid-point, q/k/v/o, the MLP's gate/up/product (Activation); rstd (and
// mean, LayerNorm) per norm and the attention's log-sum-exp (Stat).
double block_cache_bytes(const ModelConfig& c, const Bytes& b, double tokens) {
  const double h = static_cast<double>(c.hidden_size), i = static_cast<double>(c.intermediate_size);
  const double ln = c.norm_kind() == NormKind::LayerNorm ? 1 : 0;
  return b.act * tokens * (7 * h + 3 * i) +
         b.stat * tokens * (2 * (1 + ln) + static_cast<double>(c.num_heads));
}

std::string bytes_text(double bytes) {
  char text[32];
  if (bytes >= kGiB)
    std::snprintf(text, sizeof text, "%.2f GiB", bytes / kGiB);
  else
    std::snprintf(text, sizeof text, "%.1f MiB", bytes / kMiB);
  return text;
}

}  // namespace

const TargetSpec& gpu_spec(const std::string& name) {
  for (const TargetSpec& spec : kGpus)
    if (spec.name == name) return spec;
  fail("unknown GPU \"", name, "\" (", gpu_names(), ")");
}

std::string gpu_names() {
  std::string names;
  for (const TargetSpec& spec : kGpus)
    names += (names.empty() ? "" : ", ") + spec.name;
  return names;
}

TargetSpec cpu_spec() {
  // OpenBLAS sgemm on this project's 2-core VM: 240-306 GFLOP/s, copy ~25 GB/s
  // (bench/RESULTS.md).
  return {"cpu", "this machine's CPU (fp32)", host_memory_total(), 250e9, 25e9, 0, true, ""};
}

std::string interconnect_names() {
  return "nvlink, ib";
}

double Interconnect::seconds(double bytes, double calls) const {
  const double remote = bytes * remote_fraction / bus_bandwidth;
  const double local = remote_fraction < 1 ? bytes * (1 - remote_fraction) / node_bandwidth : 0;
  return calls * latency + std::max(remote, local);  // both directions of traffic at once
}

Interconnect interconnect(const TargetSpec& target, std::int64_t ranks) {
  if (target.cpu) {
    KEPT_CHECK(target.interconnect.empty() || target.interconnect == "shm", "--interconnect ",
               target.interconnect,
               ": a cpu job's ranks are processes of this host, which talk through shared memory "
               "(drop --interconnect)");
    const auto n = static_cast<double>(std::max<std::int64_t>(ranks, 1));
    return {"shm",
            "MPI through this host's shared memory, the ranks sharing its memory bandwidth",
            target.memory_bandwidth * kBandwidthEfficiency / (2 * n),
            kShmLatency,
            1,
            0};
  }
  const std::string name = !target.interconnect.empty() ? target.interconnect
                           : ranks <= kGpusPerNode      ? "nvlink"
                                                        : "ib";
  KEPT_CHECK(name == "nvlink" || name == "ib", "--interconnect ", name, ": unknown link (",
             interconnect_names(), ")");
  KEPT_CHECK(name == "ib" || ranks <= kGpusPerNode, "--interconnect nvlink with ", ranks,
             " GPUs: NVLink joins the ", kGpusPerNode,
             " GPUs of one node; more go over InfiniBand (--interconnect ib)");
  // A GPU outside the table (kept train's "this GPU"): the H100's figures.
  const GpuLinks* links = &kGpuLinks[0];
  for (const GpuLinks& each : kGpuLinks)
    if (target.name == each.gpu) links = &each;
  if (name == "nvlink") return {name, links->nvlink_text, links->nvlink, kNvlinkLatency, 1, 0};
  Interconnect ib{name, links->ib_text, links->ib, kIbLatency, 1, 0};
  if (ranks > kGpusPerNode) {
    // Nodes of kGpusPerNode: a rank's peers on its own node are reached over NVLink.
    const auto n = static_cast<double>(ranks), node = static_cast<double>(kGpusPerNode);
    ib.remote_fraction = (n - node) / (n - 1);
    ib.node_bandwidth = links->nvlink;
    ib.description += ", nodes of " + std::to_string(kGpusPerNode) + " GPUs on NVLink";
  } else {
    ib.description += ", one GPU a node";
  }
  return ib;
}

// ---- strategies -------------------------------------------------------------------------------

std::string Strategy::describe(std::int64_t ranks) const {
  std::string text = std::string(checkpointing ? "checkpointing" : "no checkpointing");
  if (teacher != "none") text += ", teacher " + teacher;
  text += ", " + states + " states";
  text += master ? ", fp32 masters" : ", no masters";
  if (states_on_host) text += " on host";
  text += gradient_buffer ? ", gradient buffer" : ", no gradient buffer";
  if (ranks > 1 || zero_stage > 0) text += ", ZeRO-" + std::to_string(zero_stage);
  return text;
}

int Strategy::approximations() const {
  return (states != "fp32") + !master + (teacher == "offline");
}

std::vector<std::string> Strategy::not_runnable(const PlanJob& job) const {
  std::vector<std::string> missing;
  if (!gradient_buffer && !job.student_backward)
    missing.push_back(
        "no gradient buffer with norm_only loss \"opm-l2\" (it has no backward to update the "
        "layers in)");
  if (zero_stage >= 2 && gradient_buffer)
    missing.push_back("zero_stage " + std::to_string(zero_stage) +
                      " with a gradient buffer (it reduce-scatters each layer's gradients inside "
                      "backward: memory.gradients \"none\")");
  if (zero_stage == 3 && job.ranks > 1 && job.grad_accum % job.ranks != 0)
    missing.push_back("zero_stage 3 with grad_accum " + std::to_string(job.grad_accum) +
                      " not a multiple of the " + std::to_string(job.ranks) +
                      " ranks (every rank gathers each layer for each of its forwards, so all "
                      "must run as many micro-batches)");
  if (job.grad_accum < job.ranks)
    missing.push_back("grad_accum " + std::to_string(job.grad_accum) + " below the " +
                      std::to_string(job.ranks) +
                      " ranks (micro-batch m runs on rank m mod N, so every rank needs one: "
                      "grad_accum >= N)");
  return missing;
}

// ---- the job ----------------------------------------------------------------------------------

PlanJob plan_job(const TrainJob& job, bool emulated) {
  PlanJob plan;
  plan.objective = job.objective;
  plan.batch = job.batch_size;
  plan.seq = job.seq_len;
  plan.grad_accum = job.grad_accum;
  plan.steps = job.steps;
  plan.min_8bit_size = job.min_8bit_size;
  plan.student_backward = !(job.objective == Objective::NormOnly && job.norm_only_loss == "opm-l2");
  plan.cuda = job.device == "cuda";
  plan.emulated = emulated && plan.cuda;
  std::error_code error;
  fs::path student_config;
  if (!job.model_config.empty()) {
    student_config = job.model_config;
    if (student_config.is_relative()) student_config = job.file.parent_path() / student_config;
  } else if (!job.init_config.empty()) {
    student_config = job.init_config;
  } else {
    student_config = fs::path(job.student) / "config.json";
  }
  KEPT_CHECK(fs::is_regular_file(student_config, error), job.file.string(),
             ": the planner needs the student's shapes, and ", student_config.string(),
             " does not exist; set \"model_config\" to a config.json of the student's shapes");
  plan.student = read_hf_config(student_config);
  plan.source = student_config.string();
  plan.has_teacher = needs_teacher(job.objective);
  if (plan.has_teacher) {
    const fs::path teacher_config = fs::path(job.teacher) / "config.json";
    if (!job.teacher.empty() && fs::is_regular_file(teacher_config, error)) {
      plan.teacher = read_hf_config(teacher_config);
    } else {
      plan.teacher = plan.student;  // the converted student has the teacher's shapes
      plan.teacher.architecture = Architecture::Orion;
      plan.teacher.attention_bias = plan.teacher.mlp_bias = false;
    }
  }
  return plan;
}

// ---- the estimate -----------------------------------------------------------------------------

Plan estimate(const PlanJob& job, const Strategy& s, const TargetSpec& target,
              double host_memory_bytes) {
  Plan plan;
  plan.strategy = s;
  plan.ranks = job.ranks;
  const Bytes b = backend_bytes(job.cuda);
  const ModelConfig& c = job.student;
  const double tokens = static_cast<double>(job.batch * job.seq);
  const double h = static_cast<double>(c.hidden_size), i = static_cast<double>(c.intermediate_size);
  const double v = static_cast<double>(c.vocab_size), layers = static_cast<double>(c.num_layers);
  const bool ln_student = c.norm_kind() == NormKind::LayerNorm;
  auto add = [&](std::string name, double bytes, std::string detail, bool host = false) {
    if (bytes > 0) plan.terms.push_back({std::move(name), bytes, host, std::move(detail)});
  };

  // Parameters: the arena's buffers (kept/model/parameter_arena.hpp), one slot per tensor padded to
  // kArenaAlignment elements.
  const std::vector<std::int64_t> sizes = parameter_sizes(c);
  double aligned = 0, small = 0;
  for (std::int64_t n : sizes) {
    aligned += static_cast<double>((n + kArenaAlignment - 1) / kArenaAlignment * kArenaAlignment);
    if (n < job.min_8bit_size) small += static_cast<double>(n);
  }
  const double n_student = sum(sizes);
  // The arena as slots: one layer's span, and the parameters outside the layers (embedding, final
  // norm, LM head), so that aligned = layers x layer_span + outside.
  auto slot = [](std::int64_t n) {
    return static_cast<double>((n + kArenaAlignment - 1) / kArenaAlignment * kArenaAlignment);
  };
  const std::size_t per_layer = (sizes.size() - 2 - (ln_student ? 2 : 1)) /
                                static_cast<std::size_t>(std::max<std::int64_t>(1, c.num_layers));
  double layer_span = 0, outside = slot(sizes.front()) + slot(sizes.back());
  for (std::size_t k = 1; k <= per_layer; ++k)
    layer_span += slot(sizes[k]);
  for (std::size_t k = sizes.size() - 1 - (ln_student ? 2 : 1); k < sizes.size() - 1; ++k)
    outside += slot(sizes[k]);
  // ZeRO: a rank's shard of the arena (kept/dist/shard_layout.hpp, kept/train/zero.hpp), the
  // largest one, which bounds both the memory and the update's time.
  const auto ranks = static_cast<double>(job.ranks);
  const double shard = static_cast<double>(
      ShardLayout(static_cast<std::int64_t>(aligned), static_cast<int>(job.ranks), kArenaAlignment)
          .max_count());
  const double state_share = s.zero_stage >= 1 ? shard / std::max(1.0, aligned) : 1.0;
  const std::string shard_text = std::to_string(static_cast<long long>(shard)) + " of " +
                                 std::to_string(static_cast<long long>(aligned)) + " elements";
  if (s.zero_stage == 3) {
    // Stage 3: the rank's shard of the layers (the largest rank's part of their span, which
    // starts after the embedding's slot), the layer in use and the other gathered one, and the
    // parameters outside the layers held whole (the embedding and head are used at both ends of
    // the step). kept/train/zero.hpp, ShardedLayerWeights.
    const ShardLayout cut(static_cast<std::int64_t>(aligned), static_cast<int>(job.ranks),
                          kArenaAlignment);
    const double layers_first = slot(sizes.front());
    const double layers_end = layers_first + layer_span * static_cast<double>(c.num_layers);
    double layer_shard = 0;
    for (int rank = 0; rank < static_cast<int>(job.ranks); ++rank)
      layer_shard =
          std::max(layer_shard, std::min(static_cast<double>(cut.end(rank)), layers_end) -
                                    std::max(static_cast<double>(cut.offset(rank)), layers_first));
    add("student weights (shard)", b.param * (layer_shard + outside + 2 * layer_span),
        std::to_string(static_cast<long long>(n_student)) + " parameters: the layers' part of a " +
            shard_text + " shard + two gathered layers + embedding, final norm and LM head");
  } else {
    add("student weights", b.param * aligned,
        std::to_string(static_cast<long long>(n_student)) + " parameters");
  }
  const bool per_layer_update = !s.gradient_buffer;
  if (s.gradient_buffer) {
    add("gradients", b.grad * aligned, "fp32, the whole model");
  } else {
    // The parameters outside the layers keep their slots; the layers share one layer's span
    // (kept/model/parameter_arena.hpp, gradient_buffer false). ZeRO-2 reduce-scatters the
    // layer's gradients inside backward, so it holds the same.
    add("gradients (per layer)", b.grad * (outside + layer_span),
        "embedding + LM head + final norm + one layer's, fp32");
  }
  const bool masters = b.separate_master && s.master;
  double state_bytes = 0;
  if (masters) state_bytes += b.master * aligned;
  if (s.states == "int8")
    state_bytes += 2 * aligned + 2 * 4 * aligned / kQuantBlock + 2 * b.master * small;
  else if (s.states == "bf16")
    state_bytes += 2 * 2 * aligned;
  else
    state_bytes += 2 * b.master * aligned;
  // From stage 1 on a rank keeps the states (masters included) of its shard alone.
  state_bytes *= state_share;
  const std::string state_detail =
      (masters ? std::string("fp32 masters + ") : std::string()) + s.states + " m and v" +
      (s.states == "int8" ? " (absmax per 256; small tensors fp32)" : "") +
      (s.zero_stage >= 1 && job.ranks > 1 ? ", a " + shard_text + " shard" : "");
  if (s.states_on_host) {
    add("optimizer states (host)", state_bytes, state_detail, true);
    // A device backend updates them through staging buffers of one chunk's state each
    // (kept/train/adamw.hpp, update_staged): m, v, their absmax and the master, each sized by the
    // largest chunk of any parameter in that part's dtype; two sets when a parameter spans more
    // than one chunk.
    if (job.cuda) {
      const std::int64_t chunk = AdamWConfig{}.host_state_chunk;
      double moment = 0, absmax = 0, master = 0, sets = 1;
      for (std::int64_t n : sizes) {
        if (n > chunk) sets = 2;
        const auto elements = static_cast<double>(std::min(n, chunk));
        const bool quantized = s.states == "int8" && n >= job.min_8bit_size;
        moment = std::max(moment, elements * (quantized ? 1.0 : s.states == "bf16" ? 2.0 : 4.0));
        if (quantized) absmax = std::max(absmax, 4.0 * std::ceil(elements / kQuantBlock));
        master = std::max(master, elements * 4.0);
      }
      add("optimizer state staging", sets * (2 * moment + 2 * absmax + (masters ? master : 0)),
          std::string(sets == 2 ? "two chunks" : "one chunk") + " of at most " +
              std::to_string(static_cast<long long>(chunk)) + " elements' state");
    }
  } else {
    add("optimizer states", state_bytes, state_detail);
  }

  // The teacher: frozen weights, a forward in Inference mode (two residual slots, one block cache).
  const bool teacher_runs = job.has_teacher && s.teacher != "offline" && s.teacher != "none";
  double n_teacher = 0, n_teacher_layer = 0;
  if (job.has_teacher) {
    const ModelConfig& t = job.teacher;
    n_teacher = sum(parameter_sizes(t));
    n_teacher_layer = layer_parameters(t);
    const double resident_part = n_teacher - static_cast<double>(t.num_layers) * n_teacher_layer;
    if (s.teacher == "resident") {
      add("teacher weights", b.param * n_teacher,
          "frozen, " + std::string(b.param == 2 ? "bf16" : "fp32"));
    } else if (s.teacher == "streamed") {
      add("teacher embedding + head", b.param * resident_part, "resident");
      add("teacher layer slots", 2 * b.param * n_teacher_layer, "two layers: in use + prefetch");
      add("teacher layers (pinned host)", b.param * (n_teacher - resident_part), "", true);
    }
    if (teacher_runs) {
      const double tln = t.norm_kind() == NormKind::LayerNorm ? 1 : 0;
      const double slots =
          job.objective == Objective::XkdHidden ? static_cast<double>(t.num_layers) + 1 : 2;
      add("teacher activations",
          4 * tokens + b.act * tokens * static_cast<double>(t.hidden_size) * (slots + 1) +
              b.stat * tokens * (1 + tln) + block_cache_bytes(t, b, tokens),
          "residual slots, one block's cache, the final norm");
    } else if (s.teacher == "offline") {
      const double k = static_cast<double>(job.offline_k);
      // The file's rows of one logit chunk on the device (kept/io/teacher_logits.hpp: 8k + 4 B).
      add("offline teacher rows",
          std::min(tokens, static_cast<double>(job.token_chunk)) * (k * 8 + 4),
          std::to_string(job.offline_k) + "-best log-probs of a chunk");
    }
  }

  // The student's activations (Training mode): L+1 residual slots and every block's cache, or
  // with checkpointing the slots and one cache reused by the recompute. Without a gradient
  // buffer the micro-batches run layer-major (kept/model/decoder.hpp): every micro-batch's
  // forward is in memory at once, each with its output gradient (d_hidden, or xkd-hidden's
  // L+1 state gradients) and its residual-stream gradient during backward.
  // Data parallel: a rank holds its own micro-batches (ceil(grad_accum / N) on the busiest).
  const auto micro_per_rank = static_cast<double>(job.micro_batches_per_rank());
  const double accum_in_flight = per_layer_update ? micro_per_rank : 1;
  const double slots = (layers + 1) * b.act * tokens * h;
  const double caches =
      (s.checkpointing ? 1 : layers * accum_in_flight) * block_cache_bytes(c, b, tokens);
  const double output_gradients =
      (job.objective == Objective::XkdHidden ? layers + 2 : 1) * b.act * tokens * h;
  std::string activations_detail =
      s.checkpointing ? "layer inputs + one block recomputed" : "every block's cache";
  if (accum_in_flight > 1)
    activations_detail +=
        ", " + std::to_string(job.micro_batches_per_rank()) + " micro-batches layer-major";
  add("student activations",
      accum_in_flight *
              (4 * tokens + slots + b.stat * tokens * (1 + ln_student) + b.act * tokens * h) +
          (accum_in_flight - 1) * (output_gradients + b.act * tokens * h) + caches,
      activations_detail);
  // Backward buffers, allocated once and kept (kept/model/decoder.hpp, block.hpp): d_hidden, two
  // residual gradients, the attention's d_o/dq/dk/dv, the MLP's three, d_normed and d_mid.
  add("backward buffers", b.act * tokens * ((s.checkpointing ? 10 : 9) * h + 3 * i),
      s.checkpointing ? "residual-stream gradients, scratch, the recomputed output"
                      : "residual-stream gradients, scratch");

  // The loss: two [token_chunk x vocab] logit buffers (kept/xkd/chunked_logits.hpp).
  const double chunk = std::min(static_cast<double>(job.token_chunk), tokens);
  const bool two_buffers = teacher_runs && job.objective != Objective::XkdHidden;
  if (job.objective != Objective::XkdHidden)
    add("logit chunks", (two_buffers ? 2 : 1) * b.stat * chunk * v,
        std::to_string(static_cast<long long>(chunk)) + " tokens x vocab, fp32");
  if (job.cuda) {
    // A mixed fp32 x bf16 GEMM widens its bf16 operand in scratch (kept/backend/cuda/gemm.cuh):
    // for dL/dhidden = dlogits . W_head that is the whole LM head in fp32.
    double scratch = 4 * v * h;
    if (!job.emulated) scratch += kGemmWorkspace;
    add("CUDA scratch", scratch,
        job.emulated ? "LM head widened to fp32" : "LM head widened to fp32, GEMM workspace");
  }

  for (const MemoryTerm& term : plan.terms)
    (term.host ? plan.host_bytes : plan.device_bytes) += term.bytes;
  // The ranks of one host share its memory: all of them on the CPU (processes of this machine),
  // the GPUs of a node (kGpusPerNode) for the pinned host memory. Budgets are per rank.
  const double ranks_per_host =
      target.cpu ? ranks : std::min(ranks, static_cast<double>(kGpusPerNode));
  plan.device_budget = target.cpu ? std::max(0.0, target.memory_bytes - 2 * kGiB) / ranks
                                  : target.memory_bytes - kRuntimeReserve;
  if (target.cpu) {
    plan.fits = plan.device_bytes + plan.host_bytes <= plan.device_budget;
  } else {
    plan.fits = plan.device_bytes <= plan.device_budget &&
                (plan.host_bytes == 0 || ranks_per_host * plan.host_bytes <= host_memory_bytes);
  }
  plan.not_runnable = s.not_runnable(job);

  // ---- time -----------------------------------------------------------------------------------
  // Model FLOPs count the global batch; the compute is the busiest rank's micro-batches.
  const double global_tokens = static_cast<double>(job.tokens_per_step());
  const double step_tokens = tokens * micro_per_rank;
  const double seq = static_cast<double>(job.seq);
  const double layer_matmul = 4 * h * h + 3 * h * i;
  const double n_matmul = layers * layer_matmul + v * h;
  const double attention_fwd = 2 * layers * h * seq;  // causal: QK^T and PV, per token
  const double student_flops = global_tokens * (6 * n_matmul + 3 * attention_fwd);
  double teacher_matmul = 0, teacher_attention = 0;
  if (job.has_teacher) {
    const ModelConfig& t = job.teacher;
    const double th = static_cast<double>(t.hidden_size),
                 ti = static_cast<double>(t.intermediate_size);
    teacher_matmul = static_cast<double>(t.num_layers) * (4 * th * th + 3 * th * ti) +
                     static_cast<double>(t.vocab_size) * th;
    teacher_attention = 2 * static_cast<double>(t.num_layers) * th * seq;
  }
  const double teacher_flops =
      teacher_runs ? global_tokens * (2 * teacher_matmul + teacher_attention) : 0;
  const double recompute_flops =
      s.checkpointing ? step_tokens * (2 * (n_matmul - v * h) + attention_fwd) : 0;
  plan.model_flops_per_step = student_flops + teacher_flops;
  // The CPU's ranks are processes of one host: they share its cores and memory bandwidth.
  const double host_share = target.cpu ? ranks : 1.0;
  const double device_gemm_rate = target.peak_flops * (target.cpu ? 1.0 : kGemmEfficiency);
  const double gemm_rate = device_gemm_rate / host_share;
  const double attention_rate =
      target.peak_flops * (target.cpu ? 0.3 : kAttentionEfficiency) / host_share;
  const double bandwidth = target.memory_bandwidth * kBandwidthEfficiency / host_share;
  const double link = target.host_link * kLinkEfficiency;
  auto attention_part = [&](double flops_per_token_attention, double multiplier) {
    return step_tokens * flops_per_token_attention * multiplier / attention_rate;
  };
  const double student_gemm = step_tokens * 6 * n_matmul / gemm_rate;
  const double student_attention = attention_part(attention_fwd, 3);
  // Memory-bound passes: ~14 hidden-wide and 3 intermediate-wide activation passes a layer forward,
  // 2.5 times that in backward; the softmax over the logits reads and writes each logit ~6 times.
  const double elementwise_bytes = step_tokens * layers * (14 * h + 3 * i) * b.act * 3.5 +
                                   step_tokens * v * b.stat * 6 * (two_buffers ? 2 : 1);
  double teacher_seconds = 0;
  if (teacher_runs) {
    teacher_seconds = step_tokens * 2 * teacher_matmul / gemm_rate +
                      attention_part(teacher_attention, 1) +
                      step_tokens * static_cast<double>(job.teacher.num_layers) *
                          (14 * static_cast<double>(job.teacher.hidden_size) +
                           3 * static_cast<double>(job.teacher.intermediate_size)) *
                          b.act / bandwidth;
    if (s.teacher == "streamed" && link > 0) {
      // Micro-batches of a step run the teacher layer-major, so each layer crosses the link once
      // a step, overlapped with the compute on the layer before.
      const double transfer =
          b.param * n_teacher_layer * static_cast<double>(job.teacher.num_layers) / link;
      plan.time_terms.push_back({"teacher transfer (overlapped)", transfer});
      teacher_seconds = std::max(teacher_seconds, transfer);
    }
  }
  // The optimizer reads the gradient and the weight and reads and writes the states (of its
  // shard from stage 1 on).
  const double optimizer_bytes = state_share * aligned * (b.grad + 2 * b.param) + 2 * state_bytes;
  const double optimizer_seconds = optimizer_bytes / bandwidth;
  // Host states cross the link both ways each step; the next chunk's upload overlaps the current
  // one's download (a full-duplex link, kept/train/adamw.hpp's update_staged), so one way's time.
  const double host_state_seconds = s.states_on_host && link > 0 ? state_bytes / link : 0;
  // Ops per step: ~16 a block forward and ~30 backward (the student), ~16 a teacher block, ~8 a
  // logit chunk, ~3 a parameter tensor in clipping and the update.
  const double chunks = std::ceil(tokens / std::max(1.0, chunk));
  const double ops =
      micro_per_rank *
          (layers * (46 + (s.checkpointing ? 16 : 0)) +
           (teacher_runs ? 16 * static_cast<double>(job.teacher.num_layers) : 0) + 8 * chunks) +
      3 * static_cast<double>(sizes.size());
  plan.time_terms.push_back({"op launches", ops * (target.cpu ? kCpuOpSeconds : kLaunchSeconds)});
  plan.time_terms.push_back({"student GEMMs", student_gemm});
  plan.time_terms.push_back({"student attention", student_attention});
  if (recompute_flops > 0)
    plan.time_terms.push_back({"recompute", step_tokens * 2 * (n_matmul - v * h) / gemm_rate +
                                                attention_part(attention_fwd, 1)});
  if (teacher_runs) plan.time_terms.push_back({"teacher forward", teacher_seconds});
  plan.time_terms.push_back({"memory-bound ops", elementwise_bytes / bandwidth});
  plan.time_terms.push_back({"optimizer", optimizer_seconds});
  if (host_state_seconds > 0)
    plan.time_terms.push_back({"states over the link", host_state_seconds});

  // ---- between ranks (plan.hpp: bytes, overlap) -------------------------------------------------
  if (job.ranks > 1) {
    plan.link = interconnect(target, job.ranks);
    const double f = (ranks - 1) / ranks;
    const double g = b.grad, w = b.param;
    const auto layer_tensors = static_cast<double>(per_layer);
    const double outside_tensors = static_cast<double>(sizes.size()) - layers * layer_tensors;
    // One layer's compute on this rank, for what hides behind it: a forward of `t` tokens, and
    // the layer-major backward of all the rank's micro-batches (with its recompute).
    auto layer_forward = [&](double t) {
      return t * 2 * layer_matmul / gemm_rate + t * 2 * h * seq / attention_rate +
             t * (14 * h + 3 * i) * b.act / bandwidth;
    };
    const double layer_backward = step_tokens * 4 * layer_matmul / gemm_rate +
                                  step_tokens * 4 * h * seq / attention_rate +
                                  step_tokens * (14 * h + 3 * i) * b.act * 2.5 / bandwidth +
                                  (s.checkpointing ? layer_forward(step_tokens) : 0);
    auto seconds = [&](double bytes, double calls) { return plan.link.seconds(bytes, calls); };
    const bool overlap = !target.cpu;  // a second stream; MPI on the CPU blocks
    // Per-layer collectives inside the backward walk: each layer's share (of every kind) hides
    // behind the next layer's backward, up to its length; the walk's last layer has none after it.
    std::vector<std::pair<std::size_t, double>> backward_per_layer;  // collective, seconds a layer
    auto collective = [&](std::string name, double bytes, double calls, bool per_layer_walk) {
      plan.collectives.push_back(
          {std::move(name), bytes, calls, seconds(bytes, calls), 0, per_layer_walk});
      return plan.collectives.size() - 1;
    };
    const int stage = s.zero_stage;
    {
      // The gradients: all-reduced (stage 0) or reduce-scattered to their owners.
      const bool sum_all = stage == 0;
      const double factor = sum_all ? 2 * f : f;
      const char* name = sum_all ? "gradient all-reduce" : "gradient reduce-scatter";
      if (s.gradient_buffer) {
        collective(name, factor * g * aligned, 1, false);
      } else {
        // Each layer's gradients as the walk leaves it, one call a parameter
        // (reduce_gradients_over_ranks), and those outside the layers at the end.
        const std::size_t index =
            collective(name, factor * g * aligned, layers * layer_tensors + outside_tensors, true);
        backward_per_layer.push_back({index, seconds(factor * g * layer_span, layer_tensors)});
      }
    }
    if ((stage == 1 || stage == 2) && s.gradient_buffer)
      collective("weight all-gather", f * w * aligned, 1, false);
    if ((stage == 1 || stage == 2) && !s.gradient_buffer) {
      // Each layer's weights right after its update inside the walk, one call a parameter
      // (gather_weights in reference/trainer_run.hpp), those outside the layers at the end.
      const std::size_t index = collective("weight all-gather", f * w * aligned,
                                           layers * layer_tensors + outside_tensors, true);
      backward_per_layer.push_back({index, seconds(f * w * layer_span, layer_tensors)});
    }
    if (stage == 3) {
      // Each layer gathered before every forward of it (micro-batch by micro-batch) and once for
      // the layer-major backward, whose recompute (checkpointing) runs just before the layer's
      // backward on the same gathered copy, except the last two, still gathered from the last
      // forward; the parts outside the layers, held whole, gathered after their update.
      const double gather = f * w * layer_span;
      const double calls = micro_per_rank * layers + std::max(0.0, layers - 2);
      collective("per-layer weight all-gather", calls * gather, calls, true);
      // kept train gathers a layer when it is about to run, on the compute stream's order (no
      // prefetch of the next layer yet, kept/train/zero.hpp): none of these gathers hides.
      collective("weight all-gather", f * w * outside, 1, false);
    }
    if (overlap && !backward_per_layer.empty()) {
      double per_layer_seconds = 0;
      for (const auto& [index, layer_seconds] : backward_per_layer)
        per_layer_seconds += layer_seconds;
      const double hidden = (layers - 1) * std::min(per_layer_seconds, layer_backward);
      for (const auto& [index, layer_seconds] : backward_per_layer)
        plan.collectives[index].hidden_seconds += hidden * layer_seconds / per_layer_seconds;
    }
    for (const Collective& each : plan.collectives) {
      plan.communication_bytes += each.bytes;
      plan.communication_seconds += each.seconds;
      plan.hidden_seconds += each.hidden_seconds;
    }
    plan.time_terms.push_back(
        {"communication (exposed)", plan.communication_seconds - plan.hidden_seconds});
  }

  plan.step_seconds = 0;
  for (const auto& [name, seconds] : plan.time_terms)
    if (name != "teacher transfer (overlapped)") plan.step_seconds += seconds;
  plan.peak_flops = target.peak_flops;
  // MFU over every device: the CPU's ranks share one.
  const double devices = target.cpu ? 1.0 : ranks;
  plan.mfu = plan.model_flops_per_step / (plan.step_seconds * target.peak_flops * devices);
  plan.job_hours = plan.step_seconds * static_cast<double>(job.steps) / 3600.0;
  // `kept teacher-logits` is one process on one device, whatever the ranks of the training.
  if (job.has_teacher && s.teacher == "offline")
    plan.offline_precompute_hours = static_cast<double>(job.steps) * global_tokens *
                                    (2 * teacher_matmul + teacher_attention) / device_gemm_rate /
                                    3600.0;
  plan.total_seconds_per_step =
      plan.step_seconds + plan.offline_precompute_hours * 3600.0 /
                              std::max<double>(1.0, static_cast<double>(job.steps));
  return plan;
}

std::vector<Plan> all_plans(const PlanJob& job, const TargetSpec& target,
                            double host_memory_bytes) {
  std::vector<Plan> plans;
  std::vector<std::string> teachers{"none"};
  if (job.has_teacher) {
    teachers = {"resident", "streamed"};
    if (job.objective == Objective::XkdLogit) teachers.push_back("offline");
  }
  const std::vector<bool> masters =
      job.cuda ? std::vector<bool>{true, false} : std::vector<bool>{true};
  // Stages from the highest down, so that of two plans with the same figures (stage 1 and 2
  // without a gradient buffer are the same run) the higher stage's name is kept.
  const int top_stage = job.ranks > 1 ? 3 : 0;
  for (bool checkpointing : {false, true})
    for (const std::string& teacher : teachers)
      for (const char* states : {"fp32", "bf16", "int8"})
        for (bool master : masters)
          for (bool host : {false, true})
            for (bool buffer : {true, false})
              for (int stage = top_stage; stage >= 0; --stage) {
                if (target.cpu && (host || teacher == "streamed")) continue;  // one memory
                // Stages 2 and 3 reduce-scatter each layer's gradients inside backward.
                if (stage >= 2 && buffer) continue;
                Strategy s{checkpointing, teacher, states, master, host, buffer, stage};
                plans.push_back(estimate(job, s, target, host_memory_bytes));
              }
  return plans;
}

const Plan* choose_plan(const std::vector<Plan>& plans, bool runnable_only) {
  // Exactness is worth some time, not any: among the plans within kSlack of the fastest that
  // fits (counting the offline teacher's precompute), the fewest approximations, then the
  // fastest.
  constexpr double kSlack = 1.25;
  auto eligible = [&](const Plan& plan) {
    return plan.fits && (!runnable_only || plan.not_runnable.empty());
  };
  double fastest = 0;
  for (const Plan& plan : plans)
    if (eligible(plan) && (fastest == 0 || plan.total_seconds_per_step < fastest))
      fastest = plan.total_seconds_per_step;
  const Plan* best = nullptr;
  for (const Plan& plan : plans) {
    if (!eligible(plan) || plan.total_seconds_per_step > kSlack * fastest) continue;
    if (!best) {
      best = &plan;
      continue;
    }
    const int a = plan.strategy.approximations(), b = best->strategy.approximations();
    if (a < b ||
        (a == b && plan.total_seconds_per_step < best->total_seconds_per_step * (1 - 1e-9)))
      best = &plan;
  }
  return best;
}

bool keeps_job_fields(const TrainJob& job, const PlanJob& plan_job, const Strategy& s) {
  // The offline teacher needs its file made first: never a default without one.
  if (s.teacher == "offline" && job.teacher_logits.empty()) return false;
  // One rank enumerates stage 0 alone (resolve_strategy sets the job's stage on the result), but
  // a stage 2 or 3 job still needs the per-layer gradients.
  const int stage = job.zero_stage ? static_cast<int>(*job.zero_stage) : s.zero_stage;
  if (stage >= 2 && s.gradient_buffer) return false;
  return (!job.activation_checkpointing || *job.activation_checkpointing == s.checkpointing) &&
         (job.memory_teacher.empty() || job.memory_teacher == s.teacher) &&
         (job.optimizer_states.empty() || job.optimizer_states == s.states) &&
         (job.master_weights.empty() || (job.master_weights == "fp32") == s.master) &&
         (job.states_on.empty() || (job.states_on == "host") == s.states_on_host) &&
         (job.gradients.empty() || (job.gradients == "buffer") == s.gradient_buffer) &&
         (!job.zero_stage || plan_job.ranks == 1 || *job.zero_stage == s.zero_stage);
}

Strategy resolve_strategy(const TrainJob& job, const PlanJob& plan_job, const TargetSpec& target,
                          double host_memory_bytes) {
  std::vector<Plan> plans;
  for (Plan& plan : all_plans(plan_job, target, host_memory_bytes))
    if (keeps_job_fields(job, plan_job, plan.strategy)) plans.push_back(std::move(plan));
  if (const Plan* best = choose_plan(plans, /*runnable_only=*/true)) {
    Strategy s = best->strategy;
    if (job.zero_stage) s.zero_stage = static_cast<int>(*job.zero_stage);
    return s;
  }
  // Nothing fits (or nothing runnable does): the job's own choices over the reference strategy.
  Strategy s;
  if (job.zero_stage) s.zero_stage = static_cast<int>(*job.zero_stage);
  s.teacher = plan_job.has_teacher ? "resident" : "none";
  if (job.activation_checkpointing) s.checkpointing = *job.activation_checkpointing;
  if (!job.memory_teacher.empty()) s.teacher = job.memory_teacher;
  if (!job.optimizer_states.empty()) s.states = job.optimizer_states;
  if (!job.master_weights.empty()) s.master = job.master_weights == "fp32";
  if (!job.states_on.empty()) s.states_on_host = job.states_on == "host";
  if (!job.gradients.empty())
    s.gradient_buffer = job.gradients == "buffer";
  else if (s.zero_stage >= 2)
    s.gradient_buffer = false;
  return s;
}

// ---- reports ----------------------------------------------------------------------------------

nlohmann::json plan_json(const Plan& plan) {
  const Strategy& s = plan.strategy;
  nlohmann::json terms = nlohmann::json::array();
  for (const MemoryTerm& term : plan.terms)
    terms.push_back({{"name", term.name},
                     {"bytes", term.bytes},
                     {"where", term.host ? "host" : "device"},
                     {"detail", term.detail}});
  nlohmann::json time = nlohmann::json::object();
  for (const auto& [name, seconds] : plan.time_terms)
    time[name] = seconds;
  nlohmann::json collectives = nlohmann::json::array();
  for (const Collective& each : plan.collectives)
    collectives.push_back({{"name", each.name},
                           {"bytes", each.bytes},
                           {"calls", each.calls},
                           {"seconds", each.seconds},
                           {"hidden_seconds", each.hidden_seconds},
                           {"per_layer", each.per_layer}});
  nlohmann::json communication{{"bytes", plan.communication_bytes},
                               {"seconds", plan.communication_seconds},
                               {"hidden_seconds", plan.hidden_seconds},
                               {"collectives", collectives}};
  if (plan.ranks > 1)
    communication["interconnect"] = {{"name", plan.link.name},
                                     {"description", plan.link.description},
                                     {"bus_bandwidth", plan.link.bus_bandwidth},
                                     {"latency", plan.link.latency},
                                     {"remote_fraction", plan.link.remote_fraction},
                                     {"node_bandwidth", plan.link.node_bandwidth}};
  return {{"strategy", s.describe(plan.ranks)},
          {"zero_stage", s.zero_stage},
          {"ranks", plan.ranks},
          {"communication", communication},
          {"memory",
           {{"activation_checkpointing", s.checkpointing},
            {"teacher", s.teacher},
            {"optimizer_states", s.states},
            {"master_weights", s.master ? "fp32" : "none"},
            {"states_on", s.states_on_host ? "host" : "device"},
            {"gradients", s.gradient_buffer ? "buffer" : "none"}}},
          {"terms", terms},
          {"device_bytes", plan.device_bytes},
          {"host_bytes", plan.host_bytes},
          {"device_budget", plan.device_budget},
          {"fits", plan.fits},
          {"runnable", plan.not_runnable.empty()},
          {"not_runnable", plan.not_runnable},
          {"approximations", s.approximations()},
          {"step_seconds", plan.step_seconds},
          {"time_terms", time},
          {"model_flops_per_step", plan.model_flops_per_step},
          {"mfu", plan.mfu},
          {"job_hours", plan.job_hours},
          {"offline_precompute_hours", plan.offline_precompute_hours}};
}

std::string format_plan_report(const PlanJob& job, const TargetSpec& target, double host_memory,
                               const std::vector<Plan>& plans, const Plan* chosen,
                               const Plan* chosen_runnable, const Plan* job_plan) {
  std::ostringstream out;
  char line[256];
  const ModelConfig& c = job.student;
  std::snprintf(line, sizeof line,
                "model: %lld layers, hidden %lld, intermediate %lld, vocab %lld (%s)\n",
                static_cast<long long>(c.num_layers), static_cast<long long>(c.hidden_size),
                static_cast<long long>(c.intermediate_size), static_cast<long long>(c.vocab_size),
                job.source.c_str());
  out << line;
  std::snprintf(line, sizeof line,
                "step: %lld x %lld tokens x %lld micro-batches = %lld tokens; %lld steps = %.1fM "
                "tokens; objective %s on %s\n",
                static_cast<long long>(job.batch), static_cast<long long>(job.seq),
                static_cast<long long>(job.grad_accum),
                static_cast<long long>(job.tokens_per_step()), static_cast<long long>(job.steps),
                static_cast<double>(job.tokens_per_step() * job.steps) / 1e6,
                objective_name(job.objective), job.cuda ? "cuda (bf16)" : "cpu (fp32)");
  out << line;
  std::snprintf(line, sizeof line, "target: %s, %s of which kept may use %s%s\n",
                target.description.c_str(), bytes_text(target.memory_bytes).c_str(),
                bytes_text(plans.empty() ? 0 : plans.front().device_budget).c_str(),
                target.cpu && job.ranks > 1 ? " a rank (the ranks share this host)" : "");
  out << line;
  if (job.ranks > 1 && !plans.empty()) {
    const Interconnect& link = plans.front().link;
    std::snprintf(line, sizeof line,
                  "ranks: %lld %s, data parallel; %lld micro-batch%s on the busiest rank; "
                  "between ranks: %s (%s), %.0f GB/s bus bandwidth a rank, %.0f us a call "
                  "(stated, not measured)\n",
                  static_cast<long long>(job.ranks), target.cpu ? "processes" : "GPUs",
                  static_cast<long long>(job.micro_batches_per_rank()),
                  job.micro_batches_per_rank() == 1 ? "" : "es", link.name.c_str(),
                  link.description.c_str(), link.bus_bandwidth / 1e9, link.latency * 1e6);
    out << line;
    if (job.grad_accum < job.ranks) {
      std::snprintf(line, sizeof line,
                    "NOT RUNNABLE: grad_accum %lld is below the %lld ranks; micro-batch m runs on "
                    "rank m mod N, so kept train needs grad_accum >= %lld (--set grad_accum=%lld; "
                    "the tokens per step grow with it)\n",
                    static_cast<long long>(job.grad_accum), static_cast<long long>(job.ranks),
                    static_cast<long long>(job.ranks), static_cast<long long>(job.ranks));
      out << line;
    }
  }
  out << "\n";

  auto table = [&](const Plan& plan, const char* title) {
    out << title << ": " << plan.strategy.describe(plan.ranks) << "\n";
    for (const MemoryTerm& term : plan.terms) {
      std::snprintf(line, sizeof line, "  %-30s %12s  %s%s\n", term.name.c_str(),
                    bytes_text(term.bytes).c_str(), term.host ? "[host] " : "",
                    term.detail.c_str());
      out << line;
    }
    std::snprintf(line, sizeof line, "  %-30s %12s  of %s: %s\n", "device peak",
                  bytes_text(plan.device_bytes).c_str(), bytes_text(plan.device_budget).c_str(),
                  plan.device_bytes <= plan.device_budget ? "fits" : "does NOT fit");
    out << line;
    if (plan.host_bytes > 0) {
      std::snprintf(line, sizeof line, "  %-30s %12s\n", "pinned host memory",
                    bytes_text(plan.host_bytes).c_str());
      out << line;
    }
    for (const Collective& each : plan.collectives) {
      std::snprintf(
          line, sizeof line, "  %-30s %12s  a rank a step, %lld call%s, %.3g s (%.3g s hidden)%s\n",
          each.name.c_str(), bytes_text(each.bytes).c_str(), static_cast<long long>(each.calls),
          each.calls == 1 ? "" : "s", each.seconds, each.hidden_seconds,
          each.per_layer ? ", per layer in the layer walk" : ", at the end of the step");
      out << line;
    }
    out << "  time per step (projected):";
    for (const auto& [name, seconds] : plan.time_terms) {
      std::snprintf(line, sizeof line, " %s %.3g s;", name.c_str(), seconds);
      out << line;
    }
    std::string over;
    if (plan.ranks > 1 && !target.cpu) over = " over " + std::to_string(plan.ranks) + " GPUs";
    std::snprintf(line, sizeof line,
                  "\n  step %.3g s, %.0f tokens/s, MFU %.1f%%%s, %.2f h for the job's %.1fM tokens",
                  plan.step_seconds, static_cast<double>(job.tokens_per_step()) / plan.step_seconds,
                  100 * plan.mfu, over.c_str(), plan.job_hours,
                  static_cast<double>(job.tokens_per_step() * job.steps) / 1e6);
    out << line;
    if (plan.offline_precompute_hours > 0) {
      std::snprintf(line, sizeof line, " (+%.2f h once for kept teacher-logits)",
                    plan.offline_precompute_hours);
      out << line;
    }
    out << "\n";
    if (!plan.not_runnable.empty()) {
      out << "  not runnable by kept train for this job:";
      for (const std::string& what : plan.not_runnable)
        out << " " << what << ";";
      out << "\n";
    }
    out << "\n";
  };
  if (job_plan) table(*job_plan, "the job's own memory fields");
  if (chosen) {
    table(*chosen, "plan (fits; within 25% of the fastest, the fewest approximations)");
    if (chosen_runnable && chosen_runnable != chosen)
      table(*chosen_runnable, "best plan kept train can run for this job");
    else if (!chosen_runnable)
      out << "no plan kept train can run for this job fits this target.\n\n";
  } else {
    // Nothing fits: say by how much, and what would.
    const Plan* smallest = nullptr;
    for (const Plan& plan : plans)
      if (!smallest || plan.device_bytes < smallest->device_bytes) smallest = &plan;
    out << "NOTHING FITS on " << target.name << ".\n";
    if (smallest) {
      table(*smallest, "the smallest plan");
      if (smallest->device_bytes > smallest->device_budget) {
        std::snprintf(line, sizeof line, "It needs %s more device memory than %s leaves.\n",
                      bytes_text(smallest->device_bytes - smallest->device_budget).c_str(),
                      target.name.c_str());
      } else {
        std::snprintf(line, sizeof line,
                      "It fits the device but needs %s of host memory, more than the %s given "
                      "(--host-memory).\n",
                      bytes_text(smallest->host_bytes).c_str(), bytes_text(host_memory).c_str());
      }
      out << line;
    }
    out << "What would fit: more host memory where the plan keeps states or teacher layers "
           "there, a GPU with more memory (kept plan --gpu "
        << gpu_names()
        << "), more GPUs sharding the states and weights (ZeRO, kept plan --gpus N), or a "
           "shorter sequence / smaller batch (activations scale with them).\n";
  }
  // The other candidates, one line each, for comparison.
  out << "strategies compared (device peak, fits, step time, approximations, runnable by kept "
         "train):\n";
  std::vector<const Plan*> sorted;
  for (const Plan& plan : plans)
    sorted.push_back(&plan);
  std::sort(sorted.begin(), sorted.end(), [](const Plan* a, const Plan* b) {
    if (a->fits != b->fits) return a->fits;
    if (a->total_seconds_per_step != b->total_seconds_per_step)
      return a->total_seconds_per_step < b->total_seconds_per_step;
    return a->strategy.approximations() < b->strategy.approximations();
  });
  constexpr std::size_t kListed = 12;
  for (std::size_t index = 0; index < sorted.size(); ++index) {
    const Plan* plan = sorted[index];
    if (index == kListed) {
      out << "  ... " << sorted.size() - kListed << " more (kept plan --json lists all)\n";
      break;
    }
    std::snprintf(line, sizeof line, "  %10s %-4s %8.3g s  %d  %-3s %s\n",
                  bytes_text(plan->device_bytes).c_str(), plan->fits ? "fits" : "no",
                  plan->step_seconds, plan->strategy.approximations(),
                  plan->not_runnable.empty() ? "yes" : "no",
                  plan->strategy.describe(plan->ranks).c_str());
    out << line;
  }
  if (job.ranks > 1) out << "\n" << format_stage_table(job, plans);
  return out.str();
}

std::string format_stage_table(const PlanJob& job, const std::vector<Plan>& plans) {
  std::ostringstream out;
  char line[320];
  out << "ZeRO stages over " << job.ranks
      << " ranks (each stage's best plan; per rank: device peak, communication a step, of it "
         "hidden, step, MFU, hours):\n";
  for (int stage = 0; stage <= 3; ++stage) {
    std::vector<Plan> at_stage;
    for (const Plan& plan : plans)
      if (plan.strategy.zero_stage == stage) at_stage.push_back(plan);
    const Plan* best = choose_plan(at_stage, false);
    const char* verdict = "fits";
    if (!best) {
      // None fits: the smallest, to say by how much.
      for (const Plan& plan : at_stage)
        if (!best || plan.device_bytes < best->device_bytes) best = &plan;
      verdict = "NO";
    }
    if (!best) continue;
    std::snprintf(line, sizeof line,
                  "  ZeRO-%d %10s %-4s %10s %8.3g s %8.3g s hidden  step %7.3g s  MFU %5.1f%%  "
                  "%7.2f h  %s%s\n",
                  stage, bytes_text(best->device_bytes).c_str(), verdict,
                  bytes_text(best->communication_bytes).c_str(), best->communication_seconds,
                  best->hidden_seconds, best->step_seconds, 100 * best->mfu, best->job_hours,
                  best->not_runnable.empty() ? "" : "[not runnable] ",
                  best->strategy.describe(best->ranks).c_str());
    out << line;
  }
  return out.str();
}

}  // namespace kept::cli
