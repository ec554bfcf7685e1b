// Validation of caller-given block indices for the selected branch: every entry is -1 or a
// block of its own sequence, listed at most once per (token, kv head) row. The kernels would
// silently skip a bad entry; the binding calls this to turn it into an error instead.
#include <algorithm>
#include <vector>

#include "kernels.h"

namespace nsa::cpu {

BlockIndexError check_block_indices(const SlcParams& p) {
  const int n = p.num_selected;
  std::vector<int32_t> sorted(n);
  for (int s = 0; s < p.seqs.num_seqs; ++s) {
    const SeqRange seq = p.seqs.range(s);
    const index_t num_blocks = num_select_blocks(seq.len, p.select_size);
    for (index_t t = 0; t < seq.len; ++t)
      for (int g = 0; g < p.num_heads_k; ++g) {
        const int32_t* idx = p.block_indices.ptr<int32_t>(seq.batch, seq.start + t, g);
        BlockIndexError err;
        err.batch = seq.batch;
        err.token = seq.start + t;
        err.head = g;
        err.num_blocks = num_blocks;
        for (int slot = 0; slot < n; ++slot)
          if (idx[slot] != -1 && (idx[slot] < 0 || idx[slot] >= num_blocks)) {
            err.kind = BlockIndexError::kOutOfRange;
            err.slot = slot;
            err.value = idx[slot];
            return err;
          }
        // Duplicates: sort a copy (n can be large), then report the second occurrence's slot.
        sorted.assign(idx, idx + n);
        std::sort(sorted.begin(), sorted.end());
        const auto dup = std::adjacent_find(
            sorted.begin(), sorted.end(), [](int32_t a, int32_t b) { return a == b && a != -1; });
        if (dup == sorted.end()) continue;
        err.kind = BlockIndexError::kDuplicate;
        err.value = *dup;
        for (int slot = 0, seen = 0; slot < n; ++slot)
          if (idx[slot] == *dup && seen++ == 1) err.slot = slot;
        return err;
      }
  }
  return BlockIndexError{};
}

}  // namespace nsa::cpu
