// The launcher, its cache, the Python hook and the registration of wrappers: see runtime.h.
#include "runtime.h"

#include <ATen/core/stack.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <dlfcn.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <unordered_map>

#if defined(GEMS_HAVE_CUDA_H)
#include <cuda.h>
#endif

namespace gems {

namespace {

const char* const kKernelNames[] = {
    "rms_norm_fwd", "rope", "act_and_mul_fwd", "pointwise", "matmul", "copy_2d", "reduce", "nonzero_count",
    "nonzero_write",
};
static_assert(sizeof(kKernelNames) / sizeof(kKernelNames[0]) == static_cast<size_t>(Kernel::Count_));

// ------------------------------------------------------------------ the key

// kernel, device, variant count + variants, one code per parameter, warps, stages.
constexpr int kMaxKey = 4 + Launch::kMaxVariant + Launch::kMaxParams + 2;

struct Key {
  int len = 0;
  std::array<int64_t, kMaxKey> v{};
  bool operator==(const Key& o) const {
    return len == o.len && std::memcmp(v.data(), o.v.data(), sizeof(int64_t) * len) == 0;
  }
};

struct KeyHash {
  size_t operator()(const Key& k) const {
    uint64_t h = 1469598103934665603ull;  // FNV-1a over the words
    for (int j = 0; j < k.len; ++j) {
      h ^= static_cast<uint64_t>(k.v[j]);
      h *= 1099511628211ull;
    }
    return static_cast<size_t>(h);
  }
};

// How the compiled kernel takes each parameter (from its Triton signature, see the hook).
enum Pack : uint8_t { kSkip = 0, kPtr, kI8, kI16, kI32, kI64, kU8, kU16, kU32, kU64, kF32, kF64 };
constexpr int kPackSize[] = {0, 8, 1, 2, 4, 8, 1, 2, 4, 8, 4, 8};

struct Entry {
  bool cacheable = false;
  void* function = nullptr;  // CUfunction
  int num_warps = 4, num_ctas = 1, shared = 0, coop = 0, pdl = 0, n_scratch = 0;
  std::vector<uint8_t> pack;  // one per kernel parameter
};

std::shared_mutex g_cache_mutex;
std::unordered_map<Key, std::shared_ptr<const Entry>, KeyHash> g_cache;

std::atomic<int64_t> g_cpp_launches{0}, g_python_launches{0}, g_uncacheable{0};
std::atomic<bool> g_cache_on{[] {
  const char* e = std::getenv("GEMS_CPP_LAUNCH");
  return !(e && std::string(e) == "0");
}()};

const bool g_interpret = [] {
  const char* e = std::getenv("TRITON_INTERPRET");
  return e && std::string(e) == "1";
}();

// ------------------------------------------------------------------ the driver API (dlopen)

#if defined(GEMS_HAVE_CUDA_H)
struct Driver {
  using GetErrorString = CUresult (*)(CUresult, const char**);
  using DeviceGet = CUresult (*)(CUdevice*, int);
  using DeviceGetAttribute = CUresult (*)(int*, CUdevice_attribute, CUdevice);
  using PrimaryCtxRetain = CUresult (*)(CUcontext*, CUdevice);
  using CtxGetCurrent = CUresult (*)(CUcontext*);
  using CtxSetCurrent = CUresult (*)(CUcontext);
  using LaunchKernel = CUresult (*)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                                    CUstream, void**, void**);
  using LaunchKernelEx = CUresult (*)(const CUlaunchConfig*, CUfunction, void**, void**);
  using FuncGetParamInfo = CUresult (*)(CUfunction, size_t, size_t*, size_t*);
  using FuncSetAttribute = CUresult (*)(CUfunction, CUfunction_attribute, int);

  std::string error;  // why the driver cannot be used ("" when it can)
  GetErrorString get_error_string = nullptr;
  DeviceGet device_get = nullptr;
  DeviceGetAttribute device_get_attribute = nullptr;
  PrimaryCtxRetain primary_ctx_retain = nullptr;
  CtxGetCurrent ctx_get_current = nullptr;
  CtxSetCurrent ctx_set_current = nullptr;
  LaunchKernel launch_kernel = nullptr;
  LaunchKernelEx launch_kernel_ex = nullptr;  // CUDA >= 11.8
  FuncGetParamInfo func_get_param_info = nullptr;  // CUDA >= 12.4: checks our packing
  FuncSetAttribute func_set_attribute = nullptr;

  std::mutex ctx_mutex;
  std::array<CUcontext, 64> primary{};

