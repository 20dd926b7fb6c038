// nf4lora/format.h — the 4-bit format contract, bitsandbytes-compatible bit for bit.
// The ONLY place the NF4/FP4 codebooks, the 8-bit dynamic maps, the block constants, the nibble
// order and the scalar encode/decode are written. Shared by C++ and CUDA (host-device inline).
// Reference: bitsandbytes 0.50 (functional.get_4bit_type, create_dynamic_map, the default
// backend's quantize_4bit). Tested by tests/test_format.py (literal tables, map checksums).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define NF4LORA_HD __host__ __device__ __forceinline__
#else
#define NF4LORA_HD inline
#endif

namespace nf4lora {

// Numbering follows bitsandbytes' native ABI (1 = FP4, 2 = NF4).
enum class QuantType : int32_t { FP4 = 1, NF4 = 2 };

// Element types of float tensors crossing the native boundary.
enum class DType : int32_t { F32 = 0, F16 = 1, BF16 = 2 };

constexpr int64_t kMinBlocksize = 32;
constexpr int64_t kMaxBlocksize = 4096;
constexpr int64_t kDefaultBlocksize = 64;
constexpr int64_t kNestedBlocksize = 256;  // double quantization of the absmax values
constexpr int64_t kDynamicMapSize = 256;

constexpr bool is_pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }
constexpr bool valid_blocksize(int64_t b) {
  return b >= kMinBlocksize && b <= kMaxBlocksize && is_pow2(b);
}
constexpr int64_t num_blocks(int64_t n, int64_t blocksize) { return (n + blocksize - 1) / blocksize; }
constexpr int64_t packed_bytes(int64_t n) { return (n + 1) / 2; }

// Scaling: bitsandbytes multiplies by the reciprocal of max(absmax, 1e-38) (an fp32 subnormal),
// so an all-zero block scales to 0 and encodes the codebook's zero. The stored absmax stays the
// true max|x| (0 for an all-zero block).
constexpr float kMinAbsmax = 1e-38f;

// NF4 codebook, code 0..15 (sorted; code 7 is exactly 0).
#define NF4LORA_NF4_VALUES                                                          \
  -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,        \
      -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,   \
      0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f,            \
      0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,             \
      0.7229568362236023f, 1.0f

// FP4 (E2M1 with exponent bias 2, bit 3 = sign) in bit-pattern order, normalized by 12 in fp32.
// Code 8 is +0.0, not -0.0: bitsandbytes' table spells it as the Python integer -0, which is 0,
// and that table is what checkpoints carry as quant_map.
#define NF4LORA_FP4_VALUES                                                                   \
  0.0f / 12.0f, 0.0625f / 12.0f, 8.0f / 12.0f, 12.0f / 12.0f, 4.0f / 12.0f, 6.0f / 12.0f,   \
      2.0f / 12.0f, 3.0f / 12.0f, 0.0f / 12.0f, -0.0625f / 12.0f, -8.0f / 12.0f,            \
      -12.0f / 12.0f, -4.0f / 12.0f, -6.0f / 12.0f, -2.0f / 12.0f, -3.0f / 12.0f

// FP4 codes in ascending value order. The two zeros tie; code 0 sorts before code 8, as
// torch.argsort orders the table in bitsandbytes' CPU quantizer, so a scaled value in
// (-0.0026, 0] encodes as code 0 and one in (0, 0.0026] as code 8. (bitsandbytes' CUDA kernel
// sets the sign bit from x < 0 instead: same values, different bytes near zero.)
#define NF4LORA_FP4_ASCENDING 11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3

