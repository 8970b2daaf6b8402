#include "src/cuda/kernel_sources.h"

#include "core/error.h"

namespace fap::cuda {

std::string kernel_translation_unit(const std::string& file) {
  for (int i = 0; i < kKernelSourceCount; ++i)
    if (file == kKernelSources[i].name) return "#include \"" + file + "\"\n";
  fail(FAP_ERROR_INTERNAL, "kernel source ", file, " is not embedded in the library");
}

std::vector<Header> kernel_headers() { return {kKernelSources, kKernelSources + kKernelSourceCount}; }

}  // namespace fap::cuda
