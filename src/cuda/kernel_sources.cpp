#include "src/cuda/kernel_sources.h"

#include <cstring>

#include "core/error.h"

namespace fap::cuda {

std::string assemble_source(const std::vector<std::string>& files) {
  std::string source;
  for (const std::string& file : files) {
    const EmbeddedSource* found = nullptr;
    for (int i = 0; i < kKernelSourceCount; ++i)
      if (file == kKernelSources[i].name) found = &kKernelSources[i];
    if (!found) fail(FAP_ERROR_INTERNAL, "kernel source ", file, " is not embedded in the library");
    source += "// ---- " + file + "\n" + found->text + "\n";
  }
  return source;
}

}  // namespace fap::cuda
