// kept/core/tensor.hpp: owning tensors and non-owning views.
//
// Tensor is type-erased (dtype + shape + memory space) and owns its bytes through a shared
// Storage, so a tensor can be a slice of an mmapped checkpoint (zero-copy: the Storage keeps
// the mapping alive) or a fresh host or device allocation. Tensors are always contiguous and
// row-major; strided access goes through the typed views below, which are what kernels take.
//
// Device memory is allocated by the CUDA backend (backend/cuda), which hands a Storage with its
// own deleter; nothing in core depends on CUDA.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <new>
#include <span>
#include <string>
#include <utility>

#include "kept/core/dtype.hpp"
#include "kept/core/error.hpp"
#include "kept/core/memory_meter.hpp"
#include "kept/core/shape.hpp"

namespace kept {

enum class MemorySpace : std::uint8_t { Host, Cuda };

constexpr const char* memory_space_name(MemorySpace space) {
  return space == MemorySpace::Host ? "host" : "cuda";
}

// A block of bytes and whatever keeps it alive (a free(), an munmap(), a cudaFree()).
class Storage {
 public:
  Storage(void* data, std::size_t bytes, MemorySpace space, std::function<void(void*)> release)
      : data_(data), bytes_(bytes), space_(space), release_(std::move(release)) {}
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
  ~Storage() {
    if (release_) release_(data_);
  }

  // 64-byte aligned host memory (a cache line, and enough for AVX-512 loads).
  // Counted by host_memory_meter() (kept/core/memory_meter.hpp) for as long as it lives.
  static std::shared_ptr<Storage> allocate_host(std::size_t bytes) {
    std::size_t rounded = (bytes + 63) / 64 * 64;
    MemoryMeter& meter = host_memory_meter();
    meter.allocate(bytes);
    void* data = rounded ? std::aligned_alloc(64, rounded) : nullptr;
    if (rounded && !data) {
      meter.release(bytes);
      throw std::bad_alloc();
    }
    try {
      return std::make_shared<Storage>(data, bytes, MemorySpace::Host, [bytes](void* p) {
        std::free(p);
        host_memory_meter().release(bytes);
      });
    } catch (...) {
      std::free(data);
      meter.release(bytes);
      throw;
    }
  }

  void* data() const { return data_; }
  std::size_t bytes() const { return bytes_; }
  MemorySpace space() const { return space_; }

  // A read-only file mapping can give its pages back to the kernel once they have been used
  // (they are re-read from the file if touched again); a streaming converter does that after
  // each tensor so its resident memory stays at a few tensors, not the whole checkpoint.
  void mark_file_mapping() { file_mapping_ = true; }
  bool file_mapping() const { return file_mapping_; }

 private:
  void* data_;
  std::size_t bytes_;
  MemorySpace space_;
  std::function<void(void*)> release_;
  bool file_mapping_ = false;
};

class Tensor {
 public:
  Tensor() = default;

  // Uninitialised host tensor.
  static Tensor empty(DType dtype, Shape shape) {
    auto storage =
        Storage::allocate_host(static_cast<std::size_t>(shape.numel()) * dtype_size(dtype));
    return Tensor(dtype, shape, std::move(storage), 0);
  }
  static Tensor zeros(DType dtype, Shape shape) {
    Tensor tensor = empty(dtype, shape);
    if (tensor.nbytes()) std::memset(tensor.raw(), 0, tensor.nbytes());
    return tensor;
  }
  // A tensor over bytes owned by `storage`, starting `offset` bytes in.
  static Tensor from_storage(DType dtype, Shape shape, std::shared_ptr<Storage> storage,
                             std::size_t offset = 0) {
    KEPT_CHECK(storage, "tensor storage is null");
    KEPT_CHECK(
        offset + static_cast<std::size_t>(shape.numel()) * dtype_size(dtype) <= storage->bytes(),
        "tensor of shape ", shape, " and dtype ", dtype_name(dtype), " at offset ", offset,
        " exceeds its storage of ", storage->bytes(), " bytes");
    return Tensor(dtype, shape, std::move(storage), offset);
  }

