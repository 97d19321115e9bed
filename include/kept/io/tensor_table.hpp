// kept/io/tensor_table.hpp: one weight file's tensors by name, in file order.
//
// What every weight-file reader (safetensors, torch .bin) hands out, so that lookups and the
// "not found" error read the same whichever format a checkpoint ships in.
#pragma once

#include <cstddef>
#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "kept/core/error.hpp"
#include "kept/core/tensor.hpp"
#include "kept/io/json.hpp"

namespace kept {

class TensorTable {
 public:
  // Names are unique: the readers reject duplicates while parsing, before they get here.
  void add(std::string name, Tensor tensor) {
    index_.emplace(name, tensors_.size());
    names_.push_back(std::move(name));
    tensors_.push_back(std::move(tensor));
  }

  std::size_t size() const { return tensors_.size(); }
  // In file order.
  const std::vector<std::string>& names() const { return names_; }
  bool contains(std::string_view name) const { return index_.find(name) != index_.end(); }

  // The tensor called `name`; an error naming `file` and the tensor if there is none.
  const Tensor& get(std::string_view name, const std::filesystem::path& file) const {
    const auto found = index_.find(name);
    if (found == index_.end())
      fail(file.string(), ": tensor ", detail::quote_json(name), " not found (the file holds ",
           tensors_.size(), " tensors)");
    return tensors_[found->second];
  }

 private:
  std::vector<std::string> names_;
  std::vector<Tensor> tensors_;  // parallel to names_
  std::map<std::string, std::size_t, std::less<>> index_;
};

// A file of named tensors read whole (safetensors, a torch checkpoint): its path, which errors
// name, and its tensors in file order.
class TensorFile {
 public:
  TensorFile() = default;
  explicit TensorFile(std::filesystem::path path) : path_(std::move(path)) {}

  const std::filesystem::path& path() const { return path_; }
  std::size_t size() const { return tensors_.size(); }
  // Tensor names in file order.
  const std::vector<std::string>& names() const { return tensors_.names(); }
  bool contains(std::string_view name) const { return tensors_.contains(name); }
  const Tensor& tensor(std::string_view name) const { return tensors_.get(name, path_); }

 protected:
  std::filesystem::path path_;
  TensorTable tensors_;
};

}  // namespace kept
