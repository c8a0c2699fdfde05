// Native CPU kernels of vmae-fast's three fused ops (forward and backward), registered as
// torch.ops.vmae_fast.*_cpu. Semantics are those of the *_ref functions in vmae_fast/ops/;
// Python (vmae_fast/_native.py + the ops' dispatch) wires them into autograd.
//
// Every op is parallel over output rows with at::parallel_for. Reductions (the loss, grad_pos,
// grad_mask_token) are computed per row / per token / per column and summed in a fixed order,
// so results do not depend on the thread count. Inputs are validated with ValueErrors that
// say what was expected and what was got; index bounds are checked (free on CPU).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

// ImageNet statistics as float32, rounded from the same doubles as vmae_fast.config.
const float kMean[3] = {static_cast<float>(0.485), static_cast<float>(0.456), static_cast<float>(0.406)};
const float kStd[3] = {static_cast<float>(0.229), static_cast<float>(0.224), static_cast<float>(0.225)};

// Elements per parallel chunk: small ops stay on one thread.
constexpr int64_t kGrainElems = 1 << 15;

int64_t grain_rows(int64_t elems_per_row) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, elems_per_row));
}

void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
}

void check_float(const at::Tensor& t, const char* op, const char* name) {
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

Cubes check_video(const at::Tensor& video, int64_t tubelet, int64_t patch, const char* op, bool imagenet) {
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
at::Tensor check_index(const at::Tensor& idx, int64_t batch, int64_t n, int64_t num_tokens, const char* op,
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

// ---------------------------------------------------------------------------------------------
// gather_cubes

template <typename in_t, typename out_t>
void gather_kernel(const in_t* vid, const int64_t* idx, out_t* out, const Cubes& g, int64_t n, bool thwc) {
  const int64_t K = g.t * g.p * g.p, P = g.C * K;
  at::parallel_for(0, g.B * n, grain_rows(P), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const in_t* src0 = vid + g.base(r / n, idx[r]);
      out_t* dst = out + r * P;
      for (int64_t c = 0; c < g.C; ++c) {
        for (int64_t dt = 0; dt < g.t; ++dt) {
          for (int64_t dh = 0; dh < g.p; ++dh) {
            const in_t* s = src0 + c * g.sC + dt * g.sT + dh * g.sH;
            const int64_t k0 = (dt * g.p + dh) * g.p;  // pixel index of (dt, dh, 0) in the cube
            for (int64_t dw = 0; dw < g.p; ++dw) {
              out_t v;
              if constexpr (std::is_same_v<in_t, uint8_t>) {
                // (x / 255 - mean) / std in float32, in the reference's order.
                v = (static_cast<float>(s[dw * g.sW]) / 255.0f - kMean[c]) / kStd[c];
              } else {
                v = s[dw * g.sW];
              }
              dst[thwc ? (k0 + dw) * g.C + c : c * K + k0 + dw] = v;
            }
          }
        }
      }
    }
  });
}

at::Tensor gather_cubes_cpu(const at::Tensor& video, const at::Tensor& idx, int64_t tubelet, int64_t patch,
                            bool thwc) {
  constexpr const char* op = "vmae_fast::gather_cubes_cpu";
  const bool u8 = video.defined() && video.scalar_type() == at::kByte;
  const Cubes g = check_video(video, tubelet, patch, op, u8);
  const at::Tensor ix = check_index(idx, g.B, -1, g.N, op, "idx");
  const int64_t n = ix.size(1), P = g.C * g.t * g.p * g.p;
  if (u8) {
    at::Tensor out = at::empty({g.B, n, P}, video.options().dtype(at::kFloat));
    gather_kernel<uint8_t, float>(video.data_ptr<uint8_t>(), ix.data_ptr<int64_t>(), out.data_ptr<float>(), g, n,
                                  thwc);
    return out;
  }
  at::Tensor out = at::empty({g.B, n, P}, video.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, video.scalar_type(), "gather_cubes_cpu", [&] {
    gather_kernel<scalar_t, scalar_t>(video.data_ptr<scalar_t>(), ix.data_ptr<int64_t>(), out.data_ptr<scalar_t>(),
                                      g, n, thwc);
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// decoder_input

at::Tensor decoder_input_fwd_cpu(const at::Tensor& z, const at::Tensor& pos, const at::Tensor& mask_token,
                                 const at::Tensor& visible_idx, const at::Tensor& decoder_idx) {
  constexpr const char* op = "vmae_fast::decoder_input_fwd_cpu";
  check_cpu(z, op, "z");
  check_cpu(pos, op, "pos");
  check_cpu(mask_token, op, "mask_token");
  TORCH_CHECK_VALUE(z.dim() == 3, op, ": z must be (B, n_vis, D), got shape ", z.sizes());
  const int64_t B = z.size(0), n_vis = z.size(1), D = z.size(2);
  TORCH_CHECK_VALUE(pos.dim() == 2 && pos.size(1) == D, op, ": pos must be (N, ", D, "), got shape ", pos.sizes());
  TORCH_CHECK_VALUE(mask_token.numel() == D && mask_token.dim() >= 1 && mask_token.size(-1) == D, op,
                    ": mask_token must be (", D, ",) or (1, 1, ", D, "), got shape ", mask_token.sizes());
  check_float(z, op, "z");
  check_float(pos, op, "pos");
  check_float(mask_token, op, "mask_token");
  const int64_t N = pos.size(0);
  const at::Tensor vis = check_index(visible_idx, B, n_vis, N, op, "visible_idx");
  const at::Tensor dec = check_index(decoder_idx, B, -1, N, op, "decoder_idx");
  const int64_t n_dec = dec.size(1), L = n_vis + n_dec;

  // Promotion only widens, so converting the inputs first is exact (as PyTorch's own add).
  const auto dtype = c10::promoteTypes(c10::promoteTypes(z.scalar_type(), pos.scalar_type()),
                                        mask_token.scalar_type());
  const at::Tensor zc = z.to(dtype).contiguous(), pc = pos.to(dtype).contiguous();
  const at::Tensor mc = mask_token.to(dtype).contiguous();
  at::Tensor out = at::empty({B, L, D}, z.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "decoder_input_fwd_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = zc.data_ptr<scalar_t>();
    const scalar_t* pp = pc.data_ptr<scalar_t>();
    const scalar_t* mp = mc.data_ptr<scalar_t>();
    const int64_t* vp = vis.data_ptr<int64_t>();
    const int64_t* dp = dec.data_ptr<int64_t>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * L, grain_rows(D), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / L, i = r % L;
        const scalar_t* src;
        int64_t tok;
        if (i < n_vis) {
          src = zp + (b * n_vis + i) * D;
          tok = vp[b * n_vis + i];
        } else {
          src = mp;
          tok = dp[b * n_dec + (i - n_vis)];
        }
        const scalar_t* prow = pp + tok * D;
        scalar_t* dst = op_ + r * D;
        for (int64_t d = 0; d < D; ++d) {
          dst[d] = static_cast<scalar_t>(static_cast<opmath_t>(src[d]) + static_cast<opmath_t>(prow[d]));
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> decoder_input_bwd_cpu(const at::Tensor& grad_out,
                                                                     const at::Tensor& visible_idx,
                                                                     const at::Tensor& decoder_idx,
                                                                     int64_t num_tokens, bool need_pos) {
  constexpr const char* op = "vmae_fast::decoder_input_bwd_cpu";
  check_cpu(grad_out, op, "grad_out");
  TORCH_CHECK_VALUE(grad_out.dim() == 3, op, ": grad_out must be (B, n_vis + n_dec, D), got shape ",
                    grad_out.sizes());
  check_float(grad_out, op, "grad_out");
  TORCH_CHECK_VALUE(num_tokens >= 0, op, ": num_tokens must be >= 0, got ", num_tokens);
  const int64_t B = grad_out.size(0), L = grad_out.size(1), D = grad_out.size(2);
  const at::Tensor vis = check_index(visible_idx, B, -1, num_tokens, op, "visible_idx");
  const at::Tensor dec = check_index(decoder_idx, B, -1, num_tokens, op, "decoder_idx");
  const int64_t n_vis = vis.size(1), n_dec = dec.size(1);
  TORCH_CHECK_VALUE(n_vis + n_dec == L, op, ": grad_out has ", L, " rows per sample, expected n_vis + n_dec = ",
                    n_vis, " + ", n_dec, " = ", n_vis + n_dec);

  const at::Tensor go = grad_out.contiguous();
  at::Tensor grad_z = go.narrow(1, 0, n_vis).clone(at::MemoryFormat::Contiguous);
  at::Tensor grad_mask = at::empty({D}, go.options());
  at::Tensor grad_pos = need_pos ? at::empty({num_tokens, D}, go.options()) : at::empty({0}, go.options());

  // Rows of each token (CSR, in row order), so grad_pos sums without races in a fixed order.
  std::vector<int64_t> start, rows;
  if (need_pos) {
    start.assign(num_tokens + 1, 0);
    const int64_t* vp = vis.data_ptr<int64_t>();
    const int64_t* dp = dec.data_ptr<int64_t>();
    auto token_of = [&](int64_t r) {
      const int64_t b = r / L, i = r % L;
      return i < n_vis ? vp[b * n_vis + i] : dp[b * n_dec + (i - n_vis)];
    };
    for (int64_t r = 0; r < B * L; ++r) ++start[token_of(r) + 1];
    for (int64_t k = 0; k < num_tokens; ++k) start[k + 1] += start[k];
    rows.resize(B * L);
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t r = 0; r < B * L; ++r) rows[fill[token_of(r)]++] = r;
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(), "decoder_input_bwd_cpu", [&] {
    const scalar_t* g = go.data_ptr<scalar_t>();
    // grad_mask_token: per column block, sum the decoder rows of all samples in order.
    scalar_t* gm = grad_mask.data_ptr<scalar_t>();
    at::parallel_for(0, D, grain_rows(B * n_dec), [&](int64_t d0, int64_t d1) {
      std::vector<double> acc(d1 - d0, 0.0);
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t j = 0; j < n_dec; ++j) {
          const scalar_t* row = g + (b * L + n_vis + j) * D;
          for (int64_t d = d0; d < d1; ++d) acc[d - d0] += static_cast<double>(row[d]);
        }
      }
      for (int64_t d = d0; d < d1; ++d) gm[d] = static_cast<scalar_t>(acc[d - d0]);
    });
    if (need_pos) {
      scalar_t* gp = grad_pos.data_ptr<scalar_t>();
      at::parallel_for(0, num_tokens, grain_rows(D * std::max<int64_t>(1, (B * L) / std::max<int64_t>(1, num_tokens))),
                       [&](int64_t k0, int64_t k1) {
                         std::vector<double> acc(D);
                         for (int64_t k = k0; k < k1; ++k) {
                           std::fill(acc.begin(), acc.end(), 0.0);
                           for (int64_t q = start[k]; q < start[k + 1]; ++q) {
                             const scalar_t* row = g + rows[q] * D;
                             for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<double>(row[d]);
                           }
                           scalar_t* dst = gp + k * D;
                           for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(acc[d]);
                         }
                       });
    }
  });
  return {grad_z, grad_mask, grad_pos};
}

// ---------------------------------------------------------------------------------------------
// masked_mse

struct MseInputs {
  Cubes g;
  at::Tensor pred, idx, weight;  // contiguous; pred and weight float32 (as the reference), idx int64
  int64_t n, P;
  double den;  // sum(w) as used for the division: 1 when sum(w) <= 0 (as the reference)
};

MseInputs check_mse(const at::Tensor& pred, const at::Tensor& video, const at::Tensor& decoder_idx,
                    const at::Tensor& weight, int64_t tubelet, int64_t patch, const char* op) {
  MseInputs in;
  in.g = check_video(video, tubelet, patch, op, /*imagenet=*/true);
  check_cpu(pred, op, "pred");
  check_cpu(weight, op, "weight");
  check_float(pred, op, "pred");
  const int64_t P = in.g.C * in.g.t * in.g.p * in.g.p;
  TORCH_CHECK_VALUE(pred.dim() == 3 && pred.size(0) == in.g.B && pred.size(2) == P, op, ": pred must be (",
                    in.g.B, ", n, ", P, ") for cubes of ", in.g.C, "x", tubelet, "x", patch, "x", patch,
                    ", got shape ", pred.sizes());
  in.n = pred.size(1);
  in.P = P;
  in.idx = check_index(decoder_idx, in.g.B, in.n, in.g.N, op, "decoder_idx");
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(0) == in.g.B && weight.size(1) == in.n, op,
                    ": weight must have shape (", in.g.B, ", ", in.n, "), got ", weight.sizes());
  TORCH_CHECK_VALUE(!weight.is_complex(), op, ": weight must be real, got ", weight.scalar_type());
  in.pred = pred.to(at::kFloat).contiguous();
  in.weight = weight.to(at::kFloat).contiguous();
  const float* w = in.weight.data_ptr<float>();
  double den = 0.0;
  for (int64_t r = 0; r < in.weight.numel(); ++r) den += w[r];
  in.den = den > 0 ? den : 1.0;
  return in;
}

// Target of one row in (t, h, w, c) order: un-normalized float32 pixels as the reference
// (x/255 for uint8, x*std + mean for a normalized clip), then per-channel standardization over
// the cube's t*p*p pixels with the unbiased variance (in double).
template <typename in_t>
void row_target(const in_t* vid, const Cubes& g, int64_t b, int64_t token, bool normalize, double eps,
                std::vector<double>& out) {
  const int64_t K = g.t * g.p * g.p, C = g.C;
  const in_t* src0 = vid + g.base(b, token);
  for (int64_t c = 0; c < C; ++c) {
    double sum = 0.0;
    for (int64_t dt = 0; dt < g.t; ++dt) {
      for (int64_t dh = 0; dh < g.p; ++dh) {
        const in_t* s = src0 + c * g.sC + dt * g.sT + dh * g.sH;
        const int64_t k0 = (dt * g.p + dh) * g.p;
        for (int64_t dw = 0; dw < g.p; ++dw) {
          float x;
          if constexpr (std::is_same_v<in_t, uint8_t>) {
            x = static_cast<float>(s[dw * g.sW]) / 255.0f;
          } else {
            x = static_cast<float>(s[dw * g.sW]) * kStd[c];  // separate rounding, as the reference
            x = x + kMean[c];
          }
          out[(k0 + dw) * C + c] = x;
          sum += x;
        }
      }
    }
    if (normalize) {
      const double mean = sum / static_cast<double>(K);
      double ss = 0.0;
      for (int64_t k = 0; k < K; ++k) {
        const double d = out[k * C + c] - mean;
        ss += d * d;
      }
      const double inv = 1.0 / (std::sqrt(ss / static_cast<double>(K - 1)) + eps);  // K == 1: NaN, as torch.var
      for (int64_t k = 0; k < K; ++k) out[k * C + c] = (out[k * C + c] - mean) * inv;
    }
  }
}

// Calls f(row, target) for each row of nonzero weight, rows split over threads.
template <typename F>
void for_weighted_rows(const at::Tensor& video, const MseInputs& in, bool normalize, double eps, const F& f) {
  const int64_t* idx = in.idx.data_ptr<int64_t>();
  const float* w = in.weight.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, video.scalar_type(), "masked_mse_cpu", [&] {
    const scalar_t* vid = video.data_ptr<scalar_t>();
    at::parallel_for(0, in.g.B * in.n, grain_rows(in.P * 4), [&](int64_t r0, int64_t r1) {
      std::vector<double> target(in.P);
      for (int64_t r = r0; r < r1; ++r) {
        if (w[r] == 0.0f) {
          f(r, static_cast<const double*>(nullptr));
          continue;
        }
        row_target<scalar_t>(vid, in.g, r / in.n, idx[r], normalize, eps, target);
        f(r, static_cast<const double*>(target.data()));
      }
    });
  });
}

at::Tensor masked_mse_fwd_cpu(const at::Tensor& pred, const at::Tensor& video, const at::Tensor& decoder_idx,
                              const at::Tensor& weight, int64_t tubelet, int64_t patch, bool normalize, double eps) {
  const MseInputs in = check_mse(pred, video, decoder_idx, weight, tubelet, patch, "vmae_fast::masked_mse_fwd_cpu");
  const int64_t R = in.g.B * in.n, P = in.P;
  std::vector<double> row_loss(R, 0.0);  // weighted per-row losses, summed in order below
  const float* w = in.weight.data_ptr<float>();
  const float* pp = in.pred.data_ptr<float>();
  for_weighted_rows(video, in, normalize, eps, [&](int64_t r, const double* target) {
    if (target == nullptr) return;
    const float* prow = pp + r * P;
    double ss = 0.0;
    for (int64_t e = 0; e < P; ++e) {
      const double d = static_cast<double>(prow[e]) - target[e];
      ss += d * d;
    }
    row_loss[r] = static_cast<double>(w[r]) * (ss / static_cast<double>(P));
  });
  double num = 0.0;
  for (int64_t r = 0; r < R; ++r) num += row_loss[r];
  at::Tensor out = at::empty({}, pred.options().dtype(at::kFloat));
  *out.data_ptr<float>() = static_cast<float>(num / in.den);
  return out;
}

at::Tensor masked_mse_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& pred, const at::Tensor& video,
                              const at::Tensor& decoder_idx, const at::Tensor& weight, int64_t tubelet, int64_t patch,
                              bool normalize, double eps) {
  constexpr const char* op = "vmae_fast::masked_mse_bwd_cpu";
  const MseInputs in = check_mse(pred, video, decoder_idx, weight, tubelet, patch, op);
  check_cpu(grad_loss, op, "grad_loss");
  TORCH_CHECK_VALUE(grad_loss.numel() == 1, op, ": grad_loss must be a scalar, got shape ", grad_loss.sizes());
  const double scale = grad_loss.item<double>() * 2.0 / (static_cast<double>(in.P) * in.den);
  const int64_t P = in.P;
  const float* w = in.weight.data_ptr<float>();
  // float32 like the reference's graph (pred.float()), cast back to pred's dtype at the end.
  at::Tensor grad = at::empty({in.g.B, in.n, P}, in.pred.options());
  const float* pp = in.pred.data_ptr<float>();
  float* gp = grad.data_ptr<float>();
  for_weighted_rows(video, in, normalize, eps, [&](int64_t r, const double* target) {
    float* grow = gp + r * P;
    if (target == nullptr) {
      std::fill(grow, grow + P, 0.0f);
      return;
    }
    const float* prow = pp + r * P;
    const double s = scale * static_cast<double>(w[r]);
    for (int64_t e = 0; e < P; ++e) grow[e] = static_cast<float>(s * (static_cast<double>(prow[e]) - target[e]));
  });
  return grad.to(pred.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vmae_fast, m) {
  m.def("gather_cubes_cpu(Tensor video, Tensor idx, int tubelet, int patch, bool thwc) -> Tensor");
  m.def("decoder_input_fwd_cpu(Tensor z, Tensor pos, Tensor mask_token, Tensor visible_idx, Tensor decoder_idx)"
        " -> Tensor");
  m.def("decoder_input_bwd_cpu(Tensor grad_out, Tensor visible_idx, Tensor decoder_idx, int num_tokens,"
        " bool need_pos) -> (Tensor, Tensor, Tensor)");
  m.def("masked_mse_fwd_cpu(Tensor pred, Tensor video, Tensor decoder_idx, Tensor weight, int tubelet, int patch,"
        " bool normalize, float eps) -> Tensor");
  m.def("masked_mse_bwd_cpu(Tensor grad_loss, Tensor pred, Tensor video, Tensor decoder_idx, Tensor weight,"
        " int tubelet, int patch, bool normalize, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(vmae_fast, CPU, m) {
  m.impl("gather_cubes_cpu", &gather_cubes_cpu);
  m.impl("decoder_input_fwd_cpu", &decoder_input_fwd_cpu);
  m.impl("decoder_input_bwd_cpu", &decoder_input_bwd_cpu);
  m.impl("masked_mse_fwd_cpu", &masked_mse_fwd_cpu);
  m.impl("masked_mse_bwd_cpu", &masked_mse_bwd_cpu);
}
