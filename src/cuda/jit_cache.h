// Run-time compilation with caches: a kernel source plus compile-time defines becomes a CUBIN for one
// architecture, compiled by NVRTC once and then found in memory or on disk.
//
// Disk cache: $FLASH_ATTENTION_PLUS_CACHE_DIR, else $XDG_CACHE_HOME/flash_attn_plus, else
// ~/.cache/flash_attn_plus. One file per kernel, named <kernel name>-<key hash>.cubin, holding a header
// (format tag, the full key, payload size and checksum) and the CUBIN. The key holds the compiler's identity,
// the architecture, the name, the options and hashes of the source and of every header. Files are written to a unique
// temporary name and renamed into place, so concurrent processes never see a partial file; a file whose
// header, size or checksum does not match is rebuilt; when the directory cannot be written the cache
// works in memory only.
#pragma once

#include <cstdint>
#include <functional>
#include <future>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace fap::cuda {

// A header the source may #include, by the name it is included as (e.g. "core/mask.h").
struct Header {
  const char* name;
  const char* text;
};

struct CompileRequest {
  std::string name;                  // readable, e.g. "attention_fwd_bf16_d128_m128_n64_causal"
  std::string source;                // the translation unit; it may include `headers` and nothing else
  std::vector<std::string> options;  // e.g. "-DHEAD_DIM=128"; the architecture is added by the compiler
  std::string arch;                  // e.g. "sm_90a"
  std::vector<Header> headers;       // every header's text is part of the cache key
};

// The compiler behind the cache: NVRTC in the library, a stand-in in tests.
struct Compiler {
  std::string identity;  // part of every key, e.g. "nvrtc-13.0"
  std::function<std::string(const CompileRequest&)> compile;  // returns the CUBIN; throws fap::Error
};

Compiler nvrtc_compiler();  // throws fap::Error(FAP_ERROR_BACKEND_UNAVAILABLE) when NVRTC can't be loaded

std::string default_cache_directory();

class KernelCache {
 public:
  KernelCache(Compiler compiler, std::string directory);

  // The CUBIN for the request, compiling it at most once per key across processes sharing the directory
  // (as far as timing allows: two processes may both compile, and both results are valid).
  std::string cubin(const CompileRequest& request);

  std::string key(const CompileRequest& request) const;  // the full key text
  std::string file_for(const CompileRequest& request) const;
  int compilations() const;  // how many times this cache ran the compiler
  // Why the disk cache is off ("" if on): neither read nor written (an untrusted or unusable directory).
  const std::string& disk_problem() const { return disk_problem_; }
  // Why entries are not written ("" if they are): also for a trusted read-only directory, whose entries are read.
  const std::string& write_problem() const { return write_problem_; }

 private:
  bool read_file(const std::string& path, const std::string& key, std::string* cubin) const;
  std::string write_file(const std::string& path, const std::string& key, const std::string& cubin) const;

  Compiler compiler_;
  std::string directory_;
  std::string disk_problem_;
  std::string write_problem_;
  mutable std::mutex mutex_;
  std::unordered_map<std::string, std::string> memory_;
  std::unordered_map<std::string, std::shared_future<std::string>> in_flight_;  // being compiled by a thread
  int compilations_ = 0;
};

uint64_t fnv1a64(const std::string& bytes);

}  // namespace fap::cuda