  Driver() {
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
      error = "libcuda.so.1 cannot be opened (no NVIDIA driver)";
      return;
    }
    auto sym = [&](const char* name) { return dlsym(lib, name); };
    get_error_string = reinterpret_cast<GetErrorString>(sym("cuGetErrorString"));
    device_get = reinterpret_cast<DeviceGet>(sym("cuDeviceGet"));
    device_get_attribute = reinterpret_cast<DeviceGetAttribute>(sym("cuDeviceGetAttribute"));
    primary_ctx_retain = reinterpret_cast<PrimaryCtxRetain>(sym("cuDevicePrimaryCtxRetain"));
    ctx_get_current = reinterpret_cast<CtxGetCurrent>(sym("cuCtxGetCurrent"));
    ctx_set_current = reinterpret_cast<CtxSetCurrent>(sym("cuCtxSetCurrent"));
    launch_kernel = reinterpret_cast<LaunchKernel>(sym("cuLaunchKernel"));
    launch_kernel_ex = reinterpret_cast<LaunchKernelEx>(sym("cuLaunchKernelEx"));
    func_get_param_info = reinterpret_cast<FuncGetParamInfo>(sym("cuFuncGetParamInfo"));
    func_set_attribute = reinterpret_cast<FuncSetAttribute>(sym("cuFuncSetAttribute"));
    if (!get_error_string || !device_get || !device_get_attribute || !primary_ctx_retain || !ctx_get_current ||
        !ctx_set_current || !launch_kernel) {
      error = "libcuda.so.1 lacks a driver API function the launcher needs";
    }
  }

  void check(CUresult r, const char* what) {
    if (r == CUDA_SUCCESS) return;
    const char* s = nullptr;
    if (get_error_string) get_error_string(r, &s);
    TORCH_CHECK(false, "flag_gems C++ launcher: ", what, " failed: ", s ? s : "unknown CUDA error", " (", int(r), ")");
  }

  // Make the device's primary context current on this thread (torch's runtime calls use it).
  void ensure_context(int index) {
    TORCH_CHECK(index >= 0 && index < static_cast<int>(primary.size()), "flag_gems: device index ", index);
    CUcontext want = primary[index];
    if (!want) {
      std::lock_guard<std::mutex> g(ctx_mutex);
      if (!primary[index]) {
        CUdevice dev;
        check(device_get(&dev, index), "cuDeviceGet");
        check(primary_ctx_retain(&primary[index], dev), "cuDevicePrimaryCtxRetain");
      }
      want = primary[index];
    }
    CUcontext cur = nullptr;
    check(ctx_get_current(&cur), "cuCtxGetCurrent");
    if (cur != want) check(ctx_set_current(want), "cuCtxSetCurrent");
  }
};

Driver& driver() {
  static Driver d;
  return d;
}
#endif

// The cudaStream_t of a c10::Stream, without torch's CUDA headers (they need the toolkit):
// c10::Stream::native_handle() where this torch's CUDA guard implements it, else
// c10::cuda::CUDAStream::stream() looked up in the already loaded libc10_cuda (a CUDAStream
// is one c10::Stream: the member function takes a pointer to it).
void* native_stream(const c10::Stream& s) {
  using StreamFn = void* (*)(const void*);
  static std::atomic<int> mode{0};  // 0 not probed, 1 native_handle, 2 CUDAStream::stream
  static StreamFn stream_fn = nullptr;
  const int m = mode.load(std::memory_order_acquire);
  if (m == 1) return s.native_handle();
  if (m == 2) return stream_fn(&s);
  try {
    void* h = s.native_handle();
    mode.store(1, std::memory_order_release);
    return h;
  } catch (const c10::Error&) {
  }
  void* lib = dlopen("libc10_cuda.so", RTLD_NOW | RTLD_NOLOAD);
  auto fn = lib ? reinterpret_cast<StreamFn>(dlsym(lib, "_ZNK3c104cuda10CUDAStream6streamEv")) : nullptr;
  TORCH_CHECK(fn, "flag_gems C++ launcher: this torch gives no CUDA stream handle (no Stream::native_handle, "
              "no c10::cuda::CUDAStream::stream)");
  stream_fn = fn;
  mode.store(2, std::memory_order_release);
  return stream_fn(&s);
}

// ------------------------------------------------------------------ the Python hook

const c10::OperatorHandle& hook_op() {
  static const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow("flag_gems_cpp::triton_launch", "");
  return op;
}

// Checks the hook's packing against the compiled function's parameters where the driver
// can tell (count and sizes): a Triton whose launcher packs otherwise is never launched here.
std::string check_packing(const Entry& e) {
#if defined(GEMS_HAVE_CUDA_H)
  auto& d = driver();
  if (!d.func_get_param_info) return "";
  size_t index = 0;
  auto expect = [&](size_t size) -> std::string {
    size_t offset = 0, got = 0;
    CUresult r = d.func_get_param_info(reinterpret_cast<CUfunction>(e.function), index, &offset, &got);
    if (r != CUDA_SUCCESS) return "the kernel has " + std::to_string(index) + " parameters, fewer than packed";
    if (got != size) {
      return "parameter " + std::to_string(index) + " has " + std::to_string(got) + " bytes, packed " +
             std::to_string(size);
    }
    ++index;
    return "";
  };
  for (uint8_t p : e.pack) {
    if (p == kSkip) continue;
    auto why = expect(kPackSize[p]);
    if (!why.empty()) return why;
  }
  for (int s = 0; s < e.n_scratch; ++s) {
    auto why = expect(8);
    if (!why.empty()) return why;
  }
  size_t offset = 0, size = 0;
  if (d.func_get_param_info(reinterpret_cast<CUfunction>(e.function), index, &offset, &size) == CUDA_SUCCESS) {
    return "the kernel has more parameters than packed (" + std::to_string(index) + ")";
  }
#endif
  (void)e;
  return "";
}

