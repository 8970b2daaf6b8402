// FAP_HOST_DEVICE marks the functions of the headers shared by host code and the run-time compiled
// device code (philox.h, mask.h), which NVRTC finds among the library's embedded headers.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define FAP_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FAP_HOST_DEVICE inline
#endif
