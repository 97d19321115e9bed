// kept/model/streamed_layers.hpp: a frozen decoder whose layers live in host memory and visit the
// backend one at a time (the "streamed" teacher of a job's memory plan, reference/plan.hpp).
//
// A 14B teacher is 29 GB of bf16 weights; its 40 layers are 681 MB each. Streamed, only the
// embedding, the final norm, the LM head and two layer slots stay in the backend's memory; the
// layers' weights are held in host memory (pinned, Backend::host_zeros) and layer l runs from
// slot l % 2. When layer l is brought, the copy of layer l + 1 into the other slot is queued with
// Backend::upload_behind: on CUDA it runs on a second stream while layer l computes, starting
// once the work queued before it (layer l - 1, the slot's previous user) is done; the compute
// waits for it (await_uploads) only when layer l + 1 is brought. After the last layer, layer 0 is
// prefetched the same way for the next forward when the two do not share a slot (an even number
// of layers). On the CPU the copies are simply synchronous. The copies are exact (same dtype),
// so the forward pass is the resident one bit for bit; the cost is one pass over the layers'
// bytes per forward, hidden behind the compute when a layer's copy takes less time than its
// forward (kept plan's "teacher transfer (overlapped)").
//
// Use: StreamedLayers<B> streamed(backend, teacher);  // moves the layers' weights to the host
//      teacher.set_before_layer([&](std::size_t l) { streamed.bring(backend, teacher, l); });
// The decoder must be frozen (no gradients) and must not be saved or trained while streamed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>
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
        // Pinned where the backend has it, so the copies run at the link's full rate.
        Tensor host = backend.host_zeros(p.value.dtype(), p.value.shape());
        backend.download_into(p.value, host);
        host_[l].push_back(std::move(host));
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

  // Makes layer `l`'s weights ready in its slot for the work queued next, points the layer's
  // parameters at them, and starts copying the next layer into the other slot.
  template <class Model>
  void bring(Backend& backend, Model& model, std::size_t l) {
    KEPT_CHECK(l < host_.size(), "streamed layers: no layer ", l);
    queue_copy(backend, l);  // a no-op when it was prefetched
    backend.await_uploads();
    const std::size_t next = (l + 1) % host_.size();
    if (next % 2 != l % 2) queue_copy(backend, next);
    std::vector<Tensor>& slot = slots_[l % 2];
    std::size_t k = 0;
    model.layers[l].visit([&](Parameter& p) { p.value = slot[k++]; });
    // The layer that used this slot before no longer owns weights in it.
    if (l >= 2) model.layers[l - 2].visit([](Parameter& p) { p.value = Tensor(); });
  }

  std::size_t layers() const { return host_.size(); }
  // Copies queued so far (prefetches included), for tests.
  std::int64_t copies() const { return copies_; }
  // Bytes of the layers in host memory, and of the two slots in the backend's.
  std::int64_t host_bytes() const {
    std::int64_t bytes = 0;
    for (const auto& layer : host_)
      for (const Tensor& t : layer)
        bytes += static_cast<std::int64_t>(t.nbytes());
    return bytes;
  }

 private:
  // Queues the copy of layer `l` into slot l % 2 unless it is there already.
  void queue_copy(Backend& backend, std::size_t l) {
    if (resident_[l % 2] == static_cast<std::int64_t>(l)) return;
    std::vector<Tensor>& slot = slots_[l % 2];
    for (std::size_t k = 0; k < slot.size(); ++k)
      backend.upload_behind(host_[l][k], slot[k]);
    resident_[l % 2] = static_cast<std::int64_t>(l);
    ++copies_;
  }

  std::vector<std::vector<Tensor>> host_;
  std::vector<Tensor> slots_[2];
  std::int64_t resident_[2] = {-1, -1};
  std::int64_t copies_ = 0;
};

}  // namespace kept
