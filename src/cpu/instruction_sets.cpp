#include "src/cpu/instruction_sets.h"

#include <cstdlib>
#include <mutex>

#include <hwy/targets.h>
#if FAP_WITH_LIBXSMM
#include <libxsmm.h>
#endif

namespace fap::cpu {

void limit_instruction_sets() {
  static std::once_flag once;
  std::call_once(once, [] {
    const char* value = std::getenv("FLASH_ATTENTION_PLUS_CPU_ISA");
    if (!value || std::string(value) != "avx2") return;
#if HWY_ARCH_X86
    hwy::DisableTargets(HWY_AVX2 - 1);  // the x86 targets above AVX2 (AVX-512 and later) have the lower bits
#endif
#if FAP_WITH_LIBXSMM
    libxsmm_init();  // else its initialisation, on first use, detects the CPU again
    libxsmm_set_target_arch("hsw");  // Haswell: AVX2 and FMA
#endif
  });
}

std::string instruction_sets() {
  const int64_t supported = hwy::SupportedTargets();
  std::string text = std::string("Highway ") + hwy::TargetName(supported & -supported);  // the best: lowest bit
#if FAP_WITH_LIBXSMM
  text += std::string(", libxsmm ") + libxsmm_get_target_arch();
#endif
  return text;
}

}  // namespace fap::cpu