// bitsandbytes' signed "dynamic" 8-bit map, create_dynamic_map(signed=True): 256 sorted fp32
// values in [-0.99296874, 1]. Used by double quantization (and the 8-bit optimizer's first
// moment). sha256 of the fp32 bytes starts with e732639a65f497b4.
#define NF4LORA_DYNAMIC_SIGNED_VALUES \
    -0x1.fc6666p-1f, -0x1.f53334p-1f, -0x1.eep-1f, -0x1.e6ccccp-1f, \
    -0x1.df999ap-1f, -0x1.d86666p-1f, -0x1.d13334p-1f, -0x1.cap-1f, \
    -0x1.c2ccccp-1f, -0x1.bb999ap-1f, -0x1.b46666p-1f, -0x1.ad3334p-1f, \
    -0x1.a6p-1f, -0x1.9eccccp-1f, -0x1.97999ap-1f, -0x1.906666p-1f, \
    -0x1.893334p-1f, -0x1.82p-1f, -0x1.7accccp-1f, -0x1.73999ap-1f, \
    -0x1.6c6668p-1f, -0x1.653334p-1f, -0x1.5ep-1f, -0x1.56ccccp-1f, \
    -0x1.4f999ap-1f, -0x1.486668p-1f, -0x1.413334p-1f, -0x1.3ap-1f, \
    -0x1.32ccccp-1f, -0x1.2b999ap-1f, -0x1.246668p-1f, -0x1.1d3334p-1f, \
    -0x1.16p-1f, -0x1.0eccccp-1f, -0x1.079998p-1f, -0x1.006666p-1f, \
    -0x1.f26664p-2f, -0x1.e4p-2f, -0x1.d59998p-2f, -0x1.c73334p-2f, \
    -0x1.b8ccccp-2f, -0x1.aa6666p-2f, -0x1.9cp-2f, -0x1.8d9998p-2f, \
    -0x1.7f3334p-2f, -0x1.70ccccp-2f, -0x1.626666p-2f, -0x1.54p-2f, \
    -0x1.459998p-2f, -0x1.373334p-2f, -0x1.28ccccp-2f, -0x1.1a6668p-2f, \
    -0x1.0cp-2f, -0x1.fb3332p-3f, -0x1.de6666p-3f, -0x1.c1999ap-3f, \
    -0x1.a4ccccp-3f, -0x1.88p-3f, -0x1.6b3334p-3f, -0x1.4e6666p-3f, \
    -0x1.31999ap-3f, -0x1.14ccccp-3f, -0x1.fp-4f, -0x1.b66668p-4f, \
    -0x1.93d70ap-4f, -0x1.8851eep-4f, -0x1.7ccccep-4f, -0x1.7147aep-4f, \
    -0x1.65c29p-4f, -0x1.5a3d7p-4f, -0x1.4eb854p-4f, -0x1.433334p-4f, \
    -0x1.37ae14p-4f, -0x1.2c28f6p-4f, -0x1.20a3d6p-4f, -0x1.151ebap-4f, \
    -0x1.09999ap-4f, -0x1.fc28f6p-5f, -0x1.e51ebap-5f, -0x1.ce147ap-5f, \
    -0x1.b70a3ep-5f, -0x1.ap-5f, -0x1.88f5c2p-5f, -0x1.71eb86p-5f, \
    -0x1.5ae146p-5f, -0x1.43d70ap-5f, -0x1.2ccccep-5f, -0x1.15c29p-5f, \
    -0x1.fd70a4p-6f, -0x1.cf5c2ap-6f, -0x1.a147aep-6f, -0x1.733334p-6f, \
    -0x1.451ebap-6f, -0x1.170a3ep-6f, -0x1.d1eb86p-7f, -0x1.75c29p-7f, \
    -0x1.3e76c8p-7f, -0x1.2c083p-7f, -0x1.19999ap-7f, -0x1.072b02p-7f, \
    -0x1.e978d4p-8f, -0x1.c49ba6p-8f, -0x1.9fbe76p-8f, -0x1.7ae148p-8f, \
    -0x1.56041ap-8f, -0x1.3126e8p-8f, -0x1.0c49bap-8f, -0x1.ced914p-9f, \
    -0x1.851eb8p-9f, -0x1.3b645ap-9f, -0x1.e353f8p-10f, -0x1.4fdf3ap-10f, \
    -0x1.eecbfep-11f, -0x1.b3d07cp-11f, -0x1.78d5p-11f, -0x1.3dd982p-11f, \
    -0x1.02de02p-11f, -0x1.8fc506p-12f, -0x1.19ce0ap-12f, -0x1.47ae16p-13f, \
    -0x1.743e96p-14f, -0x1.15df66p-14f, -0x1.6f0068p-15f, -0x1.64840cp-16f, \
    -0x1.040bfep-17f, -0x1.b43528p-19f, -0x1.27476ep-21f, 0x0.0p+0f, \
    0x1.27476ep-21f, 0x1.b43528p-19f, 0x1.040bfep-17f, 0x1.64840cp-16f, \
    0x1.6f0068p-15f, 0x1.15df66p-14f, 0x1.743e96p-14f, 0x1.47ae16p-13f, \
    0x1.19ce0ap-12f, 0x1.8fc506p-12f, 0x1.02de02p-11f, 0x1.3dd982p-11f, \
    0x1.78d5p-11f, 0x1.b3d07cp-11f, 0x1.eecbfep-11f, 0x1.4fdf3ap-10f, \
    0x1.e353f8p-10f, 0x1.3b645ap-9f, 0x1.851eb8p-9f, 0x1.ced914p-9f, \
    0x1.0c49bap-8f, 0x1.3126e8p-8f, 0x1.56041ap-8f, 0x1.7ae148p-8f, \
    0x1.9fbe76p-8f, 0x1.c49ba6p-8f, 0x1.e978d4p-8f, 0x1.072b02p-7f, \
    0x1.19999ap-7f, 0x1.2c083p-7f, 0x1.3e76c8p-7f, 0x1.75c29p-7f, \
    0x1.d1eb86p-7f, 0x1.170a3ep-6f, 0x1.451ebap-6f, 0x1.733334p-6f, \
    0x1.a147aep-6f, 0x1.cf5c2ap-6f, 0x1.fd70a4p-6f, 0x1.15c29p-5f, \
    0x1.2ccccep-5f, 0x1.43d70ap-5f, 0x1.5ae146p-5f, 0x1.71eb86p-5f, \
    0x1.88f5c2p-5f, 0x1.ap-5f, 0x1.b70a3ep-5f, 0x1.ce147ap-5f, \
    0x1.e51ebap-5f, 0x1.fc28f6p-5f, 0x1.09999ap-4f, 0x1.151ebap-4f, \
    0x1.20a3d6p-4f, 0x1.2c28f6p-4f, 0x1.37ae14p-4f, 0x1.433334p-4f, \
    0x1.4eb854p-4f, 0x1.5a3d7p-4f, 0x1.65c29p-4f, 0x1.7147aep-4f, \
    0x1.7ccccep-4f, 0x1.8851eep-4f, 0x1.93d70ap-4f, 0x1.b66668p-4f, \
    0x1.fp-4f, 0x1.14ccccp-3f, 0x1.31999ap-3f, 0x1.4e6666p-3f, \
    0x1.6b3334p-3f, 0x1.88p-3f, 0x1.a4ccccp-3f, 0x1.c1999ap-3f, \
    0x1.de6666p-3f, 0x1.fb3332p-3f, 0x1.0cp-2f, 0x1.1a6668p-2f, \
    0x1.28ccccp-2f, 0x1.373334p-2f, 0x1.459998p-2f, 0x1.54p-2f, \
    0x1.626666p-2f, 0x1.70ccccp-2f, 0x1.7f3334p-2f, 0x1.8d9998p-2f, \
    0x1.9cp-2f, 0x1.aa6666p-2f, 0x1.b8ccccp-2f, 0x1.c73334p-2f, \
    0x1.d59998p-2f, 0x1.e4p-2f, 0x1.f26664p-2f, 0x1.006666p-1f, \
    0x1.079998p-1f, 0x1.0eccccp-1f, 0x1.16p-1f, 0x1.1d3334p-1f, \
    0x1.246668p-1f, 0x1.2b999ap-1f, 0x1.32ccccp-1f, 0x1.3ap-1f, \
    0x1.413334p-1f, 0x1.486668p-1f, 0x1.4f999ap-1f, 0x1.56ccccp-1f, \
    0x1.5ep-1f, 0x1.653334p-1f, 0x1.6c6668p-1f, 0x1.73999ap-1f, \
    0x1.7accccp-1f, 0x1.82p-1f, 0x1.893334p-1f, 0x1.906666p-1f, \
    0x1.97999ap-1f, 0x1.9eccccp-1f, 0x1.a6p-1f, 0x1.ad3334p-1f, \
    0x1.b46666p-1f, 0x1.bb999ap-1f, 0x1.c2ccccp-1f, 0x1.cap-1f, \
    0x1.d13334p-1f, 0x1.d86666p-1f, 0x1.df999ap-1f, 0x1.e6ccccp-1f, \
    0x1.eep-1f, 0x1.f53334p-1f, 0x1.fc6666p-1f, 0x1p+0f

