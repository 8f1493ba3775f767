"""``apply_gems_patches_to_vllm`` on the real vLLM 0.33.0: routes found by feature detection,
the replaced functions on real layer objects against vLLM's ``forward_native`` and a float64
reference, verbose output, idempotence, removal, and the all-or-nothing rule per op."""

import logging

import pytest
import torch

from vllm_helpers import act_math, import_vllm_or_skip, rms_math, rope_math

vllm = import_vllm_or_skip()

from accuracy import DTYPES, DTYPE_IDS, assert_close, poison, rand, tag  # noqa: E402
from flag_gems.vllm import apply_gems_patches_to_vllm, patched, remove_gems_patches_from_vllm  # noqa: E402
from flag_gems.vllm import impls, patches  # noqa: E402

TOKENS = [1, 7]

# What the patches replace on a CPU build of vLLM 0.33 (no _C): the IR providers and the CustomOps.
EXPECTED_ROUTES = {"rms_norm": "ir", "silu_and_mul": "custom", "gelu_and_mul": "custom",
                   "rotary_embedding": "custom", "deepseek_scaling_rope": "custom"}
EXPECTED_TARGETS = ["vllm.ir.ops.rms_norm", "vllm.ir.ops.fused_add_rms_norm", "SiluAndMul.forward_cuda",
                    "GeluAndMul.forward_cuda", "RotaryEmbedding.forward_cuda",
                    "DeepseekScalingRotaryEmbedding.forward_cuda"]


@pytest.fixture
def gems(unpatched, vllm_config):
    return apply_gems_patches_to_vllm()


def _layers():
    from vllm.model_executor.layers import activation, layernorm, rotary_embedding

    return layernorm, activation, rotary_embedding


# ------------------------------------------------------------------ routing, logging, idempotence


def test_every_op_is_routed_and_verbose_names_each_replacement(unpatched, vllm_config, caplog):
    with caplog.at_level(logging.INFO, logger="flag_gems"):
        routes = apply_gems_patches_to_vllm(verbose=True)
    assert routes == EXPECTED_ROUTES
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Patched ")]
    for target in EXPECTED_TARGETS:
        assert any(line.startswith(f"Patched {target} with FLAGGEMS ") for line in lines), (target, lines)
    assert len(lines) == len(EXPECTED_TARGETS), lines
    # What was logged is what is in effect.
    layernorm, activation, rope = _layers()
    assert activation.SiluAndMul.forward_cuda.__qualname__ == "gems_silu_and_mul_forward_cuda"
    assert rope.DeepseekScalingRotaryEmbedding.forward_cuda.__qualname__ == "gems_deepseek_rope_forward_cuda"
    x = rand(3, 64, dtype=torch.bfloat16)
    assert vllm.ir.ops.rms_norm.dispatch(x, rand(64, dtype=torch.bfloat16), 1e-6, None).provider == "flag_gems"


def test_applying_twice_changes_nothing_and_removal_restores_vllm(unpatched, vllm_config, caplog):
    layernorm, activation, rope = _layers()
    silu_before = activation.SiluAndMul.forward_cuda
    prio_before = vllm.ir.ops.rms_norm.get_priority()
    first = apply_gems_patches_to_vllm()
    state = patched()
    with caplog.at_level(logging.INFO, logger="flag_gems"):
        assert apply_gems_patches_to_vllm(verbose=True) == first
    assert patched() == state
    assert not [r for r in caplog.records if r.getMessage().startswith("Patched ")]
    assert "flag_gems" in vllm.ir.ops.rms_norm.impls
    assert sorted(remove_gems_patches_from_vllm()) == sorted(EXPECTED_ROUTES)
    assert activation.SiluAndMul.forward_cuda is silu_before
    assert "flag_gems" not in vllm.ir.ops.rms_norm.impls
    assert vllm.ir.ops.rms_norm.get_priority() == prio_before
    assert "set_default" not in vars(vllm.ir.ops.rms_norm)
    assert patched() == {}


def test_the_ir_provider_stays_first_when_the_worker_sets_the_configured_priority(gems, vllm_config):
    # WorkerBase.__init__ runs vllm_config.kernel_config.ir_op_priority.set_default() after the plugin.
    vllm_config.kernel_config.ir_op_priority.set_default()
    for op in (vllm.ir.ops.rms_norm, vllm.ir.ops.fused_add_rms_norm):
        assert op.get_priority()[0] == "flag_gems", op.get_priority()
    # Naming the provider in vLLM's own config is accepted too (it is registered).
    from vllm.config.kernel import IrOpPriorityConfig

    IrOpPriorityConfig(rms_norm=["flag_gems", "native"], fused_add_rms_norm=["flag_gems"],
                       gelu_and_mul_sparse=["native"]).set_default()
    assert vllm.ir.ops.fused_add_rms_norm.get_priority()[0] == "flag_gems"


