// The instruction sets the CPU backend runs: everything the CPU has, or AVX2 at most where
// FLASH_ATTENTION_PLUS_CPU_ISA=avx2 (the code x86-64 CPUs without AVX-512 run, for tests and comparisons on a
// machine that has it). Highway's dispatch and libxsmm's code generation both follow it.
#pragma once

#include <string>

namespace fap::cpu {

// Reads FLASH_ATTENTION_PLUS_CPU_ISA once and applies it; called when the CPU backend is created, before any of
// its kernels runs. Other values than "avx2" leave every instruction set on.
void limit_instruction_sets();

// The instruction sets in use, e.g. "Highway AVX3, libxsmm cpx".
std::string instruction_sets();

}  // namespace fap::cpu
