// flag_gems C++ runtime: launches our Triton kernels without Python once they are compiled.
//
// A wrapper (ops.cpp) checks its inputs, allocates outputs and describes one launch as a
// `Launch`: the kernel, every parameter in the kernel's order (tensors, ints, floats,
// bools, None, constexprs), the grid and the launch options. `Launch::run` builds the
// specialization key (at least as fine as Triton's: see `spec_code`), looks it up, and
//
//   - on a hit, packs the parameters as the compiled kernel takes them and calls
//     cuLaunchKernelEx on the current stream of the tensors' device (no Python);
//   - on a miss (first call of a specialization, a CPU tensor under Triton's interpreter,
//     or a kernel the cache does not take), calls the Python hook
//     `flag_gems_cpp::triton_launch`, which launches through Triton's own path (compiling
//     on first use) and returns what a later launch needs: the CUfunction, the launch
//     metadata, and how each parameter is packed.
//
// libcuda is opened at run time (dlopen), as Triton's launcher does: nothing here needs
// the CUDA toolkit at build time, only Triton's copy of cuda.h for the types.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <cstdint>
#include <string>

namespace gems {

// Kernels the wrappers launch. The Python side maps each name (kernel_names()) to its
// triton.jit function; keep the two lists in the same order.
enum class Kernel : int64_t {
  RmsNormFwd = 0,
  Rope,
  ActAndMulFwd,
  Pointwise,
  Matmul,
  Copy2d,
  Reduce,
  NonzeroCount,
  NonzeroWrite,
  Count_,
};
const char* kernel_name(Kernel k);

// Specialization code of one runtime argument (the key's unit). Two arguments with one code
// get one compiled kernel from Triton (native_specialize_impl): tensors by dtype and 16-byte
// alignment; ints by ==1, %16==0 and 32/64-bit range; floats by type; bools by value; None.
// kernels/_launch.py:spec_code computes the same codes in Python (tests compare them).
int64_t spec_code_tensor(const at::Tensor& t, int64_t offset = 0);
int64_t spec_code_int(int64_t v);
constexpr int64_t kSpecFloat = 3000;
inline int64_t spec_code_bool(bool v) { return 4000 + (v ? 1 : 0); }
constexpr int64_t kSpecNone = 5000;

// Triton constexpr strings the wrappers pass (matmul's input_precision); ids in the hook.
enum class ConstStr : int64_t { Ieee = 0, Tf32 = 1 };

class Launch {
 public:
  static constexpr int kMaxParams = 64;
  static constexpr int kMaxVariant = 8;

  explicit Launch(Kernel k) : kernel_(k) {}
  // A family's generated kernel (pointwise): part of the key and passed to the hook.
  Launch& variant(int64_t v);
  Launch& tensor(const at::Tensor& t);
  // The tensor's data from element `offset` on (t contiguous): a pointer into it.
  Launch& tensor_at(const at::Tensor& t, int64_t offset);
  Launch& i(int64_t v);
  Launch& f(double v);
  Launch& b(bool v);
  Launch& none();
  Launch& c(int64_t v);  // constexpr int
  Launch& cb(bool v);    // constexpr bool
  Launch& cs(ConstStr v);  // constexpr str
  // Launch on `on`'s device (its current stream). num_stages 0: Triton's default.
  void run(const at::Tensor& on, int64_t g0, int64_t g1 = 1, int64_t g2 = 1, int64_t num_warps = 4,
           int64_t num_stages = 0);
  // The specialization key of this launch without the launch options (tests; `run` adds
  // num_warps and num_stages).
  std::vector<int64_t> key(int64_t device_index) const;

 private:
  enum Kind : uint8_t { kTensor = 0, kInt, kFloat, kBool, kNone, kConstInt, kConstBool, kConstStr };
  struct Arg {
    Kind kind;
    int64_t i;
    double f;
    const at::Tensor* t;
  };
  Launch& push(Arg a);
  int fill_key(int64_t device_index, int64_t* out) const;  // the key without the launch options
  void python_launch(const std::array<int64_t, 5>& launch, int64_t* key, int key_len, bool cacheable);

  Kernel kernel_;
  int n_ = 0;
  int n_variant_ = 0;
  std::array<Arg, kMaxParams> args_{};
  std::array<int64_t, kMaxVariant> variant_{};
};

// Counters since load (or the last reset): launches from C++ (cache hits), launches through
// the Python hook (misses), and of those the ones the cache cannot take.
struct Stats {
  int64_t cpp_launches, python_launches, uncacheable;
};
Stats stats();
void reset_stats();
void clear_cache();
// false: every launch goes through the Python hook (GEMS_CPP_LAUNCH=0, proton, tests).
void set_launch_cache(bool on);
bool launch_cache_enabled();
// Why launches cannot bypass Python on this machine ("" when they can): no libcuda, no cuda.h.
std::string driver_unavailable_reason();

// ---------------------------------------------------------------- registration helpers

// A boxed wrapper: reads its arguments from the stack; returns false (stack untouched) to
// refuse, or replaces them by the results and returns true.
using BoxedWrapper = bool (*)(const c10::OperatorHandle& op, torch::jit::Stack* stack);

// Registers `wrapper` for `qualname` ("flag_gems::rms_norm", "aten::add.Tensor") on
// `dispatch_key`; a refusal runs the kernel that was there before (captured now): the
// Python implementation for flag_gems ops, the native kernel for aten ops. Returns a handle
// for `deregister`.
int64_t register_wrapper(const std::string& qualname, const std::string& dispatch_key, BoxedWrapper wrapper);
void deregister(int64_t handle);

// The wrappers (ops.cpp) by qualified op name.
BoxedWrapper find_wrapper(const std::string& qualname);
std::vector<std::string> wrapper_names();

// Shared small helpers for the wrappers.
inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t next_pow2(int64_t n) {
  int64_t p = 1;
  while (p < n) p <<= 1;
  return p;
}
// Whether Triton kernels run on CPU tensors (TRITON_INTERPRET=1 when the library was loaded).
bool interpreter_mode();
int64_t num_sms(const at::Device& d);

}  // namespace gems