  // A tensor with a dtype and shape but no storage, like torch's "meta" device: what a
  // planner needs to lay out a checkpoint or count parameters without allocating them.
  static Tensor meta(DType dtype, Shape shape) { return Tensor(dtype, shape, nullptr, 0); }

  bool defined() const { return storage_ != nullptr; }
  DType dtype() const { return dtype_; }
  const Shape& shape() const { return shape_; }
  std::int64_t dim(int axis) const { return shape_[axis]; }
  int rank() const { return shape_.rank(); }
  std::int64_t numel() const { return shape_.numel(); }
  std::size_t nbytes() const { return static_cast<std::size_t>(numel()) * dtype_size(dtype_); }
  MemorySpace space() const { return storage_ ? storage_->space() : MemorySpace::Host; }
  const std::shared_ptr<Storage>& storage() const { return storage_; }

  void* raw() { return storage_ ? static_cast<char*>(storage_->data()) + offset_ : nullptr; }
  const void* raw() const {
    return storage_ ? static_cast<const char*>(storage_->data()) + offset_ : nullptr;
  }
  std::span<const std::byte> bytes() const {
    return {static_cast<const std::byte*>(raw()), nbytes()};
  }

  // Typed access; throws if T does not match the dtype.
  template <class T>
  T* data() {
    check_type<T>();
    return static_cast<T*>(raw());
  }
  template <class T>
  const T* data() const {
    check_type<T>();
    return static_cast<const T*>(raw());
  }
  template <class T>
  std::span<T> span() {
    return {data<T>(), static_cast<std::size_t>(numel())};
  }
  template <class T>
  std::span<const T> span() const {
    return {data<T>(), static_cast<std::size_t>(numel())};
  }

  // Same bytes, new shape with the same element count.
  Tensor reshape(Shape shape) const {
    KEPT_CHECK(shape.numel() == numel(), "cannot reshape ", shape_, " to ", shape);
    return Tensor(dtype_, shape, storage_, offset_);
  }

  // Deep copy on the host.
  Tensor clone() const {
    require_host("clone");
    Tensor copy = empty(dtype_, shape_);
    if (nbytes()) std::memcpy(copy.raw(), raw(), nbytes());
    return copy;
  }

  // Host conversion between float dtypes (F32, BF16, F16, F64), rounding to nearest even.
  Tensor to(DType target) const;

 private:
  Tensor(DType dtype, Shape shape, std::shared_ptr<Storage> storage, std::size_t offset)
      : dtype_(dtype), shape_(shape), storage_(std::move(storage)), offset_(offset) {}

  template <class T>
  void check_type() const {
    KEPT_CHECK(dtype_of_v<std::remove_const_t<T>> == dtype_, "tensor holds ", dtype_name(dtype_),
               ", accessed as ", dtype_name(dtype_of_v<std::remove_const_t<T>>));
  }
  void require_host(const char* what) const {
    KEPT_CHECK(space() == MemorySpace::Host, what, " needs a host tensor, this one is on ",
               memory_space_name(space()));
  }

