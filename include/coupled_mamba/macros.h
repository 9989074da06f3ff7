// Lets the same inline functions compile for the host (C++ compiler) and the device (nvcc).
#pragma once

#ifdef __CUDACC__
#define CM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CM_HOST_DEVICE inline
#endif
