// kept forward: run a checkpoint on token ids and save logits and residual-stream states.
//
// This is the numerics-verification entry point: the outputs can be compared with any other
// implementation (the tests compare them with HF transformers). Input: a safetensors file with
// an integer tensor "input_ids" of shape [batch, seq] (or [seq]). Output: a safetensors file
// with "logits" [batch, seq, vocab] and, with --hidden-states, "hidden_states.0" ..
// "hidden_states.L" [batch, seq, hidden]: the embedding output and each layer's output, before
// the final norm. --precision fp64 runs the float64 reference backend; --device cuda the CUDA
// backend (bf16 weights and activations; fp32 logits).
#include <cstdio>
#include <string>
#include <vector>

#include "commands.hpp"
#include "forward_run.hpp"
#include "kept/backend/cpu.hpp"

namespace kept::cli {

void register_forward(CLI::App& app) {
  struct Options {
    std::string model, input, output, precision = "fp32", device = "cpu";
    bool hidden_states = false;
  };
  auto [command, options] = add_command<Options>(
      app, "forward", "Run a checkpoint on token ids; save logits (and states)");
  add_existing_directory(command, "model", options->model,
                         "Checkpoint directory (config.json + safetensors)");
  add_existing_file(command, "--input", options->input,
                    "safetensors file with an integer \"input_ids\" [batch, seq]");
  command->add_option("--out", options->output, "Output safetensors file")->required();
  command->add_flag("--hidden-states", options->hidden_states,
                    "Also save the L+1 residual-stream states");
  command
      ->add_option("--precision", options->precision,
                   "fp32 (the CPU backend), fp64 (the reference) or bf16 (the CUDA backend, as "
                   "--device cuda)")
      ->check(CLI::IsMember({"fp32", "fp64", "bf16"}))
      ->capture_default_str();
  command->add_option("--device", options->device, "cpu or cuda (bf16)")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  command->callback([options] {
    if (options->device == "cuda" || options->precision == "bf16") {
      KEPT_CHECK(options->precision != "fp64", "--precision fp64 runs on the CPU only");
      run_forward_cuda(options->model, options->input, options->output, options->hidden_states);
    } else if (options->precision == "fp64") {
      Cpu64 backend;
      run_forward(backend, options->model, options->input, options->output, options->hidden_states);
    } else {
      Cpu backend;
      run_forward(backend, options->model, options->input, options->output, options->hidden_states);
    }
  });
}

}  // namespace kept::cli
