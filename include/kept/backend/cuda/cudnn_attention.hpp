// kept/backend/cuda/cudnn_attention.hpp: causal attention on cuDNN's fused flash attention
// (SDPA), forward with softmax statistics and backward, as a kept::cuda::AttentionEngine.
//
// Include this header in g++-compiled translation units only (it pulls in the cuDNN frontend,
// a large C++ header library from PyPI's nvidia-cudnn-frontend; link -lcudnn -lcudart). The
// CUDA backend reaches it through the AttentionEngine interface: Cuda::use_attention_engine.
//
// Layout: kept's q, k, v, o are [batch * seq, heads * D] row-major, which is cuDNN's logical
// [b, h, s, d] with strides (seq * heads * D, D, heads * D, 1), so no transpose is needed; the
// statistics tensor is [b, h, s, 1] fp32 with strides (heads * seq, seq, 1, 1), exactly kept's
// lse layout, and holds the same quantity (log-sum-exp of the scaled scores, natural log), so
// cuDNN's backward could also consume kept's forward and the other way round. The scale is
// 1/sqrt(D), baked into the graph.
//
// One graph per direction and shape (batch, seq, heads, D), built on first use and cached (the
// build takes tens of milliseconds; a training run sees one shape). The backward asks for cuDNN's
// deterministic algorithm, so a run and its resumed twin agree bit for bit. One workspace, grown
// to the largest graph's need. Every failure (an unsupported shape or device, a failed launch)
// throws kept::Error naming the op, the shape and cuDNN's message.
#pragma once

#include <cuda_runtime_api.h>
#include <cudnn.h>

#include <cstdint>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include <cudnn_frontend.h>

#include "kept/backend/cuda/attention_engine.hpp"
#include "kept/core/error.hpp"

namespace kept::cuda {

class CudnnAttention final : public AttentionEngine {
 public:
  CudnnAttention() {
    const cudnnStatus_t status = cudnnCreate(&handle_);
    KEPT_CHECK(status == CUDNN_STATUS_SUCCESS,
               "cuDNN attention: cudnnCreate failed: ", cudnnGetErrorString(status));
    const std::size_t version = cudnnGetVersion();
    std::ostringstream name;
    name << "cuDNN SDPA (cuDNN " << version / 10000 << "." << version / 100 % 100 << ", frontend "
         << CUDNN_FRONTEND_MAJOR_VERSION << "." << CUDNN_FRONTEND_MINOR_VERSION << ")";
    name_ = name.str();
  }
  ~CudnnAttention() override {
    graphs_.clear();
    if (workspace_) (void)cudaFree(workspace_);
    if (handle_) (void)cudnnDestroy(handle_);
  }
  CudnnAttention(const CudnnAttention&) = delete;
  CudnnAttention& operator=(const CudnnAttention&) = delete;

  const char* name() const override { return name_.c_str(); }

  void forward(const void* q, const void* k, const void* v, void* o, float* lse,
               const AttentionShape& shape, void* stream) override {
    Graph& graph = graph_for(Direction::Forward, shape);
    std::unordered_map<std::int64_t, void*> pack{{kQ, const_cast<void*>(q)},
                                                 {kK, const_cast<void*>(k)},
                                                 {kV, const_cast<void*>(v)},
                                                 {kO, o},
                                                 {kStats, lse}};
    execute(graph, pack, "attention_forward", shape, stream);
  }

  void backward(const void* d_o, const void* q, const void* k, const void* v, const void* o,
                const float* lse, void* dq, void* dk, void* dv, const AttentionShape& shape,
                void* stream) override {
    Graph& graph = graph_for(Direction::Backward, shape);
    std::unordered_map<std::int64_t, void*> pack{{kQ, const_cast<void*>(q)},
                                                 {kK, const_cast<void*>(k)},
                                                 {kV, const_cast<void*>(v)},
                                                 {kO, const_cast<void*>(o)},
                                                 {kDO, const_cast<void*>(d_o)},
                                                 {kStats, const_cast<float*>(lse)},
                                                 {kDQ, dq},
                                                 {kDK, dk},
                                                 {kDV, dv}};
    execute(graph, pack, "attention_backward", shape, stream);
  }

 private:
  using Graph = cudnn_frontend::graph::Graph;
  using TensorAttributes = cudnn_frontend::graph::Tensor_attributes;
  enum class Direction { Forward, Backward };
  // Tensor ids of the variant pack.
  enum : std::int64_t { kQ = 1, kK, kV, kO, kStats, kDO, kDQ, kDK, kDV };
  using Key = std::tuple<Direction, std::int64_t, std::int64_t, std::int64_t, std::int64_t>;

  static std::string describe(const char* op, const AttentionShape& s) {
    std::ostringstream out;
    out << op << " (cuDNN SDPA, batch " << s.batch << ", seq " << s.seq << ", heads " << s.heads
        << ", head_dim " << s.head_dim << ")";
    return out.str();
  }
  static void check(const cudnn_frontend::error_object& status, const char* op,
                    const AttentionShape& shape, const char* stage) {
    KEPT_CHECK(status.is_good(), describe(op, shape), ": ", stage, ": ", status.err_msg);
  }

