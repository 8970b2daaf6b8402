// The device sources embedded in the library (cmake/embed_sources.cmake): the kernel files under their own
// names ("attention_fwd.cuh") and the headers they share with the host under "core/..." ("core/mask.h"), so
// that NVRTC compiles a kernel from one #include line with the embedded files as its headers.
#pragma once

#include <string>
#include <vector>

#include "src/cuda/jit_cache.h"

namespace fap::cuda {

extern const Header kKernelSources[];
extern const int kKernelSourceCount;

// The translation unit of a kernel family: an #include of its file (which must be embedded; throws
// fap::Error(INTERNAL) otherwise).
std::string kernel_translation_unit(const std::string& file);
// Every embedded file, as NVRTC's headers.
std::vector<Header> kernel_headers();

}  // namespace fap::cuda
