// The C++ wrappers: argument checks, launch configuration, output allocation and the launch
// of our Triton kernels, for the ops of FlagGems' C++ runtime. Each wrapper ports the host
// side of its Python launcher (kernels/*.py: the same tuning key, the same kernel
// parameters) for the inputs it takes, and refuses the rest (returns false). The launch
// config is the autotuner's, as the Python launcher gets it (TuneQuery, runtime.h: the
// family's key looked up in C++, asked from Python once per key); each family's heuristic
// below is the config while the tuner is off (GEMS_AUTOTUNE=off). The caller
// (runtime.cpp's WrapperKernel) then runs the kernel registered before it, i.e. the Python
// implementation for `flag_gems::` ops (which handles or rejects every input with its own
// error) and the native kernel for `aten::` ops.
//
// Wrappers are boxed (they read the dispatcher's argument stack), so a refusal hands the
// untouched stack to the previous kernel.
#include "runtime.h"

#include <ATen/TensorUtils.h>
#include <ATen/core/stack.h>
#include <ATen/Context.h>
#include <ATen/ExpandUtils.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/full.h>

#include <algorithm>
#include <array>
#include <numeric>
#include <optional>
#include <unordered_map>

namespace gems {

namespace {

using Stack = torch::jit::Stack;
using at::IntArrayRef;

constexpr int64_t kMaxFusedBlock = 16384;  // kernels/_common.py:MAX_FUSED_BLOCK

const c10::IValue& arg(const Stack* s, size_t n, size_t i) { return (*s)[s->size() - n + i]; }

template <class... T>
bool finish(Stack* s, size_t n, T&&... outs) {
  torch::jit::drop(*s, n);
  torch::jit::push(*s, std::forward<T>(outs)...);
  return true;
}

// finish() with the one output a launch gave, or false (the wrapper refused: the kernel before it runs).
bool finish_or_refuse(Stack* s, size_t n, std::optional<at::Tensor> out) {
  return out ? finish(s, n, std::move(*out)) : false;
}

bool is_float(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat; }

// A dense tensor our kernels can read on this key's device (CUDA, or the CPU in interpreter mode).
bool runnable(const at::Tensor& t) {
  if (!t.defined() || t.layout() != at::kStrided || t.is_quantized() || t.is_neg() || t.is_conj()) return false;
  return t.is_cuda() || (t.is_cpu() && interpreter_mode());
}

bool float_tensor(const at::Tensor& t) { return runnable(t) && is_float(t.scalar_type()); }

std::optional<at::Tensor> opt_tensor(const c10::IValue& v) {
  if (v.isNone()) return std::nullopt;
  return v.toTensor();
}

int64_t prod(IntArrayRef s, size_t from = 0, size_t to = SIZE_MAX) {
  int64_t n = 1;
  for (size_t j = from; j < std::min(to, s.size()); ++j) n *= s[j];
  return n;
}

// Strides of `t` seen with `shape` (a view), or nullopt when no view exists.
std::optional<std::vector<int64_t>> view_strides(const at::Tensor& t, IntArrayRef shape) {
  return at::detail::computeStride(t.sizes(), t.strides(), shape);
}

void bump_version(const at::Tensor& t) { t.unsafeGetTensorImpl()->bump_version(); }

// _autotune.pow2_bucket: n rounded up to a power of two (1 for n <= 1), at most `cap`.
int64_t pow2_bucket(int64_t n, int64_t cap) { return std::min(next_pow2(n), cap); }

// ================================================================== RMSNorm (kernels/rms_norm.py)

// row_config: the whole row up to MAX_FUSED_BLOCK in registers, about one warp per KiB.
std::pair<int64_t, int64_t> row_config(int64_t n_cols, int64_t elem) {
  int64_t block = std::min(next_pow2(n_cols), kMaxFusedBlock);
  int64_t warps = std::max<int64_t>(1, std::min<int64_t>(16, block * elem / 1024));
  return {block, warps};
}

constexpr int64_t kRmsRowsBucketCap = 1 << 16;  // kernels/rms_norm.py:_ROWS_BUCKET_CAP

// The forward's (BLOCK_N, num_warps): Tunable "rms_norm", key (rows bucket, n_cols, dtype, has_residual).
std::pair<int64_t, int64_t> rms_norm_config(const at::Tensor& x, int64_t n_rows, int64_t n_cols, bool has_residual) {
  auto cfg = TuneQuery(Family::RmsNorm, x.device(), x.scalar_type())
                 .k(pow2_bucket(n_rows, kRmsRowsBucketCap)).k(n_cols).k(has_residual)
                 .dim(n_rows)
                 .get();
  if (cfg.heuristic) return row_config(n_cols, x.element_size());
  return {cfg[0], cfg[1]};
}

struct Rows3 {
  int64_t n_inner = 0;
  std::vector<std::array<int64_t, 2>> strides;  // (outer, inner) per tensor
};

// _rows3: every tensor (of logical shape `shape` = [*, n_cols]) as [n_outer, n_inner, n_cols],
// unit stride on the columns; the first token split all of them view with. nullopt when
// none does (the Python launcher then copies: refused here).
std::optional<Rows3> rows3(const std::vector<const at::Tensor*>& ts, IntArrayRef shape) {
  const int64_t n_cols = shape.back();
  const int64_t n_rows = prod(shape, 0, shape.size() - 1);
  std::vector<std::array<int64_t, 2>> cands{{1, n_rows}};
  if (shape.size() >= 3 && shape[shape.size() - 2] > 0) {
    int64_t inner = shape[shape.size() - 2];
    cands.push_back({n_rows / inner, inner});
  }
  for (auto& lead : cands) {
    Rows3 r;
    r.n_inner = lead[1];
    bool ok = true;
    for (const at::Tensor* t : ts) {
      if (t->stride(-1) != 1 && n_cols > 1) {
        ok = false;
        break;
      }
      auto st = view_strides(*t, {lead[0], lead[1], n_cols});
      if (!st) {
        ok = false;
        break;
      }
      r.strides.push_back({(*st)[0], (*st)[1]});
    }
    if (ok) return r;
  }
  return std::nullopt;
}

// One launch of _rms_norm_fwd_kernel; `shape` is the logical [*, n_cols] of every tensor.
bool rms_norm_launch(const at::Tensor& x, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& w,
                     const at::Tensor& y, const std::optional<at::Tensor>& h, const std::optional<at::Tensor>& rstd,
                     IntArrayRef shape, double eps, double weight_offset, bool round_before_weight) {
  std::vector<const at::Tensor*> ts{&x, &y};
  if (residual) ts.push_back(&*residual);
  if (h) ts.push_back(&*h);
  auto r3 = rows3(ts, shape);
  if (!r3) return false;
  const int64_t n_cols = shape.back();
  const int64_t n_rows = prod(shape, 0, shape.size() - 1);
  if (n_rows * n_cols == 0) return true;
  auto [block, warps] = rms_norm_config(x, n_rows, n_cols, residual.has_value());
  const auto& s = r3->strides;
  std::array<int64_t, 2> rs{0, 0}, hs{0, 0};
  if (residual) rs = s[2];
  if (h) hs = s[residual ? 3 : 2];
  Launch l(Kernel::RmsNormFwd);
  l.tensor(x).tensor(residual ? *residual : x).tensor(w ? *w : x).tensor(y).tensor(h ? *h : y).tensor(rstd ? *rstd : y);
  l.i(s[0][0]).i(s[0][1]).i(rs[0]).i(rs[1]).i(s[1][0]).i(s[1][1]).i(hs[0]).i(hs[1]);
  l.i(r3->n_inner).i(n_cols).f(eps).f(weight_offset);
  l.cb(residual.has_value()).cb(w.has_value()).cb(round_before_weight && w.has_value()).cb(rstd.has_value());
  l.c(block).cb(n_cols <= kMaxFusedBlock);
  l.run(x, n_rows, 1, 1, warps);
  return true;
}

// check_rms_norm_args, as a yes/no (the Python implementation raises the errors).
bool rms_norm_args_ok(const at::Tensor& x, const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& r) {
  if (!float_tensor(x) || x.dim() < 1) return false;
  if (w && (!float_tensor(*w) || w->dim() != 1 || w->size(0) != x.size(-1) || w->device() != x.device())) return false;
  if (r && (!float_tensor(*r) || r->sizes() != x.sizes() || r->scalar_type() != x.scalar_type() ||
            r->device() != x.device())) {
    return false;
  }
  return true;
}

// flag_gems::rms_norm(Tensor input, Tensor? weight, float epsilon, float weight_offset=0.0,
//                     bool round_before_weight=False) -> Tensor
bool rms_norm_op(const c10::OperatorHandle&, Stack* s) {
  const auto x = arg(s, 5, 0).toTensor();
  const auto w = opt_tensor(arg(s, 5, 1));
  if (!rms_norm_args_ok(x, w, std::nullopt)) return false;
  auto y = at::empty(x.sizes(), x.options());
  if (!rms_norm_launch(x, std::nullopt, w, y, std::nullopt, std::nullopt, x.sizes(), arg(s, 5, 2).toDouble(),
                       arg(s, 5, 3).toDouble(), arg(s, 5, 4).toBool())) {
    return false;
  }
  return finish(s, 5, std::move(y));
}

// flag_gems::add_rms_norm(Tensor input, Tensor residual, Tensor? weight, float epsilon, ...) -> (Tensor, Tensor)
bool add_rms_norm_op(const c10::OperatorHandle&, Stack* s) {
  const auto x = arg(s, 6, 0).toTensor();
  const auto r = arg(s, 6, 1).toTensor();
  const auto w = opt_tensor(arg(s, 6, 2));
  if (!rms_norm_args_ok(x, w, r)) return false;
  auto y = at::empty(x.sizes(), x.options());
  auto h = at::empty(x.sizes(), x.options());
  if (!rms_norm_launch(x, r, w, y, h, std::nullopt, x.sizes(), arg(s, 6, 3).toDouble(), arg(s, 6, 4).toDouble(),
                       arg(s, 6, 5).toBool())) {
    return false;
  }
  return finish(s, 6, std::move(y), std::move(h));
}

// flag_gems::fused_add_rms_norm(Tensor(a!) input, Tensor(b!) residual, Tensor? weight, float epsilon, ...) -> ()
bool fused_add_rms_norm_op(const c10::OperatorHandle&, Stack* s) {
  const auto x = arg(s, 6, 0).toTensor();
  const auto r = arg(s, 6, 1).toTensor();
  const auto w = opt_tensor(arg(s, 6, 2));
  if (!rms_norm_args_ok(x, w, r)) return false;
  // In place: y over x, h over the residual (the kernel reads h back in its second pass).
  if (!rms_norm_launch(x, r, w, x, r, std::nullopt, x.sizes(), arg(s, 6, 3).toDouble(), arg(s, 6, 4).toDouble(),
                       arg(s, 6, 5).toBool())) {
    return false;
  }
  bump_version(x);
  bump_version(r);
  torch::jit::drop(*s, 6);
  return true;
}

// aten::_fused_rms_norm(Tensor input, int[] normalized_shape, Tensor? weight, float? eps) -> (Tensor, Tensor)
// (lowerings/fused_rms_norm.py's entry: trailing dims one unit-stride row, weight of the input's dtype)
bool fused_rms_norm_aten(const c10::OperatorHandle&, Stack* s) {
  const auto x = arg(s, 4, 0).toTensor();
  const auto ns = arg(s, 4, 1).toIntVector();
  const auto w = opt_tensor(arg(s, 4, 2));
  const auto& eps_iv = arg(s, 4, 3);
  const int64_t k = static_cast<int64_t>(ns.size());
  if (!float_tensor(x) || k == 0 || x.dim() < k) return false;
  for (int64_t j = 0; j < k; ++j) {
    if (x.size(x.dim() - k + j) != ns[j]) return false;
  }
  const int64_t n = prod(ns);
  if (n == 0) return false;
  int64_t expected = 1;  // the trailing k dims: one unit-stride row
  for (int64_t j = x.dim() - 1; j >= x.dim() - k; --j) {
    if (x.size(j) != 1 && x.stride(j) != expected) return false;
    expected *= x.size(j);
  }
  if (w && (!float_tensor(*w) || !w->is_contiguous() || w->sizes() != IntArrayRef(ns) || w->device() != x.device() ||
            w->scalar_type() != x.scalar_type())) {
    return false;
  }
  const double eps = eps_iv.isNone() ? 1.1920928955078125e-07 : eps_iv.toDouble();  // finfo(float32).eps
  std::vector<int64_t> lead(x.sizes().begin(), x.sizes().end() - k), shape = lead, rstd_shape = lead;
  shape.push_back(n);
  rstd_shape.insert(rstd_shape.end(), k, 1);
  auto y = at::empty(x.sizes(), x.options());
  auto rstd = at::empty(rstd_shape, x.options().dtype(at::kFloat));
  std::optional<at::Tensor> w1;
  if (w) w1 = w->view({n});
  if (!rms_norm_launch(x, std::nullopt, w1, y, std::nullopt, rstd, shape, eps, 0.0, false)) return false;
  return finish(s, 4, std::move(y), std::move(rstd));
}

// ================================================================== SiLU·mul (kernels/act_and_mul.py)

constexpr int64_t kActTile = 2048, kActManyRows = 4096, kActMinTile = 512, kActRowsBucketCap = 1 << 16;

struct ActConfig {
  int64_t block_m, block_n, warps;
};

ActConfig act_config(int64_t rows_bucket, int64_t n_cols, int64_t elem, int64_t sms) {
  int64_t bn = std::min(next_pow2(n_cols), kActTile);
  int64_t bm = std::max<int64_t>(1, std::min(kActTile / bn, rows_bucket));
  auto programs = [&](int64_t m, int64_t nn) { return cdiv(rows_bucket, m) * cdiv(n_cols, nn); };
  while (programs(bm, bn) < 2 * sms && bm * bn > kActMinTile) {
    if (bm > 1)
      bm /= 2;
    else
      bn /= 2;
  }
  int64_t vec = std::max<int64_t>(1, 16 / elem);
  int64_t warps = std::max<int64_t>(1, std::min<int64_t>(8, (bm * bn) / (2 * vec * 32)));
  if (rows_bucket >= kActManyRows && bm * bn == kActTile) warps = 16;
  return {bm, bn, warps};
}

// _layout: the token dims `lead` of every tensor folded into one [n_outer, n_inner] (dims
// whose strides merge in every tensor are joined); nullopt above two groups.
struct Fold {
  int64_t n_outer, n_inner;
  std::vector<std::array<int64_t, 2>> strides;
};

std::optional<Fold> fold_tokens(IntArrayRef lead, const std::vector<const at::Tensor*>& ts) {
  const size_t k = lead.size();
  Fold f{1, 1, {}};
  if (k == 1) {
    f.n_inner = lead[0];
    for (auto* t : ts) f.strides.push_back({0, t->stride(0)});
    return f;
  }
  std::vector<size_t> dims;
  for (size_t j = 0; j < k; ++j)
    if (lead[j] != 1) dims.push_back(j);
  if (dims.empty()) {
    f.strides.assign(ts.size(), {0, 0});
    return f;
  }
  std::vector<std::vector<size_t>> groups{{dims[0]}};
  for (size_t j = 1; j < dims.size(); ++j) {
    size_t prev = dims[j - 1], cur = dims[j];
    bool merge = true;
    for (auto* t : ts) merge = merge && t->stride(prev) == t->stride(cur) * lead[cur];
    if (merge)
      groups.back().push_back(cur);
    else
      groups.push_back({cur});
  }
  if (groups.size() > 2) return std::nullopt;
  if (groups.size() == 1) {
    for (size_t d : groups[0]) f.n_inner *= lead[d];
    for (auto* t : ts) f.strides.push_back({0, t->stride(groups[0].back())});
    return f;
  }
  for (size_t d : groups[0]) f.n_outer *= lead[d];
  for (size_t d : groups[1]) f.n_inner *= lead[d];
  for (auto* t : ts) f.strides.push_back({t->stride(groups[0].back()), t->stride(groups[1].back())});
  return f;
}

// act(a) * b for two tensors of one shape (ACT 0: silu, 1: gelu erf, 2: gelu tanh); b is read
// b_off elements past b's data (the one-tensor form passes x twice and b_off = d).
bool act_and_mul_launch(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out, int64_t act,
                        int64_t b_off = 0) {
  const int64_t n_cols = out.size(-1);
  const int64_t n_rows = out.numel() / std::max<int64_t>(n_cols, 1);
  if (out.numel() == 0) return true;
  for (auto* t : {&a, &b, &out})
    if (t->stride(-1) != 1) return false;  // the Python launcher copies these: refused here
  IntArrayRef lead = out.sizes().slice(0, out.dim() - 1);
  auto f = fold_tokens(lead, {&a, &b, &out});
  if (!f) return false;
  // Tunable "act_and_mul": key (rows bucket, n_cols, dtype), fields (BLOCK_M, BLOCK_N, num_warps).
  const int64_t rows_bucket = std::min(next_pow2(n_rows), kActRowsBucketCap);
  auto tuned = TuneQuery(Family::ActAndMul, out.device(), out.scalar_type()).k(rows_bucket).k(n_cols).dim(n_rows).get();
  const ActConfig cfg = tuned.heuristic ? act_config(rows_bucket, n_cols, out.element_size(), num_sms(out.device()))
                                        : ActConfig{tuned[0], tuned[1], tuned[2]};
  Launch l(Kernel::ActAndMulFwd);
  l.tensor(a).tensor(b).tensor(out);
  for (auto& st : f->strides) l.i(st[0]).i(st[1]);
  l.i(b_off).i(n_rows).i(f->n_inner).i(n_cols);
  l.c(act).cb(f->n_outer > 1).c(cfg.block_m).c(cfg.block_n);
  l.run(out, cdiv(n_rows, cfg.block_m), cdiv(n_cols, cfg.block_n), 1, cfg.warps);
  return true;
}

// act_and_mul_fwd: act(a) * b into a new tensor (check_act_and_mul_args), or nullopt (refused).
std::optional<at::Tensor> act_and_mul_two(const at::Tensor& a, const at::Tensor& b, int64_t act) {
  if (!float_tensor(a) || !float_tensor(b) || a.dim() < 1 || a.sizes() != b.sizes() ||
      a.scalar_type() != b.scalar_type() || a.device() != b.device()) {
    return std::nullopt;
  }
  auto out = at::empty(a.sizes(), a.options());
  if (!act_and_mul_launch(a, b, out, act)) return std::nullopt;
  return out;
}

// flag_gems::silu_and_mul(Tensor a, Tensor b) -> Tensor
bool silu_and_mul_op(const c10::OperatorHandle&, Stack* s) {
  return finish_or_refuse(s, 2, act_and_mul_two(arg(s, 2, 0).toTensor(), arg(s, 2, 1).toTensor(), 0));
}

// act_code("gelu", approximate): "none" -> 1 (erf), "tanh" -> 2; -1 for what the Python op rejects.
int64_t gelu_code(const std::string& approximate) {
  if (approximate == "none") return 1;
  if (approximate == "tanh") return 2;
  return -1;
}

// flag_gems::gelu_and_mul(Tensor a, Tensor b, str approximate="none") -> Tensor
bool gelu_and_mul_op(const c10::OperatorHandle&, Stack* s) {
  const int64_t act = gelu_code(arg(s, 3, 2).toStringRef());
  if (act < 0) return false;
  return finish_or_refuse(s, 3, act_and_mul_two(arg(s, 3, 0).toTensor(), arg(s, 3, 1).toTensor(), act));
}

// act_and_mul_fused_fwd: act(x[..., :d]) * x[..., d:] into out (new and contiguous when not given).
std::optional<at::Tensor> act_and_mul_fused_launch(const at::Tensor& x, int64_t act,
                                                   const std::optional<at::Tensor>& out_in = std::nullopt) {
  if (!float_tensor(x) || x.dim() < 1 || x.size(-1) % 2) return std::nullopt;  // check_act_and_mul_fused_args
  const int64_t d = x.size(-1) / 2;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = d;
  at::Tensor out;
  if (out_in) {  // check_out
    out = *out_in;
    if (!runnable(out) || out.sizes() != IntArrayRef(shape) || out.scalar_type() != x.scalar_type() ||
        out.device() != x.device()) {
      return std::nullopt;
    }
  } else {
    out = at::empty(shape, x.options());
  }
  if (!act_and_mul_launch(x, x, out, act, d)) return std::nullopt;
  return out;
}

// flag_gems::silu_and_mul_fused(Tensor x) -> Tensor
bool silu_and_mul_fused_op(const c10::OperatorHandle&, Stack* s) {
  return finish_or_refuse(s, 1, act_and_mul_fused_launch(arg(s, 1, 0).toTensor(), 0));
}

// flag_gems::gelu_and_mul_fused(Tensor x, str approximate="none") -> Tensor
bool gelu_and_mul_fused_op(const c10::OperatorHandle&, Stack* s) {
  const int64_t act = gelu_code(arg(s, 2, 1).toStringRef());
  if (act < 0) return false;
  return finish_or_refuse(s, 2, act_and_mul_fused_launch(arg(s, 2, 0).toTensor(), act));
}

// flag_gems::silu_and_mul_out(Tensor(a!) out, Tensor x) -> () (vLLM's convention)
bool silu_and_mul_out_op(const c10::OperatorHandle&, Stack* s) {
  const auto out = arg(s, 2, 0).toTensor();
  if (!act_and_mul_fused_launch(arg(s, 2, 1).toTensor(), 0, out)) return false;
  bump_version(out);
  torch::jit::drop(*s, 2);
  return true;
}

// ================================================================== RoPE (kernels/rotary_embedding.py)

struct RopeLayout {
  at::Tensor t;  // the tensor or its contiguous copy
  std::array<int64_t, 3> strides;  // (outer, inner, head)
  std::array<int64_t, 2> split;
  bool copied;
};

// _layout: `t (*tokens, heads, D)` as [n_outer, n_inner, heads, D], from the first split that views.
RopeLayout rope_layout(const at::Tensor& t, const std::vector<std::array<int64_t, 2>>& splits) {
  const int64_t nd = t.dim(), heads = t.size(-2), d = t.size(-1);
  if (t.stride(-1) == 1 || d <= 1) {
    if (nd == 3 && splits[0][0] == 1) return {t, {0, t.stride(0), t.stride(1)}, splits[0], false};
    if (nd == 4 && splits[0][0] == t.size(0) && splits[0][1] == t.size(1))
      return {t, {t.stride(0), t.stride(1), t.stride(2)}, splits[0], false};
    for (auto& sp : splits) {
      auto st = view_strides(t, {sp[0], sp[1], heads, d});
      if (st) return {t, {(*st)[0], (*st)[1], (*st)[2]}, sp, false};
    }
  }
  auto sp = splits.back();
  auto c = t.contiguous();
  auto st = view_strides(c, {sp[0], sp[1], heads, d});
  TORCH_INTERNAL_ASSERT(st.has_value());
  return {c, {(*st)[0], (*st)[1], (*st)[2]}, sp, true};
}

struct RopeConfig {
  int64_t bhq, bhk, br2, bp, warps;
};

constexpr int64_t kRopeTokensBucketCap = 1 << 16;  // kernels/rotary_embedding.py:_TOKENS_BUCKET_CAP

RopeConfig rope_config(int64_t nq, int64_t nk, int64_t half_rot, int64_t head_dim, int64_t elem, bool copy_pass) {
  int64_t br2 = next_pow2(half_rot);
  int64_t cap = std::max<int64_t>(1, 1024 / br2);
  int64_t bhq = std::min(next_pow2(nq), cap), bhk = std::min(next_pow2(nk), cap);
  int64_t bp = copy_pass ? next_pow2(head_dim - 2 * half_rot) : 1;
  int64_t vec = std::max<int64_t>(1, 16 / elem);
  int64_t warps = std::max<int64_t>(1, std::min<int64_t>(8, (bhq * br2) / (2 * vec * 32)));
  return {bhq, bhk, br2, bp, warps};
}

bool is_index(const at::Tensor& t) {
  return runnable(t) && (t.scalar_type() == at::kInt || t.scalar_type() == at::kLong);
}

// rope_fwd with half tables; outputs fresh (nullopt) or the inputs themselves (in place).
// _run_tokens: rotate q/k (*tokens, H, D) into q_out/k_out (the inputs themselves when in place).
// False (before any launch) where the Python launcher would rotate in a contiguous copy.
bool rope_run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_out, const at::Tensor& k_out, bool inplace,
              const std::vector<std::array<int64_t, 2>>& splits, const at::Tensor& cos, const at::Tensor& sin,
              const std::array<int64_t, 6>& table, const std::optional<at::Tensor>& pos_in, int64_t n_pos,
              int64_t half_rot, bool full_table, bool interleaved) {
  const int64_t head_dim = q.size(-1);
  auto ql = rope_layout(q, splits);
  std::vector<std::array<int64_t, 2>> one{ql.split};
  auto kl = rope_layout(k, one);
  if (ql.copied || kl.copied) {
    if (inplace) return false;  // the Python launcher writes back copies
  }
  RopeLayout qo = inplace ? ql : rope_layout(q_out, one);
  RopeLayout ko = inplace ? kl : rope_layout(k_out, one);
  if (qo.copied || ko.copied) return false;  // outputs that do not view: the Python launcher copies back
  const auto split = ql.split;
  at::Tensor pos;
  std::array<int64_t, 2> pos_strides{0, 0};
  if (pos_in) {
    pos = *pos_in;
    if (pos.dim() == 1 && split[0] == 1) {
      pos_strides = {0, pos.stride(0)};
    } else if (pos.dim() == 2 && pos.size(0) == split[0] && pos.size(1) == split[1]) {
      pos_strides = {pos.stride(0), pos.stride(1)};
    } else {
      pos = pos.reshape({split[0], split[1]});
      pos_strides = {pos.stride(0), pos.stride(1)};
    }
  }
  const int64_t nq = q.size(-2), nk = k.size(-2);
  const bool copy_pass = !inplace && 2 * half_rot < head_dim;
  // Tunable "rope": key (tokens bucket, q heads, k heads, r/2, head_dim, dtype, copy pass,
  // interleaved, full table), fields (BLOCK_HQ, BLOCK_HK, BLOCK_R2, BLOCK_P, num_warps).
  const int64_t n_tokens = split[0] * split[1];
  auto tuned = TuneQuery(Family::Rope, q.device(), q.scalar_type())
                   .k(pow2_bucket(n_tokens, kRopeTokensBucketCap)).k(nq).k(nk).k(half_rot).k(head_dim)
                   .k(copy_pass).k(interleaved).k(full_table)
                   .dim(n_tokens)
                   .get();
  const RopeConfig cfg = tuned.heuristic ? rope_config(nq, nk, half_rot, head_dim, q.element_size(), copy_pass)
                                         : RopeConfig{tuned[0], tuned[1], tuned[2], tuned[3], tuned[4]};
  const int64_t n_q_blocks = cdiv(nq, cfg.bhq), n_k_blocks = cdiv(nk, cfg.bhk);
  Launch l(Kernel::Rope);
  l.tensor(ql.t).tensor(kl.t).tensor(qo.t).tensor(ko.t).tensor(cos).tensor(sin);
  if (pos_in)
    l.tensor(pos);
  else
    l.tensor(cos);
  for (auto* lay : {&ql, &kl, &qo, &ko})
    for (int64_t v : lay->strides) l.i(v);
  for (int64_t v : table) l.i(v);
  l.i(pos_strides[0]).i(pos_strides[1]);
  l.i(split[1]).i(nq).i(nk).i(n_q_blocks).i(n_pos);
  l.c(half_rot).c(head_dim).cb(pos_in.has_value()).cb(full_table).cb(interleaved).cb(false).cb(copy_pass);
  l.c(cfg.bhq).c(cfg.bhk).c(cfg.br2).c(cfg.bp);
  l.run(q, split[0] * split[1], n_q_blocks + n_k_blocks, 1, cfg.warps);
  return true;
}

bool rope_launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos_in, const at::Tensor& sin_in,
                 const std::optional<at::Tensor>& pos_in, bool interleaved, bool inplace, at::Tensor* q_out,
                 at::Tensor* k_out) {
  // check_rope_args
  if (!float_tensor(q) || !float_tensor(k) || k.scalar_type() != q.scalar_type() || k.dim() != q.dim() || q.dim() < 3)
    return false;
  const int64_t head_dim = q.size(-1);
  if (head_dim % 2 || k.size(-1) != head_dim) return false;
  if (k.sizes().slice(0, k.dim() - 2) != q.sizes().slice(0, q.dim() - 2)) return false;
  if (!float_tensor(cos_in) || !float_tensor(sin_in) || cos_in.sizes() != sin_in.sizes() || cos_in.dim() != 2)
    return false;
  const int64_t half_rot = cos_in.size(1), n_pos = cos_in.size(0);
  if (half_rot < 1 || 2 * half_rot > head_dim) return false;
  const at::Device dev = q.device();
  if (k.device() != dev || cos_in.device() != dev || sin_in.device() != dev) return false;
  IntArrayRef lead = q.sizes().slice(0, q.dim() - 2);
  std::vector<std::array<int64_t, 2>> splits;
  if (!pos_in) {
    if (q.dim() != 4 || q.size(1) > n_pos) return false;
    splits.push_back({q.size(0), q.size(1)});
  } else {
    const auto& p = *pos_in;
    if (!is_index(p) || p.sizes() != lead || p.device() != dev) return false;
    if (p.is_cpu() && p.numel()) {  // the Python launcher raises for out-of-range rows: let it
      auto lo = p.min().item<int64_t>(), hi = p.max().item<int64_t>();
      if (lo < 0 || hi >= n_pos) return false;
    }
    const int64_t n = prod(lead);
    if (lead.size() >= 2 && lead.back() > 0) splits.push_back({n / lead.back(), lead.back()});
    splits.push_back({1, n});
  }
  *q_out = inplace ? q : at::empty(q.sizes(), q.options());
  *k_out = inplace ? k : at::empty(k.sizes(), k.options());
  if (q.numel() == 0 && k.numel() == 0) return true;
  const at::Tensor cos = (cos_in.stride(-1) == 1 || cos_in.size(-1) <= 1) ? cos_in : cos_in.contiguous();
  const at::Tensor sin = (sin_in.stride(-1) == 1 || sin_in.size(-1) <= 1) ? sin_in : sin_in.contiguous();
  std::array<int64_t, 6> table;
  if (!pos_in)
    table = {0, cos.stride(0), 0, 0, sin.stride(0), 0};
  else
    table = {0, 0, cos.stride(0), 0, 0, sin.stride(0)};
  return rope_run(q, k, *q_out, *k_out, inplace, splits, cos, sin, table, pos_in, n_pos, half_rot, false,
                  interleaved);
}

