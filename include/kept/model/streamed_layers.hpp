// kept/model/streamed_layers.hpp: a frozen decoder whose layers live in host memory and visit the
// backend one at a time (the "streamed" teacher of a job's memory plan, reference/plan.hpp).
//
// A 14B teacher is 29 GB of bf16 weights; its 40 layers are 681 MB each. Streamed, only the
// embedding, the final norm, the LM head and two layer slots stay in the backend's memory; the
// layers' weights are held in host memory and copied into a slot just before the layer runs
// (slot l % 2, so the next layer's copy can overlap the current layer's compute on a backend
// with asynchronous copies). The copies are exact (same dtype), so the forward pass is the
// resident one bit for bit; the cost is one pass over the layers' bytes per forward, which the
// trainer amortises by running the teacher once per micro-batch.
//
// Use: StreamedLayers<B> streamed(backend, teacher);  // moves the layers' weights to the host
//      teacher.set_before_layer([&](std::size_t l) { streamed.bring(backend, teacher, l); });
// The decoder must be frozen (no gradients) and must not be saved or trained while streamed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "kept/core/error.hpp"
#include "kept/core/tensor.hpp"
#include "kept/layers/parameter.hpp"

namespace kept {

template <class Backend>
class StreamedLayers {
 public:
  StreamedLayers() = default;

  // Moves every layer's weights of `model` to host memory and allocates the two slots.
  template <class Model>
  StreamedLayers(Backend& backend, Model& model) {
    const std::size_t layers = model.layers.size();
    KEPT_CHECK(layers > 0, "streamed layers: the model has no layers");
    host_.resize(layers);
    for (std::size_t l = 0; l < layers; ++l) {
      model.layers[l].visit([&](Parameter& p) {
        KEPT_CHECK(!p.grad.defined(), "streamed layers: ", p.name,
                   " has a gradient; only a frozen model can be streamed");
        host_[l].push_back(backend.download(p.value));
        p.value = Tensor();  // the backend's copy is released here
      });
    }
    for (auto& slot : slots_)
      for (const Tensor& host : host_[0])
        slot.push_back(backend.zeros(host.dtype(), host.shape()));
    for (std::size_t l = 1; l < layers; ++l) {
      KEPT_CHECK(host_[l].size() == host_[0].size(), "streamed layers: layer ", l, " has ",
                 host_[l].size(), " parameters, layer 0 has ", host_[0].size());
      for (std::size_t k = 0; k < host_[l].size(); ++k)
        KEPT_CHECK(host_[l][k].shape() == host_[0][k].shape(), "streamed layers: layer ", l,
                   " parameter ", k, " has shape ", host_[l][k].shape(), ", layer 0's has ",
                   host_[0][k].shape());
    }
  }

  // Copies layer `l`'s weights into its slot and points the layer's parameters at them.
  template <class Model>
  void bring(Backend& backend, Model& model, std::size_t l) {
    KEPT_CHECK(l < host_.size(), "streamed layers: no layer ", l);
    std::vector<Tensor>& slot = slots_[l % 2];
    if (resident_[l % 2] != static_cast<std::int64_t>(l)) {
      for (std::size_t k = 0; k < slot.size(); ++k)
        backend.upload(host_[l][k], slot[k]);
      resident_[l % 2] = static_cast<std::int64_t>(l);
    }
    std::size_t k = 0;
    model.layers[l].visit([&](Parameter& p) { p.value = slot[k++]; });
    // The layer that used this slot before no longer owns weights in it.
    if (l >= 2) model.layers[l - 2].visit([](Parameter& p) { p.value = Tensor(); });
  }

  std::size_t layers() const { return host_.size(); }
  // Bytes of the layers in host memory, and of the two slots in the backend's.
  std::int64_t host_bytes() const {
    std::int64_t bytes = 0;
    for (const auto& layer : host_)
      for (const Tensor& t : layer)
        bytes += static_cast<std::int64_t>(t.nbytes());
    return bytes;
  }

 private:
  std::vector<std::vector<Tensor>> host_;
  std::vector<Tensor> slots_[2];
  std::int64_t resident_[2] = {-1, -1};
};

}  // namespace kept
