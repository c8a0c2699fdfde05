// Native CPU kernels of vmae-fast's decoder input (forward and backward), registered as
// torch.ops.vmae_fast.decoder_input_{fwd,bwd}_cpu with the semantics of decoder_input_ref.
// Parallel over output rows (forward), over columns (grad_mask_token) and over tokens through a
// per-token row list (grad_pos): sums run in a fixed order, whatever the thread count.
#include "common.h"

namespace {
using namespace vmae_fast_native;

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

std::tuple<at::Tensor, at::Tensor> decoder_input_bwd_cpu(const at::Tensor& grad_out,
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
  // grad_z is the visible slice of grad_out: the caller takes that view, nothing to compute here.
  return {grad_mask, grad_pos};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vmae_fast, m) {
  m.def("decoder_input_fwd_cpu(Tensor z, Tensor pos, Tensor mask_token, Tensor visible_idx, Tensor decoder_idx)"
        " -> Tensor");
  m.def("decoder_input_bwd_cpu(Tensor grad_out, Tensor visible_idx, Tensor decoder_idx, int num_tokens,"
        " bool need_pos) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vmae_fast, CPU, m) {
  m.impl("decoder_input_fwd_cpu", &decoder_input_fwd_cpu);
  m.impl("decoder_input_bwd_cpu", &decoder_input_bwd_cpu);
}