// ------------------------------------------------------------------ tuned configs (state)

const char* const kFamilyNames[] = {"rms_norm", "act_and_mul", "rope", "pointwise", "matmul", "reduction"};
static_assert(sizeof(kFamilyNames) / sizeof(kFamilyNames[0]) == static_cast<size_t>(Family::Count_));

// The hook's answer: [status, config values...].
constexpr int64_t kTuneKeep = 0;  // the Python launcher keeps this config for the key: so do we
constexpr int64_t kTuneOnce = 1;  // this call only (a capture-time heuristic, a tuning run's forced config)
constexpr int64_t kTuneOff = 2;   // the tuner is off: the wrapper's heuristic, kept

struct TuneKey {
  int len = 0;
  std::array<int64_t, TuneQuery::kMaxKey> v;
  bool operator==(const TuneKey& o) const {
    return len == o.len && std::memcmp(v.data(), o.v.data(), sizeof(int64_t) * len) == 0;
  }
};

struct TuneKeyHash {
  size_t operator()(const TuneKey& k) const {
    uint64_t h = 1469598103934665603ull;
    for (int j = 0; j < k.len; ++j) {
      h ^= static_cast<uint64_t>(k.v[j]);
      h *= 1099511628211ull;
    }
    return static_cast<size_t>(h);
  }
};

std::shared_mutex g_tuned_mutex;
std::unordered_map<TuneKey, TunedConfig, TuneKeyHash> g_tuned;
std::atomic<int64_t> g_tuned_generation{0};  // bumped by clear_tuned: an answer asked before is not kept
std::atomic<int64_t> g_tune_queries{0};
std::atomic<bool> g_tma_available{false};

const c10::OperatorHandle& tuned_hook_op() {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("flag_gems_cpp::tuned_config", "");
  return op;
}

// ------------------------------------------------------------------ registration

struct WrapperKernel final : c10::OperatorKernel {
  WrapperKernel(BoxedWrapper fn, std::optional<c10::SafeKernelFunction> prev, std::string what)
      : fn(fn), prev(std::move(prev)), what(std::move(what)) {}
  void operator()(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
    if (fn(op, stack)) return;
    TORCH_CHECK_NOT_IMPLEMENTED(prev.has_value(), what, ": flag_gems' C++ wrapper does not take these inputs and there "
                                "is no other kernel on this dispatch key");
    prev->callBoxed(op, ks, stack);
  }
  BoxedWrapper fn;
  std::optional<c10::SafeKernelFunction> prev;
  std::string what;
};

std::mutex g_reg_mutex;
std::unordered_map<int64_t, std::unique_ptr<torch::Library>> g_registrations;
int64_t g_next_handle = 1;

}  // namespace

const char* kernel_name(Kernel k) { return kKernelNames[static_cast<int>(k)]; }

bool interpreter_mode() { return g_interpret; }

#if defined(GEMS_HAVE_CUDA_H)
namespace {

constexpr int kMaxDevices = 64;
using AttributeCache = std::array<std::atomic<int>, kMaxDevices>;

// A device attribute (never 0 for those asked here), asked of the driver once per device;
// threads racing on a first query both ask and store the same value.
int device_attribute(const at::Device& d, CUdevice_attribute attr, const char* what, AttributeCache& cache) {
  int index = d.index() >= 0 ? d.index() : 0;
  TORCH_CHECK(index < kMaxDevices, "flag_gems: device index ", index, " (at most ", kMaxDevices, " devices)");
  int v = cache[index].load(std::memory_order_acquire);
  if (v != 0) return v;
  auto& drv = driver();
  TORCH_CHECK(drv.error.empty(), "flag_gems: ", drv.error);
  CUdevice dev;
  drv.check(drv.device_get(&dev, index), "cuDeviceGet");
  drv.check(drv.device_get_attribute(&v, attr, dev), what);
  cache[index].store(v, std::memory_order_release);
  return v;
}

}  // namespace
#endif

int64_t num_sms(const at::Device& d) {
  if (!d.is_cuda()) return 4;  // the interpreter's stand-in (kernels/_common.py:num_sms)
#if defined(GEMS_HAVE_CUDA_H)
  static AttributeCache sms{};
  return device_attribute(d, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, "cuDeviceGetAttribute(SM count)", sms);
#else
  TORCH_CHECK(false, "flag_gems was built without cuda.h: no device queries");
#endif
}

