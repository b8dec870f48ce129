// kernels_avx2.cpp — the leaf loops built for x86-64 with AVX2 and FMA (compiled with -mavx2 -mfma).
#define TRIM_ISA avx2
#include "kernels_impl.h"
