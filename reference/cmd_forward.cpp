// kept forward: run a checkpoint on token ids and save logits and residual-stream states.
//
// This is the numerics-verification entry point: the outputs can be compared with any other
// implementation (the tests compare them with HF transformers). Input: a safetensors file with
// an integer tensor "input_ids" of shape [batch, seq] (or [seq]). Output: a safetensors file
// with "logits" [batch, seq, vocab] and, with --hidden-states, "hidden_states.0" ..
// "hidden_states.L" [batch, seq, hidden]: the embedding output and each layer's output, before
// the final norm. --precision fp64 runs the float64 reference backend.
#include <cstdio>
#include <string>
#include <vector>

#include "commands.hpp"
#include "kept/backend/cpu.hpp"
#include "kept/io/checkpoint.hpp"
#include "kept/io/hf_config.hpp"
#include "kept/io/safetensors.hpp"
#include "kept/io/weights.hpp"
#include "kept/model/any_decoder.hpp"

namespace kept::cli {
namespace {

struct TokenBatch {
  std::vector<std::int32_t> ids;
  std::int64_t batch = 0, seq = 0;
};

TokenBatch read_input_ids(const std::string& path, std::int64_t vocab_size) {
  SafetensorsFile file(path);
  KEPT_CHECK(file.contains("input_ids"), path, ": no tensor \"input_ids\"");
  const Tensor& ids = file.tensor("input_ids");
  KEPT_CHECK(ids.rank() == 1 || ids.rank() == 2, path, ": tensor \"input_ids\" has shape ",
             ids.shape(), ", expected [batch, seq] or [seq]");
  KEPT_CHECK(ids.dtype() == DType::I64 || ids.dtype() == DType::I32, path,
             ": tensor \"input_ids\" has dtype ", dtype_name(ids.dtype()), ", expected I64 or I32");
  TokenBatch batch;
  batch.batch = ids.rank() == 2 ? ids.dim(0) : 1;
  batch.seq = ids.dim(ids.rank() - 1);
  KEPT_CHECK(batch.batch > 0 && batch.seq > 0, path, ": tensor \"input_ids\" is empty");
  for (std::int64_t i = 0; i < ids.numel(); ++i) {
    const std::int64_t id =
        ids.dtype() == DType::I64 ? ids.data<std::int64_t>()[i] : ids.data<std::int32_t>()[i];
    KEPT_CHECK(id >= 0 && id < vocab_size, path, ": tensor \"input_ids\": token id ", id,
               " at index ", i, " is outside the model's vocabulary of ", vocab_size);
    batch.ids.push_back(static_cast<std::int32_t>(id));
  }
  return batch;
}

template <class Backend>
void run_forward(const std::string& model_dir, const std::string& input, const std::string& output,
                 bool hidden_states) {
  const ModelConfig config = read_hf_config(std::filesystem::path(model_dir) / "config.json");
  const TokenBatch tokens = read_input_ids(input, config.vocab_size);
  Backend backend;
  AnyDecoder<Backend> model = make_decoder(backend, config);
  with_decoder(model, [&](auto& decoder) {
    load_weights(backend, decoder, CheckpointReader::open(model_dir));
    typename std::remove_reference_t<decltype(decoder)>::Activations acts;
    decoder.forward(backend, tokens.ids, tokens.batch, tokens.seq, acts, ForwardMode::Inference,
                    hidden_states);
    std::vector<NamedTensor> outputs;
    Tensor logits;
    decoder.logits(backend, acts, logits);
    outputs.push_back({"logits", logits.reshape({tokens.batch, tokens.seq, config.vocab_size})});
    if (hidden_states)
      for (std::int64_t l = 0; l <= config.num_layers; ++l)
        outputs.push_back({"hidden_states." + std::to_string(l),
                           acts.state(static_cast<std::size_t>(l))
                               .reshape({tokens.batch, tokens.seq, config.hidden_size})});
    write_safetensors(output, outputs);
  });
}

}  // namespace

void register_forward(CLI::App& app) {
  struct Options {
    std::string model, input, output, precision = "fp32";
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
                   "fp32 (the CPU backend) or fp64 (the reference)")
      ->check(CLI::IsMember({"fp32", "fp64"}))
      ->capture_default_str();
  command->callback([options] {
    if (options->precision == "fp64")
      run_forward<Cpu64>(options->model, options->input, options->output, options->hidden_states);
    else
      run_forward<Cpu>(options->model, options->input, options->output, options->hidden_states);
  });
}

}  // namespace kept::cli
