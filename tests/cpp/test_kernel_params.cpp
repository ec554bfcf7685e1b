// The torch-free helpers every kernel relies on: sizes, offsets, sequence ranges, and the
// bf16 / fp16 conversions of the CPU kernels.
#include <cmath>
#include <cstdint>
#include <limits>

#include "catch.h"
#include "nsa/cpu/numeric.h"
#include "nsa/params.h"

using namespace nsa;

TEST_CASE("num_cmp_tokens and num_select_blocks follow docs/design.md section 1", "[params]") {
  // Nc(T) = (T - l) // d + 1 for T >= l, else 0.
  CHECK(num_cmp_tokens(0, 32, 16) == 0);
  CHECK(num_cmp_tokens(31, 32, 16) == 0);
  CHECK(num_cmp_tokens(32, 32, 16) == 1);
  CHECK(num_cmp_tokens(47, 32, 16) == 1);
  CHECK(num_cmp_tokens(48, 32, 16) == 2);
  CHECK(num_cmp_tokens(65536, 32, 16) == 4095);
  CHECK(num_cmp_tokens(int64_t(1) << 33, 32, 16) == ((int64_t(1) << 33) - 32) / 16 + 1);
  CHECK(num_select_blocks(0, 64) == 0);
  CHECK(num_select_blocks(1, 64) == 1);
  CHECK(num_select_blocks(64, 64) == 1);
  CHECK(num_select_blocks(65, 64) == 2);
}

TEST_CASE("View offsets are int64 element offsets", "[params]") {
  View v;
  v.batch_stride = int64_t(1) << 31;  // past int32: T = 128k, HQ = 128, D = 128
  v.row_stride = 128 * 128;
  v.head_stride = 128;
  CHECK(v.offset(1, 2, 3) == (int64_t(1) << 31) + 2 * 128 * 128 + 3 * 128);
  CHECK(v.offset(3, 131071, 127) == 3 * (int64_t(1) << 31) + int64_t(131071) * 16384 + 127 * 128);
  float buf[8] = {};
  View w{buf, 4, 2, 1};
  CHECK(w.ptr<float>(1, 1, 1) == buf + 7);
}

TEST_CASE("Seqs::range: fixed-length batch and packed varlen", "[params]") {
  Seqs fixed;
  fixed.batch = 3;
  fixed.num_seqs = 3;
  fixed.seqlen = 100;
  fixed.cmp_seqlen = 5;
  const SeqRange r = fixed.range(2);
  CHECK(r.batch == 2);
  CHECK(r.start == 0);
  CHECK(r.len == 100);
  CHECK(r.cmp_start == 0);
  CHECK(r.cmp_len == 5);

  const int32_t cu[] = {0, 0, 1, 40, 100};  // an empty and a length-1 sequence
  const int32_t cu_cmp[] = {0, 0, 0, 1, 5};
  Seqs packed;
  packed.batch = 1;
  packed.num_seqs = 4;
  packed.seqlen = 100;
  packed.cu_seqlens = cu;
  packed.cu_seqlens_cmp = cu_cmp;
  const int64_t expect[4][5] = {{0, 0, 0, 0, 0}, {0, 0, 1, 0, 0}, {0, 1, 39, 0, 1}, {0, 40, 60, 1, 4}};
  for (int s = 0; s < 4; ++s) {
    const SeqRange q = packed.range(s);
    CHECK(q.batch == expect[s][0]);
    CHECK(q.start == expect[s][1]);
    CHECK(q.len == expect[s][2]);
    CHECK(q.cmp_start == expect[s][3]);
    CHECK(q.cmp_len == expect[s][4]);
  }
  packed.cu_seqlens_cmp = nullptr;  // branches without compressed rows
  CHECK(packed.range(3).cmp_len == 0);
}

TEST_CASE("bf16 conversion rounds to nearest even and keeps specials", "[numeric]") {
  using cpu::bf16;
  using cpu::to_bf16;
  using cpu::to_float;
  CHECK(to_float(to_bf16(1.0f)) == 1.0f);
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1). 1 + 3 * 2^-8 ties up.
  CHECK(to_float(to_bf16(1.0f + std::ldexp(1.0f, -8))) == 1.0f);
  CHECK(to_float(to_bf16(1.0f + 3 * std::ldexp(1.0f, -8))) == 1.0f + std::ldexp(1.0f, -6));
  CHECK(std::isinf(to_float(to_bf16(std::numeric_limits<float>::infinity()))));
  CHECK(std::isnan(to_float(to_bf16(std::numeric_limits<float>::quiet_NaN()))));
  CHECK(to_float(to_bf16(-2.5f)) == -2.5f);
}

TEST_CASE("fp16 conversion: normals, subnormals, overflow, specials", "[numeric]") {
  using cpu::fp16;
  using cpu::to_float;
  using cpu::to_fp16;
  CHECK(to_fp16(1.0f).bits == 0x3c00);
  CHECK(to_fp16(-2.0f).bits == 0xc000);
  CHECK(to_fp16(65504.0f).bits == 0x7bff);             // largest finite
  CHECK(to_fp16(65520.0f).bits == 0x7c00);             // rounds to inf
  CHECK(to_fp16(std::ldexp(1.0f, -24)).bits == 0x0001);  // smallest subnormal
  CHECK(to_fp16(std::ldexp(1.0f, -26)).bits == 0x0000);  // below half of it: 0
  CHECK(to_fp16(std::ldexp(1.0f, -14)).bits == 0x0400);  // smallest normal
  // 1 + 2^-11 is halfway between 1 and the next fp16: ties to even.
  CHECK(to_fp16(1.0f + std::ldexp(1.0f, -11)).bits == 0x3c00);
  CHECK(to_fp16(1.0f + 3 * std::ldexp(1.0f, -11)).bits == 0x3c02);
  CHECK(std::isnan(to_float(to_fp16(std::numeric_limits<float>::quiet_NaN()))));
  CHECK(std::isinf(to_float(to_fp16(-std::numeric_limits<float>::infinity()))));
  // Every fp16 value survives a round trip through float.
  for (uint32_t bits = 0; bits < 0x10000; ++bits) {
    const fp16 h{uint16_t(bits)};
    const float f = to_float(h);
    if (std::isnan(f)) continue;
    CHECK(to_fp16(f).bits == h.bits);
  }
}