int64_t spec_code_tensor(const at::Tensor& t, int64_t offset) {
  auto addr = reinterpret_cast<uintptr_t>(t.data_ptr()) + static_cast<uintptr_t>(offset * t.element_size());
  return 1000 + 2 * static_cast<int64_t>(t.scalar_type()) + ((addr & 15) == 0 ? 1 : 0);
}

int64_t spec_code_int(int64_t v) {
  // width: 0 fits int32, 1 int64 (C++ ints never reach Triton's u64)
  int64_t width = (v >= INT32_MIN && v <= INT32_MAX) ? 0 : 1;
  return 2000 + (v == 1 ? 1 : 0) + (v % 16 == 0 ? 2 : 0) + 4 * width;
}

Launch& Launch::push(Arg a) {
  TORCH_CHECK(n_ < kMaxParams, "flag_gems launcher: more than ", kMaxParams, " parameters");
  args_[n_++] = a;
  return *this;
}
Launch& Launch::variant(int64_t v) {
  TORCH_CHECK(n_variant_ < kMaxVariant, "flag_gems launcher: variant too long");
  variant_[n_variant_++] = v;
  return *this;
}
Launch& Launch::tensor(const at::Tensor& t) { return push({kTensor, 0, 0.0, &t}); }
Launch& Launch::tensor_at(const at::Tensor& t, int64_t offset) { return push({kTensor, offset, 0.0, &t}); }
Launch& Launch::i(int64_t v) { return push({kInt, v, 0.0, nullptr}); }
Launch& Launch::f(double v) { return push({kFloat, 0, v, nullptr}); }
Launch& Launch::b(bool v) { return push({kBool, v ? 1 : 0, 0.0, nullptr}); }
Launch& Launch::none() { return push({kNone, 0, 0.0, nullptr}); }
Launch& Launch::c(int64_t v) { return push({kConstInt, v, 0.0, nullptr}); }
Launch& Launch::cb(bool v) { return push({kConstBool, v ? 1 : 0, 0.0, nullptr}); }
Launch& Launch::cs(ConstStr v) { return push({kConstStr, static_cast<int64_t>(v), 0.0, nullptr}); }

int Launch::fill_key(int64_t device_index, int64_t* out) const {
  int len = 0;
  out[len++] = static_cast<int64_t>(kernel_);
  out[len++] = device_index;
  out[len++] = n_variant_;
  for (int j = 0; j < n_variant_; ++j) out[len++] = variant_[j];
  for (int j = 0; j < n_; ++j) {
    const Arg& a = args_[j];
    switch (a.kind) {
      case kTensor: out[len++] = spec_code_tensor(*a.t, a.i); break;
      case kInt: out[len++] = spec_code_int(a.i); break;
      case kFloat: out[len++] = kSpecFloat; break;
      case kBool: out[len++] = spec_code_bool(a.i != 0); break;
      case kNone: out[len++] = kSpecNone; break;
      default: out[len++] = 10000 + 8 * a.i + a.kind; break;  // constexprs by value
    }
  }
  return len;
}

std::vector<int64_t> Launch::key(int64_t device_index) const {
  std::array<int64_t, kMaxKey> k{};
  int len = fill_key(device_index, k.data());
  return std::vector<int64_t>(k.begin(), k.begin() + len);
}

