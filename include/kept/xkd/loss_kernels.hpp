// kept/xkd/loss_kernels.hpp: the objectives' view of the per-chunk loss kernels.
//
// LossKernels<Backend> and ChunkSums are part of the backend contract and live in
// kept/backend/loss_kernels.hpp; each backend's header specialises them. This header only
// brings them into kept::xkd, so the objectives include no backend.
#pragma once

#include "kept/backend/loss_kernels.hpp"

namespace kept::xkd {

using kept::ChunkSums;
using kept::LossKernels;

}  // namespace kept::xkd