def test_an_op_no_route_can_patch_is_left_to_vllm_with_one_warning(unpatched):
    table = {"rms_norm": [patches.Route("a", lambda: "no vllm.ir.ops.rms_norm"),
                          patches.Route("b", lambda: "no torch.ops._C.rms_norm")]}
    with pytest.warns(RuntimeWarning, match="rms_norm is left to vLLM.*a: no vllm.ir.ops.rms_norm; b: no torch"):
        assert apply_gems_patches_to_vllm(_routes=table) == {"rms_norm": None}
    assert patched() == {}


def test_a_route_that_fails_halfway_is_undone_before_the_next_is_tried(unpatched):
    state = {"first": "vllm", "second": "vllm"}

    def change(name, fails=False):
        def apply():
            if fails:
                raise RuntimeError("this vLLM refused the change")
            state[name] = "gems"
            return lambda: state.__setitem__(name, "vllm")
        return patches.Change(name, "gems", apply)

    table = {"silu_and_mul": [
        patches.Route("broken", lambda: [change("first"), change("second", fails=True)]),
        patches.Route("working", lambda: [change("second")]),
    ]}
    assert apply_gems_patches_to_vllm(_routes=table) == {"silu_and_mul": "working"}
    assert state == {"first": "vllm", "second": "gems"}  # nothing of the broken route is left
    remove_gems_patches_from_vllm()
    assert state == {"first": "vllm", "second": "vllm"}


def test_unknown_op_names_are_refused(unpatched):
    with pytest.raises(ValueError, match="unknown ops \\['rms'\\]"):
        apply_gems_patches_to_vllm(ops=["rms"])


# ------------------------------------------------------------------ numerics on real layers