void Launch::run(const at::Tensor& on, int64_t g0, int64_t g1, int64_t g2, int64_t num_warps, int64_t num_stages) {
  if (g0 <= 0 || g1 <= 0 || g2 <= 0) return;  // an empty grid launches nothing (as Triton)
  const at::Device device = on.device();
  const bool cuda = device.is_cuda();
  std::array<int64_t, 5> launch{g0, g1, g2, num_warps, num_stages};
  if (!cuda || !g_cache_on.load(std::memory_order_relaxed)) {
    python_launch(launch, nullptr, 0, false);
    return;
  }
#if defined(GEMS_HAVE_CUDA_H)
  Key key;
  key.len = fill_key(device.index(), key.v.data());
  key.v[key.len++] = num_warps;
  key.v[key.len++] = num_stages;
  std::shared_ptr<const Entry> entry;
  {
    std::shared_lock<std::shared_mutex> lock(g_cache_mutex);
    auto it = g_cache.find(key);
    if (it != g_cache.end()) entry = it->second;
  }
  if (!entry || !entry->cacheable) {
    python_launch(launch, key.v.data(), key.len, entry == nullptr);
    return;
  }
  // Pack: each parameter into an 8-byte slot, read by the driver at its own size.
  std::array<uint64_t, kMaxParams + 2> slots{};
  std::array<void*, kMaxParams + 2> params{};
  int np = 0;
  for (int j = 0; j < n_; ++j) {
    const uint8_t p = entry->pack[j];
    if (p == kSkip) continue;
    const Arg& a = args_[j];
    uint64_t& s = slots[np];
    switch (p) {
      case kPtr: {
        uint64_t ptr = 0;
        if (a.kind == kTensor) ptr = reinterpret_cast<uint64_t>(a.t->data_ptr()) + a.i * a.t->element_size();
        std::memcpy(&s, &ptr, 8);
        break;
      }
      case kF32: {
        float v = static_cast<float>(a.f);
        std::memcpy(&s, &v, 4);
        break;
      }
      case kF64: std::memcpy(&s, &a.f, 8); break;
      default: {  // integers and bools: little-endian, the low bytes are the value
        int64_t v = a.i;
        std::memcpy(&s, &v, 8);
        break;
      }
    }
    params[np] = &s;
    ++np;
  }
  for (int s = 0; s < entry->n_scratch; ++s) {  // global / profile scratch: none needed (checked by the hook)
    slots[np] = 0;
    params[np] = &slots[np];
    ++np;
  }
  auto& drv = driver();
  c10::DeviceGuard guard(device);
  const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
  auto stream = reinterpret_cast<CUstream>(native_stream(impl->getStream(device)));
  drv.ensure_context(device.index());
  auto fn = reinterpret_cast<CUfunction>(entry->function);
  const unsigned block = 32u * static_cast<unsigned>(entry->num_warps);
  if (entry->num_ctas == 1 && !entry->coop && !entry->pdl) {
    drv.check(drv.launch_kernel(fn, g0, g1, g2, block, 1, 1, entry->shared, stream, params.data(), nullptr),
              "cuLaunchKernel");
  } else {
    // What Triton's launcher sets for these kernels: PDL, cooperative grid, CTA clusters.
    TORCH_CHECK(drv.launch_kernel_ex, "flag_gems C++ launcher: this driver has no cuLaunchKernelEx");
    CUlaunchAttribute attrs[4];
    int n_attrs = 0;
    if (entry->pdl) {
      attrs[n_attrs].id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
      attrs[n_attrs].value.programmaticStreamSerializationAllowed = 1;
      ++n_attrs;
    }
    if (entry->coop) {
      attrs[n_attrs].id = CU_LAUNCH_ATTRIBUTE_COOPERATIVE;
      attrs[n_attrs].value.cooperative = 1;
      ++n_attrs;
    }
    if (entry->num_ctas != 1) {
      attrs[n_attrs] = CUlaunchAttribute{};
      attrs[n_attrs].id = CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
      attrs[n_attrs].value.clusterDim.x = entry->num_ctas;
      attrs[n_attrs].value.clusterDim.y = 1;
      attrs[n_attrs].value.clusterDim.z = 1;
      ++n_attrs;
      attrs[n_attrs] = CUlaunchAttribute{};
      attrs[n_attrs].id = CU_LAUNCH_ATTRIBUTE_CLUSTER_SCHEDULING_POLICY_PREFERENCE;
      attrs[n_attrs].value.clusterSchedulingPolicyPreference = CU_CLUSTER_SCHEDULING_POLICY_SPREAD;
      ++n_attrs;
      if (entry->num_ctas == 16 && drv.func_set_attribute) {
        drv.check(drv.func_set_attribute(fn, CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED, 1),
                  "cuFuncSetAttribute");
      }
    }
    CUlaunchConfig config{};
    config.gridDimX = static_cast<unsigned>(g0 * entry->num_ctas);
    config.gridDimY = static_cast<unsigned>(g1);
    config.gridDimZ = static_cast<unsigned>(g2);
    config.blockDimX = block;
    config.blockDimY = 1;
    config.blockDimZ = 1;
    config.sharedMemBytes = entry->shared;
    config.hStream = stream;
    config.attrs = attrs;
    config.numAttrs = n_attrs;
    drv.check(drv.launch_kernel_ex(&config, fn, params.data(), nullptr), "cuLaunchKernelEx");
  }
  g_cpp_launches.fetch_add(1, std::memory_order_relaxed);
#else
  python_launch(launch, nullptr, 0, false);
#endif
}

