"""The op registry as a whole: every entry's contract, and the registration rules."""

import inspect

import pytest
import torch

import flag_gems  # noqa: F401  (registers every family)
from flag_gems.lowerings.registry import FALLBACKS, REGISTRY, describe, register

aten = torch.ops.aten


@pytest.mark.parametrize("target", sorted(REGISTRY, key=str), ids=str)
def test_entry_matches_its_schema(target):
    """impl and supports take exactly the overload's arguments (names, keyword-only ones too)."""
    entry = REGISTRY[target]
    assert target not in FALLBACKS, f"[op={target}] is both lowered and a declared fallback"
    assert entry.reason and entry.kernel
    names = [a.name for a in target._schema.arguments]
    for fn in (entry.impl, entry.supports):
        params = inspect.signature(fn).parameters
        assert list(params) == names, f"[op={target}] {fn.__name__}{inspect.signature(fn)} vs {target._schema}"
        for a in target._schema.arguments:
            kw_only = params[a.name].kind is inspect.Parameter.KEYWORD_ONLY
            assert kw_only == a.kwarg_only, f"[op={target}] {a.name}"


def test_register_rejects_packets_and_duplicates():
    with pytest.raises(TypeError, match=r"name an overload, not the packet aten::add \(one of: .*aten::add.Tensor"):
        register(aten.add, kernel="k", supports=lambda *a: None, default=False, reason="r")
    with pytest.raises(ValueError, match="already registered"):
        register(aten.add.Tensor, kernel="k", supports=lambda *a: None, default=False, reason="r")
    with pytest.raises(ValueError, match="declared fallback"):
        register(next(iter(FALLBACKS)), kernel="k", supports=lambda *a: None, default=False, reason="r")


def test_describe_lists_every_entry_and_fallback():
    text = describe()
    for target in list(REGISTRY) + list(FALLBACKS):
        assert str(target) in text