// rope_hf_fwd: q [B, Hq, S, D], k [B, Hk, S, D], full tables [S, r], [B or 1, S, r] or
// [B or 1, 1, S, r]; outputs laid out like the inputs (torch.empty_like, as the fake says).
bool rope_hf_launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos_in, const at::Tensor& sin_in,
                    bool interleaved, at::Tensor* q_out, at::Tensor* k_out) {
  // check_rope_hf_args
  if (!float_tensor(q) || !float_tensor(k) || k.scalar_type() != q.scalar_type() || q.dim() != 4 || k.dim() != 4)
    return false;
  const int64_t batch = q.size(0), seq = q.size(2), head_dim = q.size(3);
  if (k.size(0) != batch || k.size(2) != seq || k.size(3) != head_dim || head_dim % 2) return false;
  if (!float_tensor(cos_in) || !float_tensor(sin_in) || cos_in.sizes() != sin_in.sizes()) return false;
  const at::Device dev = q.device();
  if (k.device() != dev || cos_in.device() != dev || sin_in.device() != dev) return false;
  // _hf_table_3d
  auto table_3d = [&](const at::Tensor& t) -> std::optional<at::Tensor> {
    at::Tensor v = t;
    if (v.dim() == 2) v = v.unsqueeze(0);
    else if (v.dim() == 4 && v.size(1) == 1) v = v.squeeze(1);
    if (v.dim() != 3 || (v.size(0) != 1 && v.size(0) != batch) || v.size(1) != seq) return std::nullopt;
    return v;
  };
  auto cos3o = table_3d(cos_in), sin3o = table_3d(sin_in);
  if (!cos3o || !sin3o) return false;
  const int64_t rot = cos_in.size(-1);
  if (rot < 2 || rot % 2 || rot > head_dim) return false;
  const int64_t half_rot = rot / 2;
  *q_out = at::empty_like(q);
  *k_out = at::empty_like(k);
  if (q.numel() == 0 && k.numel() == 0) return true;
  const at::Tensor cos3 = cos3o->stride(-1) == 1 ? *cos3o : cos3o->contiguous();
  const at::Tensor sin3 = sin3o->stride(-1) == 1 ? *sin3o : sin3o->contiguous();
  const std::array<int64_t, 6> table{cos3.size(0) > 1 ? cos3.stride(0) : 0, cos3.stride(1), 0,
                                     sin3.size(0) > 1 ? sin3.stride(0) : 0, sin3.stride(1), 0};
  // [B, H, S, D] -> [B, S, H, D]: tokens (b, s) become (outer, inner) with no copy.
  const std::vector<std::array<int64_t, 2>> splits{{batch, seq}};
  return rope_run(q.transpose(1, 2), k.transpose(1, 2), q_out->transpose(1, 2), k_out->transpose(1, 2), false,
                  splits, cos3, sin3, table, std::nullopt, 0, half_rot, true, interleaved);
}

