// Native CPU kernels of vmae-fast's cube ops (forward and backward), registered as
// torch.ops.vmae_fast.{gather_cubes,masked_mse_fwd,masked_mse_bwd}_cpu with the semantics of
// gather_cubes_ref / masked_mse_loss_ref (vmae_fast/ops/); Python wires them into autograd.
// Parallel over rows with at::parallel_for; the loss is summed from per-row values in a fixed
// order, so it does not depend on the thread count.
#include "common.h"

namespace {
using namespace vmae_fast_native;

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

#ifndef VMAE_FAST_TORCH_VERSION
#define VMAE_FAST_TORCH_VERSION "unknown"
#endif

TORCH_LIBRARY_FRAGMENT(vmae_fast, m) {
  // torch.__version__ this library was built against (checked by vmae_fast/_native.py).
  m.def("native_torch_version() -> str", [] { return std::string(VMAE_FAST_TORCH_VERSION); });
  m.def("gather_cubes_cpu(Tensor video, Tensor idx, int tubelet, int patch, bool thwc) -> Tensor");
  m.def("masked_mse_fwd_cpu(Tensor pred, Tensor video, Tensor decoder_idx, Tensor weight, int tubelet, int patch,"
        " bool normalize, float eps) -> Tensor");
  m.def("masked_mse_bwd_cpu(Tensor grad_loss, Tensor pred, Tensor video, Tensor decoder_idx, Tensor weight,"
        " int tubelet, int patch, bool normalize, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(vmae_fast, CPU, m) {
  m.impl("gather_cubes_cpu", &gather_cubes_cpu);
  m.impl("masked_mse_fwd_cpu", &masked_mse_fwd_cpu);
  m.impl("masked_mse_bwd_cpu", &masked_mse_bwd_cpu);
}