// create_dynamic_map(signed=False): 256 sorted fp32 values in [0, 1] (the 8-bit optimizer's
// second moment). sha256 of the fp32 bytes starts with 305f002cc11278fb.
#define NF4LORA_DYNAMIC_UNSIGNED_VALUES \
    0x0.0p+0f, 0x1.5cf754p-22f, 0x1.a0133p-21f, 0x1.1d367p-19f, \
    0x1.2599ecp-18f, 0x1.bc98a2p-18f, 0x1.29cbaap-17f, 0x1.0624dcp-16f, \
    0x1.c2e34p-16f, 0x1.3fd0dp-15f, 0x1.9e3p-15f, 0x1.fc8f34p-15f, \
    0x1.2d7732p-14f, 0x1.5ca6c8p-14f, 0x1.8bd662p-14f, 0x1.0cb296p-13f, \
    0x1.82a994p-13f, 0x1.f8a092p-13f, 0x1.374bc8p-12f, 0x1.724744p-12f, \
    0x1.ad42c6p-12f, 0x1.e83e44p-12f, 0x1.119ce2p-11f, 0x1.2f1aap-11f, \
    0x1.4c986p-11f, 0x1.6a162p-11f, 0x1.8793dep-11f, 0x1.a511ap-11f, \
    0x1.c28f5ep-11f, 0x1.e00d1cp-11f, 0x1.fd8adcp-11f, 0x1.2b020cp-10f, \
    0x1.74bc6ap-10f, 0x1.be76c8p-10f, 0x1.041894p-9f, 0x1.28f5c2p-9f, \
    0x1.4dd2fp-9f, 0x1.72b02p-9f, 0x1.978d4ep-9f, 0x1.bc6a8p-9f, \
    0x1.e147aep-9f, 0x1.03126ep-8f, 0x1.158104p-8f, 0x1.27ef9ep-8f, \
    0x1.3a5e34p-8f, 0x1.4cccccp-8f, 0x1.5f3b64p-8f, 0x1.71a9fap-8f, \
    0x1.841894p-8f, 0x1.96872ap-8f, 0x1.a8f5c2p-8f, 0x1.bb645cp-8f, \
    0x1.cdd2fp-8f, 0x1.e0418ap-8f, 0x1.f2b01ep-8f, 0x1.028f5cp-7f, \
    0x1.0bc6a8p-7f, 0x1.14fdf2p-7f, 0x1.1e354p-7f, 0x1.276c8ap-7f, \
    0x1.30a3d6p-7f, 0x1.39db24p-7f, 0x1.43126ep-7f, 0x1.5eb854p-7f, \
    0x1.8ccccep-7f, 0x1.bae146p-7f, 0x1.e8f5c4p-7f, 0x1.0b851ep-6f, \
    0x1.228f5ep-6f, 0x1.39999ap-6f, 0x1.50a3d6p-6f, 0x1.67ae16p-6f, \
    0x1.7eb852p-6f, 0x1.95c28ep-6f, 0x1.accccep-6f, 0x1.c3d70ep-6f, \
    0x1.dae146p-6f, 0x1.f1eb86p-6f, 0x1.047aep-5f, 0x1.1p-5f, \
    0x1.1b851ep-5f, 0x1.270a3ep-5f, 0x1.328f5ep-5f, 0x1.3e147ap-5f, \
    0x1.49999ap-5f, 0x1.551eb8p-5f, 0x1.60a3d6p-5f, 0x1.6c28f6p-5f, \
    0x1.77ae14p-5f, 0x1.833334p-5f, 0x1.8eb85p-5f, 0x1.9a3d7p-5f, \
    0x1.a5c28ep-5f, 0x1.b147aep-5f, 0x1.bccccep-5f, 0x1.c851eep-5f, \
    0x1.d3d70ep-5f, 0x1.df5c2ap-5f, 0x1.eae146p-5f, 0x1.f66666p-5f, \
    0x1.00f5c4p-4f, 0x1.06b854p-4f, 0x1.0c7ae2p-4f, 0x1.123d7p-4f, \
    0x1.18p-4f, 0x1.1dc29p-4f, 0x1.23852p-4f, 0x1.2947aep-4f, \
    0x1.2f0a3ep-4f, 0x1.34cccep-4f, 0x1.3a8f5ep-4f, 0x1.4051ecp-4f, \
    0x1.46147cp-4f, 0x1.4bd70ap-4f, 0x1.51999ap-4f, 0x1.575c2ap-4f, \
    0x1.5d1eb8p-4f, 0x1.62e148p-4f, 0x1.68a3d6p-4f, 0x1.6e6666p-4f, \
    0x1.7428f6p-4f, 0x1.79eb86p-4f, 0x1.7fae16p-4f, 0x1.8570a4p-4f, \
    0x1.8b3334p-4f, 0x1.90f5c4p-4f, 0x1.96b852p-4f, 0x1.a8p-4f, \
    0x1.c4ccccp-4f, 0x1.e1999ap-4f, 0x1.fe6666p-4f, 0x1.0d9998p-3f, \
    0x1.1cp-3f, 0x1.2a6668p-3f, 0x1.38ccccp-3f, 0x1.473334p-3f, \
    0x1.559998p-3f, 0x1.64p-3f, 0x1.726668p-3f, 0x1.80ccccp-3f, \
    0x1.8f3334p-3f, 0x1.9d9998p-3f, 0x1.acp-3f, 0x1.ba6668p-3f, \
    0x1.c8ccccp-3f, 0x1.d73334p-3f, 0x1.e59998p-3f, 0x1.f4p-3f, \
    0x1.013332p-2f, 0x1.086666p-2f, 0x1.0f999ap-2f, 0x1.16ccccp-2f, \
    0x1.1ep-2f, 0x1.253334p-2f, 0x1.2c6666p-2f, 0x1.339998p-2f, \
    0x1.3accccp-2f, 0x1.42p-2f, 0x1.493334p-2f, 0x1.506666p-2f, \
    0x1.579998p-2f, 0x1.5eccccp-2f, 0x1.66p-2f, 0x1.6d3334p-2f, \
    0x1.746666p-2f, 0x1.7b9998p-2f, 0x1.82ccccp-2f, 0x1.8ap-2f, \
    0x1.913334p-2f, 0x1.986666p-2f, 0x1.9f9998p-2f, 0x1.a6ccccp-2f, \
    0x1.aep-2f, 0x1.b53334p-2f, 0x1.bc6666p-2f, 0x1.c39998p-2f, \
    0x1.caccccp-2f, 0x1.d2p-2f, 0x1.d93334p-2f, 0x1.e06666p-2f, \
    0x1.e79998p-2f, 0x1.eeccccp-2f, 0x1.f6p-2f, 0x1.fd3332p-2f, \
    0x1.023334p-1f, 0x1.05ccccp-1f, 0x1.096666p-1f, 0x1.0dp-1f, \
    0x1.109998p-1f, 0x1.143334p-1f, 0x1.17ccccp-1f, 0x1.1b6668p-1f, \
    0x1.1fp-1f, 0x1.22999ap-1f, 0x1.263334p-1f, 0x1.29ccccp-1f, \
    0x1.2d6668p-1f, 0x1.31p-1f, 0x1.34999ap-1f, 0x1.383334p-1f, \
    0x1.3bccccp-1f, 0x1.3f6668p-1f, 0x1.43p-1f, 0x1.46999ap-1f, \
    0x1.4a3334p-1f, 0x1.4dccccp-1f, 0x1.516668p-1f, 0x1.55p-1f, \
    0x1.58999ap-1f, 0x1.5c3334p-1f, 0x1.5fccccp-1f, 0x1.636668p-1f, \
    0x1.67p-1f, 0x1.6a999ap-1f, 0x1.6e3334p-1f, 0x1.71ccccp-1f, \
    0x1.756668p-1f, 0x1.79p-1f, 0x1.7c999ap-1f, 0x1.803334p-1f, \
    0x1.83ccccp-1f, 0x1.876668p-1f, 0x1.8bp-1f, 0x1.8e9998p-1f, \
    0x1.923334p-1f, 0x1.95ccccp-1f, 0x1.996668p-1f, 0x1.9dp-1f, \
    0x1.a09998p-1f, 0x1.a43334p-1f, 0x1.a7ccccp-1f, 0x1.ab6668p-1f, \
    0x1.afp-1f, 0x1.b29998p-1f, 0x1.b63334p-1f, 0x1.b9ccccp-1f, \
    0x1.bd6668p-1f, 0x1.c1p-1f, 0x1.c49998p-1f, 0x1.c83334p-1f, \
    0x1.cbccccp-1f, 0x1.cf6668p-1f, 0x1.d3p-1f, 0x1.d69998p-1f, \
    0x1.da3334p-1f, 0x1.ddccccp-1f, 0x1.e16668p-1f, 0x1.e5p-1f, \
    0x1.e89998p-1f, 0x1.ec3334p-1f, 0x1.efccccp-1f, 0x1.f36668p-1f, \
    0x1.f7p-1f, 0x1.fa9998p-1f, 0x1.fe3334p-1f, 0x1p+0f

