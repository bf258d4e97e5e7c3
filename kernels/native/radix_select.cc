// Exact k-th largest |x| per row by radix select on the float32 bit patterns (an XLA FFI custom call for CPU).
//
//   genome_kth_largest_abs(x: f32[R, n], k: s32[R]) -> f32[R]      k <= 0 -> +inf, k > n -> clipped to n
//
// |x| as a uint32 bit pattern (sign bit cleared) is ordered like the value, so: pass 1 histograms the top 11 bits
// (exponent + 3 mantissa bits; 2048 bins, L1-resident), a scan from the top finds the bin holding the k-th entry,
// pass 2 copies that bin's keys (typically a few hundred) into a buffer, and nth_element finishes exactly.
// Two reads of the row, no sort. Rows are independent; they are spread over XLA's intra-op thread pool.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kShift = 20;                 // 31 value bits -> top 11 bits index the histogram
constexpr int kBins = 1 << (31 - kShift);  // 2048

inline uint32_t Key(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  return u & 0x7fffffffu;
}

inline float FromKey(uint32_t u) {
  float v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

float KthLargestAbs(const float* x, int64_t n, int64_t k, std::vector<uint32_t>& buf) {
  if (k <= 0 || n == 0) return FromKey(0x7f800000u);  // +inf: nothing is kept
  if (k > n) k = n;
  // two interleaved histograms (16 KiB, L1-resident): runs of one bin do not serialise on a single counter
  uint32_t hist[2][kBins];
  std::memset(hist, 0, sizeof(hist));
  int64_t i = 0;
  for (; i + 2 <= n; i += 2) {
    ++hist[0][Key(x[i]) >> kShift];
    ++hist[1][Key(x[i + 1]) >> kShift];
  }
  for (; i < n; ++i) ++hist[0][Key(x[i]) >> kShift];
  int64_t need = k;
  int bin = kBins - 1;
  for (; bin > 0; --bin) {
    int64_t c = int64_t(hist[0][bin]) + hist[1][bin];
    if (c >= need) break;
    need -= c;
  }
  buf.clear();
  const uint32_t b = uint32_t(bin);
  for (i = 0; i < n; ++i) {
    uint32_t u = Key(x[i]);
    if ((u >> kShift) == b) buf.push_back(u);
  }
  // need-th largest key of the bin
  std::nth_element(buf.begin(), buf.begin() + (need - 1), buf.end(), std::greater<uint32_t>());
  return FromKey(buf[need - 1]);
}

ffi::Error KthLargestAbsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> k,
                             ffi::ResultBuffer<ffi::F32> out) {
  auto dims = x.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("x must be 2-D (R, n)");
  const int64_t R = dims[0], n = dims[1];
  if (int64_t(k.element_count()) != R || int64_t(out->element_count()) != R)
    return ffi::Error::InvalidArgument("k and the output must have R entries");
  const float* xd = x.typed_data();
  const int32_t* kd = k.typed_data();
  float* od = out->typed_data();
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t chunks = std::min<int64_t>(R, threads);
  if (chunks <= 1 || R * n < (1 << 16)) {  // small: not worth a hand-off
    std::vector<uint32_t> buf;
    for (int64_t r = 0; r < R; ++r) od[r] = KthLargestAbs(xd + r * n, n, kd[r], buf);
    return ffi::Error::Success();
  }
  // Shared state lives on the heap: a helper the pool starts late (after every row is taken) must not touch
  // this frame. The caller works too and waits only for rows that a running thread has claimed, so a saturated
  // pool can delay but never deadlock the call.
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  auto work = [state, xd, kd, od, R, n]() {
    std::vector<uint32_t> buf;
    for (int64_t r; (r = state->next.fetch_add(1)) < R;) {
      od[r] = KthLargestAbs(xd + r * n, n, kd[r], buf);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t c = 1; c < chunks; ++c) pool.Schedule(std::function<void()>(work));
  work();
  while (state->done.load(std::memory_order_acquire) < R) {
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GenomeKthLargestAbs, KthLargestAbsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
