// The backend interface and the registry that picks one per call. A backend runs validated problems;
// it never re-checks arguments. Backends register themselves in backend_registry.cpp, in priority order
// for "auto" (fastest first).
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "core/problem.h"

namespace fap {

// A call a backend has prepared: its kernel chosen (and compiled), its launch arguments and workspace laid
// out once, so that run() only launches. It reads the problem it was prepared for, which must outlive it.
class PreparedCall {
 public:
  virtual ~PreparedCall() = default;
  virtual size_t workspace_size() const = 0;
  // What runs, for reports and tests: a kernel configuration's name ("" where there is nothing to name).
  virtual const char* kernel() const = 0;
  // workspace holds at least workspace_size() bytes, 16-byte aligned (checked by the caller).
  virtual void run(void* stream, void* workspace) const = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;
  // Whether it can run on this machine; when not, *reason says why (the exact missing piece).
  virtual bool usable(std::string* reason) const = 0;
  virtual bool runs_on(fap_device_type device) const = 0;
  // What a user reporting a problem would be asked for: library versions and paths, settings.
  virtual std::string details() const = 0;
  // Empty when supported, else why not (e.g. a dtype the backend lacks).
  virtual std::string unsupported_reason(const AttentionProblem& problem) const = 0;
  // Chooses how to run a supported problem; throws fap::Error (e.g. DEVICE when a kernel fails to compile).
  virtual std::unique_ptr<PreparedCall> prepare(const AttentionProblem& problem) const = 0;
  // Compiles or loads ahead of use what calls with these features would run on the device (no-op where
  // nothing is compiled).
  virtual void precompile(const KernelFeatures& features, int32_t device_index) const {
    (void)features, (void)device_index;
  }
  // A 1-D contiguous int32 tensor in this backend's device memory, copied to the host once the device's pending
  // work is done (the index checks read cu_seqlens this way). Backends of host memory are never asked.
  virtual std::vector<int32_t> read_int32(const fap_tensor& tensor) const;
};

const std::vector<const Backend*>& all_backends();
// The backend a call on tensors of this device runs on under the current selection; throws fap::Error
// (BACKEND_UNAVAILABLE or INVALID_ARGUMENT) with the reason when there is none.
const Backend& resolve_backend(fap_device_type device);
void select_backend(const std::string& name);  // "auto" or a registered name; throws on unknown names
std::string selected_backend();

// Whether calls copy device-resident index arrays to the host and check them (fap_set_index_checks).
bool index_checks();
void set_index_checks(bool enabled);

// Backend factories, one per backend directory.
const Backend& cpu_backend();
const Backend& cuda_backend();

}  // namespace fap
