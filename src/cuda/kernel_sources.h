// The device sources embedded in the library (cmake/embed_sources.cmake) and the assembly of a complete
// NVRTC translation unit from them.
#pragma once

#include <string>
#include <vector>

namespace fap::cuda {

struct EmbeddedSource {
  const char* name;  // file name, e.g. "attention_fwd.cuh"
  const char* text;
};

extern const EmbeddedSource kKernelSources[];
extern const int kKernelSourceCount;

// The named files concatenated in order (each must be embedded; throws fap::Error(INTERNAL) otherwise).
std::string assemble_source(const std::vector<std::string>& files);

}  // namespace fap::cuda
