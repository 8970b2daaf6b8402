// The backend interface and the registry that picks one per call. A backend runs validated problems;
// it never re-checks arguments. Backends register themselves in backend_registry.cpp, in priority order
// for "auto" (fastest first).
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "core/problem.h"

namespace fap {

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
  virtual size_t workspace_size(const AttentionProblem& problem) const = 0;
  virtual void run(const AttentionProblem& problem, void* stream, void* workspace, size_t workspace_bytes) const = 0;
};

const std::vector<const Backend*>& all_backends();
// The backend a call on tensors of this device runs on under the current selection; throws fap::Error
// (BACKEND_UNAVAILABLE or INVALID_ARGUMENT) with the reason when there is none.
const Backend& resolve_backend(fap_device_type device);
void select_backend(const std::string& name);  // "auto" or a registered name; throws on unknown names
std::string selected_backend();

// Backend factories, one per backend directory.
const Backend& cpu_backend();
const Backend& cuda_backend();

}  // namespace fap
