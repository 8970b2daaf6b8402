#include "src/cuda/jit_cache.h"

#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

#include "core/error.h"
#include "src/cuda/cuda_api.h"

namespace fap::cuda {
namespace {

constexpr const char* kFormatTag = "flash_attn_plus cubin v1";

std::string hex(uint64_t value) {
  char text[17];
  std::snprintf(text, sizeof text, "%016llx", static_cast<unsigned long long>(value));
  return text;
}

// mkdir -p; returns "" on success, else why not.
std::string make_directories(const std::string& path) {
  std::string partial;
  std::stringstream parts(path);
  std::string part;
  if (!path.empty() && path[0] == '/') partial = "/";
  while (std::getline(parts, part, '/')) {
    if (part.empty()) continue;
    partial += part + "/";
    if (mkdir(partial.c_str(), 0755) != 0 && errno != EEXIST) return partial + ": " + std::strerror(errno);
  }
  return {};
}

bool quiet() {
  const char* value = std::getenv("FLASH_ATTENTION_PLUS_JIT_QUIET");
  return value && *value && std::strcmp(value, "0") != 0;
}

void check_nvrtc(const NvrtcApi& api, nvrtcResult result, const char* call, const std::string& log = {}) {
  if (result == NVRTC_SUCCESS) return;
  fail(FAP_ERROR_DEVICE, call, ": ", api.nvrtcGetErrorString(result), log.empty() ? "" : "\n", log);
}

std::string compile_with_nvrtc(const NvrtcApi& api, const CompileRequest& request) {
  nvrtcProgram program = nullptr;
  std::vector<const char*> header_texts, header_names;
  for (const Header& header : request.headers) {
    header_names.push_back(header.name);
    header_texts.push_back(header.text);
  }
  check_nvrtc(api,
              api.nvrtcCreateProgram(&program, request.source.c_str(), (request.name + ".cu").c_str(),
                                     static_cast<int>(request.headers.size()), header_texts.data(), header_names.data()),
              "nvrtcCreateProgram");
  std::vector<std::string> options = request.options;
  options.push_back("--gpu-architecture=" + request.arch);
  options.push_back("-std=c++17");
  std::vector<const char*> values;
  for (const std::string& option : options) values.push_back(option.c_str());
  const nvrtcResult compiled = api.nvrtcCompileProgram(program, static_cast<int>(values.size()), values.data());
  size_t log_size = 0;
  api.nvrtcGetProgramLogSize(program, &log_size);
  std::string log(log_size, '\0');
  if (log_size > 1) api.nvrtcGetProgramLog(program, log.data());
  std::string cubin;
  if (compiled == NVRTC_SUCCESS) {
    size_t size = 0;
    api.nvrtcGetCUBINSize(program, &size);
    cubin.resize(size);
    api.nvrtcGetCUBIN(program, cubin.data());
  }
  api.nvrtcDestroyProgram(&program);
  check_nvrtc(api, compiled, concat("nvrtcCompileProgram(", request.name, ", ", request.arch, ")").c_str(), log);
  return cubin;
}

}  // namespace

uint64_t fnv1a64(const std::string& bytes) {
  uint64_t hash = 0xcbf29ce484222325ull;
  for (unsigned char byte : bytes) hash = (hash ^ byte) * 0x100000001b3ull;
  return hash;
}

Compiler nvrtc_compiler() {
  std::string reason;
  const NvrtcApi* api = nvrtc(&reason);
  if (!api) fail(FAP_ERROR_BACKEND_UNAVAILABLE, reason);
  return {concat("nvrtc-", api->major, ".", api->minor),
          [api](const CompileRequest& request) { return compile_with_nvrtc(*api, request); }};
}

std::string default_cache_directory() {
  if (const char* dir = std::getenv("FLASH_ATTENTION_PLUS_CACHE_DIR"); dir && *dir) return dir;
  if (const char* xdg = std::getenv("XDG_CACHE_HOME"); xdg && *xdg) return std::string(xdg) + "/flash_attn_plus";
  const char* home = std::getenv("HOME");
  return std::string(home && *home ? home : "/tmp") + "/.cache/flash_attn_plus";
}

KernelCache::KernelCache(Compiler compiler, std::string directory)
    : compiler_(std::move(compiler)), directory_(std::move(directory)) {
  disk_problem_ = make_directories(directory_);
  if (disk_problem_.empty() && access(directory_.c_str(), W_OK) != 0) {
    disk_problem_ = directory_ + ": not writable";
  }
}

std::string KernelCache::key(const CompileRequest& request) const {
  std::string text = concat("compiler=", compiler_.identity, " arch=", request.arch, " name=", request.name,
                            " source=", hex(fnv1a64(request.source)), "/", request.source.size(), " options=");
  for (const std::string& option : request.options) text += option + " ";
  text += "headers=";
  for (const Header& header : request.headers) text += concat(header.name, ":", hex(fnv1a64(header.text)), " ");
  return text;
}

std::string KernelCache::file_for(const CompileRequest& request) const {
  return directory_ + "/" + request.name + "-" + request.arch + "-" + hex(fnv1a64(key(request))) + ".cubin";
}

int KernelCache::compilations() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return compilations_;
}