  DType dtype_ = DType::F32;
  Shape shape_;
  std::shared_ptr<Storage> storage_;
  std::size_t offset_ = 0;
};

namespace detail {
inline float load_as_float(const void* data, DType dtype, std::int64_t index) {
  switch (dtype) {
    case DType::F32:
      return static_cast<const float*>(data)[index];
    case DType::BF16:
      return to_float(static_cast<const bf16*>(data)[index]);
    case DType::F16:
      return to_float(static_cast<const f16*>(data)[index]);
    case DType::F64:
      return static_cast<float>(static_cast<const double*>(data)[index]);
    default:
      fail("dtype ", dtype_name(dtype), " is not a floating-point type");
  }
}
inline void store_from_float(void* data, DType dtype, std::int64_t index, float value) {
  switch (dtype) {
    case DType::F32:
      static_cast<float*>(data)[index] = value;
      return;
    case DType::BF16:
      static_cast<bf16*>(data)[index] = to_bf16(value);
      return;
    case DType::F16:
      static_cast<f16*>(data)[index] = to_f16(value);
      return;
    case DType::F64:
      static_cast<double*>(data)[index] = value;
      return;
    default:
      fail("dtype ", dtype_name(dtype), " is not a floating-point type");
  }
}
}  // namespace detail

inline Tensor Tensor::to(DType target) const {
  require_host("dtype conversion");
  KEPT_CHECK(is_float(dtype_) && is_float(target), "cannot convert ", dtype_name(dtype_), " to ",
             dtype_name(target), ": only F32, BF16, F16 and F64 convert");
  if (target == dtype_) return clone();
  Tensor result = empty(target, shape_);
  const std::int64_t count = numel();
  if (dtype_ == DType::F64 && target == DType::F32) {
    const double* source = data<double>();
    float* destination = result.data<float>();
    for (std::int64_t i = 0; i < count; ++i)
      destination[i] = static_cast<float>(source[i]);
  } else if (dtype_ == DType::F64) {
    // Double to a 16-bit float: round to odd first, so the result is correctly rounded.
    const double* source = data<double>();
    for (std::int64_t i = 0; i < count; ++i)
      detail::store_from_float(result.raw(), target, i, to_float_round_to_odd(source[i]));
  } else if (target == DType::F64) {
    double* destination = result.data<double>();
    for (std::int64_t i = 0; i < count; ++i)
      destination[i] = detail::load_as_float(raw(), dtype_, i);
  } else {
    // Via fp32: exact for BF16/F16 -> F32, and a single rounding for F32 -> BF16/F16.
    for (std::int64_t i = 0; i < count; ++i)
      detail::store_from_float(result.raw(), target, i, detail::load_as_float(raw(), dtype_, i));
  }
  return result;
}

// Whether a GEMM operand is used as stored or transposed.
enum class Transpose : bool { No = false, Yes = true };

// A non-owning, row-major matrix view with a row stride (leading dimension), the shape every
// kernel and GEMM in kept takes. A head of a [tokens, heads*head_dim] activation is a
// MatrixView with cols = head_dim and stride = heads*head_dim.
template <class T>
struct MatrixView {
  T* data = nullptr;
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  std::int64_t stride = 0;  // elements between the starts of consecutive rows

  MatrixView() = default;
  MatrixView(T* data_, std::int64_t rows_, std::int64_t cols_)
      : data(data_), rows(rows_), cols(cols_), stride(cols_) {}
  MatrixView(T* data_, std::int64_t rows_, std::int64_t cols_, std::int64_t stride_)
      : data(data_), rows(rows_), cols(cols_), stride(stride_) {}
  // A MatrixView<const T> from a MatrixView<T>.
  template <class U>
  requires std::is_same_v<const U, T> MatrixView(const MatrixView<U>& other)
      : data(other.data), rows(other.rows), cols(other.cols), stride(other.stride) {}

  T* row(std::int64_t r) const { return data + r * stride; }
  T& operator()(std::int64_t r, std::int64_t c) const { return data[r * stride + c]; }
  MatrixView block(std::int64_t row0, std::int64_t col0, std::int64_t nrows,
                   std::int64_t ncols) const {
    return MatrixView(data + row0 * stride + col0, nrows, ncols, stride);
  }
  bool contiguous() const { return stride == cols; }
};

// A 2-D view of a contiguous tensor: the last axis is the columns, all others fold into rows.
template <class T>
MatrixView<T> as_matrix(Tensor& tensor) {
  KEPT_CHECK(tensor.rank() >= 1, "a matrix view needs rank >= 1, got a scalar");
  std::int64_t cols = tensor.dim(tensor.rank() - 1);
  std::int64_t rows = cols ? tensor.numel() / cols : 0;
  return MatrixView<T>(tensor.data<T>(), rows, cols);
}
template <class T>
MatrixView<const T> as_matrix(const Tensor& tensor) {
  KEPT_CHECK(tensor.rank() >= 1, "a matrix view needs rank >= 1, got a scalar");
  std::int64_t cols = tensor.dim(tensor.rank() - 1);
  std::int64_t rows = cols ? tensor.numel() / cols : 0;
  return MatrixView<const T>(tensor.data<T>(), rows, cols);
}

}  // namespace kept