  Graph& graph_for(Direction direction, const AttentionShape& shape) {
    const Key key{direction, shape.batch, shape.seq, shape.heads, shape.head_dim};
    auto found = graphs_.find(key);
    if (found != graphs_.end()) return *found->second;
    namespace fe = cudnn_frontend;
    const char* op = direction == Direction::Forward ? "attention_forward" : "attention_backward";
    const std::int64_t b = shape.batch, s = shape.seq, h = shape.heads, d = shape.head_dim;
    KEPT_CHECK(b > 0 && s > 0 && h > 0 && d > 0, describe(op, shape), ": empty shape");
    auto graph = std::make_shared<Graph>();
    graph->set_io_data_type(fe::DataType_t::BFLOAT16)
        .set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    const std::vector<std::int64_t> dims{b, h, s, d}, strides{s * h * d, d, h * d, 1};
    const std::vector<std::int64_t> stat_dims{b, h, s, 1}, stat_strides{h * s, s, 1, 1};
    auto tensor = [&](const char* name, std::int64_t uid) {
      return graph->tensor(
          TensorAttributes().set_name(name).set_uid(uid).set_dim(dims).set_stride(strides));
    };
    auto q = tensor("q", kQ), k = tensor("k", kK), v = tensor("v", kV);
    const float scale = shape.scale<float>();
    if (direction == Direction::Forward) {
      auto options = fe::graph::SDPA_attributes()
                         .set_name("kept_attention_forward")
                         .set_generate_stats(true)
                         .set_causal_mask(true)
                         .set_attn_scale(scale);
      auto [o, stats] = graph->sdpa(q, k, v, options);
      o->set_output(true).set_uid(kO).set_dim(dims).set_stride(strides);
      stats->set_output(true)
          .set_uid(kStats)
          .set_data_type(fe::DataType_t::FLOAT)
          .set_dim(stat_dims)
          .set_stride(stat_strides);
    } else {
      auto o = tensor("o", kO), d_o = tensor("d_o", kDO);
      auto stats = graph->tensor(TensorAttributes()
                                     .set_name("stats")
                                     .set_uid(kStats)
                                     .set_data_type(fe::DataType_t::FLOAT)
                                     .set_dim(stat_dims)
                                     .set_stride(stat_strides));
      auto options = fe::graph::SDPA_backward_attributes()
                         .set_name("kept_attention_backward")
                         .set_causal_mask(true)
                         .set_deterministic_algorithm(true)
                         .set_attn_scale(scale);
      auto [dq, dk, dv] = graph->sdpa_backward(q, k, v, o, d_o, stats, options);
      dq->set_output(true).set_uid(kDQ).set_dim(dims).set_stride(strides);
      dk->set_output(true).set_uid(kDK).set_dim(dims).set_stride(strides);
      dv->set_output(true).set_uid(kDV).set_dim(dims).set_stride(strides);
    }
    check(graph->validate(), op, shape, "validate");
    check(graph->build_operation_graph(handle_), op, shape, "build_operation_graph");
    check(graph->create_execution_plans({fe::HeurMode_t::A}), op, shape, "create_execution_plans");
    check(graph->check_support(handle_), op, shape, "not supported on this device");
    check(graph->build_plans(handle_), op, shape, "build_plans");
    std::int64_t workspace = 0;
    check(graph->get_workspace_size(workspace), op, shape, "get_workspace_size");
    if (workspace > workspace_bytes_) {
      if (workspace_) (void)cudaFree(workspace_);
      workspace_ = nullptr;
      workspace_bytes_ = 0;
      const cudaError_t status = cudaMalloc(&workspace_, static_cast<std::size_t>(workspace));
      KEPT_CHECK(status == cudaSuccess, describe(op, shape), ": cudaMalloc of a ", workspace,
                 "-byte workspace: ", cudaGetErrorName(status), ": ", cudaGetErrorString(status));
      workspace_bytes_ = workspace;
    }
    return *graphs_.emplace(key, std::move(graph)).first->second;
  }

  void execute(Graph& graph, std::unordered_map<std::int64_t, void*>& pack, const char* op,
               const AttentionShape& shape, void* stream) {
    const cudnnStatus_t set = cudnnSetStream(handle_, static_cast<cudaStream_t>(stream));
    KEPT_CHECK(set == CUDNN_STATUS_SUCCESS, describe(op, shape),
               ": cudnnSetStream: ", cudnnGetErrorString(set));
    check(graph.execute(handle_, pack, workspace_), op, shape, "execute");
    const cudaError_t launched = cudaGetLastError();
    KEPT_CHECK(launched == cudaSuccess, describe(op, shape), ": ", cudaGetErrorName(launched), ": ",
               cudaGetErrorString(launched));
  }

  cudnnHandle_t handle_ = nullptr;
  std::string name_;
  std::map<Key, std::shared_ptr<Graph>> graphs_;
  void* workspace_ = nullptr;
  std::int64_t workspace_bytes_ = 0;
};

}  // namespace kept::cuda