bool KernelCache::read_file(const std::string& path, const std::string& key, std::string* cubin) const {
  std::ifstream file(path, std::ios::binary);
  if (!file) return false;
  std::string tag, stored_key, size_line, checksum;
  if (!std::getline(file, tag) || tag != kFormatTag) return false;
  if (!std::getline(file, stored_key) || stored_key != key) return false;
  if (!std::getline(file, size_line) || !std::getline(file, checksum)) return false;
  char* end = nullptr;
  const unsigned long long size = std::strtoull(size_line.c_str(), &end, 10);
  if (end == size_line.c_str() || *end != '\0' || size > (1ull << 30)) return false;
  std::string payload(size, '\0');
  if (!file.read(payload.data(), static_cast<std::streamsize>(size)) || file.peek() != EOF) return false;
  if (checksum != hex(fnv1a64(payload))) return false;
  *cubin = std::move(payload);
  return true;
}

void KernelCache::write_file(const std::string& path, const std::string& key, const std::string& cubin) {
  static std::atomic<unsigned> counter{0};
  const std::string temporary = concat(path, ".tmp.", getpid(), ".",
                                       std::hash<std::thread::id>()(std::this_thread::get_id()), ".", counter++);
  {
    std::ofstream file(temporary, std::ios::binary | std::ios::trunc);
    file << kFormatTag << '\n' << key << '\n' << cubin.size() << '\n' << hex(fnv1a64(cubin)) << '\n';
    file.write(cubin.data(), static_cast<std::streamsize>(cubin.size()));
    if (!file.flush()) {
      disk_problem_ = temporary + ": write failed";
      std::remove(temporary.c_str());
      return;
    }
  }
  if (std::rename(temporary.c_str(), path.c_str()) != 0) {
    disk_problem_ = path + ": " + std::strerror(errno);
    std::remove(temporary.c_str());
  }
}

std::string KernelCache::cubin(const CompileRequest& request) {
  const std::string full_key = key(request);
  std::lock_guard<std::mutex> lock(mutex_);
  if (auto found = memory_.find(full_key); found != memory_.end()) return found->second;
  const std::string path = file_for(request);
  std::string binary;
  if (disk_problem_.empty() && read_file(path, full_key, &binary)) return memory_[full_key] = binary;
  if (!quiet()) {
    std::fprintf(stderr, "flash_attn_plus: compiling %s for %s (first use; cached in %s)\n", request.name.c_str(),
                 request.arch.c_str(), disk_problem_.empty() ? directory_.c_str() : "memory only");
  }
  binary = compiler_.compile(request);
  ++compilations_;
  if (disk_problem_.empty()) write_file(path, full_key, binary);
  return memory_[full_key] = binary;
}

}  // namespace fap::cuda
