// kept/core/shape.hpp: tensor shapes and row-major strides.
//
// A shape has at most kMaxRank dimensions and lives inline (no allocation), so passing shapes
// around in hot loops and error paths costs nothing. Element counts are checked for overflow,
// because shapes come from untrusted checkpoint headers.
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <ostream>
#include <string>
#include <vector>

#include "kept/core/error.hpp"

namespace kept {

class Shape {
 public:
  static constexpr int kMaxRank = 8;

  Shape() = default;
  Shape(std::initializer_list<std::int64_t> dims) { assign(dims.begin(), dims.end()); }
  explicit Shape(const std::vector<std::int64_t>& dims) { assign(dims.begin(), dims.end()); }

  int rank() const { return rank_; }
  std::int64_t operator[](int axis) const { return dims_[check_axis(axis)]; }
  std::int64_t& operator[](int axis) { return dims_[check_axis(axis)]; }
  const std::int64_t* begin() const { return dims_.data(); }
  const std::int64_t* end() const { return dims_.data() + rank_; }

  // Product of the dimensions; 1 for a scalar (rank 0).
  std::int64_t numel() const {
    std::int64_t count = 1;
    for (int axis = 0; axis < rank_; ++axis)
      count *= dims_[axis];
    return count;
  }

  // Row-major strides in elements.
  std::array<std::int64_t, kMaxRank> strides() const {
    std::array<std::int64_t, kMaxRank> result{};
    std::int64_t stride = 1;
    for (int axis = rank_ - 1; axis >= 0; --axis) {
      result[axis] = stride;
      stride *= dims_[axis];
    }
    return result;
  }

  std::vector<std::int64_t> to_vector() const { return {begin(), end()}; }

  std::string to_string() const {
    std::string text = "[";
    for (int axis = 0; axis < rank_; ++axis) {
      if (axis) text += ", ";
      text += std::to_string(dims_[axis]);
    }
    return text + "]";
  }

  friend bool operator==(const Shape& a, const Shape& b) {
    if (a.rank_ != b.rank_) return false;
    for (int axis = 0; axis < a.rank_; ++axis)
      if (a.dims_[axis] != b.dims_[axis]) return false;
    return true;
  }

 private:
  template <class It>
  void assign(It first, It last) {
    std::int64_t count = 1;
    for (; first != last; ++first) {
      KEPT_CHECK(rank_ < kMaxRank, "shape has more than ", kMaxRank, " dimensions");
      KEPT_CHECK(*first >= 0, "shape dimension ", *first, " is negative");
      if (*first != 0)
        KEPT_CHECK(count <= std::numeric_limits<std::int64_t>::max() / *first,
                   "shape element count overflows 64 bits");
      count *= *first;
      dims_[rank_++] = *first;
    }
  }
  int check_axis(int axis) const {
    KEPT_CHECK(axis >= 0 && axis < rank_, "axis ", axis, " out of range for rank ", rank_);
    return axis;
  }

  std::array<std::int64_t, kMaxRank> dims_{};
  int rank_ = 0;
};

inline std::ostream& operator<<(std::ostream& out, const Shape& shape) {
  return out << shape.to_string();
}

}  // namespace kept