// flag_gems::rotary_embedding(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor? position_ids=None,
//                             bool rotary_interleaved=False) -> (Tensor, Tensor)
bool rotary_embedding_op(const c10::OperatorHandle&, Stack* s) {
  at::Tensor qo, ko;
  if (!rope_launch(arg(s, 6, 0).toTensor(), arg(s, 6, 1).toTensor(), arg(s, 6, 2).toTensor(), arg(s, 6, 3).toTensor(),
                   opt_tensor(arg(s, 6, 4)), arg(s, 6, 5).toBool(), false, &qo, &ko)) {
    return false;
  }
  return finish(s, 6, std::move(qo), std::move(ko));
}

// flag_gems::rotary_embedding_hf(Tensor q, Tensor k, Tensor cos, Tensor sin, bool rotary_interleaved=False)
//     -> (Tensor, Tensor)
bool rotary_embedding_hf_op(const c10::OperatorHandle&, Stack* s) {
  at::Tensor qo, ko;
  if (!rope_hf_launch(arg(s, 5, 0).toTensor(), arg(s, 5, 1).toTensor(), arg(s, 5, 2).toTensor(),
                      arg(s, 5, 3).toTensor(), arg(s, 5, 4).toBool(), &qo, &ko)) {
    return false;
  }
  return finish(s, 5, std::move(qo), std::move(ko));
}

