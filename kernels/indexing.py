"""Indexing and data-movement kernels: row gather (embedding / index_select), gather, cat,
cumsum, arange, and the embedding weight gradient.

Row gather, ``out[o, j, :] = src[o, index[j], :]``, with ``src`` seen as
``[n_outer, n_src, n_inner]``: one program per output row ``(o, j)``, walking the inner
dim in ``BLOCK`` chunks (contiguous loads and stores when the inner stride is 1).
``embedding(weight, ids)`` is the case ``n_outer = 1``.

Out-of-range indices: torch raises (CPU: ``IndexError``; CUDA: a device-side assert that
poisons the context). These kernels never read or write out of bounds: a row whose index
is outside ``[0, n_src)`` reads as zeros (``gather``: the element is zero). The launchers
do not check the values (that would be a device sync per call).

``gather`` (``out[p] = src[p with p[dim] = index[p]]``) runs one program per ``BLOCK``
elements of the index, unravelling the flat position over at most :data:`MAX_DIMS` dims
(any strides for ``src`` and ``index``).

``cat``: one launch per input, copying the input seen as ``[n_outer, n_cols]`` into its
column slice of the output seen as ``[n_outer, total_cols]``.

``cumsum`` over the last dim: one program per row, ``BLOCK`` elements at a time with
``tl.cumsum`` plus a running carry; fp32 accumulation for fp16/bf16/fp32, int64 for
integers and bool (torch's rule), fp64 for fp64.

``arange``: ``out[i] = start + i * step`` computed in the accumulation type torch uses on
the device (CUDA: fp32 for fp16/bf16/fp32; CPU: fp64), int64 for integer dtypes.

Embedding backward (deterministic, no atomics): the token ids are sorted (stable, so equal
ids keep token order); one program per sorted position that starts a run of equal ids
sums that run's gradient rows in fp32, in token order, and writes the weight row once.
Every element is therefore summed in the same order on every run. Ids outside
``[0, num_weights)`` and ``padding_idx`` contribute nothing. Cost: one program walks a
whole run, so a very frequent id (thousands of tokens) is summed serially by one program
per column block; a split of long runs is left for the GPU benchmark to ask for.

All offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, device_guard, next_pow2
from ._launch import jit

__all__ = [
    "MAX_DIMS",
    "arange",
    "cat",
    "cumsum",
    "embedding_dense_backward",
    "gather",
    "index_select",
    "rows_view",
]

MAX_DIMS = 4  # gather: most dims of src / index
_BLOCK = 1024  # elements per program (cat, gather, arange) or per chunk (row kernels)
_MAX_GRID_1 = 65535  # CUDA limit on grid dims 1 and 2


def _row_block(n_cols: int) -> int:
    return min(_BLOCK, next_pow2(n_cols))


# --------------------------------------------------------------------------- row gather


@jit
def _index_select_kernel(
    src_ptr,  # [n_outer, n_src, n_inner] any strides
    idx_ptr,  # [n_idx] int32/int64, stride stride_idx
    out_ptr,  # [n_outer, n_idx, n_inner] contiguous
    n_idx,
    n_src,
    n_inner,
    stride_src_o, stride_src_s, stride_src_i,
    stride_idx,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    o = pid // n_idx
    j = pid % n_idx
    row = tl.load(idx_ptr + j * stride_idx).to(tl.int64)
    valid = (row >= 0) & (row < n_src)
    row = tl.where(valid, row, 0)  # never address outside src
    src_row = src_ptr + o * stride_src_o + row * stride_src_s
    n_read = tl.where(valid, n_inner, 0)  # an invalid row reads nothing: zeros
    out_row = out_ptr + pid * n_inner
    cols = tl.arange(0, BLOCK)
    for start in range(0, n_inner, BLOCK):
        c = start + cols
        mask = c < n_inner
        v = tl.load(src_row + c * stride_src_i, mask=c < n_read, other=0)
        tl.store(out_row + c, v, mask=mask)


def rows_view(t: torch.Tensor, dim: int):
    """``t`` as ``(n_outer, n_dim, n_inner)`` with one stride each, without copying when possible.

    Returns:
        ``(t_or_copy, (n_outer, n_dim, n_inner), (stride_o, stride_d, stride_i))``; a
        contiguous copy of ``t`` when its outer or inner dims do not merge into one stride.
    """
    shape = list(t.shape)
    n_outer = 1
    for s in shape[:dim]:
        n_outer *= s
    n_inner = 1
    for s in shape[dim + 1:]:
        n_inner *= s

    def merged(dims):
        # one stride covering ``dims`` (outermost first) or None
        stride = None
        for d in reversed(dims):
            if shape[d] == 1:
                continue
            if stride is None:
                stride, expect = t.stride(d), t.stride(d) * shape[d]
            elif t.stride(d) != expect:
                return None
            else:
                expect = t.stride(d) * shape[d]
        return 0 if stride is None else stride

    so, si = merged(list(range(dim))), merged(list(range(dim + 1, t.dim())))
    if so is None or si is None:
        t = t.contiguous()
        so, si = n_inner * shape[dim], 1
    return t, (n_outer, shape[dim], n_inner), (so, t.stride(dim) if shape[dim] > 1 else n_inner, si)


def index_select(src: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``torch.index_select(src, dim, index)``: rows of ``src`` along ``dim``.

    Args:
        src: any dtype, at least 1-D, any strides (copied when its outer or inner dims do
            not merge into one stride).
        dim: a non-negative dim of ``src``.
        index: 0-D or 1-D int32/int64 (any stride). Out-of-range values give zero rows.

    Returns:
        A contiguous tensor of ``src``'s shape with ``dim`` of size ``index.numel()``.

    Raises:
        TypeError / ValueError: bad dtype, dim or index rank.
    """
    if index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"index: expected int32 or int64, got {index.dtype}")
    if index.dim() > 1:
        raise ValueError(f"index: expected 0-D or 1-D, got {index.dim()}-D")
    if not 0 <= dim < src.dim():
        raise ValueError(f"dim: expected 0 <= dim < {src.dim()}, got {dim}")
    shape = list(src.shape)
    n_idx = index.numel()
    shape[dim] = n_idx
    out = torch.empty(shape, dtype=src.dtype, device=src.device)
    if out.numel() == 0:
        return out
    idx = index.reshape(-1)
    srcv, (n_outer, n_src, n_inner), (so, ss, si) = rows_view(src, dim)
    with device_guard(src):
        _index_select_kernel[(n_outer * n_idx,)](
            srcv, idx, out, n_idx, n_src, n_inner, so, ss, si, idx.stride(0),
            BLOCK=_row_block(n_inner),
        )
    return out


