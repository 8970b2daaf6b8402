// dlopen of libcuda and NVRTC. Driver symbols come from cuGetProcAddress (the ABI of CUDA 12.0 for each
// name, e.g. the _v2 variants), NVRTC symbols from dlsym on the first library that loads.
#include <dlfcn.h>

#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#include "core/error.h"
#include "src/cuda/cuda_api.h"

namespace fap::cuda {
namespace {

constexpr int kDriverAbiVersion = 12000;
constexpr unsigned long long kGetProcDefault = 0;  // CU_GET_PROC_ADDRESS_DEFAULT

using GetProcAddressV2 = CUresult (*)(const char* symbol, void** function, int version, unsigned long long flags,
                                      int* status);
using GetProcAddressV1 = CUresult (*)(const char* symbol, void** function, int version, unsigned long long flags);

std::string dl_error() {
  const char* text = dlerror();
  return text ? text : "unknown dlopen error";
}

struct LoadedDriver {
  DriverApi api;
  std::string error;  // empty when loaded
};

LoadedDriver load_driver() {
  LoadedDriver loaded;
  void* library = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!library) {
    loaded.error = "the CUDA driver (libcuda.so.1) could not be loaded: " + dl_error();
    return loaded;
  }
  const auto v2 = reinterpret_cast<GetProcAddressV2>(dlsym(library, "cuGetProcAddress_v2"));
  const auto v1 = reinterpret_cast<GetProcAddressV1>(dlsym(library, "cuGetProcAddress"));
  if (!v2 && !v1) {
    loaded.error = "the CUDA driver is too old: libcuda.so.1 has no cuGetProcAddress (CUDA 11.3 or newer needed)";
    return loaded;
  }
  const auto resolve = [&](const char* name, void** function) {
    int status = 0;
    const CUresult result = v2 ? v2(name, function, kDriverAbiVersion, kGetProcDefault, &status)
                               : v1(name, function, kDriverAbiVersion, kGetProcDefault);
    if (result != CUDA_SUCCESS || !*function) {
      loaded.error = concat("the CUDA driver does not provide ", name, " (error ", result, ")");
    }
  };
#define FAP_RESOLVE(name, result, params) resolve(#name, reinterpret_cast<void**>(&loaded.api.name));
  FAP_DRIVER_FUNCTIONS(FAP_RESOLVE)
#undef FAP_RESOLVE
  if (!loaded.error.empty()) return loaded;
  const CUresult init = loaded.api.cuInit(0);
  if (init != CUDA_SUCCESS) {
    loaded.error = describe(loaded.api, "cuInit", init);
    return loaded;
  }
  loaded.api.cuDriverGetVersion(&loaded.api.version);
  int devices = 0;
  if (loaded.api.cuDeviceGetCount(&devices) != CUDA_SUCCESS || devices == 0) {
    loaded.error = "the CUDA driver sees no device";
  }
  return loaded;
}

}  // namespace

LoadedNvrtc load_nvrtc(const std::vector<std::string>& candidates) {
  LoadedNvrtc loaded;
  std::string tried;
  for (const std::string& candidate : candidates) {
    void* library = dlopen(candidate.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!library) {
      tried += "\n  " + candidate + ": " + dl_error();
      continue;
    }
    std::string missing;
#define FAP_RESOLVE(name, result, params)                                              \
  loaded.api.name = reinterpret_cast<decltype(loaded.api.name)>(dlsym(library, #name)); \
  if (!loaded.api.name) missing += std::string(" ") + #name;
    FAP_NVRTC_FUNCTIONS(FAP_RESOLVE)
#undef FAP_RESOLVE
    if (!missing.empty()) {
      tried += "\n  " + candidate + ": lacks" + missing + " (NVRTC 12 or newer needed)";
      dlclose(library);
      continue;
    }
    loaded.api.nvrtcVersion(&loaded.api.major, &loaded.api.minor);
    loaded.api.path = candidate;
    return loaded;
  }
  loaded.error = "NVRTC (the CUDA run-time compiler) could not be loaded; install the nvidia-cuda-nvrtc wheel "
                 "or a CUDA toolkit, or set FLASH_ATTENTION_PLUS_NVRTC to libnvrtc.so. Tried:" + tried;
  return loaded;
}

namespace {

void add_directory(std::vector<std::string>& candidates, const char* directory) {
  if (!directory || !*directory) return;
  for (const char* name : {"libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"})
    candidates.push_back(std::string(directory) + "/" + name);
}

}  // namespace

std::vector<std::string> nvrtc_candidates() {
  std::vector<std::string> candidates;
  if (const char* explicit_path = std::getenv("FLASH_ATTENTION_PLUS_NVRTC"); explicit_path && *explicit_path) {
    candidates.emplace_back(explicit_path);
  }
  add_directory(candidates, std::getenv("FLASH_ATTENTION_PLUS_PYTHON_NVRTC_DIR"));
  for (const char* variable : {"CUDA_HOME", "CUDA_PATH"}) {
    if (const char* root = std::getenv(variable); root && *root) add_directory(candidates, (std::string(root) + "/lib64").c_str());
  }
  add_directory(candidates, "/usr/local/cuda/lib64");
  for (const char* name : {"libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"}) candidates.emplace_back(name);
  return candidates;
}

std::string describe(const DriverApi& api, const char* call, CUresult result) {
  const char* name = nullptr;
  const char* text = nullptr;
  if (api.cuGetErrorName) api.cuGetErrorName(result, &name);
  if (api.cuGetErrorString) api.cuGetErrorString(result, &text);
  return concat(call, ": ", name ? name : "CUDA error", " ", result, " (", text ? text : "no description", ")");
}

void check(const DriverApi& api, CUresult result, const char* call) {
  if (result != CUDA_SUCCESS) fail(FAP_ERROR_DEVICE, describe(api, call, result));
}

const DriverApi* driver(std::string* reason) {
  static const LoadedDriver loaded = load_driver();
  if (!loaded.error.empty()) {
    if (reason) *reason = loaded.error;
    return nullptr;
  }
  return &loaded.api;
}

const NvrtcApi* nvrtc(std::string* reason) {
  static const LoadedNvrtc loaded = load_nvrtc(nvrtc_candidates());
  if (!loaded.error.empty()) {
    if (reason) *reason = loaded.error;
    return nullptr;
  }
  return &loaded.api;
}

}  // namespace fap::cuda