// flag_gems::rotary_embedding_(Tensor(a!) q, Tensor(b!) k, ...) -> ()
bool rotary_embedding_inplace_op(const c10::OperatorHandle&, Stack* s) {
  const auto q = arg(s, 6, 0).toTensor();
  const auto k = arg(s, 6, 1).toTensor();
  at::Tensor qo, ko;
  if (!rope_launch(q, k, arg(s, 6, 2).toTensor(), arg(s, 6, 3).toTensor(), opt_tensor(arg(s, 6, 4)),
                   arg(s, 6, 5).toBool(), true, &qo, &ko)) {
    return false;
  }
  bump_version(q);
  bump_version(k);
  torch::jit::drop(*s, 6);
  return true;
}

// rope_cache_fwd: vLLM's layout. positions (*), query (*, Hq * D) or (*, Hq, D), key likewise, a
// cos|sin cache [max_pos, r] (cos in columns [0, r/2), sin in [r/2, r)): the half-table launch
// above on (*, H, D) views with the cache's two column halves as the tables. Outputs (out of
// place) are new contiguous tensors of query's / key's shape. False where the Python launcher
// decides (no key, a bad argument, positions on the CPU out of range: it raises).
bool rope_cache_launch(const at::Tensor& positions, const at::Tensor& query, const at::Tensor& key,
                       int64_t head_size, const at::Tensor& cache, bool is_neox, bool inplace, at::Tensor* q_out,
                       at::Tensor* k_out) {
  // check_rope_cache_args (rope_launch checks dtypes, devices and the positions against the token dims)
  if (!runnable(positions) || positions.dim() < 1 || head_size <= 0 || head_size % 2) return false;
  if (!float_tensor(cache) || cache.dim() != 2) return false;
  const int64_t rot = cache.size(1);
  if (rot < 2 || rot % 2 || rot > head_size) return false;
  const int64_t nd = positions.dim();
  auto heads3 = [&](const at::Tensor& t) -> std::optional<at::Tensor> {  // _heads3
    if (!t.defined() || t.dim() < nd + 1 || t.sizes().slice(0, nd) != positions.sizes()) return std::nullopt;
    if (t.dim() == nd + 2) return t.size(-1) == head_size ? std::optional<at::Tensor>(t) : std::nullopt;
    if (t.dim() != nd + 1 || t.size(-1) % head_size) return std::nullopt;
    std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end() - 1);
    shape.push_back(t.size(-1) / head_size);
    shape.push_back(head_size);
    return t.view(shape);  // splitting the last dim always views
  };
  auto q3 = heads3(query), k3 = heads3(key);
  if (!q3 || !k3) return false;
  const int64_t half = rot / 2;
  at::Tensor qo3, ko3;
  if (!rope_launch(*q3, *k3, cache.slice(1, 0, half), cache.slice(1, half, rot), positions, !is_neox, inplace, &qo3,
                   &ko3)) {
    return false;
  }
  *q_out = inplace ? query : qo3.view(query.sizes());
  *k_out = inplace ? key : ko3.view(key.sizes());
  return true;
}

// flag_gems::rotary_embedding_cache(Tensor positions, Tensor query, Tensor key, int head_size,
//                                   Tensor cos_sin_cache, bool is_neox) -> (Tensor, Tensor)
bool rotary_embedding_cache_op(const c10::OperatorHandle&, Stack* s) {
  at::Tensor qo, ko;
  if (!rope_cache_launch(arg(s, 6, 0).toTensor(), arg(s, 6, 1).toTensor(), arg(s, 6, 2).toTensor(),
                         arg(s, 6, 3).toInt(), arg(s, 6, 4).toTensor(), arg(s, 6, 5).toBool(), false, &qo, &ko)) {
    return false;
  }
  return finish(s, 6, std::move(qo), std::move(ko));
}

// flag_gems::rotary_embedding_cache_(Tensor positions, Tensor(a!) query, Tensor(b!)? key, int head_size,
//                                    Tensor cos_sin_cache, bool is_neox) -> ()
bool rotary_embedding_cache_inplace_op(const c10::OperatorHandle&, Stack* s) {
  const auto key = opt_tensor(arg(s, 6, 2));
  if (!key) return false;  // query alone: the Python launcher
  const auto query = arg(s, 6, 1).toTensor();
  at::Tensor qo, ko;
  if (!rope_cache_launch(arg(s, 6, 0).toTensor(), query, *key, arg(s, 6, 3).toInt(), arg(s, 6, 4).toTensor(),
                         arg(s, 6, 5).toBool(), true, &qo, &ko)) {
    return false;
  }
  bump_version(query);
  bump_version(*key);
  torch::jit::drop(*s, 6);
  return true;
}

// ================================================================== add (kernels/pointwise.py's generator)

constexpr int kMaxDims = 8;  // pointwise.MAX_DIMS
constexpr int64_t kPointwiseBucketCap = int64_t(1) << 28;  // pointwise._N_BUCKET_CAP

