// kept/kept.hpp: the whole CPU-side library in one include.
#pragma once

#include "kept/core/dtype.hpp"
#include "kept/core/error.hpp"
#include "kept/core/shape.hpp"
#include "kept/core/tensor.hpp"
