// AVX2 + FMA build of the kernels (compiled with -mavx2 -mfma; selected only when the CPU has both).
#define DHSA_NS avx2
#define DHSA_NAME "avx2"
#define DHSA_VW 8
#define DHSA_ROWS 3
#define DHSA_VBLOCK 4
#define DHSA_KEY_TILE 32
#include "kernels.inc"