# --------------------------------------------------------------------------- gather


@jit
def _gather_kernel(
    src_ptr,  # [s0, s1, s2, s3] any strides (dims padded to MAX_DIMS with size 1)
    idx_ptr,  # [i0, i1, i2, i3] int64, any strides
    out_ptr,  # [i0, i1, i2, i3] contiguous
    n,
    size1, size2, size3,  # index (= out) sizes of dims 1..3
    stride_src_0, stride_src_1, stride_src_2, stride_src_3,
    stride_idx_0, stride_idx_1, stride_idx_2, stride_idx_3,
    n_src,  # src.size(dim)
    stride_src_dim,
    DIM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    p = pid * BLOCK + tl.arange(0, BLOCK)
    mask = p < n
    i3 = p % size3
    r = p // size3
    i2 = r % size2
    r = r // size2
    i1 = r % size1
    i0 = r // size1
    k = tl.load(idx_ptr + i0 * stride_idx_0 + i1 * stride_idx_1 + i2 * stride_idx_2 + i3 * stride_idx_3,
                mask=mask, other=0).to(tl.int64)
    valid = (k >= 0) & (k < n_src)
    k = tl.where(valid, k, 0)
    # the position in src: index's coordinates, with the gathered dim's replaced by k
    if DIM == 0:
        i0 = tl.zeros_like(i0)
    elif DIM == 1:
        i1 = tl.zeros_like(i1)
    elif DIM == 2:
        i2 = tl.zeros_like(i2)
    else:
        i3 = tl.zeros_like(i3)
    off = i0 * stride_src_0 + i1 * stride_src_1 + i2 * stride_src_2 + i3 * stride_src_3 + k * stride_src_dim
    v = tl.load(src_ptr + off, mask=mask & valid, other=0)
    tl.store(out_ptr + p, v, mask=mask)


def gather(src: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``torch.gather(src, dim, index)``.

    Args:
        src: any dtype, 1 to MAX_DIMS dims, any strides.
        dim: a non-negative dim of ``src``.
        index: int64 with ``src``'s rank and ``index.size(d) <= src.size(d)`` for ``d != dim``.
            Out-of-range values give zeros.

    Returns:
        A contiguous tensor of ``index``'s shape and ``src``'s dtype.

    Raises:
        TypeError / ValueError: what torch refuses, or more than MAX_DIMS dims.
    """
    if index.dtype != torch.int64:
        raise TypeError(f"index: expected int64, got {index.dtype}")
    if not 1 <= src.dim() <= MAX_DIMS or index.dim() != src.dim():
        raise ValueError(f"gather: expected src and index of one rank in 1..{MAX_DIMS}, got {src.dim()} and {index.dim()}")
    if not 0 <= dim < src.dim():
        raise ValueError(f"dim: expected 0 <= dim < {src.dim()}, got {dim}")
    for d in range(src.dim()):
        if d != dim and index.shape[d] > src.shape[d]:
            raise ValueError(f"index: size {index.shape[d]} of dim {d} exceeds src's {src.shape[d]}")
    out = torch.empty(index.shape, dtype=src.dtype, device=src.device)
    n = out.numel()
    if n == 0:
        return out
    pad = MAX_DIMS - src.dim()
    isize = [1] * pad + list(index.shape)
    sstr = [0] * pad + list(src.stride())
    istr = [0] * pad + list(index.stride())
    with device_guard(src):
        _gather_kernel[(cdiv(n, _BLOCK),)](
            src, index, out, n, isize[1], isize[2], isize[3], *sstr, *istr,
            src.shape[dim], src.stride(dim), DIM=dim + pad, BLOCK=_BLOCK,
        )
    return out


# --------------------------------------------------------------------------- cat


@jit
def _copy_2d_kernel(
    src_ptr,  # [n_outer, n_cols] strides (stride_src_o, stride_src_c)
    out_ptr,  # [n_outer, *] row stride stride_out_o, unit column stride
    n_cols,
    n_col_blocks,
    stride_src_o, stride_src_c,
    stride_out_o,
    BLOCK: tl.constexpr,
):
    o = tl.program_id(0).to(tl.int64)
    b0 = tl.program_id(1).to(tl.int64)
    nb = tl.num_programs(1).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    for b in range(b0, n_col_blocks, nb):
        c = b * BLOCK + cols
        mask = c < n_cols
        v = tl.load(src_ptr + o * stride_src_o + c * stride_src_c, mask=mask, other=0)
        tl.store(out_ptr + o * stride_out_o + c, v, mask=mask)


def cat(tensors, dim: int) -> torch.Tensor:
    """``torch.cat(tensors, dim)`` for tensors of one dtype and device.

    Args:
        tensors: a non-empty sequence of tensors of one rank (>= 1), equal sizes except
            along ``dim``, one dtype, one device; any strides (an input whose outer dims or
            ``[dim:]`` dims do not merge into one stride is copied first).
        dim: a non-negative dim.

    Returns:
        A new contiguous tensor.

    Raises:
        TypeError / ValueError: mixed dtypes or devices, mismatched shapes.
    """
    tensors = list(tensors)
    if not tensors:
        raise ValueError("tensors: expected at least one tensor")
    first = tensors[0]
    if not 0 <= dim < first.dim():
        raise ValueError(f"dim: expected 0 <= dim < {first.dim()}, got {dim}")
    for i, t in enumerate(tensors):
        if t.dtype != first.dtype or t.device != first.device:
            raise TypeError(f"tensors[{i}]: expected {first.dtype} on {first.device}, got {t.dtype} on {t.device}")
        if t.dim() != first.dim() or t.shape[:dim] != first.shape[:dim] or t.shape[dim + 1:] != first.shape[dim + 1:]:
            raise ValueError(f"tensors[{i}]: shape {list(t.shape)} does not match {list(first.shape)} outside dim {dim}")
    shape = list(first.shape)
    shape[dim] = sum(t.shape[dim] for t in tensors)
    out = torch.empty(shape, dtype=first.dtype, device=first.device)
    if out.numel() == 0:
        return out
    n_outer = 1
    for s in shape[:dim]:
        n_outer *= s
    out_cols = out.numel() // n_outer
    offset = 0
    with device_guard(first):
        for t in tensors:
            if t.numel() == 0:
                continue
            cols = t.numel() // n_outer
            # t as [n_outer, cols]: dims [dim:] merge into one stride, dims [:dim] into another
            tv, (_, _, _), (so, _, sc) = rows_view(t.unsqueeze(dim), dim)
            # rows_view on the unsqueezed tensor: outer = t's dims before dim, inner = dims [dim:]
            nb = cdiv(cols, _row_block(cols))
            _copy_2d_kernel[(n_outer, min(nb, _MAX_GRID_1))](
                tv, out.view(-1)[offset:], cols, nb, so, sc, out_cols, BLOCK=_row_block(cols),
            )
            offset += cols
    return out


# --------------------------------------------------------------------------- cumsum


@jit
def _cumsum_kernel(
    x_ptr,  # [n_rows, n_cols] row stride stride_x, unit column stride
    y_ptr,  # [n_rows, n_cols] contiguous
    n_cols,
    stride_x,
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    x_row = x_ptr + row * stride_x
    y_row = y_ptr + row * n_cols
    carry = tl.zeros([1], dtype=ACC)
    for start in range(0, n_cols, BLOCK):
        c = start + cols
        mask = c < n_cols
        # cast to the output dtype first (torch casts the input, then accumulates), then widen
        x = tl.load(x_row + c, mask=mask, other=0).to(y_ptr.dtype.element_ty).to(ACC)
        s = tl.cumsum(x, axis=0) + carry
        tl.store(y_row + c, s.to(y_ptr.dtype.element_ty), mask=mask)
        carry += tl.sum(x, axis=0)


_ACC = {torch.float16: tl.float32, torch.bfloat16: tl.float32, torch.float32: tl.float32, torch.float64: tl.float64}


def cumsum(x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Inclusive prefix sum of ``x`` over its last dim, as ``out_dtype``.

    Args:
        x: at least 1-D, float or integer or bool; any strides (copied unless its rows
            merge into ``[n_rows, n_cols]`` with unit column stride).
        out_dtype: the result dtype (torch: int64 for integer/bool input without ``dtype=``).

    Returns:
        A contiguous tensor of ``x``'s shape.
    """
    if x.dim() < 1:
        raise ValueError("x: expected at least 1 dimension")
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    n_cols = x.shape[-1]
    if out.numel() == 0:
        return out
    xv, (n_rows, _, _), (so, sc, _) = rows_view(x.unsqueeze(-1), x.dim() - 1)
    if sc != 1 and n_cols > 1:
        xv = x.contiguous()
        so = n_cols
    acc = _ACC.get(out_dtype, tl.int64)
    with device_guard(x):
        _cumsum_kernel[(n_rows,)](xv, out, n_cols, so, ACC=acc, BLOCK=_row_block(n_cols))
    return out


# --------------------------------------------------------------------------- arange


@jit
def _arange_kernel(
    out_ptr,  # [n]
    params_ptr,  # [2] (start, step) in ACC (read only with PARAMS_IN_MEMORY)
    n,
    start,
    step,
    ACC: tl.constexpr,
    PARAMS_IN_MEMORY: tl.constexpr,  # fp64: Python floats would reach the kernel as fp32
    VIA_FP32: tl.constexpr,  # fp64 -> fp16/bf16 through fp32, as c10::Half(float) / BFloat16(float)
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    i = pid * BLOCK + tl.arange(0, BLOCK)
    if PARAMS_IN_MEMORY:
        v = tl.load(params_ptr) + i.to(ACC) * tl.load(params_ptr + 1)
    else:
        # In ACC: a launcher other than Triton's (Inductor's wrapper) passes Python floats as fp64.
        v = tl.cast(start, ACC) + i.to(ACC) * tl.cast(step, ACC)
    if VIA_FP32:
        v = v.to(tl.float32)
    tl.store(out_ptr + i, v.to(out_ptr.dtype.element_ty), mask=i < n)


def arange(start, step, n: int, dtype: torch.dtype, device) -> torch.Tensor:
    """``start + i * step`` for ``i < n``, in the accumulation type torch uses on ``device``.

    Args:
        start, step: Python numbers (ints for integer dtypes).
        n: the element count (>= 0).
        dtype: the output dtype.
        device: the output device.

    Returns:
        A new 1-D tensor.
    """
    out = torch.empty(n, dtype=dtype, device=device)
    if n == 0:
        return out
    if dtype.is_floating_point:
        # torch's CUDA kernel computes in acc_type<T, true> (fp32 below fp64); its CPU kernel in double
        acc = tl.float64 if dtype == torch.float64 or out.device.type != "cuda" else tl.float32
        start, step = float(start), float(step)
    else:
        acc = tl.int64
        start, step = int(start), int(step)
    in_memory = acc == tl.float64
    params = torch.tensor([start, step], dtype=torch.float64, device=out.device) if in_memory else out
    with device_guard(out):
        _arange_kernel[(cdiv(n, _BLOCK),)](
            out, params, n, start, step, ACC=acc, PARAMS_IN_MEMORY=in_memory,
            VIA_FP32=in_memory and dtype in (torch.float16, torch.bfloat16), BLOCK=_BLOCK,
        )
    return out


# --------------------------------------------------------------------------- embedding backward


@jit
def _embedding_bwd_kernel(
    grad_ptr,  # [n_tokens, n_cols] row stride stride_g, unit column stride
    sorted_ptr,  # [n_tokens] int64 ids, sorted (stable)
    perm_ptr,  # [n_tokens] int64 token of each sorted position
    out_ptr,  # [num_weights, n_cols] contiguous, zero-filled
    n_tokens,
    n_cols,
    num_weights,
    padding_idx,
    stride_g,
    SCALE_BY_FREQ: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pos = tl.program_id(0).to(tl.int64)
    col0 = tl.program_id(1).to(tl.int64) * BLOCK
    w = tl.load(sorted_ptr + pos)
    prev = tl.load(sorted_ptr + pos - 1, mask=pos > 0, other=-1)
    starts_run = (pos == 0) | (prev != w)
    if starts_run & (w >= 0) & (w < num_weights) & (w != padding_idx):
        cols = col0 + tl.arange(0, BLOCK)
        mask = cols < n_cols
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        j = pos
        nxt = w
        while (j < n_tokens) & (nxt == w):
            tok = tl.load(perm_ptr + j)
            acc += tl.load(grad_ptr + tok * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
            j += 1
            nxt = tl.load(sorted_ptr + j, mask=j < n_tokens, other=-1)
        if SCALE_BY_FREQ:
            acc = acc / (j - pos).to(tl.float32)
        tl.store(out_ptr + w * n_cols + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def embedding_dense_backward(grad: torch.Tensor, ids: torch.Tensor, num_weights: int, padding_idx: int,
                             scale_grad_by_freq: bool) -> torch.Tensor:
    """The dense weight gradient of ``embedding``: ``out[w] = sum of grad rows of tokens with id w``.

    Args:
        grad: ``[*ids.shape, n_cols]`` fp16/bf16/fp32 (rows copied if not unit column stride).
        ids: int32/int64 token ids, any shape.
        num_weights: rows of the weight.
        padding_idx: the id whose row gets no gradient (negative: none).
        scale_grad_by_freq: divide each row's sum by its id's token count.

    Returns:
        ``[num_weights, n_cols]`` in ``grad``'s dtype, deterministic (fp32 sums in token order).
    """
    n_cols = grad.shape[-1]
    out = torch.zeros((num_weights, n_cols), dtype=grad.dtype, device=grad.device)
    n_tokens = ids.numel()
    if n_tokens == 0 or out.numel() == 0:
        return out
    g = grad.reshape(n_tokens, n_cols)
    if g.stride(-1) != 1 and n_cols > 1:
        g = g.contiguous()
    sorted_ids, perm = torch.sort(ids.reshape(-1).to(torch.int64), stable=True)
    block = _row_block(n_cols)
    with device_guard(grad):
        _embedding_bwd_kernel[(n_tokens, cdiv(n_cols, block))](
            g, sorted_ids, perm, out, n_tokens, n_cols, num_weights, padding_idx, g.stride(0),
            SCALE_BY_FREQ=scale_grad_by_freq, BLOCK=block,
        )
    return out
