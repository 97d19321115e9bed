// kept/train/checkpoint_state.hpp: saving and resuming a training run, atomically.
//
// A run directory holds one directory per saved step:
//
//   run_dir/step-000123/model.safetensors      every parameter (frozen ones too), HF names, in
//                                              the parameter's own dtype (fp32 on the CPU
//                                              backend), metadata {"format": "pt"}: a valid
//                                              single-file HF state dict
//           optimizer.safetensors              AdamW::state_tensors(): m, v, step counts and
//                                              the optimizer's scalars (see adamw.hpp)
//           trainer.json                       {"format": "kept-trainer-state", "version": 1,
//                                               "step", "tokens_seen", "config_hash",
//                                               "seeds": {name: uint64}, "loader":
//                                               LoaderState, "extra": {...trainer's own}}
//
// The name is "step-" and the step zero-padded to 6 digits (more digits past 999999); listing
// parses the number, so order never depends on the padding. The directory is built under a
// hidden temporary name and renamed into place only when all three files are written and
// synced (AtomicDirectory), so a crash or a full disk at any moment leaves either the complete
// new checkpoint or nothing (just hidden ".step-...tmp-..." debris after a hard kill), and the
// previous checkpoints are never touched. Re-saving an existing step replaces it with one
// atomic exchange. latest_checkpoint() therefore only has to find the highest step-N directory
// that holds the three files.
//
// Only after the new checkpoint is in place are old ones pruned (keep_last > 0 keeps the K
// highest steps, always including the one just written). A pruned directory is first renamed
// to a hidden name and then deleted, so a crash during deletion can never leave a half-deleted
// directory under a step-N name.
//
// Bit-exact resume needs every piece of state: parameters (exact bytes), optimizer moments and
// per-parameter steps (exact bytes), the loader position (LoaderState), and the seeds. kept's
// training code derives randomness from (seed, name, step) with Random::derive instead of
// carrying a generator along, so the seeds are the whole random state. config_hash lets the
// trainer refuse to resume under a different configuration.
#pragma once

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include <nlohmann/json.hpp>

#include "kept/core/error.hpp"
#include "kept/core/tensor.hpp"
#include "kept/io/atomic_file.hpp"
#include "kept/io/json.hpp"
#include "kept/io/safetensors.hpp"
#include "kept/layers/parameter.hpp"
#include "kept/train/adamw.hpp"
#include "kept/train/data.hpp"

namespace kept {

inline constexpr std::string_view kTrainerStateFormat = "kept-trainer-state";
inline constexpr int kTrainerStateVersion = 1;
inline constexpr const char* kCheckpointFiles[] = {"model.safetensors", "optimizer.safetensors",
                                                   "trainer.json"};

// A short hash of a canonical configuration text (e.g. the trainer's config JSON dumped with
// sorted keys): 16 hex digits of FNV-1a.
inline std::string config_hash(std::string_view canonical_text) {
  return Fingerprint().add(canonical_text).hex();
}

struct TrainerState {
  std::int64_t step = 0;         // optimizer steps completed
  std::int64_t tokens_seen = 0;  // training target tokens consumed
  LoaderState loader{};
  std::map<std::string, std::uint64_t> seeds{};
  std::string config_hash{};
  nlohmann::json extra = nlohmann::json::object();  // the trainer's own fields

  nlohmann::json to_json() const {
    nlohmann::json seeds_json = nlohmann::json::object();
    for (const auto& [name, seed] : seeds)
      seeds_json[name] = seed;
    return {{"format", kTrainerStateFormat},
            {"version", kTrainerStateVersion},
            {"step", step},
            {"tokens_seen", tokens_seen},
            {"config_hash", config_hash},
            {"seeds", seeds_json},
            {"loader", loader.to_json()},
            {"extra", extra}};
  }

