// Baseline x86-64 (SSE2) build of the kernels: runs on every x86-64 CPU.
#define DHSA_NS generic
#define DHSA_NAME "generic"
#define DHSA_VW 4
#define DHSA_ROWS 1
#define DHSA_VBLOCK 4
#define DHSA_KEY_TILE 32
#include "kernels.inc"
