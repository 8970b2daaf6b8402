#include "src/cuda/jit_cache.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <future>
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

// The largest entry read: a kernel's CUBIN is well under a megabyte; a header claiming more is refused before
// anything of that size is allocated.
constexpr size_t kMaxEntryBytes = 64u << 20;

// Whether a file or directory may be trusted: owned by this user or by root, and not writable by group or others
// (only the user, or root, can have put what is there). Returns "" if so, else why not.
std::string untrusted(const std::string& path, const struct stat& info) {
  if (info.st_uid != geteuid() && info.st_uid != 0) return path + ": owned by another user";
  if (info.st_mode & (S_IWGRP | S_IWOTH)) return path + ": writable by group or others";
  return {};
}

// mkdir -p, the last directory private (0700); returns "" on success, else why not.
std::string make_directories(const std::string& path) {
  std::string partial;
  std::stringstream parts(path);
  std::string part;
  if (!path.empty() && path[0] == '/') partial = "/";
  while (std::getline(parts, part, '/')) {
    if (part.empty()) continue;
    partial += part + "/";
    const bool last = path.find_first_not_of('/', partial.size()) == std::string::npos;
    if (mkdir(partial.c_str(), last ? 0700 : 0755) != 0 && errno != EEXIST) return partial + ": " + std::strerror(errno);
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
  // A real architecture (sm_XX) gives a cubin; a virtual one (compute_XX) PTX, NUL-terminated as
  // cuModuleLoadData reads it, which the driver translates for the GPU it is loaded on.
  std::string cubin;
  if (compiled == NVRTC_SUCCESS) {
    size_t size = 0;
    if (request.arch.rfind("compute_", 0) == 0) {
      api.nvrtcGetPTXSize(program, &size);
      cubin.resize(size);
      api.nvrtcGetPTX(program, cubin.data());
    } else {
      api.nvrtcGetCUBINSize(program, &size);
      cubin.resize(size);
      api.nvrtcGetCUBIN(program, cubin.data());
    }
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

// The directory is used only if it can be trusted (see untrusted()); it is written only if it is this user's
// and writable, else read (a precompiled cache shared read-only by its owner or root).
KernelCache::KernelCache(Compiler compiler, std::string directory)
    : compiler_(std::move(compiler)), directory_(std::move(directory)) {
  disk_problem_ = make_directories(directory_);
  struct stat info {};
  if (disk_problem_.empty() && stat(directory_.c_str(), &info) != 0) disk_problem_ = directory_ + ": " + std::strerror(errno);
  if (disk_problem_.empty() && !S_ISDIR(info.st_mode)) disk_problem_ = directory_ + ": not a directory";
  if (disk_problem_.empty()) disk_problem_ = untrusted(directory_, info);
  if (!disk_problem_.empty()) {
    write_problem_ = disk_problem_;
  } else if (info.st_uid != geteuid() || !(info.st_mode & S_IWUSR) || access(directory_.c_str(), W_OK) != 0) {
    write_problem_ = directory_ + ": not writable by this user (entries are read, not written)";
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

// An entry is read only from a regular file (not through a symbolic link) that can be trusted, whole, and only
// if its format line, key, size and checksum all match.
bool KernelCache::read_file(const std::string& path, const std::string& key, std::string* cubin) const {
  const int fd = open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return false;
  std::string contents;
  struct stat info {};
  bool ok = fstat(fd, &info) == 0 && S_ISREG(info.st_mode) && untrusted(path, info).empty() &&
            static_cast<size_t>(info.st_size) <= kMaxEntryBytes + key.size() + 256;
  if (ok) {
    contents.resize(static_cast<size_t>(info.st_size));
    size_t done = 0;
    while (ok && done < contents.size()) {
      const ssize_t got = read(fd, contents.data() + done, contents.size() - done);
      ok = got > 0;
      done += ok ? static_cast<size_t>(got) : 0;
    }
  }
  close(fd);
  if (!ok) return false;
  // Four header lines, then the payload.
  size_t position = 0;
  std::string lines[4];
  for (std::string& line : lines) {
    const size_t end = contents.find('\n', position);
    if (end == std::string::npos) return false;
    line = contents.substr(position, end - position);
    position = end + 1;
  }
  if (lines[0] != kFormatTag || lines[1] != key) return false;
  char* end = nullptr;
  const unsigned long long size = std::strtoull(lines[2].c_str(), &end, 10);
  if (end == lines[2].c_str() || *end != '\0' || size != contents.size() - position) return false;
  std::string payload = contents.substr(position);
  if (lines[3] != hex(fnv1a64(payload))) return false;
  *cubin = std::move(payload);
  return true;
}

// A new file only this user can read or write (0600, created exclusively, never through a symbolic link),
// renamed into place once complete. Returns "" or why the entry was not written.
std::string KernelCache::write_file(const std::string& path, const std::string& key, const std::string& cubin) const {
  static std::atomic<unsigned> counter{0};
  const std::string temporary = concat(path, ".tmp.", getpid(), ".",
                                       std::hash<std::thread::id>()(std::this_thread::get_id()), ".", counter++);
  const int fd = open(temporary.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) return temporary + ": " + std::strerror(errno);
  const std::string contents =
      concat(kFormatTag, "\n", key, "\n", cubin.size(), "\n", hex(fnv1a64(cubin)), "\n") + cubin;
  size_t done = 0;
  while (done < contents.size()) {
    const ssize_t wrote = write(fd, contents.data() + done, contents.size() - done);
    if (wrote <= 0) break;
    done += static_cast<size_t>(wrote);
  }
  const bool complete = close(fd) == 0 && done == contents.size();
  if (!complete) {
    std::remove(temporary.c_str());
    return temporary + ": write failed";
  }
  if (std::rename(temporary.c_str(), path.c_str()) != 0) {
    const std::string problem = path + ": " + std::strerror(errno);
    std::remove(temporary.c_str());
    return problem;
  }
  return {};
}

// The lock guards the maps, never a compile: different kernels compile at the same time (a forward's and its
// backward's on two threads), and a thread asking for a kernel another thread is compiling waits for that result.
std::string KernelCache::cubin(const CompileRequest& request) {
  const std::string full_key = key(request);
  std::unique_lock<std::mutex> lock(mutex_);
  if (auto found = memory_.find(full_key); found != memory_.end()) return found->second;
  if (auto pending = in_flight_.find(full_key); pending != in_flight_.end()) {
    const std::shared_future<std::string> other_thread = pending->second;
    lock.unlock();
    return other_thread.get();  // rethrows that thread's error
  }
  std::promise<std::string> result;
  in_flight_.emplace(full_key, result.get_future().share());
  const std::string path = file_for(request);
  const bool writable = write_problem_.empty();
  lock.unlock();

  std::string binary, written;
  bool compiled = false;
  try {
    if (!disk_problem_.empty() || !read_file(path, full_key, &binary)) {
      if (!quiet()) {
        std::fprintf(stderr, "flash_attn_plus: compiling %s for %s (first use; cached in %s)\n",
                     request.name.c_str(), request.arch.c_str(), writable ? directory_.c_str() : "memory only");
      }
      binary = compiler_.compile(request);
      compiled = true;
      if (writable) written = write_file(path, full_key, binary);
    }
  } catch (...) {
    result.set_exception(std::current_exception());
    lock.lock();
    in_flight_.erase(full_key);
    throw;
  }
  result.set_value(binary);
  lock.lock();
  compilations_ += compiled ? 1 : 0;
  if (!written.empty() && write_problem_.empty()) write_problem_ = written;
  in_flight_.erase(full_key);
  return memory_[full_key] = binary;
}

}  // namespace fap::cuda