// _iteration_order: dims outermost to innermost, as TensorIterator's reorder_dimensions.
std::vector<int64_t> iteration_order(IntArrayRef shape, const std::vector<std::vector<int64_t>>& strides) {
  const int64_t nd = static_cast<int64_t>(shape.size());
  std::vector<int64_t> perm(nd);
  for (int64_t j = 0; j < nd; ++j) perm[j] = nd - 1 - j;  // innermost first
  auto should_swap = [&](int64_t d0, int64_t d1) {
    for (auto& st : strides) {
      int64_t s0 = st[d0], s1 = st[d1];
      if (s0 == 0 || s1 == 0) continue;
      if (s0 != s1) return s0 < s1 ? -1 : 1;
      if (shape[d0] > shape[d1]) return 1;
    }
    return 0;
  };
  for (int64_t i = 1; i < nd; ++i) {
    int64_t dim1 = i;
    for (int64_t dim0 = i - 1; dim0 >= 0; --dim0) {
      int c = should_swap(perm[dim0], perm[dim1]);
      if (c > 0) {
        std::swap(perm[dim0], perm[dim1]);
        dim1 = dim0;
      } else if (c < 0) {
        break;
      }
    }
  }
  std::reverse(perm.begin(), perm.end());
  return perm;
}

// Ops of the pointwise generator the wrappers launch: the index into
// flag_gems/c_runtime.py:_POINTWISE_OPS (the op's name in kernels/pointwise.py:OPS).
constexpr int64_t kPointwiseAdd = 0;
constexpr int64_t kPointwiseMul = 1;
constexpr int64_t kPointwiseNeg = 2;
constexpr int64_t kPointwiseRsqrt = 3;
constexpr int64_t kPointwiseSilu = 4;
constexpr int64_t kPointwiseExp = 5;
constexpr int64_t kPointwiseSigmoid = 6;
constexpr int64_t kPointwiseToCopy = 7;
// pow(x, e): the general form, then the exponents torch computes without pow (pointwise._POW_FORMS)
constexpr int64_t kPointwisePow = 8;
constexpr std::array<std::pair<double, int64_t>, 8> kPowForms{{
    {0.0, 9}, {1.0, 10}, {2.0, 11}, {3.0, 12}, {0.5, 13}, {-0.5, 14}, {-1.0, 15}, {-2.0, 16}}};
constexpr int64_t kPointwiseCos = 17;
constexpr int64_t kPointwiseSin = 18;
constexpr int64_t kPointwiseTanh = 19;
constexpr int64_t kPointwiseSqrt = 20;
constexpr int64_t kPointwiseLog = 21;
constexpr int64_t kPointwiseAbs = 22;
constexpr int64_t kPointwiseReciprocal = 23;
constexpr int64_t kPointwiseGelu = 24;
constexpr int64_t kPointwiseGeluTanh = 25;
constexpr int64_t kPointwiseSub = 26;

// op(inputs...) for one or two tensors of one float dtype on one device (the plan of
// pointwise._build for that case): broadcasting, any strides, fp32 compute, the result in the
// inputs' dtype (or `out_dtype`, a float dtype: casts); the generated kernel's signature is the
// variant: (op, output class, rank, 64-bit indexing, each operand's class), classes 0 'c',
// 1 's', 2 'g' as in the generator, 3 a scalar argument (`scalar`: the last operand, an int or
// a float as Python would pass it; it takes no part in the result dtype, as for a float tensor
// in torch). The output is laid out as TensorIterator lays it out, or with `keep_strides` (one
// non-overlapping and dense input) with the input's exact strides, as _to_copy's preserve_format.
std::optional<at::Tensor> pointwise_launch(int64_t op, std::initializer_list<at::Tensor> inputs,
                                           std::optional<at::ScalarType> out_dtype = std::nullopt,
                                           bool keep_strides = false,
                                           const std::optional<c10::Scalar>& scalar = std::nullopt) {
  const at::Tensor* in = inputs.begin();  // the caller's tensors, alive for the call (Launch keeps pointers)
  const size_t k = inputs.size();
  TORCH_CHECK(k >= 1 && k <= 2, "flag_gems: pointwise_launch takes one or two tensors");
  for (const auto& t : inputs) {
    if (!float_tensor(t) || t.scalar_type() != in[0].scalar_type() || t.device() != in[0].device())
      return std::nullopt;
  }
  std::vector<int64_t> shape(in[0].sizes().begin(), in[0].sizes().end());
  if (k == 2) {
    auto s = at::infer_size_dimvector(in[0].sizes(), in[1].sizes());  // throws when they do not broadcast
    shape.assign(s.begin(), s.end());
  }
  const int64_t nd = static_cast<int64_t>(shape.size());
  std::vector<std::vector<int64_t>> bstrides;  // each operand's strides, broadcast to shape
  for (const auto& t : inputs) {
    const int64_t pad = nd - t.dim();
    std::vector<int64_t> st(pad, 0);
    for (int64_t d = 0; d < t.dim(); ++d) st.push_back(t.size(d) == 1 && shape[pad + d] != 1 ? 0 : t.stride(d));
    bstrides.push_back(std::move(st));
  }
  auto dense = [&](const std::vector<int64_t>& order) {  // _dense_strides
    std::vector<int64_t> st(nd, 0);
    int64_t step = 1;
    for (auto it = order.rbegin(); it != order.rend(); ++it) {
      st[*it] = step;
      step *= shape[*it];
    }
    return st;
  };
  bool plain = true;
  for (const auto& t : inputs) plain = plain && t.is_contiguous() && t.sizes() == IntArrayRef(shape);
  std::vector<int64_t> natural(nd);
  std::iota(natural.begin(), natural.end(), 0);
  std::vector<int64_t> out_strides = plain ? dense(natural) : dense(iteration_order(shape, bstrides));
  if (keep_strides) {
    TORCH_CHECK(k == 1 && in[0].is_non_overlapping_and_dense(), "flag_gems: keep_strides needs one dense input");
    out_strides.assign(in[0].strides().begin(), in[0].strides().end());
  }
  const auto opts = in[0].options().dtype(out_dtype.value_or(in[0].scalar_type()));
  at::Tensor out = plain && !keep_strides ? at::empty(shape, opts) : at::empty_strided(shape, out_strides, opts);
  const int64_t n = prod(shape);
  if (n == 0) return out;
  std::vector<std::vector<int64_t>> all{out_strides};  // column 0 is the output, then the operands
  for (auto& st : bstrides) all.push_back(std::move(st));
  const size_t cols = all.size();
  auto order = iteration_order(shape, all);
  // coalesce, outermost first; per dim the strides of the output and the operands
  using Col = std::array<int64_t, 3>;
  std::vector<int64_t> sizes;
  std::vector<Col> mst;
  for (int64_t d : order) {
    if (shape[d] == 1) continue;
    Col st{};
    for (size_t j = 0; j < cols; ++j) st[j] = all[j][d];
    if (!sizes.empty()) {
      auto& prev = mst.back();
      bool merge = true;
      for (size_t j = 0; j < cols; ++j) merge = merge && prev[j] == st[j] * shape[d];
      if (merge) {
        sizes.back() *= shape[d];
        prev = st;
        continue;
      }
    }
    sizes.push_back(shape[d]);
    mst.push_back(st);
  }
  if (sizes.empty()) {
    sizes.push_back(1);
    mst.push_back(Col{});
  }
  const int64_t r = static_cast<int64_t>(sizes.size());
  std::vector<int64_t> contig(r);
  for (int64_t d = 0; d < r; ++d) contig[d] = prod(sizes, d + 1);
  std::vector<int> cls(cols);  // 0 'c', 1 's', 2 'g'
  bool any_g = false;
  for (size_t j = 0; j < cols; ++j) {
    bool is_contig = true, all_zero = true;
    for (int64_t d = 0; d < r; ++d) {
      is_contig = is_contig && mst[d][j] == contig[d];
      all_zero = all_zero && mst[d][j] == 0;
    }
    cls[j] = (is_contig || (j == 0 && all_zero)) ? 0 : all_zero ? 1 : 2;
    any_g = any_g || cls[j] == 2;
  }
  const int64_t rank = any_g ? r : 0;
  if (rank > kMaxDims) return std::nullopt;
  // launch_config: Tunable "pointwise", key (n bucket,), fields (BLOCK, num_warps). The
  // heuristic: 1024 elements on 4 warps; the interpreter: one program per <= 4096 elements.
  auto tuned = TuneQuery(Family::Pointwise, out.device()).k(pow2_bucket(n, kPointwiseBucketCap)).dim(n).get();
  int64_t block = 1024, warps = 4;
  if (!tuned.heuristic) {
    block = tuned[0];
    warps = tuned[1];
  } else if (interpreter_mode() && !out.is_cuda()) {
    block = std::max<int64_t>(16, std::min<int64_t>(4096, next_pow2(n)));
    warps = 1;
  }
  int64_t extent = n;
  for (size_t j = 0; j < cols; ++j) {
    if (cls[j] != 2) continue;
    int64_t e = 1;
    for (int64_t d = 0; d < r; ++d) e += (sizes[d] - 1) * mst[d][j];
    extent = std::max(extent, e);
  }
  const bool index64 = extent + block >= (int64_t(1) << 31);
  Launch l(Kernel::Pointwise);
  l.variant(op).variant(cls[0]).variant(rank).variant(index64);
  for (size_t j = 1; j < cols; ++j) l.variant(cls[j]);
  if (scalar) l.variant(3);
  for (const auto& t : inputs) l.tensor(t);
  if (scalar) {
    if (scalar->isIntegral(/*includeBool=*/false))
      l.i(scalar->toLong());
    else
      l.f(scalar->toDouble());
  }
  l.tensor(out).i(n);
  if (rank) {
    for (int64_t d = 1; d < r; ++d) l.i(sizes[d]);
    for (size_t j = 1; j < cols; ++j)
      if (cls[j] == 2)
        for (int64_t d = 0; d < r; ++d) l.i(mst[d][j]);
    if (cls[0] == 2)
      for (int64_t d = 0; d < r; ++d) l.i(mst[d][0]);
  }
  l.c(block);
  l.run(out, cdiv(n, block), 1, 1, warps);
  return out;
}

bool broadcastable(IntArrayRef a, IntArrayRef b) {
  for (size_t j = 1; j <= std::min(a.size(), b.size()); ++j) {
    int64_t x = a[a.size() - j], y = b[b.size() - j];
    if (x != y && x != 1 && y != 1) return false;
  }
  return true;
}

