// The kernel plan (nsa/plan.h): which CUDA kernel each shape gets on an sm_90 GPU with 132 SMs
// (H100 SXM) and on sm_80, and which overrides are accepted or refused, and why.
#include <stdexcept>
#include <string>
#include <utility>

#include "catch.h"
#include "nsa/cuda/decode/choices.h"
#include "nsa/plan.h"

using namespace nsa;

namespace {

const DeviceFacts kH100{90, 132, 227 * 1024, 228 * 1024};
const DeviceFacts kA100{80, 108, 163 * 1024, 164 * 1024};

// A fixed-length batch of B x T tokens, HQ = 64 query heads in groups of G.
template <typename P>
P attn_shape(int G, int D, int DV, index_t T = 4096, int B = 1) {
  P p;
  p.seqs.batch = B;
  p.seqs.num_seqs = B;
  p.seqs.seqlen = T;
  p.num_heads = 64;
  p.num_heads_k = 64 / G;
  p.head_dim = D;
  p.head_dim_v = DV;
  return p;
}

SlcParams slc_shape(int G, int D = 128, int DV = 128, index_t T = 4096) {
  SlcParams p = attn_shape<SlcParams>(G, D, DV, T);
  p.select_size = 64;
  p.num_selected = 16;
  return p;
}

TopkParams topk_shape(int G, int D = 128) {
  TopkParams p;
  p.seqs.batch = 1;
  p.seqs.num_seqs = 1;
  p.seqs.seqlen = 4096;
  p.num_heads = 64;
  p.num_heads_k = 64 / G;
  p.head_dim = D;
  return p;
}

PlanOverrides with(const std::string& key, const std::string& value) {
  PlanOverrides o;
  set_override(o, key, value);
  return o;
}

PlanOverrides with(const std::string& key, int64_t value) {
  PlanOverrides o;
  set_override(o, key, value);
  return o;
}

// A decode step of B sequences (S new tokens each) over caches of `capacity` tokens: HQ = 64 query
// heads in groups of G, D = Dv = 128, the paper's hyper-parameters (l = 32, d = 16, l' = 64,
// n = 16, w = 512).
DecodeParams decode_shape(int B, index_t capacity, int G = 16, int S = 1) {
  DecodeParams p;
  p.batch = B;
  p.num_queries = S;
  p.num_heads = 64;
  p.num_heads_k = 64 / G;
  p.head_dim = 128;
  p.head_dim_v = 128;
  p.capacity = capacity;
  p.page_size = capacity;
  p.cmp_capacity = num_cmp_tokens(capacity, p.block_size, p.block_stride);
  return p;
}

// The message of the std::invalid_argument that f throws ("" when it throws none).
template <typename F>
std::string refusal(F&& f) {
  try {
    f();
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

const int kGroups[] = {1, 2, 4, 8, 16, 32, 64};
const std::pair<int, int> kWgmmaDims[] = {{64, 64}, {64, 128}, {128, 64}, {128, 128}};

}  // namespace

TEST_CASE("plan: forward of the compressed and window branches", "[plan]") {
  const PlanOverrides none;
  for (int G : kGroups) {
    CAPTURE(G);
    for (auto [D, DV] : kWgmmaDims) {
      CAPTURE(D, DV);
      CHECK(plan_cmp(attn_shape<CmpParams>(G, D, DV), Pass::kFwd, kH100, none).fwd == FwdKernel::kWgmma);
      CHECK(plan_swa(attn_shape<SwaParams>(G, D, DV), Pass::kFwd, kH100, none).fwd == FwdKernel::kWgmma);
      CHECK(plan_cmp(attn_shape<CmpParams>(G, D, DV), Pass::kFwd, kA100, none).fwd == FwdKernel::kWide);
      CHECK(plan_swa(attn_shape<SwaParams>(G, D, DV), Pass::kFwd, kA100, none).fwd == FwdKernel::kWide);
    }
    // (96, 96): no warpgroup kernel, the wide one; (192, 128) and (256, 256): the 16-row one.
    CHECK(plan_cmp(attn_shape<CmpParams>(G, 96, 96), Pass::kFwd, kH100, none).fwd == FwdKernel::kWide);
    CHECK(plan_swa(attn_shape<SwaParams>(G, 96, 96), Pass::kBwd, kH100, none).bwd == BwdKernel::kMma);
    CHECK(plan_swa(attn_shape<SwaParams>(G, 256, 256), Pass::kFwd, kH100, none).fwd == FwdKernel::kMma);
    CHECK(plan_cmp(attn_shape<CmpParams>(G, 192, 128), Pass::kFwd, kH100, none).fwd == FwdKernel::kMma);
    CHECK(plan_swa(attn_shape<SwaParams>(G, 192, 128), Pass::kFwd, kA100, none).fwd == FwdKernel::kMma);
  }
}

TEST_CASE("plan: backward kernels and the dK/dV split by T", "[plan]") {
  const PlanOverrides none;
  const AttnPlan h = plan_cmp(attn_shape<CmpParams>(16, 128, 128), Pass::kBwd, kH100, none);
  CHECK(h.bwd == BwdKernel::kWgmma);
  CHECK(plan_cmp(attn_shape<CmpParams>(16, 128, 128), Pass::kBwd, kA100, none).bwd == BwdKernel::kMma);
  CHECK(plan_swa(attn_shape<SwaParams>(4, 192, 128), Pass::kBwd, kH100, none).bwd == BwdKernel::kMma);
  CHECK(plan_slc(slc_shape(16), Pass::kBwd, kH100, none).bwd == BwdKernel::kWgmma);
  CHECK(plan_slc(slc_shape(16, 192, 128), Pass::kBwd, kH100, none).bwd == BwdKernel::kMma);

  // Ranges of 4096 tokens, 16 at most; none below 2 * 4096 tokens, none for the window branch.
  CHECK(h.split_tokens == 4096);
  CHECK(h.split == 1);
  CHECK(plan_cmp(attn_shape<CmpParams>(16, 128, 128, 8192), Pass::kBwd, kH100, none).split == 2);
  CHECK(plan_cmp(attn_shape<CmpParams>(16, 128, 128, 65536), Pass::kBwd, kH100, none).split == 16);
  CHECK(plan_cmp(attn_shape<CmpParams>(16, 128, 128, 1 << 20), Pass::kBwd, kH100, none).split == 16);
  CHECK(plan_slc(slc_shape(16, 128, 128, 16384), Pass::kBwd, kA100, none).split == 4);
  CHECK(plan_swa(attn_shape<SwaParams>(16, 128, 128, 65536), Pass::kBwd, kH100, none).split == 1);
  CHECK(plan_cmp(attn_shape<CmpParams>(16, 128, 128, 65536), Pass::kFwd, kH100, none).split == 1);

  PlanOverrides o;
  set_override(o, "split_tokens", int64_t(64));
  CHECK(plan_cmp(attn_shape<CmpParams>(16, 128, 128, 300), Pass::kBwd, kH100, o).split == 4);
  CHECK(plan_swa(attn_shape<SwaParams>(16, 128, 128, 300), Pass::kBwd, kH100, o).split == 1);
  set_override(o, "split_tokens", int64_t(0));
  const AttnPlan off = plan_cmp(attn_shape<CmpParams>(16, 128, 128, 65536), Pass::kBwd, kH100, o);
  CHECK(off.split_tokens == 0);
  CHECK(off.split == 1);
}

TEST_CASE("plan: the selected branch by G, GPU and head dims", "[plan]") {
  const PlanOverrides none;
  for (int G : kGroups) {
    CAPTURE(G);
    const SlcKernel tokens = G < 64 ? SlcKernel::kWarp : SlcKernel::kUnion;
    const SlcKernel h100 = G < 16 ? SlcKernel::kBlocks : tokens;
    const AttnPlan fwd = plan_slc(slc_shape(G), Pass::kFwd, kH100, none);
    const AttnPlan bwd = plan_slc(slc_shape(G), Pass::kBwd, kH100, none);
    CHECK(fwd.slc_fwd == h100);
    CHECK(bwd.slc_dq == h100);
    CHECK((fwd.slc_chunk_rows > 0) == (G < 16));
    CHECK(plan_slc(slc_shape(G), Pass::kFwd, kA100, none).slc_fwd == tokens);
    CHECK(plan_slc(slc_shape(G), Pass::kBwd, kA100, none).slc_dq == tokens);
    CHECK(plan_slc(slc_shape(G, 192, 128), Pass::kFwd, kH100, none).slc_fwd == tokens);
    CHECK(plan_slc(slc_shape(G, 64, 128), Pass::kFwd, kH100, none).slc_fwd == h100);
  }
  // By blocks needs select_size within [32, 256], and something to compute.
  SlcParams p = slc_shape(4);
  p.select_size = 16;
  CHECK(plan_slc(p, Pass::kFwd, kH100, none).slc_fwd == SlcKernel::kWarp);
  p.select_size = 512;
  CHECK(plan_slc(p, Pass::kBwd, kH100, none).slc_dq == SlcKernel::kWarp);
  CHECK(plan_slc(slc_shape(4, 128, 128, 0), Pass::kFwd, kH100, none).slc_fwd == SlcKernel::kWarp);
}

TEST_CASE("plan: chunk rows of the selected branch by blocks", "[plan]") {
  const PlanOverrides none;
  // Per row: HQ x n x tiles per block slots of Dv 16-bit outputs and an fp32 lse (forward) or of
  // D bf16 dQ values; chunks stay under 2 GiB and within [1, B * T].
  const SlcParams p = slc_shape(4, 128, 64, 1 << 20);
  const index_t fwd_row = 64 * 16 * (64 * 2 + 4), dq_row = 64 * 16 * (128 * 2);
  const index_t fwd_rows = plan_slc(p, Pass::kFwd, kH100, none).slc_chunk_rows;
  const index_t dq_rows = plan_slc(p, Pass::kBwd, kH100, none).slc_chunk_rows;
  CHECK(fwd_rows == (index_t(2) << 30) / fwd_row);
  CHECK(dq_rows == (index_t(2) << 30) / dq_row);
  CHECK(fwd_rows * fwd_row <= index_t(kSlcPartialBytes));
  CHECK((fwd_rows + 1) * fwd_row > index_t(kSlcPartialBytes));
  CHECK(plan_slc(slc_shape(4, 128, 128, 100), Pass::kFwd, kH100, none).slc_chunk_rows == 100);

  PlanOverrides o;
  set_override(o, "slc_chunk_rows", int64_t(70));
  CHECK(plan_slc(slc_shape(4), Pass::kFwd, kH100, o).slc_chunk_rows == 70);
  CHECK(plan_slc(slc_shape(4), Pass::kBwd, kH100, o).slc_chunk_rows == 70);
  CHECK(plan_slc(slc_shape(4, 128, 128, 50), Pass::kFwd, kH100, o).slc_chunk_rows == 50);
  CHECK(plan_slc(slc_shape(16), Pass::kFwd, kH100, o).slc_chunk_rows == 0);  // by tokens
}

TEST_CASE("plan: block selection", "[plan]") {
  const PlanOverrides none;
  for (int G : kGroups) {
    CAPTURE(G);
    const SelectKernel h100 = G == 16 || G == 32 ? SelectKernel::kWgmma : SelectKernel::kMma;
    CHECK(plan_select(topk_shape(G, 64), kH100, none).select == h100);
    CHECK(plan_select(topk_shape(G, 128), kH100, none).select == h100);
    CHECK(plan_select(topk_shape(G, 192), kH100, none).select == SelectKernel::kMma);
    CHECK(plan_select(topk_shape(G, 128), kA100, none).select == SelectKernel::kMma);
  }
  TopkParams p = topk_shape(16);
  p.block_size = 1024;
  p.block_stride = 1;  // a window of 1023 compressed rows per token: beyond the default's bound
  CHECK(plan_select(p, kH100, none).select == SelectKernel::kMma);
  CHECK(plan_select(p, kH100, with("select", "wgmma")).select == SelectKernel::kWgmma);
  CHECK(plan_select(topk_shape(64), kH100, with("select", "mma")).select == SelectKernel::kMma);
}

TEST_CASE("plan: overrides accepted where the kernel can run", "[plan]") {
  CHECK(plan_cmp(attn_shape<CmpParams>(16, 128, 128), Pass::kFwd, kH100, with("fwd", "wide")).fwd == FwdKernel::kWide);
  CHECK(plan_swa(attn_shape<SwaParams>(16, 128, 128), Pass::kFwd, kH100, with("fwd", "mma")).fwd == FwdKernel::kMma);
  CHECK(plan_swa(attn_shape<SwaParams>(4, 192, 128), Pass::kFwd, kA100, with("fwd", "mma")).fwd == FwdKernel::kMma);
  CHECK(plan_cmp(attn_shape<CmpParams>(16, 64, 64), Pass::kBwd, kH100, with("bwd", "mma")).bwd == BwdKernel::kMma);
  CHECK(plan_slc(slc_shape(16), Pass::kFwd, kH100, with("slc_fwd", "blocks")).slc_fwd == SlcKernel::kBlocks);
  CHECK(plan_slc(slc_shape(64), Pass::kFwd, kH100, with("slc_fwd", "blocks")).slc_fwd == SlcKernel::kBlocks);
  CHECK(plan_slc(slc_shape(4), Pass::kFwd, kH100, with("slc_fwd", "union")).slc_fwd == SlcKernel::kUnion);
  CHECK(plan_slc(slc_shape(1), Pass::kFwd, kA100, with("slc_fwd", "union")).slc_fwd == SlcKernel::kUnion);
  CHECK(plan_slc(slc_shape(64), Pass::kFwd, kA100, with("slc_fwd", "union")).slc_fwd == SlcKernel::kUnion);
  CHECK(plan_slc(slc_shape(16), Pass::kBwd, kH100, with("slc_dq", "blocks")).slc_dq == SlcKernel::kBlocks);
  CHECK(plan_slc(slc_shape(4), Pass::kBwd, kH100, with("slc_dq", "tokens")).slc_dq == SlcKernel::kWarp);
  // warp and union also pick the dQ's kernel by tokens; blocks leaves the dQ to the plan.
  CHECK(plan_slc(slc_shape(32), Pass::kBwd, kH100, with("slc_fwd", "union")).slc_dq == SlcKernel::kUnion);
  CHECK(plan_slc(slc_shape(4), Pass::kBwd, kH100, with("slc_fwd", "union")).slc_dq == SlcKernel::kBlocks);
  CHECK(plan_slc(slc_shape(32), Pass::kBwd, kH100, with("slc_fwd", "blocks")).slc_dq == SlcKernel::kWarp);
  CHECK(plan_select(topk_shape(32, 64), kH100, with("select", "wgmma")).select == SelectKernel::kWgmma);
  // Keys that do not concern an op leave it alone.
  CHECK(plan_slc(slc_shape(16), Pass::kFwd, kA100, with("fwd", "wgmma")).slc_fwd == SlcKernel::kWarp);
  CHECK(plan_cmp(attn_shape<CmpParams>(16, 192, 128), Pass::kBwd, kH100, with("fwd", "wgmma")).bwd == BwdKernel::kMma);
}

TEST_CASE("plan: overrides the shape or GPU cannot take are refused with the reason", "[plan]") {
  std::string why = refusal([] { plan_cmp(attn_shape<CmpParams>(16, 128, 128), Pass::kFwd, kA100, with("fwd", "wgmma")); });
  CHECK(contains(why, "nsa.compressed_attention"));
  CHECK(contains(why, "fwd=\"wgmma\""));
  CHECK(contains(why, "sm_90"));
  CHECK(contains(why, "sm_80"));
  why = refusal([] { plan_swa(attn_shape<SwaParams>(16, 192, 128), Pass::kFwd, kH100, with("fwd", "wgmma")); });
  CHECK(contains(why, "nsa.sliding_window_attention"));
  CHECK(contains(why, "D = 192"));
  why = refusal([] { plan_swa(attn_shape<SwaParams>(16, 192, 128), Pass::kFwd, kH100, with("fwd", "wide")); });
  CHECK(contains(why, "fwd=\"wide\""));
  CHECK(contains(why, "D, Dv <= 128"));
  why = refusal([] { plan_cmp(attn_shape<CmpParams>(4, 192, 128), Pass::kBwd, kH100, with("bwd", "wgmma")); });
  CHECK(contains(why, "bwd=\"wgmma\""));
  why = refusal([] { plan_slc(slc_shape(64), Pass::kFwd, kH100, with("slc_fwd", "warp")); });
  CHECK(contains(why, "nsa.selected_attention"));
  CHECK(contains(why, "slc_fwd=\"warp\""));
  CHECK(contains(why, "G = 64"));
  why = refusal([] { plan_slc(slc_shape(64), Pass::kBwd, kH100, with("slc_fwd", "warp")); });
  CHECK(contains(why, "slc_fwd=\"warp\""));
  why = refusal([] { plan_slc(slc_shape(4), Pass::kFwd, kA100, with("slc_fwd", "blocks")); });
  CHECK(contains(why, "slc_fwd=\"blocks\""));
  CHECK(contains(why, "sm_80"));
  why = refusal([] { plan_slc(slc_shape(4, 192, 128), Pass::kBwd, kH100, with("slc_dq", "blocks")); });
  CHECK(contains(why, "slc_dq=\"blocks\""));
  CHECK(contains(why, "D = 192"));
  SlcParams p = slc_shape(4);
  p.select_size = 512;
  why = refusal([&] { plan_slc(p, Pass::kBwd, kH100, with("slc_dq", "blocks")); });
  CHECK(contains(why, "select_size in [32, 256], got 512"));
  why = refusal([] { plan_select(topk_shape(8), kH100, with("select", "wgmma")); });
  CHECK(contains(why, "nsa.select_blocks"));
  CHECK(contains(why, "select=\"wgmma\""));
  CHECK(contains(why, "G = 8"));
  why = refusal([] { plan_select(topk_shape(16, 192), kH100, with("select", "wgmma")); });
  CHECK(contains(why, "D = 192"));
  CHECK(contains(refusal([] { plan_select(topk_shape(16), kA100, with("select", "wgmma")); }), "sm_80"));
}

TEST_CASE("plan: unknown keys and values are refused when set", "[plan]") {
  PlanOverrides o;
  CHECK(contains(refusal([&] { set_override(o, "fwdd", "wide"); }), "unknown key \"fwdd\""));
  CHECK(contains(refusal([&] { set_override(o, "fwd", "narrow"); }), "\"wgmma\", \"wide\", \"mma\""));
  CHECK(contains(refusal([&] { set_override(o, "fwd", "wgmma_kv2"); }), "fwd=\"wgmma_kv2\""));
  CHECK(contains(refusal([&] { set_override(o, "slc_dq", "warp"); }), "\"tokens\", \"blocks\""));
  CHECK(contains(refusal([&] { set_override(o, "select", int64_t(1)); }), "select=1"));
  CHECK(contains(refusal([&] { set_override(o, "split_tokens", "64"); }), "expected an int >= 0"));
  CHECK(contains(refusal([&] { set_override(o, "split_tokens", int64_t(-1)); }), "expected an int >= 0"));
  CHECK(contains(refusal([&] { set_override(o, "slc_chunk_rows", int64_t(0)); }), "expected an int >= 1"));
  CHECK(refusal([&] { set_override(o, "split_tokens", int64_t(0)); }).empty());
  CHECK(!o.fwd);  // nothing refused was set
  CHECK(o.split_tokens == 0);
  CHECK(plan_keys().size() == 13);
  for (const std::string& key : plan_keys())
    for (const std::string& value : plan_values(key)) CHECK(refusal([&] { set_override(o, key, value); }).empty());
}

TEST_CASE("plan: description of what ran", "[plan]") {
  const PlanOverrides none;
  auto find = [](const std::vector<PlanItem>& items, const std::string& key) {
    for (const PlanItem& it : items)
      if (it.key == key) return it;
    return PlanItem{"(absent)", "", -1};
  };
  const auto cmp_fwd = describe(plan_cmp(attn_shape<CmpParams>(16, 128, 128), Pass::kFwd, kH100, none),
                                AttnBranch::kCmp, Pass::kFwd);
  CHECK(find(cmp_fwd, "fwd").name == "wgmma");
  CHECK(find(cmp_fwd, "bwd").key == "(absent)");
  CHECK(find(cmp_fwd, "arch").number == 90);
  CHECK(find(cmp_fwd, "num_sms").number == 132);
  const auto slc_bwd = describe(plan_slc(slc_shape(4, 128, 128, 16384), Pass::kBwd, kH100, none), AttnBranch::kSlc,
                                Pass::kBwd);
  CHECK(find(slc_bwd, "slc_dq").name == "blocks");
  CHECK(find(slc_bwd, "bwd").name == "wgmma");
  CHECK(find(slc_bwd, "split").number == 4);
  CHECK(find(slc_bwd, "slc_chunk_rows").number > 0);
  const auto slc_tokens = describe(plan_slc(slc_shape(64), Pass::kBwd, kA100, none), AttnBranch::kSlc, Pass::kBwd);
  CHECK(find(slc_tokens, "slc_dq").name == "tokens");
  CHECK(find(slc_tokens, "slc_tokens").name == "union");
  CHECK(find(slc_tokens, "bwd").name == "mma");
  const auto swa_bwd = describe(plan_swa(attn_shape<SwaParams>(16, 64, 64), Pass::kBwd, kA100, none),
                                AttnBranch::kSwa, Pass::kBwd);
  CHECK(find(swa_bwd, "split").key == "(absent)");
  CHECK(find(describe(plan_select(topk_shape(16), kH100, none)), "select").name == "wgmma");
}

TEST_CASE("plan: decode splits by batch and capacity", "[plan][decode]") {
  const PlanOverrides none;
  for (index_t capacity : {index_t(8) << 10, index_t(16) << 10, index_t(32) << 10, index_t(64) << 10,
                           index_t(128) << 10}) {
    CAPTURE(capacity);
    const index_t tiles = (num_cmp_tokens(capacity, 32, 16) + 63) / 64;  // 8 .. 128
    // B = 1 (4 KV heads): two compressed tiles per split, 64 splits (256 thread blocks) at 128k.
    const DecodePlan one = plan_decode(decode_shape(1, capacity), kH100, none);
    CHECK(one.cmp_splits == tiles / 2);
    CHECK(one.cmp_chunk == 128);
    // 25 selected + window tiles (16 blocks, 9 blocks of the window): 9 splits of 3.
    CHECK(one.slc_splits == 9);
    // capacity / 64 candidate blocks, 128 a split at least: 1 split at 8k, 16 at 128k.
    CHECK(one.sel_splits == capacity / 64 / 128);
    // B = 16: 64 units, 4 splits each (256 thread blocks); B = 64: 256 units, no split.
    const DecodePlan sixteen = plan_decode(decode_shape(16, capacity), kH100, none);
    CHECK(sixteen.cmp_splits == 4);
    CHECK(sixteen.cmp_chunk == tiles / 4 * 64);
    CHECK(sixteen.slc_splits == 4);
    // 64 units, 4 scan blocks each: keys and values together; 64 queries, 8 selection blocks
    // each give 4 per SM.
    CHECK(sixteen.scan_order == ScanOrder::kTogether);
    CHECK(sixteen.sel_splits == std::min<index_t>(8, capacity / 64 / 128));
    const DecodePlan sixty_four = plan_decode(decode_shape(64, capacity), kH100, none);
    CHECK(sixty_four.cmp_splits == 1);
    CHECK(sixty_four.cmp_chunk == tiles * 64);
    CHECK(sixty_four.slc_splits == 1);
    CHECK(sixty_four.scan_order == ScanOrder::kTogether);
    CHECK(sixty_four.sel_splits == std::min<index_t>(2, capacity / 64 / 128));
  }
  // Long caches stop at 64 selection splits (2^20 tokens: 16384 candidate blocks), or at one
  // thread block per SM beside a scan with its keys first (33 of 4 queries at B = 1).
  CHECK(plan_decode(decode_shape(1, 1 << 20), kH100, none).sel_splits == 33);
  CHECK(plan_decode(decode_shape(1, 1 << 20), kH100, with("scan_order", "together")).sel_splits == 64);
  // B = 1 gives about one thread block per SM at 64k (128, two tiles each), two at 128k.
  CHECK(4 * plan_decode(decode_shape(1, 64 << 10), kH100, none).cmp_splits == 128);
  CHECK(4 * plan_decode(decode_shape(1, 128 << 10), kH100, none).cmp_splits >= 2 * 132 - 8);
  // Fewer SMs, fewer splits (108: 54 wanted, 43 of 3 tiles); more rows than a thread block holds
  // (G = 64, S = 2: two row blocks) count as more units (B = 4: 33 wanted, 32 of 4 tiles).
  CHECK(plan_decode(decode_shape(1, 128 << 10), kA100, none).cmp_splits == 43);
  CHECK(plan_decode(decode_shape(1, 128 << 10, 64, 2), kH100, none).cmp_splits == 64);
  CHECK(plan_decode(decode_shape(4, 128 << 10, 64, 2), kH100, none).cmp_splits == 32);
  // A window past the capacity (the op's "whole past", 2^30) counts the capacity's tiles: 16 + 129
  // tiles at 8k, 49 splits of 3.
  DecodeParams whole = decode_shape(1, 8 << 10);
  whole.window_size = 1 << 30;
  CHECK(plan_decode(whole, kH100, none).slc_splits == 49);
}

TEST_CASE("plan: decode splits stay within their bounds", "[plan][decode]") {
  const PlanOverrides none;
  for (int B : {1, 2, 3, 16, 64, 1000}) {
    for (index_t capacity : {index_t(1), index_t(31), index_t(32), index_t(100), index_t(5000), index_t(1) << 17,
                             index_t(1) << 20}) {
      for (int G : {1, 3, 16, 64}) {
        for (int S : {1, 4}) {
          CAPTURE(B, capacity, G, S);
          const DecodeParams p = decode_shape(B, capacity, G, S);
          const DecodePlan plan = plan_decode(p, kH100, none);
          const index_t units = index_t(B) * p.num_heads_k * ((S * G + 63) / 64);
          CHECK(plan.cmp_splits >= 1);
          CHECK(plan.slc_splits >= 1);
          CHECK(plan.cmp_chunk % 64 == 0);
          CHECK(plan.cmp_chunk >= 64);
          CHECK(plan.cmp_splits * plan.cmp_chunk >= p.cmp_capacity);
          // No split is empty at full capacity, and none is shorter than two tiles but one.
          if (p.cmp_capacity > 0) CHECK((plan.cmp_splits - 1) * plan.cmp_chunk < p.cmp_capacity);
          if (plan.cmp_splits > 1) CHECK(plan.cmp_chunk >= 2 * 64);
          // Never more thread blocks than two per SM, unless the units alone are more.
          CHECK(units * plan.cmp_splits <= std::max<index_t>(units, 2 * 132));
          CHECK(units * plan.slc_splits <= std::max<index_t>(units, 2 * 132));
          // The selection: 1 to 64 splits, none below 128 candidate blocks but one, at most 4
          // thread blocks per SM over the (query, KV head) units unless those alone are more.
          const index_t queries = index_t(B) * p.num_heads_k * S, blocks = (capacity + 63) / 64;
          CHECK(plan.sel_splits >= 1);
          CHECK(plan.sel_splits <= 64);
          if (plan.sel_splits > 1) CHECK(blocks / plan.sel_splits >= 128);
          CHECK(queries * plan.sel_splits <= std::max<index_t>(queries, 4 * 132));
          // Keys first only where a block's shared memory holds the split, and then a selection
          // block per SM at most.
          if (plan.scan_order == ScanOrder::kKeysFirst) {
            const int per = int((p.cmp_capacity + 63) / 64 + plan.cmp_splits - 1) / plan.cmp_splits;
            CHECK(nsa::cuda::decode::keys_first_layout(p.head_dim, p.head_dim_v, S * G <= 16 ? 16 : 64, per).bytes <=
                  size_t(227 * 1024));
            CHECK(queries * plan.sel_splits <= std::max<index_t>(queries, 132));
          }
          CHECK(describe(plan).size() == 10);
        }
      }
    }
  }
}

TEST_CASE("plan: decode kernels' launch choices", "[plan][decode]") {
  using namespace nsa::cuda::decode;
  // Kernel D: warps per row so that none merges more than 4 splits of a branch (8 warps at
  // most), and batches of one split where no warp has more than one.
  auto plan = [](int cmp, int slc) {
    DecodePlan pl;
    pl.cmp_splits = cmp;
    pl.slc_splits = slc;
    return pl;
  };
  CHECK(combine_warps_per_row(plan(1, 1)) == 1);
  CHECK(combine_warps_per_row(plan(4, 4)) == 1);
  CHECK(combine_warps_per_row(plan(32, 9)) == 8);
  CHECK(combine_warps_per_row(plan(2, 64)) == 8);
  CHECK(combine_batch(plan(1, 1)) == 1);
  CHECK(combine_batch(plan(4, 4)) == 4);
  CHECK(combine_batch(plan(2, 1)) == 4);
  CHECK(combine_batch(plan(32, 9)) == 4);
  // The paper's sizes at 64k, B = 1, 16 and 64 (plan_decode's splits).
  for (int B : {1, 16, 64}) {
    const DecodePlan pl = plan_decode(decode_shape(B, 64 << 10), kH100, PlanOverrides{});
    CHECK(combine_batch(pl) == (B == 64 ? 1 : 4));
  }
  // Kernel B: whole rounds of 1024 candidates unless the factors and sums of their tiles pass
  // 32 KB of shared memory (cpb = 4, cpr = 2: 18 slots per tile).
  CHECK(tile_slots(2, 4) == 18);
  CHECK(select_round_tiles(1024, 4, 2) == 67);
  CHECK(select_round(16, 4, 2) == 1024);
  CHECK(select_round(64, 4, 2) == 1024);
  CHECK(select_round(256, 4, 2) == 256);
  CHECK(select_round(1, 1, 64) == 1024);  // 128 slots a tile, 19 tiles
  for (int G : {1, 3, 16, 64, 256})
    for (int cpb : {1, 2, 4, 8})
      for (int cpr : {1, 2, 8, 64}) {
        const int round = select_round(G, cpb, cpr);
        CAPTURE(G, cpb, cpr, round);
        CHECK(round >= 32);
        CHECK(select_smem_bytes(G, select_round_tiles(round, cpb, cpr), tile_slots(cpr, cpb)) <= 48 * 1024);
      }
}

TEST_CASE("plan: decode split overrides", "[plan][decode]") {
  const DecodeParams p = decode_shape(16, 64 << 10);  // 64 compressed tiles
  const DecodePlan cmp = plan_decode(p, kH100, with("cmp_splits", int64_t(7)));
  CHECK(cmp.cmp_splits == 7);
  CHECK(cmp.cmp_chunk == 10 * 64);
  CHECK(cmp.slc_splits == 4);  // the other split as planned
  const DecodePlan many = plan_decode(p, kH100, with("cmp_splits", int64_t(500)));
  CHECK(many.cmp_splits == 500);  // as given: the splits past the tiles are empty
  CHECK(many.cmp_chunk == 64);
  const DecodePlan slc = plan_decode(p, kH100, with("slc_splits", int64_t(1)));
  CHECK(slc.slc_splits == 1);
  CHECK(slc.cmp_splits == 4);
  const DecodePlan sel = plan_decode(p, kH100, with("sel_splits", int64_t(64)));
  CHECK(sel.sel_splits == 64);  // as given: splits past the candidates keep empty lists
  CHECK(sel.slc_splits == 4);
  CHECK(plan_decode(p, kH100, PlanOverrides{}).window_order == WindowOrder::kAfterScan);
  const DecodePlan before = plan_decode(p, kH100, with("window_order", "before_scan"));
  CHECK(before.window_order == WindowOrder::kBeforeScan);
  CHECK(before.cmp_splits == 4);
  CHECK(before.slc_splits == 4);
  CHECK(plan_decode(p, kH100, PlanOverrides{}).dep_wait == DepWait::kHead);
  const DecodePlan grid = plan_decode(p, kH100, with("dep_wait", "grid"));
  CHECK(grid.dep_wait == DepWait::kGrid);
  CHECK(grid.window_order == WindowOrder::kAfterScan);
  CHECK(grid.sel_splits == plan_decode(p, kH100, PlanOverrides{}).sel_splits);
  // Keys that do not concern the decode step leave it alone, and its keys leave the others alone.
  CHECK(plan_decode(p, kH100, with("fwd", "mma")).cmp_splits == 4);
  CHECK(plan_cmp(attn_shape<CmpParams>(16, 128, 128), Pass::kFwd, kH100, with("cmp_splits", int64_t(3))).fwd ==
        FwdKernel::kWgmma);

  PlanOverrides o;
  CHECK(contains(refusal([&] { set_override(o, "cmp_splits", int64_t(0)); }),
                 "cmp_splits=0: expected an int in [1, 65535]"));
  CHECK(contains(refusal([&] { set_override(o, "slc_splits", int64_t(-2)); }), "slc_splits=-2"));
  CHECK(contains(refusal([&] { set_override(o, "slc_splits", int64_t(65536)); }), "in [1, 65535]"));
  CHECK(contains(refusal([&] { set_override(o, "sel_splits", int64_t(65)); }), "sel_splits=65: expected an int in [1, 64]"));
  CHECK(contains(refusal([&] { set_override(o, "sel_splits", int64_t(0)); }), "in [1, 64]"));
  CHECK(contains(refusal([&] { set_override(o, "cmp_splits", "4"); }),
                 "cmp_splits=\"4\": expected an int in [1, 65535]"));
  CHECK(refusal([&] { set_override(o, "cmp_splits", int64_t(65535)); }).empty());
  CHECK(!o.slc_splits);  // nothing refused was set
  CHECK(!o.sel_splits);
  CHECK(o.cmp_splits == 65535);
  CHECK(plan_values("cmp_splits").empty());
  CHECK(plan_values("slc_splits").empty());
  CHECK(plan_values("sel_splits").empty());
  CHECK(plan_values("window_order") == std::vector<std::string>{"after_scan", "before_scan", "after_select"});
  CHECK(contains(refusal([&] { set_override(o, "window_order", "first"); }), "window_order"));
  CHECK(contains(refusal([&] { set_override(o, "window_order", int64_t(1)); }), "window_order=1"));
  CHECK(!o.window_order);
  CHECK(plan_values("dep_wait") == std::vector<std::string>{"grid", "head"});
  CHECK(contains(refusal([&] { set_override(o, "dep_wait", "block"); }), "dep_wait=\"block\""));
  CHECK(!o.dep_wait);
  CHECK(plan_values("scan_order") == std::vector<std::string>{"together", "keys_first"});
  CHECK(contains(refusal([&] { set_override(o, "scan_order", "values_first"); }), "scan_order=\"values_first\""));
  CHECK(!o.scan_order);
}

TEST_CASE("plan: the decode scan's order", "[plan][decode]") {
  using namespace nsa::cuda::decode;
  const PlanOverrides none;
  // Its shared memory with the keys first: Q, a ring of three 64-key tiles, the row maxima, two
  // tiles' probabilities (fp32), then per key tile 16 factors and 16 x 64 2-byte probabilities.
  CHECK(keys_first_layout(128, 128, 16, 16).bytes == 4096 + 3 * 16384 + 256 + 8320 + 16 * (64 + 2048));
  CHECK(keys_first_layout(192, 128, 64, 2).ring == 64 * 192 * 2);
  CHECK(keys_first_layout(192, 128, 64, 2).red == 64 * 192 * 2 + 3 * 64 * 192 * 2);
  // B = 4 at 64k (16 units, 4 tiles per split; 264 scan blocks fill an H100: 16 per unit) and at
  // 128k: keys first, with the selection right behind the scan, a block per SM (132 / 16 queries).
  for (const index_t T : {index_t(64) << 10, index_t(128) << 10}) {
    const DecodePlan b4 = plan_decode(decode_shape(4, T), kH100, none);
    CHECK(b4.scan_order == ScanOrder::kKeysFirst);
    CHECK(b4.window_order == WindowOrder::kAfterSelect);
    CHECK(b4.sel_splits == 8);
  }
  // B = 1: two tiles per split; the selection's splits as before (16 at 128k: 2048 candidates).
  const DecodePlan b1 = plan_decode(decode_shape(1, 128 << 10), kH100, none);
  CHECK(b1.scan_order == ScanOrder::kKeysFirst);
  CHECK(b1.sel_splits == 16);
  // 64k, B = 8 and 16: two scan blocks and a selection block would fit an SM, but 32 or 64 units
  // leave 8 or 4 scan blocks each: together, as at 128k, B = 16 (whose 32 tiles per split would
  // not fit either).
  for (const int B : {8, 16}) {
    const DecodePlan many = plan_decode(decode_shape(B, 64 << 10), kH100, none);
    CHECK(many.scan_order == ScanOrder::kTogether);
    CHECK(many.window_order == WindowOrder::kAfterScan);
  }
  CHECK(plan_decode(decode_shape(16, 64 << 10), kH100, none).sel_splits == 8);
  CHECK(plan_decode(decode_shape(16, 128 << 10), kH100, none).scan_order == ScanOrder::kTogether);
  // An A100 (108 SMs: 216 scan blocks) has 13 per unit at B = 4, 27 at B = 2.
  CHECK(plan_decode(decode_shape(4, 64 << 10), kA100, none).scan_order == ScanOrder::kTogether);
  CHECK(plan_decode(decode_shape(2, 64 << 10), kA100, none).scan_order == ScanOrder::kKeysFirst);
  // Forced: keys first wherever a block's shared memory holds it, else refused with the bytes.
  const DecodePlan forced = plan_decode(decode_shape(16, 128 << 10), kH100, with("scan_order", "keys_first"));
  CHECK(forced.scan_order == ScanOrder::kKeysFirst);
  CHECK(forced.window_order == WindowOrder::kAfterSelect);
  PlanOverrides one = with("scan_order", "keys_first");
  set_override(one, "cmp_splits", int64_t(1));
  const std::string why = refusal([&] { plan_decode(decode_shape(1, 128 << 10), kH100, one); });
  CHECK(contains(why, "scan_order=\"keys_first\") cannot run: needs 332160 bytes of shared memory per block"));
  CHECK(plan_decode(decode_shape(16, 64 << 10), kH100, with("scan_order", "together")).scan_order ==
        ScanOrder::kTogether);
}

TEST_CASE("plan: description of a decode step", "[plan][decode]") {
  const DecodePlan plan = plan_decode(decode_shape(1, 128 << 10), kH100, PlanOverrides{});
  const std::vector<PlanItem> items = describe(plan);
  REQUIRE(items.size() == 10);
  CHECK(items[0].key == "cmp_splits");
  CHECK(items[0].number == 64);
  CHECK(items[1].key == "cmp_chunk");
  CHECK(items[1].number == 128);
  CHECK(items[2].key == "slc_splits");
  CHECK(items[2].number == 9);
  CHECK(items[3].key == "sel_splits");
  CHECK(items[3].number == 16);
  CHECK(items[4].key == "window_order");
  CHECK(items[4].name == "after_select");
  CHECK(items[5].key == "dep_wait");
  CHECK(items[5].name == "head");
  CHECK(items[6].key == "scan_order");
  CHECK(items[6].name == "keys_first");
  CHECK(items[7].key == "combine_wpr");
  CHECK(items[7].number == 8);  // 64 compressed splits: 8 warps of a row, 8 splits each
  CHECK(items[7].number == cuda::decode::combine_warps_per_row(plan));
  CHECK(items[8].key == "arch");
  CHECK(items[8].number == 90);
  CHECK(items[9].key == "num_sms");
  CHECK(items[9].number == 132);
}