// Host-side tables (device code goes through the functions below, which hold their own copy of
// the same macro expansion so that nvcc can place them in constant memory).
inline constexpr float kNF4Codebook[16] = {NF4LORA_NF4_VALUES};
inline constexpr float kFP4Codebook[16] = {NF4LORA_FP4_VALUES};
inline constexpr int kFP4Ascending[16] = {NF4LORA_FP4_ASCENDING};
inline constexpr float kDynamicSigned[256] = {NF4LORA_DYNAMIC_SIGNED_VALUES};
inline constexpr float kDynamicUnsigned[256] = {NF4LORA_DYNAMIC_UNSIGNED_VALUES};

NF4LORA_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  return u;
#endif
}
NF4LORA_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
#endif
}

// Nibble order: element 2i sits in the HIGH nibble of byte i, element 2i+1 in the LOW nibble.
NF4LORA_HD uint8_t pack_nibbles(uint8_t even, uint8_t odd) { return (uint8_t)((even << 4) | odd); }
NF4LORA_HD uint8_t high_nibble(uint8_t b) { return (uint8_t)(b >> 4); }
NF4LORA_HD uint8_t low_nibble(uint8_t b) { return (uint8_t)(b & 0x0F); }

NF4LORA_HD float codebook_value(QuantType qt, int code) {
  constexpr float nf4[16] = {NF4LORA_NF4_VALUES};
  constexpr float fp4[16] = {NF4LORA_FP4_VALUES};
  return qt == QuantType::NF4 ? nf4[code & 15] : fp4[code & 15];
}

