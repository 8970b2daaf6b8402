// The CUDA driver API and NVRTC, loaded at run time: the library is built without the CUDA toolkit and
// must load (and run its CPU backend) on machines with no driver. The few types and constants used are
// declared here with the values of the CUDA headers (cuda.h, nvrtc.h; stable across CUDA 11-13), and
// every function is reached through the tables below.
//
// RULE: no code calls a cu* or nvrtc* function directly; everything goes through driver() and nvrtc().
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace fap::cuda {

using CUresult = int;
using CUdevice = int;
using CUdeviceptr = unsigned long long;
using CUcontext = struct CUctx_st*;
using CUmodule = struct CUmod_st*;
using CUfunction = struct CUfunc_st*;
using CUstream = struct CUstream_st*;
using nvrtcResult = int;
using nvrtcProgram = struct _nvrtcProgram*;

constexpr CUresult CUDA_SUCCESS = 0;
constexpr nvrtcResult NVRTC_SUCCESS = 0;
constexpr int CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT = 16;
constexpr int CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75;
constexpr int CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76;
constexpr int CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR = 81;
constexpr int CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 97;
constexpr int CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8;
constexpr int CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6;
constexpr int CU_POINTER_ATTRIBUTE_CONTEXT = 1;
constexpr int CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL = 9;

// cuLaunchKernelEx's configuration, laid out as cuda.h's CUlaunchAttribute and CUlaunchConfig.
struct CUlaunchAttribute {
  int id;
  char pad[8 - sizeof(int)];
  union {
    char bytes[64];
    int programmatic_stream_serialization_allowed;
  } value;
};
struct CUlaunchConfig {
  unsigned int grid_x, grid_y, grid_z, block_x, block_y, block_z, shared_bytes;
  CUstream stream;
  CUlaunchAttribute* attributes;
  unsigned int attribute_count;
};

// X-macro lists: (name, return type, parameter list). The driver functions are resolved with
// cuGetProcAddress for the ABI of CUDA 12.0, so that e.g. cuModuleLoadData gets its current version.
#define FAP_DRIVER_FUNCTIONS(X)                                                                              \
  X(cuInit, CUresult, (unsigned int flags))                                                                  \
  X(cuDriverGetVersion, CUresult, (int* version))                                                            \
  X(cuGetErrorName, CUresult, (CUresult error, const char** name))                                           \
  X(cuGetErrorString, CUresult, (CUresult error, const char** text))                                         \
  X(cuDeviceGetCount, CUresult, (int* count))                                                                \
  X(cuDeviceGet, CUresult, (CUdevice * device, int ordinal))                                                 \
  X(cuDeviceGetAttribute, CUresult, (int* value, int attribute, CUdevice device))                            \
  X(cuCtxGetCurrent, CUresult, (CUcontext * context))                                                        \
  X(cuCtxSetCurrent, CUresult, (CUcontext context))                                                          \
  X(cuDevicePrimaryCtxRetain, CUresult, (CUcontext * context, CUdevice device))                              \
  X(cuCtxPushCurrent, CUresult, (CUcontext context))                                                         \
  X(cuCtxPopCurrent, CUresult, (CUcontext * context))                                                        \
  X(cuMemAlloc, CUresult, (CUdeviceptr * pointer, size_t bytes))                                             \
  X(cuMemFree, CUresult, (CUdeviceptr pointer))                                                              \
  X(cuMemcpyHtoD, CUresult, (CUdeviceptr target, const void* source, size_t bytes))                          \
  X(cuMemcpyDtoH, CUresult, (void* target, CUdeviceptr source, size_t bytes))                                \
  X(cuStreamSynchronize, CUresult, (CUstream stream))                                                        \
  X(cuCtxSynchronize, CUresult, (void))                                                                      \
  X(cuCtxGetDevice, CUresult, (CUdevice * device))                                                           \
  X(cuPointerGetAttribute, CUresult, (void* data, int attribute, CUdeviceptr pointer))                       \
  X(cuModuleLoadData, CUresult, (CUmodule * module, const void* image))                                      \
  X(cuModuleUnload, CUresult, (CUmodule module))                                                             \
  X(cuModuleGetFunction, CUresult, (CUfunction * function, CUmodule module, const char* name))               \
  X(cuFuncSetAttribute, CUresult, (CUfunction function, int attribute, int value))                           \
  X(cuLaunchKernel, CUresult,                                                                                \
    (CUfunction function, unsigned int grid_x, unsigned int grid_y, unsigned int grid_z, unsigned int block_x, \
     unsigned int block_y, unsigned int block_z, unsigned int shared_bytes, CUstream stream, void** params,     \
     void** extra))                                                                                          \
  X(cuLaunchKernelEx, CUresult, (const CUlaunchConfig* config, CUfunction function, void** params, void** extra))

#define FAP_NVRTC_FUNCTIONS(X)                                                                                 \
  X(nvrtcVersion, nvrtcResult, (int* major, int* minor))                                                     \
  X(nvrtcGetErrorString, const char*, (nvrtcResult result))                                                  \
  X(nvrtcCreateProgram, nvrtcResult,                                                                         \
    (nvrtcProgram * program, const char* source, const char* name, int headers, const char* const* contents, \
     const char* const* include_names))                                                                      \
  X(nvrtcDestroyProgram, nvrtcResult, (nvrtcProgram * program))                                              \
  X(nvrtcCompileProgram, nvrtcResult, (nvrtcProgram program, int options, const char* const* option_values)) \
  X(nvrtcGetProgramLogSize, nvrtcResult, (nvrtcProgram program, size_t * size))                              \
  X(nvrtcGetProgramLog, nvrtcResult, (nvrtcProgram program, char* log))                                      \
  X(nvrtcGetCUBINSize, nvrtcResult, (nvrtcProgram program, size_t * size))                                   \
  X(nvrtcGetCUBIN, nvrtcResult, (nvrtcProgram program, char* cubin))                                         \
  X(nvrtcGetPTXSize, nvrtcResult, (nvrtcProgram program, size_t * size))                                     \
  X(nvrtcGetPTX, nvrtcResult, (nvrtcProgram program, char* ptx))                                             \
  X(nvrtcGetNumSupportedArchs, nvrtcResult, (int* count))                                                    \
  X(nvrtcGetSupportedArchs, nvrtcResult, (int* archs))

#define FAP_DECLARE_POINTER(name, result, params) result(*name) params = nullptr;

struct DriverApi {
  FAP_DRIVER_FUNCTIONS(FAP_DECLARE_POINTER)
  int version = 0;  // e.g. 13000
};

struct NvrtcApi {
  FAP_NVRTC_FUNCTIONS(FAP_DECLARE_POINTER)
  int major = 0, minor = 0;
  std::string path;  // the library that was loaded
};

#undef FAP_DECLARE_POINTER

// The loaded APIs, or nullptr with *reason saying exactly what is missing. Loaded once per process
// (thread-safe); the outcome, failure included, is remembered.
const DriverApi* driver(std::string* reason);
const NvrtcApi* nvrtc(std::string* reason);

struct LoadedNvrtc {
  NvrtcApi api;
  std::string error;  // empty when loaded: else what was tried and why each failed
};
// Loads the first candidate that is a usable NVRTC (nvrtc() does this once with nvrtc_candidates()).
LoadedNvrtc load_nvrtc(const std::vector<std::string>& candidates);

// The NVRTC libraries tried, in order: $FLASH_ATTENTION_PLUS_NVRTC, the nvidia-cuda-nvrtc wheel of the
// Python environment ($FLASH_ATTENTION_PLUS_PYTHON_NVRTC_DIR, set by the Python package), $CUDA_HOME and
// $CUDA_PATH lib64, /usr/local/cuda/lib64, then the system loader's libnvrtc.so.13 / .12 / libnvrtc.so.
std::vector<std::string> nvrtc_candidates();

// "cuModuleLoadData: CUDA_ERROR_INVALID_IMAGE (device kernel image is invalid)".
std::string describe(const DriverApi& api, const char* call, CUresult result);
// Throws fap::Error(FAP_ERROR_DEVICE) with describe()'s text unless result is CUDA_SUCCESS.
void check(const DriverApi& api, CUresult result, const char* call);

}  // namespace fap::cuda