  static TrainerState from_json(const nlohmann::json& json, std::string_view where) {
    KEPT_CHECK(json.is_object(), where, ": expected a JSON object, got ",
               detail::describe_json(json));
    auto field = [&](const char* key) -> const nlohmann::json& {
      auto found = json.find(key);
      KEPT_CHECK(found != json.end(), where, ": missing \"", key, "\"");
      return *found;
    };
    const nlohmann::json& format = field("format");
    KEPT_CHECK(format.is_string() && format.get<std::string>() == kTrainerStateFormat, where,
               ": \"format\" is ", detail::describe_json(format), ", expected \"",
               kTrainerStateFormat, "\"");
    const nlohmann::json& version = field("version");
    KEPT_CHECK(version.is_number_integer() && version.get<std::int64_t>() == kTrainerStateVersion,
               where, ": unsupported \"version\" ", detail::describe_json(version),
               " (this kept reads version ", kTrainerStateVersion, ")");
    auto count = [&](const char* key) {
      const nlohmann::json& value = field(key);
      KEPT_CHECK(value.is_number_integer() &&
                     (value.is_number_unsigned() || value.get<std::int64_t>() >= 0),
                 where, ": \"", key, "\" must be an integer >= 0, got ",
                 detail::describe_json(value));
      return value.get<std::int64_t>();
    };
    TrainerState state;
    state.step = count("step");
    state.tokens_seen = count("tokens_seen");
    const nlohmann::json& hash = field("config_hash");
    KEPT_CHECK(hash.is_string(), where, ": \"config_hash\" must be a string, got ",
               detail::describe_json(hash));
    state.config_hash = hash.get<std::string>();
    const nlohmann::json& seeds = field("seeds");
    KEPT_CHECK(seeds.is_object(), where, ": \"seeds\" must be an object, got ",
               detail::describe_json(seeds));
    for (const auto& [name, value] : seeds.items()) {
      KEPT_CHECK(value.is_number_unsigned(), where, ": seed ", detail::quote_json(name),
                 " must be an integer >= 0, got ", detail::describe_json(value));
      state.seeds[name] = value.get<std::uint64_t>();
    }
    state.loader = LoaderState::from_json(field("loader"), std::string(where) + ": \"loader\"");
    const nlohmann::json& extra = field("extra");
    KEPT_CHECK(extra.is_object(), where, ": \"extra\" must be an object, got ",
               detail::describe_json(extra));
    state.extra = extra;
    return state;
  }
};

// "step-000123".
inline std::string checkpoint_name(std::int64_t step) {
  KEPT_CHECK(step >= 0, "checkpoint step must be >= 0, got ", step);
  char name[32];
  std::snprintf(name, sizeof name, "step-%06lld", static_cast<long long>(step));
  return name;
}

// The step of a "step-<digits>" name; nullopt for anything else (temporaries, other files).
inline std::optional<std::int64_t> parse_checkpoint_name(std::string_view name) {
  if (!name.starts_with("step-")) return std::nullopt;
  std::string_view digits = name.substr(5);
  if (digits.empty() || digits.size() > 18) return std::nullopt;
  std::int64_t step = 0;
  for (char c : digits) {
    if (c < '0' || c > '9') return std::nullopt;
    step = step * 10 + (c - '0');
  }
  return step;
}

inline bool is_complete_checkpoint(const std::filesystem::path& directory) {
  std::error_code error;
  if (!std::filesystem::is_directory(directory, error)) return false;
  for (const char* file : kCheckpointFiles)
    if (!std::filesystem::is_regular_file(directory / file, error)) return false;
  return true;
}

struct CheckpointEntry {
  std::int64_t step = 0;
  std::filesystem::path path{};
};

// The complete checkpoints in `run_dir`, by ascending step. A missing run_dir has none.
inline std::vector<CheckpointEntry> list_checkpoints(const std::filesystem::path& run_dir) {
  std::vector<CheckpointEntry> entries;
  std::error_code error;
  if (!std::filesystem::exists(run_dir, error)) return entries;
  std::filesystem::directory_iterator it(run_dir, error);
  if (error) fail(run_dir.string(), ": cannot list the run directory: ", error.message());
  for (const auto& entry : it) {
    auto step = parse_checkpoint_name(entry.path().filename().string());
    if (step && is_complete_checkpoint(entry.path())) entries.push_back({*step, entry.path()});
  }
  std::sort(entries.begin(), entries.end(),
            [](const CheckpointEntry& a, const CheckpointEntry& b) { return a.step < b.step; });
  return entries;
}

// The newest complete checkpoint, or nullopt when there is none (a fresh run).
inline std::optional<std::filesystem::path> latest_checkpoint(
    const std::filesystem::path& run_dir) {
  auto entries = list_checkpoints(run_dir);
  if (entries.empty()) return std::nullopt;
  return entries.back().path;
}

// Deletes all but the `keep_last` highest-step checkpoints (never `keep`, if given). Each is
// renamed to a hidden name before deletion (see the top comment).
inline void prune_checkpoints(const std::filesystem::path& run_dir, std::size_t keep_last,
                              const std::filesystem::path& keep = {}) {
  if (keep_last == 0) return;
  auto entries = list_checkpoints(run_dir);
  if (entries.size() <= keep_last) return;
  entries.resize(entries.size() - keep_last);  // the oldest ones
  for (const CheckpointEntry& entry : entries) {
    if (!keep.empty() && entry.path.filename() == keep.filename()) continue;
    std::filesystem::path doomed = detail::temporary_sibling(entry.path, "deleting");
    if (::rename(entry.path.c_str(), doomed.c_str()) != 0)
      fail(entry.path.string(), ": cannot remove old checkpoint: ", detail::errno_text(errno));
    std::error_code error;
    std::filesystem::remove_all(doomed, error);
    if (error)
      fail(entry.path.string(), ": old checkpoint moved to ", doomed.string(),
           " but not deleted: ", error.message());
  }
}

// Writes run_dir/step-<state.step>/ atomically and, when keep_last > 0, prunes older ones.
// `optimizer_state`, when given, is written instead of optimizer.state_tensors() (sharded
// states gathered whole, kept/train/zero.hpp). Returns the checkpoint's path.
template <class Backend>
std::filesystem::path save_checkpoint(Backend& backend, const std::filesystem::path& run_dir,
                                      const TrainerState& state, std::span<Parameter* const> params,
                                      const AdamW& optimizer, std::size_t keep_last = 0,
                                      const std::vector<NamedTensor>* optimizer_state = nullptr) {
  std::error_code error;
  std::filesystem::create_directories(run_dir, error);
  if (error) fail(run_dir.string(), ": cannot create the run directory: ", error.message());
  const std::filesystem::path destination = run_dir / checkpoint_name(state.step);
  {
    AtomicDirectory directory(destination, /*force=*/true);
    std::vector<NamedTensor> model;
    model.reserve(params.size());
    for (Parameter* p : params) {
      KEPT_CHECK(p != nullptr, destination.string(), ": null parameter pointer");
      model.push_back({p->name, backend.download(p->value)});
    }
    write_safetensors(directory.path() / "model.safetensors", model, {{"format", "pt"}});
    const AdamWConfig& config = optimizer.config();
    write_safetensors(directory.path() / "optimizer.safetensors",
                      optimizer_state ? *optimizer_state : optimizer.state_tensors(backend),
                      {{"optimizer", "adamw"},
                       {"lr", nlohmann::json(config.lr).dump()},
                       {"weight_decay", nlohmann::json(config.weight_decay).dump()}});
    write_file_atomically(directory.path() / "trainer.json", state.to_json().dump(2) + "\n");
    directory.commit();
  }
  if (keep_last > 0) {
    try {
      prune_checkpoints(run_dir, keep_last, destination);
    } catch (const Error& pruning) {
      fail(destination.string(),
           " was saved, but pruning old checkpoints failed: ", pruning.what());
    }
  }
  return destination;
}

// Loads a checkpoint directory into `params` (same names, shapes and dtypes; every parameter
// must be in the file and nothing else) and `optimizer`, and returns the trainer state. When
// expected_config_hash is non-empty it must equal the saved one. Parameters are only written
// after everything has been validated.
template <class Backend>
TrainerState load_checkpoint(Backend& backend, const std::filesystem::path& directory,
                             std::span<Parameter* const> params, AdamW& optimizer,
                             std::string_view expected_config_hash = {}) {
  const std::string where = directory.string();
  KEPT_CHECK(is_complete_checkpoint(directory), where,
             ": not a complete checkpoint (needs model.safetensors, optimizer.safetensors and "
             "trainer.json)");
  const std::filesystem::path trainer_path = directory / "trainer.json";
  TrainerState state = TrainerState::from_json(
      detail::parse_json_strict(detail::read_text_file(trainer_path, 64ull << 20),
                                trainer_path.string(), 64),
      trainer_path.string());
  if (auto step = parse_checkpoint_name(directory.filename().string()))
    KEPT_CHECK(*step == state.step, trainer_path.string(), ": \"step\" is ", state.step,
               " but the directory is named for step ", *step);
  if (!expected_config_hash.empty())
    KEPT_CHECK(state.config_hash == expected_config_hash, where, ": saved with configuration ",
               state.config_hash, " but this run's configuration is ", expected_config_hash,
               "; resuming under a different configuration would not continue the same run");

  const std::filesystem::path model_path = directory / "model.safetensors";
  SafetensorsFile model(model_path);
  std::set<std::string, std::less<>> expected;
  for (Parameter* p : params) {
    KEPT_CHECK(p != nullptr, where, ": null parameter pointer");
    KEPT_CHECK(expected.insert(p->name).second, where, ": two parameters are named ", p->name);
    KEPT_CHECK(model.contains(p->name), model_path.string(), ": parameter ", p->name,
               " is missing");
    const Tensor& saved = model.tensor(p->name);
    KEPT_CHECK(saved.shape() == p->value.shape() && saved.dtype() == p->value.dtype(),
               model_path.string(), ": parameter ", p->name, " is ", dtype_name(saved.dtype()), " ",
               saved.shape(), " in the checkpoint but ", dtype_name(p->value.dtype()), " ",
               p->value.shape(), " in the model");
  }
  for (const std::string& name : model.names())
    KEPT_CHECK(expected.count(name), model_path.string(), ": tensor ", name,
               " is not a parameter of the model");

  const std::filesystem::path optimizer_path = directory / "optimizer.safetensors";
  SafetensorsFile optimizer_file(optimizer_path);
  std::vector<NamedTensor> optimizer_state;
  for (const std::string& name : optimizer_file.names())
    optimizer_state.push_back({name, optimizer_file.tensor(name)});
  optimizer.load_state(backend, optimizer_state, params, optimizer_path.string());

  for (Parameter* p : params) {
    backend.upload(model.tensor(p->name), p->value);
  }
  return state;
}

}  // namespace kept
