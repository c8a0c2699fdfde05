// Shared by the native CPU kernels of vmae-fast (kernels/*.cpp): input checks that raise
// ValueErrors saying what was expected and what was got, and the cube geometry of a clip.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace vmae_fast_native {

// ImageNet statistics as float32, rounded from the same doubles as vmae_fast.config.
inline const float kMean[3] = {static_cast<float>(0.485), static_cast<float>(0.456), static_cast<float>(0.406)};
inline const float kStd[3] = {static_cast<float>(0.229), static_cast<float>(0.224), static_cast<float>(0.225)};

// Elements per parallel chunk: small ops stay on one thread.
constexpr int64_t kGrainElems = 1 << 15;

inline int64_t grain_rows(int64_t elems_per_row) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, elems_per_row));
}

inline void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
}

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK_VALUE(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16, op, ": ", name,
                    " must be float32/float64/float16/bfloat16, got ", s);
}

// Cube geometry of a (B, C, T, H, W) clip cut into tubelet x patch x patch cubes.
struct Cubes {
  int64_t B, C, t, p, Hp, Wp, N;
  int64_t sB, sC, sT, sH, sW;  // element strides of the clip (any layout)

  // Offset of cube `token` of sample `b` (its (c=0, dt=0, dh=0, dw=0) element).
  int64_t base(int64_t b, int64_t token) const {
    const int64_t hw = Hp * Wp;
    const int64_t ti = token / hw, rem = token % hw;
    return b * sB + ti * t * sT + (rem / Wp) * p * sH + (rem % Wp) * p * sW;
  }
};

inline Cubes check_video(const at::Tensor& video, int64_t tubelet, int64_t patch, const char* op, bool imagenet) {
  check_cpu(video, op, "video");
  TORCH_CHECK_VALUE(video.dim() == 5, op, ": video must be (B, C, T, H, W), got shape ", video.sizes());
  TORCH_CHECK_VALUE(tubelet >= 1 && patch >= 1, op, ": tubelet and patch must be >= 1, got tubelet=", tubelet,
                    ", patch=", patch);
  const auto s = video.scalar_type();
  TORCH_CHECK_VALUE(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16 || s == at::kByte,
                    op, ": video must be floating point (normalized) or uint8 (0..255), got ", s);
  const int64_t T = video.size(2), H = video.size(3), W = video.size(4);
  TORCH_CHECK_VALUE(T % tubelet == 0 && H % patch == 0 && W % patch == 0, op, ": video of shape ", video.sizes(),
                    " does not divide into cubes of ", tubelet, "x", patch, "x", patch);
  if (imagenet) {
    TORCH_CHECK_VALUE(video.size(1) == 3, op, ": video must have 3 channels (ImageNet mean/std), got shape ",
                      video.sizes());
  }
  Cubes g{};
  g.B = video.size(0);
  g.C = video.size(1);
  g.t = tubelet;
  g.p = patch;
  g.Hp = H / patch;
  g.Wp = W / patch;
  g.N = (T / tubelet) * g.Hp * g.Wp;
  g.sB = video.stride(0);
  g.sC = video.stride(1);
  g.sT = video.stride(2);
  g.sH = video.stride(3);
  g.sW = video.stride(4);
  return g;
}

// A (batch, n) int32/int64 index with values in [0, num_tokens), as contiguous int64.
inline at::Tensor check_index(const at::Tensor& idx, int64_t batch, int64_t n, int64_t num_tokens, const char* op,
                       const char* name) {
  check_cpu(idx, op, name);
  TORCH_CHECK_VALUE(idx.dim() == 2 && idx.size(0) == batch && (n < 0 || idx.size(1) == n), op, ": ", name,
                    " must have shape (", batch, ", ", (n < 0 ? std::string("n") : std::to_string(n)), "), got ",
                    idx.sizes());
  TORCH_CHECK_VALUE(idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt, op, ": ", name,
                    " must be int64 or int32, got ", idx.scalar_type());
  at::Tensor out = idx.to(at::kLong).contiguous();
  const int64_t* p = out.data_ptr<int64_t>();
  const int64_t m = out.numel();
  if (m > 0) {
    const auto [lo, hi] = std::minmax_element(p, p + m);
    TORCH_CHECK_VALUE(*lo >= 0 && *hi < num_tokens, op, ": ", name, " holds token indices in [", *lo, ", ", *hi,
                      "], expected [0, ", num_tokens, ")");
  }
  return out;
}

}  // namespace vmae_fast_native
