#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#include "core/backend.h"
#include "core/error.h"

namespace fap {
namespace {

constexpr const char* kBackendEnvVar = "FLASH_ATTENTION_PLUS_BACKEND";
constexpr const char* kIndexChecksEnvVar = "FLASH_ATTENTION_PLUS_CHECK_INDICES";

std::atomic<bool>& index_checks_flag() {
  static std::atomic<bool> flag = [] {
    const char* value = std::getenv(kIndexChecksEnvVar);
    return value && *value && std::strcmp(value, "0") != 0;
  }();
  return flag;
}

std::string& selection() {
  // The environment sets the initial choice once; fap_set_backend() changes it later.
  static std::string choice = [] {
    const char* value = std::getenv(kBackendEnvVar);
    return std::string(value && *value ? value : "auto");
  }();
  return choice;
}

std::mutex& selection_mutex() {
  static std::mutex mutex;
  return mutex;
}

const Backend* find_backend(const std::string& name) {
  for (const Backend* backend : all_backends())
    if (name == backend->name()) return backend;
  return nullptr;
}

std::string known_names() {
  std::string names = "auto";
  for (const Backend* backend : all_backends()) names += std::string(", ") + backend->name();
  return names;
}

std::string device_label(fap_device_type device) { return device == FAP_DEVICE_CPU ? "cpu" : "cuda"; }

}  // namespace

const std::vector<const Backend*>& all_backends() {
  static const std::vector<const Backend*> backends = {&cuda_backend(), &cpu_backend()};
  return backends;
}

void select_backend(const std::string& name) {
  require(name == "auto" || find_backend(name) != nullptr, "backend: unknown name '", name, "', expected one of ",
          known_names(), name == "flaggems" ? " (flaggems is served by the Python package)" : "");
  std::lock_guard<std::mutex> lock(selection_mutex());
  selection() = name;
}

std::string selected_backend() {
  std::lock_guard<std::mutex> lock(selection_mutex());
  return selection();
}

const Backend& resolve_backend(fap_device_type device) {
  const std::string choice = selected_backend();
  std::string reason;
  if (choice != "auto") {
    const Backend* backend = find_backend(choice);
    if (!backend) {
      fail(FAP_ERROR_INVALID_ARGUMENT, kBackendEnvVar, "/fap_set_backend: unknown backend '", choice,
           "', expected one of ", known_names());
    }
    if (!backend->usable(&reason)) fail(FAP_ERROR_BACKEND_UNAVAILABLE, "backend '", choice, "' is unusable: ", reason);
    require(backend->runs_on(device), "backend '", choice, "' cannot run on ", device_label(device),
            " tensors; move the tensors or select another backend");
    return *backend;
  }
  std::string reasons;
  for (const Backend* backend : all_backends()) {
    if (!backend->runs_on(device)) continue;
    if (backend->usable(&reason)) return *backend;
    reasons += concat("; ", backend->name(), ": ", reason);
  }
  fail(FAP_ERROR_BACKEND_UNAVAILABLE, "no usable backend for ", device_label(device), " tensors", reasons);
}

bool index_checks() { return index_checks_flag().load(); }
void set_index_checks(bool enabled) { index_checks_flag().store(enabled); }

std::vector<int32_t> Backend::read_int32(const fap_tensor&) const {
  fail(FAP_ERROR_INTERNAL, "backend '", name(), "' holds no device memory to read");
}

}  // namespace fap
