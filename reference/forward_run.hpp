// reference/forward_run.hpp: `kept forward` as a template over the backend (cmd_forward.cpp runs
// it on Cpu or Cpu64, cuda_commands.cpp on the CUDA backend).
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include "kept/io/checkpoint.hpp"
#include "kept/io/hf_config.hpp"
#include "kept/io/safetensors.hpp"
#include "kept/io/weights.hpp"
#include "kept/model/any_decoder.hpp"

namespace kept::cli {

struct TokenBatch {
  std::vector<std::int32_t> ids;
  std::int64_t batch = 0, seq = 0;
};

inline TokenBatch read_input_ids(const std::string& path, std::int64_t vocab_size) {
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

// Runs the checkpoint on `backend` and writes the outputs (downloaded to the host).
template <class Backend>
void run_forward(Backend& backend, const std::string& model_dir, const std::string& input,
                 const std::string& output, bool hidden_states) {
  const ModelConfig config = read_hf_config(std::filesystem::path(model_dir) / "config.json");
  const TokenBatch tokens = read_input_ids(input, config.vocab_size);
  AnyDecoder<Backend> model = make_decoder(backend, config);
  with_decoder(model, [&](auto& decoder) {
    load_weights(backend, decoder, CheckpointReader::open(model_dir));
    typename std::remove_reference_t<decltype(decoder)>::Activations acts;
    decoder.forward(backend, tokens.ids, tokens.batch, tokens.seq, acts, ForwardMode::Inference,
                    hidden_states);
    std::vector<NamedTensor> outputs;
    Tensor logits;
    decoder.logits(backend, acts, logits);
    outputs.push_back({"logits", backend.download(logits).reshape(
                                     {tokens.batch, tokens.seq, config.vocab_size})});
    if (hidden_states)
      for (std::int64_t l = 0; l <= config.num_layers; ++l)
        outputs.push_back({"hidden_states." + std::to_string(l),
                           backend.download(acts.state(static_cast<std::size_t>(l)))
                               .reshape({tokens.batch, tokens.seq, config.hidden_size})});
    write_safetensors(output, outputs);
  });
}

// The CUDA backend's run (cuda_commands.cpp; without a CUDA build, a clear error).
void run_forward_cuda(const std::string& model_dir, const std::string& input,
                      const std::string& output, bool hidden_states);

}  // namespace kept::cli