// Decision thresholds: the fp32 midpoints between adjacent codebook values in ascending order,
// (a + b) / 2 evaluated in fp32 exactly as bitsandbytes' bucketize bounds are.
NF4LORA_HD float threshold(QuantType qt, int i) {
  constexpr float nf4[16] = {NF4LORA_NF4_VALUES};
  constexpr float fp4[16] = {NF4LORA_FP4_VALUES};
  constexpr int asc[16] = {NF4LORA_FP4_ASCENDING};
  return qt == QuantType::NF4 ? (nf4[i] + nf4[i + 1]) / 2.0f
                              : (fp4[asc[i]] + fp4[asc[i + 1]]) / 2.0f;
}

// Scaled value (x * (1/absmax)) to 4-bit code: the nearest codebook value; a value exactly on a
// midpoint takes the lower one; NaN takes code of -1.0. `rank` counts thresholds strictly below x.
NF4LORA_HD int encode_rank(QuantType qt, float scaled) {
  int rank = 0;
  for (int i = 0; i < 15; ++i) rank += scaled > threshold(qt, i) ? 1 : 0;
  return rank;
}
NF4LORA_HD uint8_t rank_to_code(QuantType qt, int rank) {
  constexpr int asc[16] = {NF4LORA_FP4_ASCENDING};
  return (uint8_t)(qt == QuantType::NF4 ? rank : asc[rank]);
}
NF4LORA_HD uint8_t encode_4bit(QuantType qt, float scaled) {
  return rank_to_code(qt, encode_rank(qt, scaled));
}