// A call of `n_args` arguments whose first two are tensors: op(self, other) when both are float
// tensors of one dtype and device that broadcast (a wrapped number, a 0-dim CPU tensor,
// integers, mixed dtypes: false, the kernel registered before).
bool binary_tensors(Stack* s, size_t n_args, int64_t op) {
  const auto& self = arg(s, n_args, 0);
  const auto& other = arg(s, n_args, 1);
  if (!self.isTensor() || !other.isTensor()) return false;
  const auto a = self.toTensor(), b = other.toTensor();
  if (!broadcastable(a.sizes(), b.sizes())) return false;
  return finish_or_refuse(s, n_args, pointwise_launch(op, {a, b}));
}

// flag_gems::add_tensor(Tensor self, Tensor other) -> Tensor
bool add_tensor_op(const c10::OperatorHandle&, Stack* s) { return binary_tensors(s, 2, kPointwiseAdd); }

// aten::add.Tensor(Tensor self, Tensor other, *, Scalar alpha=1) -> Tensor
bool add_aten(const c10::OperatorHandle&, Stack* s) {
  const auto alpha = arg(s, 3, 2).toScalar();
  const bool one = alpha.isIntegral(false) ? alpha.toLong() == 1 : alpha.isFloatingPoint() && alpha.toDouble() == 1.0;
  if (!one) return false;
  return binary_tensors(s, 3, kPointwiseAdd);
}

// aten::mul.Tensor(Tensor self, Tensor other) -> Tensor
bool mul_aten(const c10::OperatorHandle&, Stack* s) { return binary_tensors(s, 2, kPointwiseMul); }

// aten::sub.Tensor(Tensor self, Tensor other, *, Scalar alpha=1) -> Tensor (alpha 1 only)
bool sub_aten(const c10::OperatorHandle&, Stack* s) {
  const auto alpha = arg(s, 3, 2).toScalar();
  const bool one = alpha.isIntegral(false) ? alpha.toLong() == 1 : alpha.isFloatingPoint() && alpha.toDouble() == 1.0;
  if (!one) return false;
  return binary_tensors(s, 3, kPointwiseSub);
}

// aten::_to_copy(Tensor self, *, ScalarType? dtype=None, Layout? layout=None, Device? device=None,
//                bool? pin_memory=None, bool non_blocking=False, MemoryFormat? memory_format=None)
// between fp16 / bf16 / fp32 on the tensor's own device, of a non-overlapping and dense tensor
// in its own layout (preserve_format); anything else (another device, pinned memory, a layout
// change, other dtypes, overlapping or gapped strides) is the native kernel's.
bool to_copy_aten(const c10::OperatorHandle&, Stack* s) {
  const auto& self_iv = arg(s, 7, 0);
  if (!self_iv.isTensor()) return false;
  const auto self = self_iv.toTensor();
  if (!float_tensor(self) || !self.is_non_overlapping_and_dense()) return false;
  const auto& dtype = arg(s, 7, 1);
  const auto& layout = arg(s, 7, 2);
  const auto& device = arg(s, 7, 3);
  const auto& pin = arg(s, 7, 4);
  const auto& format = arg(s, 7, 6);
  const at::ScalarType to = dtype.isNone() ? self.scalar_type() : dtype.toScalarType();
  if (!is_float(to)) return false;
  if (!layout.isNone() && layout.toLayout() != at::kStrided) return false;
  if (!device.isNone()) {
    const auto d = device.toDevice();  // "cuda" without an index is the current device: not ours to guess
    if (d.type() != self.device().type()) return false;
    if (d.is_cuda() && (!d.has_index() || d.index() != self.device().index())) return false;
  }
  if (!pin.isNone() && pin.toBool()) return false;
  if (!format.isNone() && format.toMemoryFormat() != at::MemoryFormat::Preserve) return false;
  return finish_or_refuse(s, 7, pointwise_launch(kPointwiseToCopy, {self}, to, /*keep_strides=*/true));
}

// aten::pow.Tensor_Scalar(Tensor self, Scalar exponent) -> Tensor for a float tensor and a real
// exponent: the exact forms for 0, +-1, 2, 3, +-0.5, -2 (as torch), the general pow otherwise.
bool pow_scalar_aten(const c10::OperatorHandle&, Stack* s) {
  const auto& self = arg(s, 2, 0);
  const auto& e_iv = arg(s, 2, 1);
  if (!self.isTensor() || !e_iv.isScalar()) return false;
  const auto e = e_iv.toScalar();
  if (e.isBoolean() || e.isComplex() || e.isSymbolic()) return false;
  const double v = e.toDouble();
  int64_t op = kPointwisePow;
  for (const auto& [value, id] : kPowForms)
    if (v == value) op = id;
  return finish_or_refuse(s, 2, pointwise_launch(op, {self.toTensor()}, std::nullopt, false, e));
}

// aten::gelu(Tensor self, *, str approximate='none') -> Tensor: erf or tanh form.
bool gelu_aten(const c10::OperatorHandle&, Stack* s) {
  const auto& self = arg(s, 2, 0);
  const auto& approximate = arg(s, 2, 1);
  if (!self.isTensor() || !approximate.isString()) return false;
  const auto form = approximate.toStringRef();
  if (form != "none" && form != "tanh") return false;
  const int64_t op = form == "none" ? kPointwiseGelu : kPointwiseGeluTanh;
  return finish_or_refuse(s, 2, pointwise_launch(op, {self.toTensor()}));
}

// aten::neg / rsqrt / silu / exp / sigmoid / cos / ... (Tensor self) -> Tensor on one float tensor.
template <int64_t Op>
bool unary_aten(const c10::OperatorHandle&, Stack* s) {
  const auto& self = arg(s, 1, 0);
  if (!self.isTensor()) return false;
  return finish_or_refuse(s, 1, pointwise_launch(Op, {self.toTensor()}));
}

// ================================================================== mm / bmm (kernels/matmul.py)

constexpr int64_t kMatmulMaxBatch = 65535;  // kernels/matmul.py:MAX_BATCH (grid axis 1)
constexpr int64_t kMatmulBucketCap = 1 << 20;
constexpr int64_t kKindPlain = 0;  // kernels/matmul.py:KINDS[0]; the others need tensor descriptors

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// kernels/matmul.py:tma_eligible for a new contiguous output: 16-bit floats on a device with
// tensor descriptors, a 2-D (or batch-1) product, rows of a and b 16-byte aligned.
bool tma_eligible(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() != at::kBFloat16 && a.scalar_type() != at::kHalf) return false;
  if (!tma_device(a.device())) return false;
  if (a.dim() == 3 && a.size(0) != 1) return false;
  const int64_t m = a.size(-2), k = a.size(-1), n = b.size(-1), e = a.element_size();
  if (m == 0 || n == 0 || k == 0) return false;
  const int64_t sa0 = a.stride(-2), sa1 = a.stride(-1), sb0 = b.stride(-2), sb1 = b.stride(-1);
  if (sa1 != 1 || (sa0 * e) % 16 || !aligned16(a) || !aligned16(b)) return false;
  if (!((sb1 == 1 && (sb0 * e) % 16 == 0) || (sb0 == 1 && (sb1 * e) % 16 == 0))) return false;
  return (n * e) % 16 == 0;
}

// The config kernels/matmul.py:matmul_config gives `a @ b`: Tunable "matmul", key (batch
// bucket, M bucket, N, K, dtype, has_bias, b K-major, tensor descriptors usable), N and K
// bucketed for batched products; fields (KIND, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps,
// num_stages, WARP_SPEC, NATIVE). The heuristic: tile_config's plain tiles.
struct GemmConfig {
  int64_t kind, bm, bn, bk, group_m, warps, stages;
  bool native;
};

GemmConfig matmul_config(const at::Tensor& a, const at::Tensor& b, bool tma) {
  const int64_t m = a.size(-2), k = a.size(-1), n = b.size(-1);
  const int64_t batch = a.dim() == 3 ? a.size(0) : 1;
  const bool kmajor = b.stride(-2) == 1 && b.stride(-1) != 1 && n > 1;
  TuneQuery q(Family::Matmul, a.device(), a.scalar_type());
  if (batch > 1) {
    q.k(pow2_bucket(batch, kMatmulMaxBatch + 1)).k(pow2_bucket(m, kMatmulBucketCap));
    q.k(pow2_bucket(n, kMatmulBucketCap)).k(pow2_bucket(k, kMatmulBucketCap)).k(false).k(kmajor).k(false);
  } else {
    q.k(1).k(pow2_bucket(m, kMatmulBucketCap)).k(n).k(k).k(false).k(kmajor).k(tma);
  }
  auto tuned = q.dim(m).dim(n).dim(k).dim(batch).get();
  if (!tuned.heuristic) {
    return {tuned[0], tuned[1], tuned[2], tuned[3], tuned[4], tuned[5], tuned[6], tuned[8] != 0};
  }
  // tile_config
  if (!a.is_cuda()) return {kKindPlain, 32, 32, 32, 8, 1, 1, false};
  GemmConfig c{kKindPlain, 128, 128, 64, 8, 8, 3, false};
  if (m <= 16)
    c = {kKindPlain, 16, 64, 128, 8, 4, 4, false};
  else if (m <= 64)
    c = {kKindPlain, 64, 64, 64, 8, 4, 4, false};
  if (a.element_size() == 4) c.bk /= 2;
  return c;
}

enum class Gemm {
  Launched,  // *out holds the product
  Refused,   // inputs the wrapper does not take
  Native,    // the tuner measured the native kernel faster (NATIVE): the aten wrappers refuse
  Python,    // a tensor-descriptor class (KIND tma / persistent): kernels/matmul.py launches it
};

