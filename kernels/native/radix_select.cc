// Exact k-th largest |x| per row by radix select on the float32 bit patterns (an XLA FFI custom call for CPU).
//
//   genome_kth_largest_abs(x: f32[R, n], k: s32[R]) -> f32[R]      k <= 0 -> +inf, k > n -> clipped to n
//
// |x| as a uint32 bit pattern (sign bit cleared) is ordered like the value, so: pass 1 histograms the top 11 bits
// (exponent + 3 mantissa bits; 2 x 2048 bins, L1-resident), a scan from the top finds the bin holding the k-th
// entry, pass 2 compresses that bin's keys (typically a few hundred; AVX-512 compress-store when available) into a
// buffer, a 1024-bin histogram of the buffer narrows it again and nth_element finishes exactly. Two reads of the
// row, no sort. Rows are independent; they are spread over XLA's intra-op thread pool.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

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

// need-th largest (1-based) of keys[0..m) by one histogram level over [lo, hi] then nth_element.
inline uint32_t SelectKeys(uint32_t* keys, int64_t m, int64_t need, uint32_t lo, uint32_t hi) {
  if (m <= 64) {
    std::nth_element(keys, keys + (need - 1), keys + m, std::greater<uint32_t>());
    return keys[need - 1];
  }
  uint64_t span = uint64_t(hi) - lo + 1;
  int shift = 0;
  while ((span >> shift) > 1024) ++shift;
  uint32_t hist[1025];
  std::memset(hist, 0, sizeof(hist));
  for (int64_t i = 0; i < m; ++i) ++hist[(keys[i] - lo) >> shift];
  int bin = int((span - 1) >> shift);
  int64_t left = need;
  for (; bin > 0; --bin) { if (hist[bin] >= left) break; left -= hist[bin]; }
  int64_t w = 0;
  for (int64_t i = 0; i < m; ++i) { uint32_t u = keys[i]; keys[w] = u; w += (((u - lo) >> shift) == uint32_t(bin)); }
  std::nth_element(keys, keys + (left - 1), keys + w, std::greater<uint32_t>());
  return keys[left - 1];
}

// Count keys > hi and copy keys in [lo, hi] to out; returns (above, m).
inline void Bracket(const float* x, int64_t n, uint32_t lo, uint32_t hi, uint32_t* out, int64_t& above, int64_t& m) {
  int64_t a = 0, w = 0, i = 0;
#ifdef __AVX512F__
  const __m512i absmask = _mm512_set1_epi32(0x7fffffff);
  const __m512i vlo = _mm512_set1_epi32(int(lo)), vhi = _mm512_set1_epi32(int(hi));
  for (; i + 16 <= n; i += 16) {
    __m512i u = _mm512_and_si512(_mm512_loadu_si512(x + i), absmask);  // keys are < 2^31: signed compares are fine
    __mmask16 gt = _mm512_cmpgt_epi32_mask(u, vhi);
    __mmask16 in = _mm512_mask_cmpge_epi32_mask(_mm512_cmple_epi32_mask(u, vhi), u, vlo);
    a += __builtin_popcount(gt);
    // compress in a register, then store all 16 lanes (out has 16 slack): a compress-store straight to memory
    // is microcoded on AMD Zen 4 and made this loop ~10x slower there
    _mm512_storeu_si512(out + w, _mm512_maskz_compress_epi32(in, u));
    w += __builtin_popcount(in);
  }
#endif
  for (; i < n; ++i) { uint32_t u = Key(x[i]); a += (u > hi); out[w] = u; w += (u >= lo) & (u <= hi); }
  above = a; m = w;
}

float KthLargestAbs(const float* x, int64_t n, int64_t k, std::vector<uint32_t>& buf) {
  if (k <= 0 || n == 0) return FromKey(0x7f800000u);  // +inf: nothing is kept
  if (k > n) k = n;
  uint32_t hist[2][kBins];
  std::memset(hist, 0, sizeof(hist));
  int64_t i = 0;
  for (; i + 2 <= n; i += 2) { ++hist[0][Key(x[i]) >> kShift]; ++hist[1][Key(x[i + 1]) >> kShift]; }
  for (; i < n; ++i) ++hist[0][Key(x[i]) >> kShift];
  int64_t need = k; int bin = kBins - 1;
  for (; bin > 0; --bin) { int64_t c = int64_t(hist[0][bin]) + hist[1][bin]; if (c >= need) break; need -= c; }
  if (int64_t(buf.size()) < n + 16) buf.resize(n + 16);
  const uint32_t lo = uint32_t(bin) << kShift, hi = lo + ((1u << kShift) - 1);
  int64_t above = 0, m = 0;
  Bracket(x, n, lo, hi, buf.data(), above, m);
  return FromKey(SelectKeys(buf.data(), m, need, lo, hi));
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
  // this frame. The caller works too and then sleeps (futex wait, no spinning: the box is shared) only until the
  // rows that running helpers claimed are done, so a saturated pool can delay but never deadlock the call.
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  auto work = [state, xd, kd, od, R, n]() {
    std::vector<uint32_t> buf;
    for (int64_t r; (r = state->next.fetch_add(1)) < R;) {
      od[r] = KthLargestAbs(xd + r * n, n, kd[r], buf);
      if (state->done.fetch_add(1, std::memory_order_acq_rel) + 1 == R) state->done.notify_all();
    }
  };
  for (int64_t c = 1; c < chunks; ++c) pool.Schedule(std::function<void()>(work));
  work();
  for (int64_t d; (d = state->done.load(std::memory_order_acquire)) < R;) state->done.wait(d);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GenomeKthLargestAbs, KthLargestAbsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