void Launch::python_launch(const std::array<int64_t, 5>& launch, int64_t* key, int key_len, bool cacheable) {
  std::vector<at::Tensor> tensors;
  std::vector<int64_t> kinds, ints, variant(variant_.begin(), variant_.begin() + n_variant_);
  std::vector<double> floats;
  for (int j = 0; j < n_; ++j) {
    const Arg& a = args_[j];
    kinds.push_back(a.kind);
    switch (a.kind) {
      case kTensor:  // Python needs a tensor: a flat view from the offset on (only on this path)
        tensors.push_back(a.i == 0 ? *a.t : a.t->reshape({-1}).slice(0, a.i));
        break;
      case kFloat: floats.push_back(a.f); break;
      case kNone: break;
      default: ints.push_back(a.i); break;
    }
  }
  torch::jit::Stack stack;
  stack.reserve(8);
  stack.emplace_back(static_cast<int64_t>(kernel_));
  stack.emplace_back(variant);
  stack.emplace_back(tensors);
  stack.emplace_back(kinds);
  stack.emplace_back(ints);
  stack.emplace_back(floats);
  stack.emplace_back(std::vector<int64_t>(launch.begin(), launch.end()));
  stack.emplace_back(cacheable && key != nullptr);
  hook_op().callBoxed(&stack);
  std::vector<int64_t> info = stack.at(0).toIntVector();
  g_python_launches.fetch_add(1, std::memory_order_relaxed);
  if (key == nullptr || !cacheable) return;
  // info: [] (not cacheable) or [function, num_warps, num_ctas, shared, coop, pdl, n_scratch, pack...]
  auto e = std::make_shared<Entry>();
  if (info.size() == static_cast<size_t>(7 + n_)) {
    e->cacheable = true;
    e->function = reinterpret_cast<void*>(static_cast<uintptr_t>(info[0]));
    e->num_warps = static_cast<int>(info[1]);
    e->num_ctas = static_cast<int>(info[2]);
    e->shared = static_cast<int>(info[3]);
    e->coop = static_cast<int>(info[4]);
    e->pdl = static_cast<int>(info[5]);
    e->n_scratch = static_cast<int>(info[6]);
    for (int j = 0; j < n_; ++j) {
      int64_t p = info[7 + j];
      TORCH_CHECK(p >= kSkip && p <= kF64, "flag_gems launcher: bad packing code ", p);
      e->pack.push_back(static_cast<uint8_t>(p));
    }
    std::string why = check_packing(*e);
    if (!why.empty()) {
      TORCH_WARN("flag_gems C++ launcher: ", kernel_name(kernel_), ": ", why,
                 "; this specialization keeps Triton's launch path");
      e->cacheable = false;
    }
  } else if (!info.empty()) {
    TORCH_WARN("flag_gems C++ launcher: ", kernel_name(kernel_), ": the hook returned ", info.size(),
               " values for ", n_, " parameters; this specialization keeps Triton's launch path");
  }
  if (!e->cacheable) g_uncacheable.fetch_add(1, std::memory_order_relaxed);
  Key k;
  k.len = key_len;
  std::memcpy(k.v.data(), key, sizeof(int64_t) * key_len);
  std::unique_lock<std::shared_mutex> lock(g_cache_mutex);
  g_cache.emplace(k, std::move(e));  // another thread's entry for this key stays: either is right
}

Stats stats() {
  return {g_cpp_launches.load(), g_python_launches.load(), g_uncacheable.load(), g_tune_queries.load()};
}
void reset_stats() {
  g_cpp_launches = 0;
  g_tune_queries = 0;
  g_python_launches = 0;
  g_uncacheable = 0;
}
void clear_cache() {
  std::unique_lock<std::shared_mutex> lock(g_cache_mutex);
  g_cache.clear();
}
void set_launch_cache(bool on) { g_cache_on = on; }
bool launch_cache_enabled() { return g_cache_on; }

// ------------------------------------------------------------------ tuned configs

const char* family_name(Family f) { return kFamilyNames[static_cast<int>(f)]; }

TuneQuery::TuneQuery(Family f, const at::Device& device, std::optional<at::ScalarType> dtype) : dtype_(dtype) {
  key_[len_++] = static_cast<int64_t>(f);
  key_[len_++] = device.is_cuda() ? device.index() : -1;  // Tensor.get_device(): -1 off CUDA
  key_[len_++] = dtype ? static_cast<int64_t>(*dtype) : -1;
}

TuneQuery& TuneQuery::k(int64_t v) {
  TORCH_CHECK(len_ < kMaxKey, "flag_gems tuned config: a key of more than ", kMaxKey - 3, " values");
  key_[len_++] = v;
  return *this;
}

TuneQuery& TuneQuery::dim(int64_t v) {
  TORCH_CHECK(n_dims_ < kMaxDims, "flag_gems tuned config: more than ", kMaxDims, " sizes");
  dims_[n_dims_++] = v;
  return *this;
}

std::optional<TunedConfig> TuneQuery::peek() const {
  TuneKey key;
  key.len = len_;
  std::memcpy(key.v.data(), key_.data(), sizeof(int64_t) * len_);
  std::shared_lock<std::shared_mutex> lock(g_tuned_mutex);
  auto it = g_tuned.find(key);
  if (it == g_tuned.end()) return std::nullopt;
  return it->second;
}