// `honor_native`: refuse where the config says the native kernel is faster (the aten entries).
Gemm matmul_launch(const at::Tensor& a, const at::Tensor& b, int64_t rank, bool honor_native, at::Tensor* out_p) {
  if (!float_tensor(a) || !float_tensor(b) || a.scalar_type() != b.scalar_type() || a.device() != b.device() ||
      a.dim() != rank || b.dim() != rank || a.size(-1) != b.size(-2)) {
    return Gemm::Refused;
  }
  if (rank == 3 && (a.size(0) != b.size(0) || a.size(0) > kMatmulMaxBatch)) return Gemm::Refused;
  const int64_t m = a.size(-2), k = a.size(-1), n = b.size(-1);
  const int64_t batch = rank == 3 ? a.size(0) : 1;
  if (m == 0 || n == 0 || batch == 0) {
    *out_p = rank == 3 ? at::empty({batch, m, n}, a.options()) : at::empty({m, n}, a.options());
    return Gemm::Launched;
  }
  const bool tma = tma_eligible(a, b);
  const GemmConfig cfg = matmul_config(a, b, tma);
  if (cfg.native && honor_native) return Gemm::Native;
  if (cfg.kind != kKindPlain && tma) return Gemm::Python;
  auto out = rank == 3 ? at::empty({batch, m, n}, a.options()) : at::empty({m, n}, a.options());
  const bool interp = !a.is_cuda();
  ConstStr precision = ConstStr::Tf32;
  if (interp || (a.scalar_type() == at::kFloat &&
                 at::globalContext().float32MatmulPrecision() == at::Float32MatmulPrecision::HIGHEST)) {
    precision = ConstStr::Ieee;
  }
  // Strides of the [1, M, K] view of a 2-D operand (unsqueeze(0): the new stride is size(0) * stride(0)).
  auto strides3 = [&](const at::Tensor& t) -> std::array<int64_t, 3> {
    if (rank == 3) return {t.stride(0), t.stride(1), t.stride(2)};
    return {t.size(0) * t.stride(0), t.stride(0), t.stride(1)};
  };
  auto sa = strides3(a), sb = strides3(b), sc = strides3(out);
  Launch l(Kernel::Matmul);
  l.tensor(a).tensor(b).tensor(out).tensor(out).i(m).i(n).i(k);
  for (auto* st : {&sa, &sb, &sc})
    for (int64_t v : *st) l.i(v);
  l.i(0).i(0).i(0).f(1.0).f(1.0);
  l.cb(false).cb(interp).cs(precision).c(cfg.bm).c(cfg.bn).c(cfg.bk).c(cfg.group_m);
  l.run(a, cdiv(m, cfg.bm) * cdiv(n, cfg.bn), batch, 1, cfg.warps, cfg.stages);
  *out_p = std::move(out);
  return Gemm::Launched;
}

// flag_gems::mm / flag_gems::bmm (Tensor self, Tensor mat2) -> Tensor. As the ops' Python
// implementations (kernels/matmul.py:matmul), the Triton kernel runs whatever NATIVE says;
// a tensor-descriptor config is refused: the Python implementation launches it.
bool gemm_op(Stack* s, int64_t rank) {
  at::Tensor out;
  if (matmul_launch(arg(s, 2, 0).toTensor(), arg(s, 2, 1).toTensor(), rank, false, &out) != Gemm::Launched)
    return false;
  return finish(s, 2, std::move(out));
}

// aten::mm / aten::bmm: as the eager mode's Python entries (lowerings/matmul.py): where the
// tuner measured the native kernel faster, refuse (the native kernel runs); a
// tensor-descriptor config runs through flag_gems::mm / bmm (its Python implementation).
bool gemm_aten(Stack* s, int64_t rank) {
  at::Tensor out;
  switch (matmul_launch(arg(s, 2, 0).toTensor(), arg(s, 2, 1).toTensor(), rank, true, &out)) {
    case Gemm::Launched: return finish(s, 2, std::move(out));
    case Gemm::Python: {
      // Once per thread: should the Python implementation come back to aten::mm (it calls
      // torch.mm for inputs it does not take), that call gets the native kernel.
      thread_local bool inside = false;
      if (inside) return false;
      static const c10::OperatorHandle mm = c10::Dispatcher::singleton().findSchemaOrThrow("flag_gems::mm", "");
      static const c10::OperatorHandle bmm = c10::Dispatcher::singleton().findSchemaOrThrow("flag_gems::bmm", "");
      inside = true;
      try {
        (rank == 3 ? bmm : mm).callBoxed(s);
      } catch (...) {
        inside = false;
        throw;
      }
      inside = false;
      return true;
    }
    default: return false;
  }
}

bool mm_op(const c10::OperatorHandle&, Stack* s) { return gemm_op(s, 2); }
bool bmm_op(const c10::OperatorHandle&, Stack* s) { return gemm_op(s, 3); }
bool mm_aten(const c10::OperatorHandle&, Stack* s) { return gemm_aten(s, 2); }
bool bmm_aten(const c10::OperatorHandle&, Stack* s) { return gemm_aten(s, 3); }

// ================================================================== cat (kernels/indexing.py)

bool data_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: case at::kBFloat16: case at::kFloat: case at::kDouble: case at::kByte: case at::kChar:
    case at::kShort: case at::kInt: case at::kLong: case at::kBool:
      return true;
    default:
      return false;
  }
}

// One stride covering dims [from, to) of t (size-1 dims skipped; 0 when all are size 1), or nullopt.
std::optional<int64_t> merged_stride(const at::Tensor& t, int64_t from, int64_t to) {
  std::optional<int64_t> stride;
  int64_t expect = 0;
  for (int64_t d = to - 1; d >= from; --d) {
    if (t.size(d) == 1) continue;
    if (!stride) {
      stride = t.stride(d);
    } else if (t.stride(d) != expect) {
      return std::nullopt;
    }
    expect = t.stride(d) * t.size(d);
  }
  return stride ? *stride : 0;
}

// flag_gems::cat / aten::cat (Tensor[] tensors, int dim=0) -> Tensor
bool cat_op(const c10::OperatorHandle&, Stack* s) {
  const auto tensors = arg(s, 2, 0).toTensorVector();
  int64_t dim = arg(s, 2, 1).toInt();
  if (tensors.empty()) return false;
  const at::Tensor& first = tensors[0];
  const int64_t nd = first.dim();
  if (nd == 0) return false;
  if (dim < -nd || dim >= nd) return false;
  if (dim < 0) dim += nd;
  for (const auto& t : tensors) {
    if (!runnable(t) || !data_dtype(t.scalar_type()) || t.scalar_type() != first.scalar_type() ||
        t.device() != first.device() || t.dim() != nd) {
      return false;  // also the legacy 1-D empty inputs torch skips (rank differs), channels-last below
    }
    if ((nd == 4 || nd == 5) && t.suggest_memory_format() != at::MemoryFormat::Contiguous) return false;
    for (int64_t d = 0; d < nd; ++d)
      if (d != dim && t.size(d) != first.size(d)) return false;
  }
  std::vector<int64_t> shape(first.sizes().begin(), first.sizes().end());
  shape[dim] = 0;
  for (const auto& t : tensors) shape[dim] += t.size(dim);
  auto out = at::empty(shape, first.options());
  if (out.numel() == 0) return finish(s, 2, std::move(out));
  const int64_t n_outer = prod(shape, 0, dim);
  const int64_t out_cols = out.numel() / n_outer;
  int64_t offset = 0;
  std::vector<at::Tensor> keep;  // contiguous copies live until their launch is enqueued
  for (const auto& t0 : tensors) {
    if (t0.numel() == 0) continue;
    const int64_t cols = t0.numel() / n_outer;
    at::Tensor t = t0;
    auto so = merged_stride(t, 0, dim), sc = merged_stride(t, dim, nd);
    if (!so || !sc) {
      t = t0.contiguous();
      so = cols;
      sc = 1;
    }
    const int64_t block = std::min<int64_t>(1024, next_pow2(cols));
    const int64_t nb = cdiv(cols, block);
    Launch l(Kernel::Copy2d);
    l.tensor(t).tensor_at(out, offset).i(cols).i(nb).i(*so).i(*sc).i(out_cols).c(block);
    l.run(out, n_outer, std::min<int64_t>(nb, 65535));
    keep.push_back(t);
    offset += cols;
  }
  return finish(s, 2, std::move(out));
}

// ================================================================== sum (kernels/reduction.py)

std::array<int64_t, 3> reduce_tile(int64_t n_rows, int64_t n_cols, int64_t elem) {
  int64_t bn = std::min(row_config(n_cols, elem).first, kMaxFusedBlock);
  int64_t bm = std::max<int64_t>(1, std::min<int64_t>({64, 4096 / bn, next_pow2(n_rows)}));
  int64_t warps = std::max<int64_t>(1, std::min<int64_t>(16, bm * bn * elem / 1024));
  return {bm, bn, warps};
}

constexpr int64_t kReduceBucketCap = 1 << 24;  // kernels/reduction.py:_BUCKET_CAP

// row sums of a contiguous [n_rows, n_cols] x into out [n_rows] (_reduce with OP_SUM), the
// final sums multiplied by `scale` in fp32 (1 / n_cols for a mean, as row_sum(mean=True)). The
// first launch's tile is Tunable "reduction"'s, key (rows bucket, columns bucket, dtype); the
// second pass over the partial sums keeps the heuristic (as the Python launcher).
void row_sum_launch(const at::Tensor& x, int64_t n_rows, int64_t n_cols, const at::Tensor& out, double scale = 1.0) {
  auto tuned = TuneQuery(Family::Reduction, x.device(), x.scalar_type())
                   .k(pow2_bucket(n_rows, kReduceBucketCap)).k(pow2_bucket(n_cols, kReduceBucketCap))
                   .dim(n_rows).dim(n_cols)
                   .get();
  auto [bm, bn, warps] = tuned.heuristic ? reduce_tile(n_rows, n_cols, x.element_size())
                                         : std::array<int64_t, 3>{tuned[0], tuned[1], tuned[2]};
  int64_t n_splits = 1;
  const int64_t row_programs = cdiv(n_rows, bm);
  if (n_cols > kMaxFusedBlock) {
    const int64_t sms = num_sms(x.device());
    if (row_programs < 2 * sms)
      n_splits = std::max<int64_t>(1, std::min<int64_t>({cdiv(n_cols, bn), 1024, (2 * sms) / row_programs}));
  }
  const int64_t span = cdiv(cdiv(n_cols, n_splits), bn) * bn;
  n_splits = cdiv(n_cols, span);
  if (n_splits == 1) {
    Launch l(Kernel::Reduce);
    l.tensor(x).tensor(out).i(n_rows).i(n_cols).i(span).f(scale).c(0).cb(true).c(bm).c(bn);
    l.run(x, cdiv(n_rows, bm), 1, 1, warps);
    return;
  }
  auto partial = at::empty({n_rows, n_splits}, x.options().dtype(at::kFloat));
  {
    Launch l(Kernel::Reduce);
    l.tensor(x).tensor(partial).i(n_rows).i(n_cols).i(span).f(1.0).c(0).cb(false).c(bm).c(bn);
    l.run(x, cdiv(n_rows, bm), n_splits, 1, warps);
  }
  auto [bm2, bn2, warps2] = reduce_tile(n_rows, n_splits, 4);
  Launch l(Kernel::Reduce);
  l.tensor(partial).tensor(out).i(n_rows).i(n_splits).i(cdiv(n_splits, bn2) * bn2).f(scale).c(0).cb(true).c(bm2).c(bn2);
  l.run(x, cdiv(n_rows, bm2), 1, 1, warps2);
}

