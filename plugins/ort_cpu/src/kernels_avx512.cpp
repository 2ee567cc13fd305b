// AVX-512 build of the kernels (compiled with -mavx512f -mavx512vl -mavx512bw -mavx512dq -mfma;
// selected only when the CPU and the OS support AVX-512).
#define DHSA_NS avx512
#define DHSA_NAME "avx512"
#define DHSA_VW 16
#define DHSA_ROWS 6
#define DHSA_VBLOCK 4
#define DHSA_KEY_TILE 32
#include "kernels.inc"
