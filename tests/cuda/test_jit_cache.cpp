// The JIT cache with a stand-in compiler (no NVRTC needed), and one real NVRTC compilation when NVRTC is
// present (it needs no GPU).
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"
#include "src/cuda/cuda_api.h"
#include "src/cuda/jit_cache.h"

namespace fap::cuda {
namespace {

// A cache directory of this test alone, removed afterwards.
struct ScratchDirectory {
  std::string path;
  explicit ScratchDirectory(const std::string& label)
      : path("/tmp/fap_jit_test_" + std::to_string(getpid()) + "_" + label) {
    remove_tree();
  }
  ~ScratchDirectory() { remove_tree(); }
  void remove_tree() const {
    if (std::system(("rm -rf '" + path + "'").c_str()) != 0) std::fprintf(stderr, "could not remove %s\n", path.c_str());
  }
};

struct CountingCompiler {
  std::atomic<int> calls{0};
  Compiler compiler() {
    return {"stand-in-1", [this](const CompileRequest& request) {
              ++calls;
              return "CUBIN(" + request.name + "|" + request.arch + "|" + request.source + ")";
            }};
  }
};

CompileRequest request(const std::string& define = "-DHEAD_DIM=128") {
  return {"attention_fwd_test", "#include \"k.cuh\"", {define}, "sm_90a", {{"k.cuh", "__global__ void k() {}"}}};
}

TEST(JitCache, CompilesOnceThenHitsMemoryAndDisk) {
  const ScratchDirectory scratch("hits");
  const std::string& dir = scratch.path;
  CountingCompiler counting;
  KernelCache first(counting.compiler(), dir);
  const std::string cubin = first.cubin(request());
  EXPECT_EQ(first.cubin(request()), cubin);
  EXPECT_EQ(counting.calls, 1);
  KernelCache second(counting.compiler(), dir);  // a new process, as far as the cache can tell
  EXPECT_EQ(second.cubin(request()), cubin);
  EXPECT_EQ(counting.calls, 1);
  EXPECT_EQ(second.compilations(), 0);
}

TEST(JitCache, EveryPartOfTheKeyMatters) {
  const ScratchDirectory scratch("keys");
  const std::string& dir = scratch.path;
  CountingCompiler counting;
  KernelCache cache(counting.compiler(), dir);
  cache.cubin(request());
  cache.cubin(request("-DHEAD_DIM=64"));
  CompileRequest other_arch = request();
  other_arch.arch = "sm_80";
  cache.cubin(other_arch);
  CompileRequest other_source = request();
  other_source.source += " // changed";
  cache.cubin(other_source);
  CompileRequest other_header = request();
  other_header.headers[0].text = "__global__ void k() { /* changed */ }";
  cache.cubin(other_header);
  EXPECT_EQ(counting.calls, 5);
  Compiler newer = counting.compiler();
  newer.identity = "stand-in-2";
  KernelCache upgraded(newer, dir);
  upgraded.cubin(request());
  EXPECT_EQ(counting.calls, 6);
}

TEST(JitCache, CorruptOrTruncatedEntriesAreRebuilt) {
  const ScratchDirectory scratch("corrupt");
  const std::string& dir = scratch.path;
  CountingCompiler counting;
  const std::string good = KernelCache(counting.compiler(), dir).cubin(request());
  const std::string path = KernelCache(counting.compiler(), dir).file_for(request());
  std::string contents;
  {
    std::ifstream in(path, std::ios::binary);
    contents.assign(std::istreambuf_iterator<char>(in), {});
  }
  for (const std::string& damaged : {contents.substr(0, contents.size() - 3),       // truncated
                                     contents.substr(0, contents.size() - 1) + "X",  // flipped byte
                                     std::string("garbage"), std::string()}) {
    {
      std::ofstream out(path, std::ios::binary | std::ios::trunc);
      out << damaged;
    }
    const int before = counting.calls;
    KernelCache cache(counting.compiler(), dir);
    EXPECT_EQ(cache.cubin(request()), good);
    EXPECT_EQ(counting.calls, before + 1);
    EXPECT_EQ(KernelCache(counting.compiler(), dir).cubin(request()), good);  // repaired on disk
    EXPECT_EQ(counting.calls, before + 1);
  }
}

TEST(JitCache, UnusableDirectoryFallsBackToMemory) {
  CountingCompiler counting;
  KernelCache cache(counting.compiler(), "/etc/hostname/cache");  // below a regular file: no one can create it
  EXPECT_FALSE(cache.disk_problem().empty());
  EXPECT_FALSE(cache.write_problem().empty());
  cache.cubin(request());
  cache.cubin(request());
  EXPECT_EQ(counting.calls, 1);
}

std::string mode_of(const std::string& path) {
  struct stat info {};
  if (lstat(path.c_str(), &info) != 0) return "missing";
  char text[8];
  std::snprintf(text, sizeof text, "%o", info.st_mode & 07777);
  return text;
}

TEST(JitCache, DirectoryAndEntriesArePrivate) {
  const ScratchDirectory scratch("private");
  const std::string dir = scratch.path + "/nested/cache";
  CountingCompiler counting;
  KernelCache cache(counting.compiler(), dir);
  EXPECT_EQ(cache.disk_problem(), "");
  EXPECT_EQ(cache.write_problem(), "");
  cache.cubin(request());
  EXPECT_EQ(mode_of(dir), "700");
  EXPECT_EQ(mode_of(cache.file_for(request())), "600");
}

// Entries another user could have written are never loaded: a directory writable by group or others, or owned
// by another user, turns the disk cache off; a file writable by others, or a symbolic link, is not read.
TEST(JitCache, OnlyEntriesThisUserCouldHaveWrittenAreRead) {
  const ScratchDirectory scratch("trust");
  const std::string& dir = scratch.path;
  CountingCompiler counting;
  KernelCache(counting.compiler(), dir).cubin(request());
  const std::string entry = KernelCache(counting.compiler(), dir).file_for(request());
  ASSERT_EQ(counting.calls, 1);

  chmod(entry.c_str(), 0666);  // a planted or tampered entry
  KernelCache(counting.compiler(), dir).cubin(request());
  EXPECT_EQ(counting.calls, 2);
  EXPECT_EQ(mode_of(entry), "600") << "rewritten privately";

  const std::string elsewhere = scratch.path + "_valid_entry";
  ASSERT_EQ(std::rename(entry.c_str(), elsewhere.c_str()), 0);
  ASSERT_EQ(symlink(elsewhere.c_str(), entry.c_str()), 0);
  KernelCache(counting.compiler(), dir).cubin(request());
  EXPECT_EQ(counting.calls, 3) << "a symbolic link is not followed";
  std::remove(elsewhere.c_str());

  chmod(dir.c_str(), 0777);
  KernelCache shared(counting.compiler(), dir);
  EXPECT_NE(shared.disk_problem().find("writable by group or others"), std::string::npos) << shared.disk_problem();
  shared.cubin(request());
  EXPECT_EQ(counting.calls, 4) << "nothing read from a directory others can write";
  chmod(dir.c_str(), 0700);

  if (geteuid() == 0) {  // only root can give the directory to another user
    ASSERT_EQ(chown(dir.c_str(), 12345, 12345), 0);
    KernelCache foreign(counting.compiler(), dir);
    EXPECT_NE(foreign.disk_problem().find("owned by another user"), std::string::npos) << foreign.disk_problem();
    foreign.cubin(request());
    EXPECT_EQ(counting.calls, 5);
    ASSERT_EQ(chown(dir.c_str(), 0, 0), 0);
  }
}

// A header claiming more bytes than the file holds, or more than any kernel, is refused.
TEST(JitCache, ForgedSizesAreRefused) {
  const ScratchDirectory scratch("forged");
  const std::string& dir = scratch.path;
  CountingCompiler counting;
  KernelCache writer(counting.compiler(), dir);
  writer.cubin(request());
  const std::string entry = writer.file_for(request());
  {
    std::ofstream out(entry, std::ios::binary | std::ios::trunc);
    out << "flash_attn_plus cubin v1\n" << writer.key(request()) << "\n" << (1ull << 30) << "\n0123456789abcdef\nX";
  }
  chmod(entry.c_str(), 0600);
  KernelCache reader(counting.compiler(), dir);
  reader.cubin(request());
  EXPECT_EQ(counting.calls, 2);
}

// A directory of the user's (or root's) that is read-only, e.g. a precompiled cache shared by its owner, is read
// and not written.
TEST(JitCache, ReadOnlyTrustedDirectoryIsReadNotWritten) {
  const ScratchDirectory scratch("readonly");
  const std::string& dir = scratch.path;
  CountingCompiler counting;
  KernelCache(counting.compiler(), dir).cubin(request());
  chmod(dir.c_str(), 0500);
  KernelCache cache(counting.compiler(), dir);
  EXPECT_EQ(cache.disk_problem(), "");
  EXPECT_NE(cache.write_problem(), "");
  cache.cubin(request());
  EXPECT_EQ(counting.calls, 1) << "read from the read-only directory";
  CompileRequest other = request("-DHEAD_DIM=32");
  cache.cubin(other);
  cache.cubin(other);
  EXPECT_EQ(counting.calls, 2) << "compiled once, kept in memory";
  EXPECT_EQ(mode_of(cache.file_for(other)), "missing");
  chmod(dir.c_str(), 0700);
}

TEST(JitCache, ConcurrentWritersLeaveOneValidEntry) {
  const ScratchDirectory scratch("concurrent");
  const std::string& dir = scratch.path;
  CountingCompiler counting;
  std::vector<std::thread> writers;
  std::vector<std::string> results(8);
  for (int i = 0; i < 8; ++i) {
    writers.emplace_back([&, i] { results[i] = KernelCache(counting.compiler(), dir).cubin(request()); });
  }
  for (std::thread& writer : writers) writer.join();
  for (const std::string& result : results) EXPECT_EQ(result, results[0]);
  const int before = counting.calls;
  EXPECT_EQ(KernelCache(counting.compiler(), dir).cubin(request()), results[0]);
  EXPECT_EQ(counting.calls, before) << "the entry on disk must be complete and valid";
}

// A stand-in whose compiles of "-DHEAD_DIM=64" and "-DHEAD_DIM=128" each wait (up to a few seconds) until the
// other has started: both finish quickly only if one cache runs them at the same time.
TEST(JitCache, DifferentKernelsCompileAtTheSameTime) {
  const ScratchDirectory scratch("parallel");
  std::atomic<int> started{0};
  Compiler rendezvous{"rendezvous", [&](const CompileRequest& request) {
                        ++started;
                        const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
                        while (started < 2 && std::chrono::steady_clock::now() < deadline) std::this_thread::yield();
                        return std::string(started >= 2 ? "together:" : "alone:") + request.options[0];
                      }};
  KernelCache cache(rendezvous, scratch.path);
  std::string wide, narrow;
  std::thread other([&] { wide = cache.cubin(request("-DHEAD_DIM=128")); });
  narrow = cache.cubin(request("-DHEAD_DIM=64"));
  other.join();
  EXPECT_EQ(narrow, "together:-DHEAD_DIM=64");
  EXPECT_EQ(wide, "together:-DHEAD_DIM=128");
}

// Threads asking for a kernel that one thread is compiling wait for that compile, its error included.
TEST(JitCache, ThreadsWantingTheSameKernelShareOneCompile) {
  const ScratchDirectory scratch("shared");
  for (const bool fails : {false, true}) {
    std::atomic<int> calls{0};
    Compiler slow{"slow", [&](const CompileRequest&) -> std::string {
                    ++calls;
                    std::this_thread::sleep_for(std::chrono::milliseconds(200));
                    if (fails) fail(FAP_ERROR_DEVICE, "nvrtcCompileProgram: broken");
                    return "CUBIN";
                  }};
    KernelCache cache(slow, scratch.path + (fails ? "/failing" : "/working"));
    std::vector<std::string> results(4);
    std::vector<std::thread> threads;
    for (int i = 0; i < 4; ++i) {
      threads.emplace_back([&, i] {
        try {
          results[i] = cache.cubin(request());
        } catch (const Error& error) {
          results[i] = error.what();
        }
      });
    }
    for (std::thread& thread : threads) thread.join();
    EXPECT_EQ(calls, 1);
    for (const std::string& result : results) EXPECT_EQ(result, fails ? "nvrtcCompileProgram: broken" : "CUBIN");
  }
}

TEST(JitCache, CompilerErrorsCarryTheLog) {
  const ScratchDirectory scratch("errors");
  const std::string& dir = scratch.path;
  Compiler failing{"failing", [](const CompileRequest&) -> std::string {
                     fail(FAP_ERROR_DEVICE, "nvrtcCompileProgram: error\nline 3: expected ';'");
                   }};
  KernelCache cache(failing, dir);
  try {
    cache.cubin(request());
    FAIL() << "expected an error";
  } catch (const Error& error) {
    EXPECT_EQ(error.status(), FAP_ERROR_DEVICE);
    EXPECT_NE(std::string(error.what()).find("expected ';'"), std::string::npos);
  }
}

TEST(JitCache, RealNvrtcCompilesForAmpereAndHopperAndTuringPtx) {
  std::string reason;
  if (!nvrtc(&reason)) GTEST_SKIP() << reason;
  const ScratchDirectory scratch("nvrtc");
  const std::string& dir = scratch.path;
  KernelCache cache(nvrtc_compiler(), dir);
  CompileRequest add{"add_one",
                     "extern \"C\" __global__ void add_one(float* x, int n) {\n"
                     "  int i = blockIdx.x * blockDim.x + threadIdx.x;\n"
                     "  if (i < n) x[i] += 1.0f;\n"
                     "}\n",
                     {},
                     "sm_80",
                     {}};
  const std::string ampere = cache.cubin(add);
  ASSERT_GT(ampere.size(), 4u);
  EXPECT_EQ(ampere.substr(1, 3), "ELF");
  add.arch = "sm_90a";
  EXPECT_EQ(cache.cubin(add).substr(1, 3), "ELF");
  CompileRequest turing_ptx = add;  // a virtual architecture: NUL-terminated PTX for the driver to translate
  turing_ptx.arch = "compute_75";
  const std::string ptx = cache.cubin(turing_ptx);
  EXPECT_NE(ptx.find(".target sm_75"), std::string::npos);
  EXPECT_NE(ptx.find(".entry add_one"), std::string::npos);
  EXPECT_EQ(ptx.back(), '\0');
  CompileRequest included = add;  // a translation unit of embedded headers, as the attention kernels are
  included.name = "add_one_included";
  included.source = "#include \"add.cuh\"\n";
  included.headers = {{"add.cuh", "#pragma once\n#include \"core/one.h\"\n"
                                  "extern \"C\" __global__ void add_one(float* x) { x[threadIdx.x] += kOne; }\n"},
                      {"core/one.h", "#pragma once\nconstexpr float kOne = 1.0f;\n"}};
  EXPECT_EQ(cache.cubin(included).substr(1, 3), "ELF");
  CompileRequest broken = add;
  broken.source = "__global__ void broken( {";
  try {
    cache.cubin(broken);
    FAIL() << "expected a compile error";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("nvrtcCompileProgram(add_one"), std::string::npos) << error.what();
  }
}

}  // namespace
}  // namespace fap::cuda