// sum (or with `mean` the mean) of a contiguous float tensor over its trailing dims `dims`
// (nullopt / empty: all).
std::optional<at::Tensor> sum_launch(const at::Tensor& x, const c10::IValue& dim_iv, bool keepdim,
                                     const c10::IValue& dtype_iv, bool mean = false) {
  if (!float_tensor(x) || !x.is_contiguous()) return std::nullopt;
  at::ScalarType out_dtype = x.scalar_type();
  if (!dtype_iv.isNone()) {
    auto d = dtype_iv.toScalarType();
    if (d != x.scalar_type() && d != at::kFloat) return std::nullopt;
    out_dtype = d;
  }
  const int64_t nd = x.dim();
  std::vector<int64_t> dims;
  std::vector<int64_t> raw;
  if (!dim_iv.isNone()) raw = dim_iv.toIntVector();
  if (raw.empty()) {
    for (int64_t d = 0; d < nd; ++d) dims.push_back(d);
  } else {
    if (nd == 0) return std::nullopt;
    for (int64_t d : raw) {
      if (d < -nd || d >= nd) return std::nullopt;
      dims.push_back(d < 0 ? d + nd : d);
    }
    std::sort(dims.begin(), dims.end());
    for (size_t j = 0; j < dims.size(); ++j)
      if (dims[j] != nd - static_cast<int64_t>(dims.size()) + static_cast<int64_t>(j)) return std::nullopt;
  }
  int64_t n_cols = 1;
  for (int64_t d : dims) n_cols *= x.size(d);
  std::vector<int64_t> shape;
  for (int64_t d = 0; d < nd; ++d) {
    bool reduced = std::find(dims.begin(), dims.end(), d) != dims.end();
    if (!reduced)
      shape.push_back(x.size(d));
    else if (keepdim)
      shape.push_back(1);
  }
  auto opts = x.options().dtype(out_dtype);
  if (n_cols == 0) {
    if (mean) return std::nullopt;  // NaN, torch's way
    return at::full(shape, 0.0, opts);
  }
  const int64_t n_rows = x.numel() / n_cols;
  auto out = at::empty(shape, opts);
  if (n_rows == 0) return out;
  row_sum_launch(x, n_rows, n_cols, out, mean ? 1.0 / static_cast<double>(n_cols) : 1.0);
  return out;
}

// flag_gems::sum(Tensor self, int[]? dim=None, bool keepdim=False, *, ScalarType? dtype=None) -> Tensor
// aten::sum.dim_IntList(Tensor self, int[1]? dim, bool keepdim=False, *, ScalarType? dtype=None) -> Tensor
bool sum_dim_op(const c10::OperatorHandle&, Stack* s) {
  return finish_or_refuse(s, 4, sum_launch(arg(s, 4, 0).toTensor(), arg(s, 4, 1), arg(s, 4, 2).toBool(), arg(s, 4, 3)));
}

// aten::mean.dim(Tensor self, int[1]? dim, bool keepdim=False, *, ScalarType? dtype=None) -> Tensor
bool mean_dim_aten(const c10::OperatorHandle&, Stack* s) {
  auto out = sum_launch(arg(s, 4, 0).toTensor(), arg(s, 4, 1), arg(s, 4, 2).toBool(), arg(s, 4, 3), /*mean=*/true);
  return finish_or_refuse(s, 4, std::move(out));
}

// aten::sum(Tensor self, *, ScalarType? dtype=None) -> Tensor
bool sum_aten(const c10::OperatorHandle&, Stack* s) {
  return finish_or_refuse(s, 2, sum_launch(arg(s, 2, 0).toTensor(), c10::IValue(), false, arg(s, 2, 1)));
}

// ================================================================== nonzero (kernels/nonzero.py)

constexpr int64_t kNonzeroMaxDims = 8;  // kernels/nonzero.py:MAX_DIMS

// flag_gems::nonzero / aten::nonzero (Tensor self) -> Tensor
bool nonzero_op(const c10::OperatorHandle&, Stack* s) {
  const auto x0 = arg(s, 1, 0).toTensor();
  if (!runnable(x0) || !data_dtype(x0.scalar_type()) || x0.dim() > kNonzeroMaxDims) return false;
  if (x0.numel() >= (int64_t(1) << 31)) return false;
  const at::Tensor x = x0.is_contiguous() ? x0 : x0.contiguous();
  const int64_t n = x.numel(), nd = x.dim();
  auto idx = x.options().dtype(at::kLong);
  if (n == 0) return finish(s, 1, at::empty({0, nd}, idx));
  // kernels/nonzero.py:block_size
  const int64_t block = x.is_cuda() ? 1024 : std::max<int64_t>(16, std::min<int64_t>(4096, next_pow2(n)));
  const int64_t n_blocks = cdiv(n, block);
  auto counts = at::empty({n_blocks}, idx);
  {
    Launch l(Kernel::NonzeroCount);
    l.tensor(x).tensor(counts).i(n).c(block);
    l.run(x, n_blocks, 1, 1, 4);
  }
  auto ends = at::cumsum(counts, 0);
  const int64_t total = ends[n_blocks - 1].item<int64_t>();  // a device sync, as torch's nonzero
  auto out = at::empty({total, nd}, idx);
  if (total == 0 || nd == 0) return finish(s, 1, std::move(out));
  Launch l(Kernel::NonzeroWrite);
  l.tensor(x).tensor(counts).tensor(ends).tensor(out).i(n);
  for (int64_t d = 0; d < kNonzeroMaxDims; ++d) l.i(d < nd ? x.size(d) : 1);
  l.c(nd).c(block);
  l.run(x, n_blocks, 1, 1, 4);
  return finish(s, 1, std::move(out));
}

const std::unordered_map<std::string, BoxedWrapper>& wrappers() {
  static const std::unordered_map<std::string, BoxedWrapper> table{
      {"flag_gems::add_tensor", add_tensor_op},
      {"flag_gems::rms_norm", rms_norm_op},
      {"flag_gems::add_rms_norm", add_rms_norm_op},
      {"flag_gems::fused_add_rms_norm", fused_add_rms_norm_op},
      {"flag_gems::rotary_embedding", rotary_embedding_op},
      {"flag_gems::rotary_embedding_", rotary_embedding_inplace_op},
      {"flag_gems::rotary_embedding_hf", rotary_embedding_hf_op},
      {"flag_gems::rotary_embedding_cache", rotary_embedding_cache_op},
      {"flag_gems::rotary_embedding_cache_", rotary_embedding_cache_inplace_op},
      {"flag_gems::silu_and_mul", silu_and_mul_op},
      {"flag_gems::gelu_and_mul", gelu_and_mul_op},
      {"flag_gems::silu_and_mul_fused", silu_and_mul_fused_op},
      {"flag_gems::gelu_and_mul_fused", gelu_and_mul_fused_op},
      {"flag_gems::silu_and_mul_out", silu_and_mul_out_op},
      {"flag_gems::mm", mm_op},
      {"flag_gems::bmm", bmm_op},
      {"flag_gems::cat", cat_op},
      {"flag_gems::sum", sum_dim_op},
      {"flag_gems::nonzero", nonzero_op},
      {"aten::add.Tensor", add_aten},
      {"aten::mul.Tensor", mul_aten},
      {"aten::neg", unary_aten<kPointwiseNeg>},
      {"aten::rsqrt", unary_aten<kPointwiseRsqrt>},
      {"aten::silu", unary_aten<kPointwiseSilu>},
      {"aten::exp", unary_aten<kPointwiseExp>},
      {"aten::sigmoid", unary_aten<kPointwiseSigmoid>},
      {"aten::_to_copy", to_copy_aten},
      {"aten::pow.Tensor_Scalar", pow_scalar_aten},
      {"aten::sub.Tensor", sub_aten},
      {"aten::cos", unary_aten<kPointwiseCos>},
      {"aten::sin", unary_aten<kPointwiseSin>},
      {"aten::tanh", unary_aten<kPointwiseTanh>},
      {"aten::sqrt", unary_aten<kPointwiseSqrt>},
      {"aten::log", unary_aten<kPointwiseLog>},
      {"aten::abs", unary_aten<kPointwiseAbs>},
      {"aten::reciprocal", unary_aten<kPointwiseReciprocal>},
      {"aten::gelu", gelu_aten},
      {"aten::_fused_rms_norm", fused_rms_norm_aten},
      {"aten::mm", mm_aten},
      {"aten::bmm", bmm_aten},
      {"aten::cat", cat_op},
      {"aten::sum", sum_aten},
      {"aten::sum.dim_IntList", sum_dim_op},
      {"aten::mean.dim", mean_dim_aten},
      {"aten::nonzero", nonzero_op},
  };
  return table;
}

}  // namespace

BoxedWrapper find_wrapper(const std::string& qualname) {
  auto& t = wrappers();
  auto it = t.find(qualname);
  return it == t.end() ? nullptr : it->second;
}

std::vector<std::string> wrapper_names() {
  std::vector<std::string> names;
  for (auto& kv : wrappers()) names.push_back(kv.first);
  std::sort(names.begin(), names.end());
  return names;
}

}  // namespace gems