// Reciprocal used for scaling a block; kept as one function so every kernel rounds alike.
NF4LORA_HD float block_scale(float absmax) {
  return 1.0f / (absmax > kMinAbsmax ? absmax : kMinAbsmax);
}

NF4LORA_HD float decode_4bit(QuantType qt, int code, float absmax) {
  return codebook_value(qt, code) * absmax;
}

// Double quantization: absmax[i] = map[q[i]] * nested_absmax[i / nested_blocksize] + offset,
// rounded to fp32 after the product and again after the sum (two operations, never an FMA:
// bitsandbytes dequantizes the 8-bit absmax first and adds the offset in a second pass).
NF4LORA_HD float decode_nested_absmax(float map_value, float nested_absmax, float offset) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(map_value, nested_absmax), offset);
#else
  volatile float product = map_value * nested_absmax;  // no contraction into an FMA
  return product + offset;
#endif
}

// Decision threshold between entries j and j + 1 of a sorted 256-value map: their fp32 midpoint.
NF4LORA_HD float midpoint_8bit(const float* sorted_code, int j) {
  return (sorted_code[j] + sorted_code[j + 1]) / 2.0f;
}

// Nearest entry of a sorted 256-value map (ties to the lower index), by binary search over the
// 255 midpoints (mids[j] = midpoint_8bit(code, j)); NaN maps to index 0. Branch-free steps.
NF4LORA_HD uint8_t encode_8bit_mids(const float* mids, float scaled) {
  int lo = 0;
  for (int step = 128; step >= 1; step >>= 1)  // lo + step - 1 <= 254
    lo += scaled > mids[lo + step - 1] ? step : 0;
  return (uint8_t)lo;
}