TunedConfig TuneQuery::get() const {
  TuneKey key;
  key.len = len_;
  std::memcpy(key.v.data(), key_.data(), sizeof(int64_t) * len_);
  {
    std::shared_lock<std::shared_mutex> lock(g_tuned_mutex);
    auto it = g_tuned.find(key);
    if (it != g_tuned.end()) return it->second;
  }
  const int64_t generation = g_tuned_generation.load();
  torch::jit::Stack stack;
  stack.reserve(5);
  stack.emplace_back(key_[0]);
  stack.emplace_back(key_[1]);
  stack.emplace_back(std::vector<int64_t>(key_.begin() + 3, key_.begin() + len_));
  if (dtype_)
    stack.emplace_back(*dtype_);
  else
    stack.emplace_back(c10::IValue());
  stack.emplace_back(std::vector<int64_t>(dims_.begin(), dims_.begin() + n_dims_));
  tuned_hook_op().callBoxed(&stack);
  const std::vector<int64_t> answer = stack.at(0).toIntVector();
  TORCH_CHECK(!answer.empty() && answer.size() <= 1 + TunedConfig::kMaxFields && answer[0] >= kTuneKeep &&
                  answer[0] <= kTuneOff,
              "flag_gems tuned config: bad answer from the Python side for ", family_name(static_cast<Family>(key_[0])),
              " (", answer.size(), " values)");
  TunedConfig cfg;
  cfg.heuristic = answer[0] == kTuneOff;
  for (size_t j = 1; j < answer.size(); ++j) cfg.v[j - 1] = answer[j];
  g_tune_queries.fetch_add(1, std::memory_order_relaxed);
  if (answer[0] != kTuneOnce) {
    std::unique_lock<std::shared_mutex> lock(g_tuned_mutex);
    if (g_tuned_generation.load() == generation) g_tuned.emplace(key, cfg);
  }
  return cfg;
}

void clear_tuned() {
  std::unique_lock<std::shared_mutex> lock(g_tuned_mutex);
  g_tuned_generation.fetch_add(1);
  g_tuned.clear();
}

void set_tma_available(bool on) { g_tma_available = on; }

bool tma_device(const at::Device& d) {
  if (!g_tma_available.load(std::memory_order_relaxed)) return false;
  if (!d.is_cuda()) return true;  // the interpreter
#if defined(GEMS_HAVE_CUDA_H)
  static AttributeCache major{};
  return device_attribute(d, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, "cuDeviceGetAttribute(compute capability)",
                          major) >= 9;
#else
  TORCH_CHECK(false, "flag_gems was built without cuda.h: no device queries");
#endif
}

std::string driver_unavailable_reason() {
#if defined(GEMS_HAVE_CUDA_H)
  return driver().error;
#else
  return "built without cuda.h (Triton's include directory was not found at build time)";
#endif
}

int64_t register_wrapper(const std::string& qualname, const std::string& dispatch_key, BoxedWrapper wrapper) {
  auto pos = qualname.find("::");
  TORCH_CHECK_VALUE(pos != std::string::npos, "register: expected 'namespace::op[.overload]', got '", qualname, "'");
  std::string ns = qualname.substr(0, pos), rest = qualname.substr(pos + 2);
  auto dot = rest.find('.');
  std::string name = rest.substr(0, dot), overload = dot == std::string::npos ? "" : rest.substr(dot + 1);
  if (overload == "default") overload = "";
  auto key = c10::parseDispatchKey(dispatch_key);
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow((ns + "::" + name).c_str(), overload.c_str());
  std::optional<c10::SafeKernelFunction> prev;
  if (op.hasComputedKernelForDispatchKey(key)) prev = op.getComputedKernelForDispatchKey(key);
  auto lib = std::make_unique<torch::Library>(torch::Library::IMPL, ns, key, __FILE__, __LINE__);
  const std::string target = overload.empty() ? name : name + "." + overload;
  lib->impl(target.c_str(),
            torch::CppFunction::makeFromBoxedFunctor(std::make_unique<WrapperKernel>(wrapper, std::move(prev), qualname)));
  std::lock_guard<std::mutex> g(g_reg_mutex);
  int64_t handle = g_next_handle++;
  g_registrations.emplace(handle, std::move(lib));
  return handle;
}

void deregister(int64_t handle) {
  std::unique_ptr<torch::Library> lib;
  {
    std::lock_guard<std::mutex> g(g_reg_mutex);
    auto it = g_registrations.find(handle);
    TORCH_CHECK_VALUE(it != g_registrations.end(), "deregister: no registration with handle ", handle);
    lib = std::move(it->second);
    g_registrations.erase(it);
  }
  lib.reset();  // the kernel before it is back
}

}  // namespace gems

// ------------------------------------------------------------------ the flag_gems_cpp ops
// Control and test entry points, as torch ops (the library needs no Python binding of its own:
// torch.ops.load_library loads it). triton_launch is the hook: defined here, implemented in
// Python (flag_gems/c_operators.py).

