// tests/support/training_surface.hpp: everything above the layers that a training job calls on
// a backend (init, load, the optimizer step with clipping and the finiteness guard, checkpoints,
// the final save), as one function template. The contract tests take its address for each
// backend, which instantiates all of it: tests/unit/test_backend_contract.cpp (the CPU
// backends) and tests/cuda/cuda_contract.cu (CUDA, under nvcc).
#pragma once

#include <filesystem>

#include "kept/io/weights.hpp"
#include "kept/model/decoder.hpp"
#include "kept/model/init.hpp"
#include "kept/train/adamw.hpp"
#include "kept/train/checkpoint_state.hpp"

namespace kept::test {

template <class B>
void training_surface(B& backend, Decoder<RMSNorm, B>& model, AdamW& optimizer,
                      const std::filesystem::path& dir) {
  init_parameters(backend, model, {});
  load_weights(backend, model, CheckpointReader::open(dir));
  ParameterArena arena(backend, model);
  optimizer.use_arena(&arena);
  auto params = parameters_of(model);
  arena.zero_grad(backend, model);
  if (all_finite(backend, params)) clip_grad_norm(backend, params, 1.0);
  optimizer.step(backend, params);
  TrainerState state;
  save_checkpoint(backend, dir, state, params, optimizer);
  load_checkpoint(backend, dir, params, optimizer);
  save_pretrained(backend, model, model.config(), dir, false);
}

}  // namespace kept::test