// The same, computing each midpoint on the fly from the map itself.
NF4LORA_HD uint8_t encode_8bit(const float* sorted_code, float scaled) {
  int lo = 0;
  for (int step = 128; step >= 1; step >>= 1)
    lo += scaled > midpoint_8bit(sorted_code, lo + step - 1) ? step : 0;
  return (uint8_t)lo;
}

// IEEE fp32 -> bf16 / fp16 with round-to-nearest-even, as torch's .to() does.
NF4LORA_HD uint16_t float_to_bf16_bits(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}
NF4LORA_HD float bf16_bits_to_float(uint16_t h) {
  return bits_float((uint32_t)h << 16);
}

// IEEE fp32 -> fp16 with round-to-nearest-even (overflow to inf, NaN stays NaN), and back.
NF4LORA_HD uint16_t float_to_half_bits(float f) {
  uint32_t u = float_bits(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint32_t h;
  if (u >= (143u << 23)) {  // |f| >= 65536: inf, or NaN
    h = u > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (u < (113u << 23)) {  // |f| < 2^-14: subnormal half; let the fp32 adder round
    const uint32_t magic_bits = 126u << 23;  // 0.5f
    h = float_bits(bits_float(u) + bits_float(magic_bits)) - magic_bits;
  } else {
    const uint32_t mant_odd = (u >> 13) & 1u;
    u += (uint32_t)(-(112 << 23)) + 0xfffu + mant_odd;  // rebias the exponent, round to even
    h = u >> 13;
  }
  return (uint16_t)(h | (sign >> 16));
}
NF4LORA_HD float half_bits_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  uint32_t u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {
    u = sign;
  } else {  // subnormal half: mant * 2^-24, exact in fp32
    u = float_bits((float)mant * (1.0f / 16777216.0f)) | sign;
  }
  return bits_float(u);
}

}  // namespace nf4lora
