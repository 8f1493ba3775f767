"""Triton GEMM for ``mm``, ``bmm`` and ``addmm``: ``out[b] = beta * bias + alpha * (a[b] @ b[b])``.

Three kernel classes, chosen per shape by the autotuner (``kernels/_autotune.py``, family
``matmul``); each is a config's ``KIND``:

* ``plain``: pointer loads of a 2-D output tile per program (programs grouped along M so that
  neighbours share ``b``'s column panel in L2), the batch on grid axis 1, masks on every edge,
  any strides (int64 offsets), every dtype. The only class for ``bmm`` with a batch, fp32,
  unaligned operands, and Triton without tensor descriptors. Its fixed tile table by M
  (:func:`tile_config`) is the heuristic default.
* ``tma``: host tensor descriptors (``triton.tools.tensor_descriptor.TensorDescriptor``) for
  ``a [M, K]``, ``b`` (``[K, N]``, or the ``[N, K]`` weight of ``nn.Linear`` whose transpose
  ``mm`` receives: loaded as is and transposed in registers) and ``out``: the bulk-copy engine
  moves whole tiles, out-of-bounds reads are zeros and writes are clipped, so no masks. One
  output tile per program.
* ``persistent``: the ``tma`` kernel with one program per SM walking the output tiles in the
  grouped order (fewer, longer programs: no tail effect, the next tile's loads overlap the
  epilogue). ``WARP_SPEC`` adds Triton's warp specialization of that loop (of the K loop for
  ``tma``) where the installed Triton has it (``tl.range(warp_specialize=...)``). That form
  makes its descriptors in the kernel (``_matmul_ws_kernel``): Triton's Hopper pass splits a
  128-row tile between two consumer warp groups and re-types the descriptors to the half tile,
  which a host descriptor's fixed box does not follow (3.6 fails on the store: ``'tt.descriptor_store'
  op tensor descriptor block and tensor types must match``; 3.8 and 3.9 on the loads). The
  candidates are the tiles that lower (:func:`_ws_tiles`); one that still does not compile on
  some GPU / Triton is dropped by the tuner with a warning.

Tensor-descriptor classes need fp16/bf16 operands, a GPU of compute capability >= 9 (Hopper)
or the interpreter, unit stride on ``a``'s and ``out``'s rows and on ``b``'s rows or columns,
16-byte aligned bases and row strides, and no batch: :func:`tma_eligible`. All classes
accumulate in fp32 and round once at the store; ``K = 0`` gives ``beta * bias`` (or zeros).
fp32 inputs follow ``torch.get_float32_matmul_precision()`` as cuBLAS does ("highest": IEEE
fp32, else TF32). Under Triton's interpreter operands are upcast to fp32 before ``tl.dot``
(its numpy path has no bf16 arithmetic).

The tuner also times the native kernel (cuBLAS) for each key; the config's ``NATIVE`` field
records whether it was faster. This module always runs a Triton kernel; the op layer
(``lowerings/matmul.py``) reads ``NATIVE`` to leave such shapes to cuBLAS.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch
import triton
import triton.language as tl

from . import _autotune as at
from ._common import FLOAT_DTYPES, cdiv, check_same_device, check_tensor, device_guard, interpreter_mode, num_sms
from ._launch import jit

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # Triton without host tensor descriptors: the plain class only
    TensorDescriptor = None
try:
    from triton.runtime import _allocation  # the scratch allocator of in-kernel descriptors (Triton 3.4+)
except ImportError:
    _allocation = None

__all__ = ["HAS_TMA", "HAS_WARP_SPEC", "TUNABLE", "matmul", "matmul_config", "shape_key", "tile_config", "tma_eligible",
           "tma_possible", "tune_key"]

MAX_BATCH = 65535  # grid axis 1
_RANGE_ARGS = inspect.signature(tl.range.__init__).parameters
HAS_TMA = TensorDescriptor is not None and "flatten" in _RANGE_ARGS
HAS_WARP_SPEC = (HAS_TMA and "warp_specialize" in _RANGE_ARGS and hasattr(tl, "make_tensor_descriptor")
                 and _allocation is not None)
KINDS = ("plain", "tma", "persistent")


@jit
def _matmul_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr,
    M, N, K,
    stride_ab, stride_am, stride_ak,
    stride_bb, stride_bk, stride_bn,
    stride_cb, stride_cm, stride_cn,
    stride_xb, stride_xm, stride_xn,  # bias strides (0 where it broadcasts)
    alpha, beta,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Float scalars to fp32 once: Triton's launcher passes Python floats as fp32, Inductor's wrapper
    # as fp64 (the math would turn fp64); so both launchers compile this kernel alike.
    alpha = tl.cast(alpha, tl.float32)
    beta = tl.cast(beta, tl.float32)
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row tiles walk the column tiles together.
    per_group = GROUP_M * n_n
    group = pid // per_group
    first_m = group * GROUP_M
    rows_in_group = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group

    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + batch * stride_ab + rm[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + batch * stride_bb + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_left = K - k0
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(rk[:, None] < k_left) & (rn[None, :] < N), other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    mask = (rm[:, None] < M) & (rn[None, :] < N)
    acc = acc * alpha
    if HAS_BIAS:
        x = tl.load(bias_ptr + batch * stride_xb + rm[:, None] * stride_xm + rn[None, :] * stride_xn,
                    mask=mask, other=0.0).to(tl.float32)
        acc += beta * x
    c_ptrs = c_ptr + batch * stride_cb + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tile_acc(a_desc, b_desc, off_m, off_n, k_tiles,
              B_KMAJOR: tl.constexpr, UPCAST: tl.constexpr, WARP_SPEC: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 ``a[off_m:, :] @ b[:, off_n:]`` tile through the descriptors (zeros past the edges)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for ki in tl.range(k_tiles, warp_specialize=WARP_SPEC):
        off_k = ki * BLOCK_K
        a = a_desc.load([off_m, off_k])
        if B_KMAJOR:
            b = b_desc.load([off_n, off_k]).T  # the [N, K] weight, transposed in registers
        else:
            b = b_desc.load([off_k, off_n])
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _tile_store(c_desc, acc, bias_ptr, off_m, off_n, M, N, stride_xm, stride_xn, alpha, beta,
                HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``alpha * acc (+ beta * bias)`` rounded once into ``out`` (the descriptor clips the edges)."""
    acc = acc * alpha
    if HAS_BIAS:
        rm = off_m.to(tl.int64) + tl.arange(0, BLOCK_M)
        rn = off_n.to(tl.int64) + tl.arange(0, BLOCK_N)
        x = tl.load(bias_ptr + rm[:, None] * stride_xm + rn[None, :] * stride_xn,
                    mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0).to(tl.float32)
        acc += beta * x
    c_desc.store([off_m, off_n], acc.to(c_desc.dtype))