namespace {

std::vector<std::string> kernel_names_op() {
  std::vector<std::string> names;
  for (int64_t k = 0; k < static_cast<int64_t>(gems::Kernel::Count_); ++k)
    names.emplace_back(gems::kernel_name(static_cast<gems::Kernel>(k)));
  return names;
}

std::vector<int64_t> stats_op() {
  auto s = gems::stats();
  return {s.cpp_launches, s.python_launches, s.uncacheable, s.tune_queries};
}

std::vector<std::string> tuned_family_names_op() {
  std::vector<std::string> names;
  for (int64_t f = 0; f < static_cast<int64_t>(gems::Family::Count_); ++f)
    names.emplace_back(gems::family_name(static_cast<gems::Family>(f)));
  return names;
}

bool set_tma_available_op(bool on) {
  gems::set_tma_available(on);
  return on;
}

// What the C++ table keeps for a key (tests): [] when nothing, else [heuristic, values...].
// Reads the table only (never asks Python). `device` -1: the CPU.
std::vector<int64_t> tuned_peek_op(int64_t family, int64_t device, std::vector<int64_t> key,
                                   std::optional<at::ScalarType> dtype) {
  TORCH_CHECK_VALUE(family >= 0 && family < static_cast<int64_t>(gems::Family::Count_), "tuned_peek: family ", family);
  const at::Device d = device < 0 ? at::Device(at::kCPU) : at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device));
  gems::TuneQuery q(static_cast<gems::Family>(family), d, dtype);
  for (int64_t v : key) q.k(v);
  auto cfg = q.peek();
  if (!cfg) return {};
  std::vector<int64_t> out{cfg->heuristic ? 1 : 0};
  out.insert(out.end(), cfg->v.begin(), cfg->v.end());
  return out;
}

bool set_launch_cache_op(bool on) {
  bool was = gems::launch_cache_enabled();
  gems::set_launch_cache(on);
  return was;
}

int64_t register_wrapper_op(std::string qualname, std::string dispatch_key) {
  auto fn = gems::find_wrapper(qualname);
  TORCH_CHECK_VALUE(fn != nullptr, "register_wrapper: no C++ wrapper for '", qualname, "'");
  return gems::register_wrapper(qualname, dispatch_key, fn);
}

// The key `Launch::run` builds for these parameters (the hook's encoding), without options.
std::vector<int64_t> spec_key_op(int64_t kernel, std::vector<int64_t> variant, std::vector<at::Tensor> tensors,
                                 std::vector<int64_t> kinds, std::vector<int64_t> ints, std::vector<double> floats,
                                 int64_t device_index) {
  TORCH_CHECK_VALUE(kernel >= 0 && kernel < static_cast<int64_t>(gems::Kernel::Count_), "spec_key: kernel ", kernel);
  gems::Launch l(static_cast<gems::Kernel>(kernel));
  for (int64_t v : variant) l.variant(v);
  size_t ti = 0, ii = 0, fi = 0;
  auto next_int = [&] {
    TORCH_CHECK_VALUE(ii < ints.size(), "spec_key: too few ints");
    return ints[ii++];
  };
  for (int64_t k : kinds) {
    switch (k) {
      case 0:
        TORCH_CHECK_VALUE(ti < tensors.size(), "spec_key: too few tensors");
        l.tensor(tensors[ti++]);
        break;
      case 1: l.i(next_int()); break;
      case 2:
        TORCH_CHECK_VALUE(fi < floats.size(), "spec_key: too few floats");
        l.f(floats[fi++]);
        break;
      case 3: l.b(next_int() != 0); break;
      case 4: l.none(); break;
      case 5: l.c(next_int()); break;
      case 6: l.cb(next_int() != 0); break;
      case 7: l.cs(static_cast<gems::ConstStr>(next_int())); break;
      default: TORCH_CHECK_VALUE(false, "spec_key: kind ", k);
    }
  }
  return l.key(device_index);
}

}  // namespace

TORCH_LIBRARY(flag_gems_cpp, m) {
  m.def(
      "triton_launch(int kernel, int[] variant, Tensor[] tensors, int[] kinds, int[] ints, float[] floats, "
      "int[] launch, bool cacheable) -> int[]");
  m.def("tuned_config(int family, int device, int[] key, ScalarType? dtype, int[] dims) -> int[]");
  m.def("kernel_names() -> str[]", &kernel_names_op);
  m.def("tuned_family_names() -> str[]", &tuned_family_names_op);
  m.def("clear_tuned() -> ()", &gems::clear_tuned);
  m.def("set_tma_available(bool on) -> bool", &set_tma_available_op);
  m.def("tuned_peek(int family, int device, int[] key, ScalarType? dtype) -> int[]", &tuned_peek_op);
  m.def("wrapper_names() -> str[]", &gems::wrapper_names);
  m.def("stats() -> int[]", &stats_op);
  m.def("reset_stats() -> ()", &gems::reset_stats);
  m.def("clear_cache() -> ()", &gems::clear_cache);
  m.def("set_launch_cache(bool on) -> bool", &set_launch_cache_op);
  m.def("driver_unavailable_reason() -> str", &gems::driver_unavailable_reason);
  m.def("interpreter_mode() -> bool", &gems::interpreter_mode);
  m.def("register_wrapper(str qualname, str dispatch_key) -> int", &register_wrapper_op);
  m.def("deregister(int handle) -> ()", &gems::deregister);
  m.def(
      "spec_key(int kernel, int[] variant, Tensor[] tensors, int[] kinds, int[] ints, float[] floats, "
      "int device_index) -> int[]",
      &spec_key_op);
}
