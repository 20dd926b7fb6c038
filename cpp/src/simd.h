// simd.h — <immintrin.h> for the per-ISA kernel files. GCC 12's AVX-512 headers trip
// -Wmaybe-uninitialized on their own _mm*_undefined_*() temporaries (GCC bug 105593); the warning
// points into the header, so it is silenced around the include only.
#pragma once

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#else
#include <immintrin.h>
#endif