@triton.jit
def _tma_tiles(a_desc, b_desc, c_desc, bias_ptr, M, N, K, stride_xm, stride_xn, alpha, beta, n_programs,
               HAS_BIAS: tl.constexpr, B_KMAJOR: tl.constexpr, UPCAST: tl.constexpr, PERSISTENT: tl.constexpr,
               WARP_SPEC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               GROUP_M: tl.constexpr):
    """The output tiles of this program (one, or with ``PERSISTENT`` every ``n_programs``-th in the
    grouped order), through the descriptors."""
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_group = GROUP_M * n_n
    if PERSISTENT:
        # Warp specialization, when asked for, partitions this loop (load / MMA / epilogue warps).
        for tile in tl.range(pid, n_m * n_n, n_programs, warp_specialize=WARP_SPEC):
            first_m = (tile // per_group) * GROUP_M
            rows_in_group = tl.minimum(n_m - first_m, GROUP_M)
            off_m = (first_m + (tile % per_group) % rows_in_group) * BLOCK_M
            off_n = ((tile % per_group) // rows_in_group) * BLOCK_N
            acc = _tile_acc(a_desc, b_desc, off_m, off_n, k_tiles, B_KMAJOR, UPCAST, False, BLOCK_M, BLOCK_N, BLOCK_K)
            _tile_store(c_desc, acc, bias_ptr, off_m, off_n, M, N, stride_xm, stride_xn, alpha, beta,
                        HAS_BIAS, BLOCK_M, BLOCK_N)
    else:
        first_m = (pid // per_group) * GROUP_M
        rows_in_group = tl.minimum(n_m - first_m, GROUP_M)
        off_m = (first_m + (pid % per_group) % rows_in_group) * BLOCK_M
        off_n = ((pid % per_group) // rows_in_group) * BLOCK_N
        acc = _tile_acc(a_desc, b_desc, off_m, off_n, k_tiles, B_KMAJOR, UPCAST, WARP_SPEC, BLOCK_M, BLOCK_N, BLOCK_K)
        _tile_store(c_desc, acc, bias_ptr, off_m, off_n, M, N, stride_xm, stride_xn, alpha, beta,
                    HAS_BIAS, BLOCK_M, BLOCK_N)


@triton.jit
def _matmul_tma_kernel(
    a_desc,  # [M, K] block [BLOCK_M, BLOCK_K]
    b_desc,  # [K, N] block [BLOCK_K, BLOCK_N], or (B_KMAJOR) [N, K] block [BLOCK_N, BLOCK_K]
    c_desc,  # [M, N] block [BLOCK_M, BLOCK_N]
    bias_ptr,  # broadcast to [M, N] through its strides (unused without HAS_BIAS)
    M, N, K,
    stride_xm, stride_xn,
    alpha, beta,
    n_programs,  # the grid (persistent: programs walk tiles with this step)
    HAS_BIAS: tl.constexpr,
    B_KMAJOR: tl.constexpr,
    UPCAST: tl.constexpr,
    PERSISTENT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Float scalars to fp32 once: Triton's launcher passes Python floats as fp32, Inductor's wrapper
    # as fp64 (the math would turn fp64); so both launchers compile this kernel alike.
    alpha = tl.cast(alpha, tl.float32)
    beta = tl.cast(beta, tl.float32)
    _tma_tiles(a_desc, b_desc, c_desc, bias_ptr, M, N, K, stride_xm, stride_xn, alpha, beta, n_programs,
               HAS_BIAS, B_KMAJOR, UPCAST, PERSISTENT, False, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


@triton.jit
def _matmul_ws_kernel(
    a_ptr,  # [M, K], unit column stride
    b_ptr,  # [K, N], or (B_KMAJOR) its [N, K] transpose, unit stride along the last dim
    c_ptr,  # [M, N], unit column stride
    bias_ptr,  # broadcast to [M, N] through its strides (unused without HAS_BIAS)
    M, N, K,
    stride_am, stride_b, stride_cm,  # row strides (elements)
    stride_xm, stride_xn,
    alpha, beta,
    n_programs,
    HAS_BIAS: tl.constexpr,
    B_KMAJOR: tl.constexpr,
    UPCAST: tl.constexpr,
    PERSISTENT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # The warp-specialized form: descriptors made here, not on the host. Triton's Hopper warp
    # specialization splits a 128-row tile between two consumer warp groups and re-types the
    # descriptors to the half tile; a host descriptor's box is fixed when it is made, and 3.6 leaves
    # the stored tile whole ("'tt.descriptor_store' op tensor descriptor block and tensor types
    # must match"), 3.8/3.9 the loaded one (triton-lang/triton#11587). An in-kernel descriptor is
    # split with the tile. (Needs a scratch allocator: the launcher provides one.)
    alpha = tl.cast(alpha, tl.float32)  # fp64 from Inductor's wrapper (see _matmul_tma_kernel)
    beta = tl.cast(beta, tl.float32)
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
    if B_KMAJOR:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_b, 1],
                                           block_shape=[BLOCK_N, BLOCK_K])
    else:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[stride_b, 1],
                                           block_shape=[BLOCK_K, BLOCK_N])
    c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[stride_cm, 1], block_shape=[BLOCK_M, BLOCK_N])
    _tma_tiles(a_desc, b_desc, c_desc, bias_ptr, M, N, K, stride_xm, stride_xn, alpha, beta, n_programs,
               HAS_BIAS, B_KMAJOR, UPCAST, PERSISTENT, True, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


def tile_config(m: int, elem_bytes: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for ``m`` output rows: the heuristic.

    Decode-sized M gets short, wide tiles with a long K step; large M the usual 128x128
    tensor-core tile. fp32 halves BLOCK_K (shared memory per stage). The interpreter takes
    32x32x32 tiles: numpy handles a block at once, each program is a Python round trip.
    """
    if interpreter_mode():
        return 32, 32, 32, 1, 1
    if m <= 16:
        bm, bn, bk, warps, stages = 16, 64, 128, 4, 4
    elif m <= 64:
        bm, bn, bk, warps, stages = 64, 64, 64, 4, 4
    else:
        bm, bn, bk, warps, stages = 128, 128, 64, 8, 3
    if elem_bytes == 4:
        bk //= 2
    return bm, bn, bk, warps, stages


def check_matmul_args(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Validate ``a [.., M, K] @ b [.., K, N] (+ bias)`` for :func:`matmul`.

    Raises:
        TypeError: not tensors, or dtypes other than one shared fp16/bf16/fp32.
        ValueError: ranks, inner sizes, batch sizes or a bias that does not broadcast.
        NotImplementedError: devices the kernel does not run on, batch above 65535.
    """
    check_tensor("a", a, FLOAT_DTYPES)
    check_tensor("b", b, FLOAT_DTYPES)
    if a.dtype != b.dtype:
        raise TypeError(f"b: expected dtype {a.dtype} (a's), got {b.dtype}")
    if a.dim() not in (2, 3) or b.dim() != a.dim():
        raise ValueError(f"a, b: expected two 2-D or two 3-D tensors, got {a.dim()}-D and {b.dim()}-D")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"b: expected {a.shape[-1]} rows (a's columns), got shape {list(b.shape)}")
    if a.dim() == 3:
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"b: expected batch {a.shape[0]} (a's), got {b.shape[0]}")
        if a.shape[0] > MAX_BATCH:
            raise NotImplementedError(f"a: batch {a.shape[0]} above {MAX_BATCH}")
    check_same_device(a=a, b=b, bias=bias)
    if bias is not None:
        check_tensor("bias", bias, FLOAT_DTYPES)
        if bias.dtype != a.dtype:
            raise TypeError(f"bias: expected dtype {a.dtype} (a's), got {bias.dtype}")
        out_shape = (a.shape[-2], b.shape[-1])
        try:
            torch.broadcast_shapes(bias.shape, out_shape)
        except RuntimeError:
            raise ValueError(f"bias: shape {list(bias.shape)} does not broadcast to {list(out_shape)}") from None
        if bias.dim() > 2:
            raise ValueError(f"bias: expected at most 2 dims, got {bias.dim()}")


# --------------------------------------------------------------------------- tensor descriptors


@functools.lru_cache(maxsize=None)
def _tma_device(dev: int) -> bool:
    """Tensor descriptors run on device ``dev``: compute capability >= 9, or the interpreter (-1)."""
    if not HAS_TMA:
        return False
    return dev < 0 or torch.cuda.get_device_capability(dev)[0] >= 9


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0


def tma_eligible(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None) -> bool:
    """Whether the tensor-descriptor classes can run ``a @ b -> out`` (module docstring).

    ``a``, ``b``: 2-D (or 3-D with batch 1); ``out``: None for a new contiguous output.
    """
    if a.dtype is not torch.bfloat16 and a.dtype is not torch.float16:
        return False
    if not _tma_device(a.get_device()):
        return False
    if a.dim() == 3:
        if a.shape[0] != 1:
            return False
        a, b, out = a[0], b[0], (out[0] if out is not None else None)
    m, k = a.shape
    n = b.shape[1]
    if m == 0 or n == 0 or k == 0:
        return False
    e = a.element_size()
    sa, sb = a.stride(), b.stride()
    if sa[1] != 1 or (sa[0] * e) % 16 or not _aligned(a) or not _aligned(b):
        return False
    if not ((sb[1] == 1 and (sb[0] * e) % 16 == 0) or (sb[0] == 1 and (sb[1] * e) % 16 == 0)):
        return False
    if out is None:
        return (n * e) % 16 == 0
    so = out.stride()
    return so[1] == 1 and (so[0] * e) % 16 == 0 and _aligned(out)


def _b_kmajor(b: torch.Tensor) -> bool:
    """``b [.., K, N]`` stored as its ``[N, K]`` transpose (``nn.Linear``'s weight): unit stride along K."""
    return b.stride(-2) == 1 and b.stride(-1) != 1 and b.shape[-1] > 1


# --------------------------------------------------------------------------- launch


def tune_key(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None = None) -> tuple:
    """The autotuning key of ``a @ b (+ bias)``: (batch bucket, M bucket, N, K, dtype, has_bias, b stored
    K-major, tensor descriptors usable). N and K are exact for 2-D products (weights), power-of-two
    buckets for batched ones (attention-shaped products change with the sequence)."""
    sa, sb = a.shape, b.stride()
    n = b.shape[-1]
    kmajor = sb[-2] == 1 and sb[-1] != 1 and n > 1  # _b_kmajor, inline (a launch path)
    if len(sa) == 3 and sa[0] > 1:
        return shape_key(sa[0], sa[1], n, sa[2], a.dtype, bias is not None, kmajor, False)
    m = sa[-2]
    return (1, min(1 << max(m - 1, 0).bit_length(), 1 << 20), n, sa[-1], a.dtype, bias is not None, kmajor,
            tma_eligible(a, b, out))


def shape_key(batch: int, m: int, n: int, k: int, dtype: torch.dtype, has_bias: bool, b_kmajor: bool,
              tma_ok: bool) -> tuple:
    """:func:`tune_key` from sizes (pretune). For contiguous, freshly allocated operands ``tma_ok`` is
    :func:`tma_possible`."""
    if batch > 1:
        n, k = at.pow2_bucket(n, 1 << 20), at.pow2_bucket(k, 1 << 20)
    return (at.pow2_bucket(batch, MAX_BATCH + 1), at.pow2_bucket(m, 1 << 20), n, k, dtype, bool(has_bias),
            bool(b_kmajor), bool(tma_ok))


def tma_possible(batch: int, m: int, n: int, k: int, dtype: torch.dtype, dev: int) -> bool:
    """What :func:`tma_eligible` says for contiguous operands of these sizes on device ``dev``."""
    e = dtype.itemsize
    return (dtype in (torch.float16, torch.bfloat16) and _tma_device(dev) and batch == 1 and min(m, n, k) > 0
            and (n * e) % 16 == 0 and (k * e) % 16 == 0)


def matmul_config(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None,
                  out: torch.Tensor | None = None) -> tuple:
    """The config tuple (``TUNABLE.fields``) the autotuner chose for this call (``NATIVE`` included)."""
    key = tune_key(a, b, bias, out)
    dev = a.get_device()
    cfg = TUNABLE.chosen.get((dev, key))
    if cfg is None:
        batch = a.shape[0] if a.dim() == 3 else 1
        cfg = TUNABLE.resolve(key, dev, {"m": a.shape[-2], "n": b.shape[-1], "k": a.shape[-1], "batch": batch})
    return cfg


def matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, *, beta=1, alpha=1,
           out: torch.Tensor | None = None, config: tuple | None = None) -> torch.Tensor:
    """``beta * bias + alpha * (a @ b)`` for 2-D (mm/addmm) or 3-D (bmm) operands.

    Args:
        a: ``[M, K]`` or ``[B, M, K]``, fp16/bf16/fp32, any strides.
        b: ``[K, N]`` or ``[B, K, N]``, a's dtype.
        bias: None, or broadcastable to ``[M, N]`` (2-D case), a's dtype. Ignored when
            ``beta == 0`` (as torch: NaN in it does not propagate).
        beta, alpha: scalars.
        out: where to write (a's dtype, ``[.., M, N]``); a new contiguous tensor when None.
        config: a config tuple (``TUNABLE.fields``; from :func:`matmul_config`), else the tuned one.
            A tensor-descriptor config on operands that do not allow one runs the plain
            kernel with its tile.

    Returns:
        The product, a's dtype.

    Raises:
        TypeError / ValueError / NotImplementedError: see :func:`check_matmul_args`.
    """
    check_matmul_args(a, b, bias)
    batched = a.dim() == 3
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    shape = (a.shape[0], m, n) if batched else (m, n)
    if out is None:
        out = torch.empty(shape, dtype=a.dtype, device=a.device)
    elif tuple(out.shape) != shape or out.dtype != a.dtype:
        raise ValueError(f"out: expected shape {list(shape)} and dtype {a.dtype}, got {list(out.shape)} {out.dtype}")
    if out.numel() == 0:
        return out
    if config is None:
        config = matmul_config(a, b, bias if beta != 0 else None, out)
    kind, bm, bn, bk, group_m, warps, stages, warp_spec, _ = config
    has_bias = bias is not None and beta != 0
    if has_bias:
        bias_v = bias.expand(m, n)
        xs = (0, bias_v.stride(0), bias_v.stride(1))
    else:
        bias_v, xs = out, (0, 0, 0)
    interp = interpreter_mode()
    if kind != "plain" and tma_eligible(a, b, out):
        _launch_tma(a, b, out, bias_v, xs, m, n, k, alpha, beta, has_bias, kind == "persistent", bool(warp_spec),
                    bm, bn, bk, group_m, warps, stages, interp)
        return out
    a3 = a if batched else a.unsqueeze(0)
    b3 = b if batched else b.unsqueeze(0)
    c3 = out if batched else out.unsqueeze(0)
    precision = "tf32"
    if a.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        precision = "ieee"
    if interp:
        precision = "ieee"
    grid = (cdiv(m, bm) * cdiv(n, bn), a3.shape[0])
    with device_guard(a):
        _matmul_kernel[grid](
            a3, b3, c3, bias_v,
            m, n, k,
            *a3.stride(), *b3.stride(), *c3.stride(), *xs,
            float(alpha), float(beta),
            HAS_BIAS=has_bias,
            UPCAST=interp,
            PRECISION=precision,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m,
            num_warps=warps, num_stages=stages,
        )
    return out


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global scratch for in-kernel tensor descriptors (Triton's allocator protocol), on the current device."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


@contextlib.contextmanager
def _scratch_allocator():
    """Inside, a launch that needs global scratch gets it from :func:`_scratch`, unless the process
    set an allocator of its own (``triton.set_allocator``); the setting is restored afterwards."""
    var = getattr(_allocation, "_allocator", None)
    if var is None or not isinstance(var.get(), _allocation.NullAllocator):
        yield
        return
    token = var.set(_scratch)
    try:
        yield
    finally:
        var.reset(token)


def _launch_tma(a, b, out, bias_v, xs, m, n, k, alpha, beta, has_bias, persistent, warp_spec,
                bm, bn, bk, group_m, warps, stages, interp):
    if a.dim() == 3:  # batch 1
        a, b, out = a[0], b[0], out[0]
    kmajor = _b_kmajor(b)
    b_rows = b.t() if kmajor else b  # unit stride along its last dim
    tiles = cdiv(m, bm) * cdiv(n, bn)
    programs = min(tiles, num_sms(a.device)) if persistent else tiles
    options = dict(HAS_BIAS=has_bias, B_KMAJOR=kmajor, UPCAST=interp, PERSISTENT=persistent, BLOCK_M=bm, BLOCK_N=bn,
                   BLOCK_K=bk, GROUP_M=group_m, num_warps=warps, num_stages=stages)
    if warp_spec:  # descriptors made in the kernel (see _matmul_ws_kernel)
        with device_guard(a), _scratch_allocator():
            _matmul_ws_kernel[(programs,)](
                a, b_rows, out, bias_v,
                m, n, k,
                a.stride(0), b_rows.stride(0), out.stride(0),
                xs[1], xs[2],
                float(alpha), float(beta),
                programs,
                **options,
            )
        return
    a_desc = TensorDescriptor.from_tensor(a, [bm, bk])
    b_desc = TensorDescriptor.from_tensor(b_rows, [bn, bk] if kmajor else [bk, bn])
    c_desc = TensorDescriptor.from_tensor(out, [bm, bn])
    with device_guard(a):
        _matmul_tma_kernel[(programs,)](
            a_desc, b_desc, c_desc, bias_v,
            m, n, k,
            xs[1], xs[2],
            float(alpha), float(beta),
            programs,
            **options,
        )


# --------------------------------------------------------------------------- autotuning

_FIELDS = ("KIND", "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages", "WARP_SPEC", "NATIVE")


def _cfg(kind, bm, bn, bk, warps, stages, warp_spec=0, group_m=8) -> dict:
    return dict(KIND=kind, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m, num_warps=warps, num_stages=stages,
                WARP_SPEC=warp_spec, NATIVE=0)


def _tune_default(key, dev) -> dict:
    bm, bn, bk, warps, stages = tile_config(key[1], key[4].itemsize)
    return _cfg("plain", bm, bn, bk, warps, stages)


# Tiles (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) by M bucket, likeliest first. Decode (M <= 16)
# streams the weight: narrow N tiles give enough programs to fill the SMs (N = 4096 in 32-column
# tiles: 128 programs on 132 SMs), long K steps and deep pipelines keep the loads in flight.
# Larger M: Hopper's 128-row wgmma tiles, 128 or 256 wide. Not measured yet (bench_tune.py).
_TILES_SMALL = ((16, 64, 128, 4, 4), (16, 32, 256, 4, 4), (16, 16, 256, 4, 4), (16, 64, 256, 4, 3),
                (16, 32, 128, 4, 6), (16, 128, 128, 4, 4), (16, 64, 128, 4, 6))
_TILES_MID = ((64, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 128, 4, 3), (64, 128, 128, 4, 3), (32, 64, 128, 4, 4))
_TILES_LARGE = ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4),
                (128, 128, 128, 8, 3), (64, 256, 64, 4, 4))


def _ws_tiles(tiles) -> list:
    """``tiles`` as warp-specialized variants. Triton's Hopper warp specialization (3.6) runs only at 4
    warps (one producer and up to two 4-warp consumer groups; at other counts the loop is left as it
    is: a duplicate candidate), on a pipelined loop (2+ stages) and on wgmma tiles (64+ rows; smaller
    ones compile unspecialized). It splits a 128-row tile between the two consumers along M (hence
    the in-kernel descriptors of ``_matmul_ws_kernel``); a narrower tile 256 or more wide it splits
    along N, which neither 3.6 nor 3.9 lowers (a wgmma operand layout assertion). Checked by
    compiling every candidate offline for sm_90 with Triton 3.6 and 3.9."""
    out = []
    for bm, bn, bk, _, stages in tiles:
        tile = (bm, bn, bk, 4, max(stages, 2))
        if bm >= 64 and (bm >= 128 or bn < 256) and tile not in out:
            out.append(tile)
    return out


def smem_estimate(cfg: dict, elem_bytes: int) -> int:
    """An upper bound of a config's shared memory, in bytes: the A and B tiles of each pipeline stage,
    and for the descriptor classes the output tile staged for the bulk store (at least 16 KiB: layout
    conversions; warp-specialized, two 64-row tiles: one per consumer group, or a double-buffered
    one) and 2 KiB of barriers. Not below the compiled size of any candidate (Triton 3.6 and 3.9,
    sm_90: every class, tile, layout, bias); the plain class's figure is an Ampere-style cp.async
    pipeline (Hopper's compile of it uses less)."""
    bm, bn, bk, stages = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_stages"]
    need = stages * (bm * bk + bk * bn) * elem_bytes
    if cfg["KIND"] != "plain":
        out_tile = max(2 * 64 * bn, bm * bn) if cfg["WARP_SPEC"] else bm * bn
        need += max(out_tile * elem_bytes, 16384) + 2048
    return need


def _fits(cfg: dict, elem_bytes: int, dev: int) -> bool:
    limit = at.max_shared_memory(dev)
    return limit is None or smem_estimate(cfg, elem_bytes) <= limit


def _tune_candidates(key, dev) -> list:
    """Per M bucket a few tiles (above) in each class the call can use: ``tma`` first on Hopper,
    ``persistent`` (and its warp-specialized form) where there are more tiles than SMs, ``plain``
    always. fp32: plain tiles with half the K step. The interpreter gets one small tile per class."""
    batch, m, n, k, dtype, _, _, tma_ok = key
    tma_ok = tma_ok and HAS_TMA
    if dev < 0:  # the interpreter: each class once, small tiles
        out = [_cfg("plain", 16, 32, 16, 1, 1)]
        if tma_ok:
            out += [_cfg("tma", 16, 16, 16, 1, 1), _cfg("persistent", 16, 16, 16, 1, 1, group_m=2)]
            if HAS_WARP_SPEC:
                out += [_cfg("persistent", 16, 16, 16, 1, 1, warp_spec=1, group_m=2),
                        _cfg("tma", 16, 32, 16, 1, 1, warp_spec=1)]
        return out
    tiles = _TILES_SMALL if m <= 16 else _TILES_MID if m <= 128 else _TILES_LARGE
    if dtype.itemsize == 4:
        out = [_cfg("plain", bm, bn, max(16, bk // 2), w, st) for bm, bn, bk, w, st in tiles]
        return [c for c in out if _fits(c, 4, dev)]
    out = []
    if tma_ok:
        out += [_cfg("tma", *t) for t in tiles]
        sms = num_sms(at.torch_device(dev))
        many = [t for t in tiles if cdiv(m, t[0]) * cdiv(n, t[1]) * batch > sms]
        out += [_cfg("persistent", *t) for t in many[:3]]
        if HAS_WARP_SPEC:
            out += [_cfg("persistent", *t, warp_spec=1) for t in _ws_tiles(many)[:2]]
            out += [_cfg("tma", *t, warp_spec=1) for t in _ws_tiles(tiles)[:2]]
    out += [_cfg("plain", *t) for t in tiles]
    return [c for c in out if _fits(c, dtype.itemsize, dev)]  # what a launch can have (smaller GPUs than Hopper)


def _bench_operands(key, dev, dims):
    batch, m, n, k, dtype, has_bias, kmajor, _ = key
    dims = dims or {}
    m, n, k, batch = dims.get("m", m), dims.get("n", n), dims.get("k", k), dims.get("batch", batch)
    device = at.torch_device(dev)
    lead = (batch,) if batch > 1 else ()
    a = torch.randn(*lead, m, k, device=device, dtype=dtype)
    if kmajor:
        b = torch.randn(*lead, n, k, device=device, dtype=dtype).transpose(-1, -2)
    else:
        b = torch.randn(*lead, k, n, device=device, dtype=dtype)
    bias = torch.randn(n, device=device, dtype=dtype) if has_bias and batch == 1 else None
    out = torch.empty(*lead, m, n, device=device, dtype=dtype)
    return a, b, bias, out


def _tune_bench(key, dev, dims):
    """``a @ b (+ bias)`` of the key's sizes (the real call's when known), ``b`` laid out as the key says."""
    a, b, bias, out = _bench_operands(key, dev, dims)
    return lambda: matmul(a, b, bias, out=out)


def _tune_baseline(key, dev, dims):
    """The native kernel on the same operands: ``torch.mm`` / ``addmm`` / ``bmm`` (cuBLAS on NVIDIA)."""
    a, b, bias, out = _bench_operands(key, dev, dims)
    if a.dim() == 3:
        return lambda: torch.bmm(a, b, out=out)
    if bias is not None:
        return lambda: torch.addmm(bias, a, b, out=out)
    return lambda: torch.mm(a, b, out=out)


TUNABLE = at.register(at.Tunable(
    "matmul",
    fields=_FIELDS,
    key_fields=("batch_bucket", "m_bucket", "n", "k", "dtype", "has_bias", "b_kmajor", "tma_ok"),
    default=_tune_default,
    candidates=_tune_candidates,
    make_bench=_tune_bench,
    baseline=_tune_baseline,
    sources=(_matmul_kernel, _matmul_tma_kernel, _matmul_ws_kernel, _tma_tiles, _tile_acc, _tile_store,
             tma_eligible, _ws_tiles, smem_estimate, _fits),
))