def _rms_layer(hidden, dtype, has_weight=True):
    layernorm, _, _ = _layers()
    layer = layernorm.RMSNorm(hidden, 1e-6, has_weight=has_weight, dtype=dtype)
    if has_weight:
        with torch.no_grad():
            layer.weight.normal_(1.0, 0.3)
    return layer


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("has_weight", [True, False], ids=["weight", "no_weight"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rms_norm_layer_runs_the_flag_gems_provider(gems, tokens, has_weight, dtype):
    layer = _rms_layer(48, dtype, has_weight)
    x = rand(tokens, 48, dtype=dtype)
    w = layer.weight.data if has_weight else None
    what = tag("vllm RMSNorm", x.shape, dtype)
    ref, _ = rms_math(x, w, 1e-6)
    out = layer(x)  # forward_native -> vllm.ir.ops.rms_norm -> provider by priority
    assert torch.equal(out, impls.ir_rms_norm(x, w, 1e-6)), what
    assert_close(out, ref, dtype, what + " flag_gems")
    native = vllm.ir.ops.rms_norm.impls["native"].impl_fn(x, w, 1e-6)
    assert_close(native, ref, dtype, what + " vLLM native")


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_residual_rms_norm_layer_runs_the_flag_gems_provider_in_place(gems, tokens, dtype):
    layer = _rms_layer(48, dtype)
    x, r = rand(tokens, 48, dtype=dtype), rand(tokens, 48, dtype=dtype)
    ref_y, ref_h = rms_math(x, layer.weight.data, 1e-6, r)
    native_y, native_h = vllm.ir.ops.fused_add_rms_norm.impls["native"].impl_fn(x, r, layer.weight.data, 1e-6)
    xi, ri = x.clone(), r.clone()
    y, h = layer(xi, ri)  # maybe_inplace: our provider is registered in place
    what = tag("vllm RMSNorm+residual", x.shape, dtype)
    assert y.data_ptr() == xi.data_ptr() and h.data_ptr() == ri.data_ptr(), what
    assert_close(y, ref_y, dtype, what + " y")
    assert_close(h, ref_h, dtype, what + " h")
    assert_close(native_y, ref_y, dtype, what + " vLLM native y")


def test_gemma_rms_norm_fp32_weight_keeps_vllms_rounding(gems):
    layernorm, _, _ = _layers()
    layer = layernorm.GemmaRMSNorm(48, 1e-6)
    with torch.no_grad():
        layer.weight.normal_(0.0, 0.3)
    x = rand(5, 48, dtype=torch.bfloat16)
    ref, _ = rms_math(x, layer.weight.data.double() + 1.0, 1e-6)
    assert vllm.ir.ops.rms_norm.dispatch(x, layer.weight.float() + 1.0, 1e-6, None).provider == "flag_gems"
    assert_close(layer(x), ref, torch.bfloat16, tag("vllm GemmaRMSNorm", x.shape, torch.bfloat16))


def test_rms_norm_with_variance_size_falls_back_to_native(gems):
    x = rand(3, 48, dtype=torch.bfloat16)
    assert vllm.ir.ops.rms_norm.dispatch(x, None, 1e-6, 16).provider == "native"


@pytest.mark.parametrize("shape", [(1, 96), (7, 96), (2, 3, 64)], ids=str)
@pytest.mark.parametrize("kind", ["silu", "none", "tanh"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_act_and_mul_layers_forward_cuda_is_flag_gems(gems, shape, kind, dtype):
    _, activation, _ = _layers()
    layer = activation.SiluAndMul() if kind == "silu" else activation.GeluAndMul(approximate=kind)
    x = rand(*shape, dtype=dtype)
    ref = act_math(x, kind)
    what = tag(f"vllm {type(layer).__name__}({kind})", shape, dtype)
    assert_close(layer.forward_cuda(x), ref, dtype, what + " flag_gems")
    assert_close(layer.forward_native(x), ref, dtype, what + " vLLM native")


def _rope(head_size, rotary_dim, is_neox, dtype, max_pos=512):
    _, _, rope = _layers()
    return rope.get_rope(head_size, max_pos, is_neox_style=is_neox,
                         rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": rotary_dim / head_size},
                         dtype=dtype)


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("rotary_dim", [32, 16], ids=["full", "partial"])
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rotary_embedding_forward_cuda_is_flag_gems_in_place(gems, tokens, rotary_dim, is_neox, dtype):
    layer = _rope(32, rotary_dim, is_neox, dtype)
    assert layer.rotary_dim == rotary_dim
    pos = torch.randint(0, 512, (tokens,))
    q, k = rand(tokens, 4 * 32, dtype=dtype), rand(tokens, 2 * 32, dtype=dtype)
    cache = layer.cos_sin_cache
    what = tag(f"vllm RotaryEmbedding({'neox' if is_neox else 'gptj'}, rot={rotary_dim})", q.shape, dtype)
    qn, kn = layer.forward_native(pos, q.clone(), k.clone())
    qi, ki = q.clone(), k.clone()
    qo, ko = layer.forward_cuda(pos, qi, ki)
    assert qo.data_ptr() == qi.data_ptr() and ko.data_ptr() == ki.data_ptr(), what  # in place, as vLLM's op
    for name, out, native, x in (("q", qo, qn, q), ("k", ko, kn, k)):
        ref = rope_math(pos, x, 32, cache, is_neox)
        assert_close(out, ref, dtype, f"{what} {name}")
        assert_close(native, ref, dtype, f"{what} {name} vLLM native")
    qo, ko = layer.forward_cuda(pos, q.clone(), None)  # no key (cross-layer KV sharing)
    assert ko is None
    assert_close(qo, rope_math(pos, q, 32, cache, is_neox), dtype, f"{what} q only")


def _deepseek(head_size, rotary_dim, is_neox, dtype):
    _, _, rope = _layers()
    params = {"rope_type": "deepseek_yarn", "rope_theta": 10000.0, "factor": 4.0,
              "original_max_position_embeddings": 256, "beta_fast": 32, "beta_slow": 1,
              "mscale": 0.707, "mscale_all_dim": 0.707, "partial_rotary_factor": rotary_dim / head_size}
    layer = rope.get_rope(head_size, 1024, is_neox_style=is_neox, rope_parameters=params, dtype=dtype)
    assert type(layer).__name__ == "DeepseekScalingRotaryEmbedding"
    return layer


@pytest.mark.parametrize("offsets", [False, True], ids=["positions", "offsets"])
@pytest.mark.parametrize("rotary_dim", [32, 16], ids=["full", "partial"])
@pytest.mark.parametrize("is_neox", [False, True], ids=["interleaved", "neox"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_deepseek_yarn_rope_forward_cuda_is_flag_gems(gems, offsets, rotary_dim, is_neox, dtype):
    layer = _deepseek(32, rotary_dim, is_neox, dtype)
    tokens = 6
    pos = torch.randint(0, 512, (tokens,))
    off = torch.randint(0, 256, (tokens,)) if offsets else None
    q, k = rand(tokens, 4, 32, dtype=dtype), rand(tokens, 1, 32, dtype=dtype)  # MLA: q heads, one k_pe
    rows = pos + off if offsets else pos
    what = tag(f"vllm DeepseekScalingRotaryEmbedding({'neox' if is_neox else 'interleaved'}, rot={rotary_dim})",
               q.shape, dtype)
    qo, ko = layer.forward_cuda(pos, q, k, off)
    qn, kn = layer.forward_native(pos, q, k, off)
    for name, out, native, x in (("q", qo, qn, q), ("k", ko, kn, k)):
        ref = rope_math(rows, x, 32, layer.cos_sin_cache, is_neox)
        assert out.dtype == dtype and out.shape == x.shape, what
        assert_close(out, ref, dtype, f"{what} {name}")
        assert_close(native, ref, dtype, f"{what} {name} vLLM native")


# ------------------------------------------------------------------ the _C route (kernels under vLLM's ops)


@pytest.fixture
def c_route(unpatched, c_ops):
    """The c_ops routes, pointed at the CPU kernels of the _C stand-in (vLLM's GPU build has CUDA ones)."""
    table = patches.routes(c_dispatch_key="CPU")
    table = {op: [r for r in rs if r.name == "c_ops"] for op, rs in table.items() if op != "deepseek_scaling_rope"}
    routes = apply_gems_patches_to_vllm(_routes=table)
    assert set(routes.values()) == {"c_ops"}, routes
    yield
    remove_gems_patches_from_vllm()


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_c_ops_norms_called_through_vllms_custom_ops(c_route, tokens, dtype):
    from vllm import _custom_ops as ops

    x, r, w = rand(tokens, 48, dtype=dtype), rand(tokens, 48, dtype=dtype), rand(48, dtype=dtype)
    what = tag("_C.rms_norm", x.shape, dtype)
    out = poison(torch.empty_like(x))
    ops.rms_norm(out, x, w, 1e-6)
    assert_close(out, rms_math(x, w, 1e-6)[0], dtype, what)
    xi, ri = x.clone(), r.clone()
    ops.fused_add_rms_norm(xi, ri, w, 1e-6)
    y, h = rms_math(x, w, 1e-6, r)
    assert_close(xi, y, dtype, what + " fused_add y")
    assert_close(ri, h, dtype, what + " fused_add h")


@pytest.mark.parametrize("name,kind", [("silu_and_mul", "silu"), ("gelu_and_mul", "none"),
                                       ("gelu_tanh_and_mul", "tanh")])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_c_ops_activations(c_route, name, kind, dtype):
    x = rand(7, 96, dtype=dtype)
    out = poison(torch.empty(7, 48, dtype=dtype))
    getattr(torch.ops._C, name)(out, x)
    assert_close(out, act_math(x, kind), dtype, tag(f"_C.{name}", x.shape, dtype))


@pytest.mark.parametrize("offset,inverse", [(0, False), (0, True), (16, False)], ids=["plain", "inverse", "offset"])
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("with_key", [True, False], ids=["qk", "q"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_c_ops_rotary_embedding_and_the_real_layer(c_route, vllm_config, offset, inverse, is_neox, with_key, dtype):
    from vllm import _custom_ops as ops

    tokens, rot = 5, 16
    pos = torch.randint(0, 64, (tokens,))
    cache = rand(64, rot, dtype=dtype)
    q = rand(tokens, 3 * 32, dtype=dtype)
    k = rand(tokens, 32, dtype=dtype) if with_key else None
    qi, ki = q.clone(), (k.clone() if with_key else None)
    ops.rotary_embedding(pos, qi, ki, 32, cache, is_neox, rope_dim_offset=offset, inverse=inverse)
    what = tag(f"_C.rotary_embedding(neox={is_neox}, offset={offset}, inverse={inverse})", q.shape, dtype)
    assert_close(qi, rope_math(pos, q, 32, cache, is_neox, offset, inverse), dtype, what + " q")
    if with_key:
        assert_close(ki, rope_math(pos, k, 32, cache, is_neox, offset, inverse), dtype, what + " k")
    # A real layer built before the patch runs it too: RotaryEmbedding.forward_cpu calls the _C op.
    layer = _rope(32, 32, is_neox, dtype)
    q2, k2 = layer.forward_cpu(pos, q.clone(), k.clone() if with_key else None)
    assert_close(q2, rope_math(pos, q, 32, layer.cos_sin_cache, is_neox), dtype, what + " layer q")


def test_c_ops_route_needs_the_expected_schema(unpatched, c_ops):
    lib = torch.library.Library("gems_test_odd", "DEF")
    lib.define("silu_and_mul(Tensor! out, Tensor x, float alpha) -> ()")
    try:
        table = patches.routes(c_namespace="gems_test_odd", c_dispatch_key="CPU")
        assert "schema" in table["silu_and_mul"][0].plan()
    finally:
        lib._destroy()
