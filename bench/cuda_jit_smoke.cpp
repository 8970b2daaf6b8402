// A smoke test of the CUDA path without torch: load the driver and NVRTC at run time, compile a kernel
// through the JIT cache (cold, then warm from disk in a fresh cache, then from memory), load it into the
// device's primary context, launch it, check the result. Prints one JSON object.
//   cuda_jit_smoke [cache_dir]
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "core/error.h"
#include "src/cuda/cuda_api.h"
#include "src/cuda/jit_cache.h"

using namespace fap::cuda;

namespace {

double milliseconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

int main(int argc, char** argv) {
  try {
    std::string reason;
    const DriverApi* api = driver(&reason);
    if (!api) fap::fail(FAP_ERROR_BACKEND_UNAVAILABLE, reason);
    CUdevice device = 0;
    int major = 0, minor = 0;
    check(*api, api->cuDeviceGet(&device, 0), "cuDeviceGet");
    api->cuDeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device);
    api->cuDeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device);
    const std::string arch = "sm_" + std::to_string(major * 10 + minor) + (major == 9 ? "a" : "");
    const std::string dir = argc > 1 ? argv[1] : "/tmp/fap_smoke_cache";
    std::system(("rm -rf " + dir).c_str());

    const CompileRequest request{"add_one",
                                 "extern \"C\" __global__ void add_one(float* x, int n) {\n"
                                 "  int i = blockIdx.x * blockDim.x + threadIdx.x;\n"
                                 "  if (i < n) x[i] += 1.0f;\n"
                                 "}\n",
                                 {},
                                 arch};
    auto start = std::chrono::steady_clock::now();
    const std::string cubin = KernelCache(nvrtc_compiler(), dir).cubin(request);
    const double cold_ms = milliseconds_since(start);
    start = std::chrono::steady_clock::now();
    KernelCache warm_cache(nvrtc_compiler(), dir);
    warm_cache.cubin(request);
    const double warm_disk_ms = milliseconds_since(start);
    start = std::chrono::steady_clock::now();
    warm_cache.cubin(request);
    const double warm_memory_ms = milliseconds_since(start);

    CUcontext context = nullptr;
    check(*api, api->cuDevicePrimaryCtxRetain(&context, device), "cuDevicePrimaryCtxRetain");
    check(*api, api->cuCtxSetCurrent(context), "cuCtxSetCurrent");
    start = std::chrono::steady_clock::now();
    CUmodule module = nullptr;
    CUfunction function = nullptr;
    check(*api, api->cuModuleLoadData(&module, cubin.data()), "cuModuleLoadData");
    check(*api, api->cuModuleGetFunction(&function, module, "add_one"), "cuModuleGetFunction");
    const double load_ms = milliseconds_since(start);

    int n = 1 << 20;
    std::vector<float> host(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) host[static_cast<size_t>(i)] = static_cast<float>(i % 977) * 0.5f;
    CUdeviceptr buffer = 0;
    check(*api, api->cuMemAlloc(&buffer, host.size() * sizeof(float)), "cuMemAlloc");
    check(*api, api->cuMemcpyHtoD(buffer, host.data(), host.size() * sizeof(float)), "cuMemcpyHtoD");
    void* params[] = {&buffer, &n};
    check(*api, api->cuLaunchKernel(function, static_cast<unsigned>((n + 255) / 256), 1, 1, 256, 1, 1, 0, nullptr,
                                    params, nullptr),
          "cuLaunchKernel");
    check(*api, api->cuStreamSynchronize(nullptr), "cuStreamSynchronize");
    std::vector<float> result(host.size());
    check(*api, api->cuMemcpyDtoH(result.data(), buffer, result.size() * sizeof(float)), "cuMemcpyDtoH");
    api->cuMemFree(buffer);
    api->cuModuleUnload(module);
    size_t wrong = 0;
    for (size_t i = 0; i < host.size(); ++i) wrong += result[i] != host[i] + 1.0f;

    std::string nvrtc_reason;
    const NvrtcApi* compiler = nvrtc(&nvrtc_reason);
    std::printf("{\"driver_version\": %d, \"nvrtc\": \"%d.%d\", \"nvrtc_path\": \"%s\", \"arch\": \"%s\", "
                "\"cubin_bytes\": %zu, \"cold_compile_ms\": %.1f, \"warm_disk_ms\": %.2f, \"warm_memory_ms\": %.3f, "
                "\"module_load_ms\": %.2f, \"wrong_elements\": %zu}\n",
                api->version, compiler->major, compiler->minor, compiler->path.c_str(), arch.c_str(), cubin.size(),
                cold_ms, warm_disk_ms, warm_memory_ms, load_ms, wrong);
    return wrong == 0 ? 0 : 1;
  } catch (const fap::Error& error) {
    std::fprintf(stderr, "cuda_jit_smoke: %s\n", error.what());
    return 2;
  }
}
