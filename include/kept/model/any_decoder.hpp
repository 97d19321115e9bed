// kept/model/any_decoder.hpp: a decoder whose norm kind is chosen at run time.
//
// The layer templates fix the norm kind at compile time (that is what makes the kernels
// branch-free); a command that reads a config.json learns it at run time. AnyDecoder holds
// either instantiation, and with_decoder() hands the concrete one to a generic lambda.
#pragma once

#include <utility>
#include <variant>

#include "kept/model/config.hpp"
#include "kept/model/decoder.hpp"

namespace kept {

template <class Backend>
using AnyDecoder = std::variant<Decoder<LayerNorm, Backend>, Decoder<RMSNorm, Backend>>;

template <class Backend>
AnyDecoder<Backend> make_decoder(Backend& backend, const ModelConfig& config) {
  if (config.norm_kind() == NormKind::LayerNorm)
    return AnyDecoder<Backend>(std::in_place_index<0>, backend, config);
  return AnyDecoder<Backend>(std::in_place_index<1>, backend, config);
}

template <class Backend, class Function>
decltype(auto) with_decoder(AnyDecoder<Backend>& decoder, Function&& function) {
  return std::visit(std::forward<Function>(function), decoder);
}

}  // namespace kept
