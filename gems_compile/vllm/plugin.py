"""The ``vllm.general_plugins`` entry point: flag_gems in every vLLM process.

vLLM loads the functions of that entry-point group in each of its processes (the API
process, the engine core, every worker, on every node), before it builds a model; this is
the seeds' multi-node recipe ("enable flag_gems in every worker") without editing vLLM's
worker code. ``pyproject.toml`` declares ``flag_gems = "flag_gems.vllm:register"``;
``VLLM_PLUGINS`` (vLLM's allow-list of plugin names) can leave it out.

``register()`` always registers the ``torch.ops.flag_gems`` ops and the ``flag_gems``
``torch.compile`` backend (modes 1/2: ``compilation_config={"mode": 2, "backend":
"flag_gems"}``) and makes ``flag_gems.vllm_pass`` resolvable by its qualified name. What
else it does is ``GEMS_VLLM``, a comma-separated list:

===========  ==================================================================
``enable``   ``flag_gems.enable()``: flag_gems kernels behind the aten ops
``patches``  ``flag_gems.apply_gems_patches_to_vllm(verbose=True)``
``pass``     adds ``flag_gems.vllm_pass`` to vLLM's post-grad pass manager (mode 3)
``all``      the three
===========  ==================================================================

**Default: unset / empty, nothing beyond registering**: installing the package does not
change what an unconfigured vLLM run computes. An unknown word is a ``ValueError`` at
vLLM's start, naming ``GEMS_VLLM`` and the valid words.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading

logger = logging.getLogger(__name__)

ENV = "GEMS_VLLM"
MODES = ("enable", "patches", "pass")

_lock = threading.Lock()
_done: set = set()


def parse_modes(value: str | None) -> tuple:
    """The modes a ``GEMS_VLLM`` value asks for, in :data:`MODES` order.

    Args:
        value: the variable's value (None or empty: none).

    Returns:
        A tuple of mode names.

    Raises:
        ValueError: an unknown word.
    """
    words = [w.strip().lower() for w in (value or "").split(",") if w.strip()]
    bad = [w for w in words if w not in (*MODES, "all", "none")]
    if bad:
        raise ValueError(f"{ENV}={value!r}: unknown {', '.join(map(repr, bad))}; expected a comma-separated list of "
                         f"{', '.join(MODES)} (or all, none)")
    if "all" in words:
        return MODES
    return tuple(m for m in MODES if m in words)


def _pass_manager_class():
    for module in ("vllm.compilation.passes.pass_manager", "vllm.compilation.pass_manager"):
        try:
            return getattr(importlib.import_module(module), "PostGradPassManager")
        except (ImportError, AttributeError):
            continue
    return None


def install_vllm_pass(pass_=None) -> bool:
    """Make every vLLM ``PostGradPassManager`` run ``flag_gems.vllm_pass`` (mode 3).

    The manager's ``configure`` is wrapped to ``add`` the pass after vLLM's own fusion passes
    (a pass also named in the compilation config runs once: the pass skips a graph it saw).

    Args:
        pass_: the pass (default ``flag_gems.vllm_pass``).

    Returns:
        True when installed (or already), False when this vLLM has no ``PostGradPassManager``
        with ``configure`` and ``add`` (a warning says so).
    """
    cls = _pass_manager_class()
    if cls is None or not all(hasattr(cls, a) for a in ("configure", "add")):
        logger.warning("flag_gems: this vLLM has no PostGradPassManager.configure/add; flag_gems.vllm_pass is not "
                       "installed (name it in compilation_config's inductor_passes instead)")
        return False
    if getattr(cls.configure, "_flag_gems_pass", None) is not None:
        return True
    original = cls.configure

    def configure(self, config, *args, **kwargs):
        original(self, config, *args, **kwargs)
        p = configure._flag_gems_pass
        if not any(q is p for q in getattr(self, "passes", ())):
            self.add(p)

    if pass_ is None:
        from .fusion_pass import vllm_pass as pass_
    configure._flag_gems_pass = pass_
    configure.__wrapped__ = original
    cls.configure = configure
    logger.info("flag_gems: vllm_pass added to vLLM's post-grad passes (PostGradPassManager.configure)")
    return True


def uninstall_vllm_pass() -> None:
    """Undo :func:`install_vllm_pass`."""
    cls = _pass_manager_class()
    if cls is not None and getattr(cls.configure, "_flag_gems_pass", None) is not None:
        cls.configure = cls.configure.__wrapped__


def _register_backend() -> None:
    import torch

    from ..backend import flag_gems_backend

    if "flag_gems" not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(flag_gems_backend, name="flag_gems")


def register() -> None:
    """The plugin function vLLM calls in each process (safe to call again: each step runs once).

    Raises:
        ValueError: ``GEMS_VLLM`` holds an unknown word.
    """
    modes = parse_modes(os.environ.get(ENV))
    import flag_gems

    with _lock:
        if "register" not in _done:
            _register_backend()
            flag_gems.vllm_pass  # noqa: B018 - into flag_gems' namespace, where vLLM looks qualnames up
            _done.add("register")
        if "enable" in modes and "enable" not in _done:
            flag_gems.enable()
            _done.add("enable")
        if "patches" in modes and "patches" not in _done:
            from .patches import apply_gems_patches_to_vllm

            apply_gems_patches_to_vllm(verbose=True)
            _done.add("patches")
        if "pass" in modes and "pass" not in _done:
            if install_vllm_pass():
                _done.add("pass")
    logger.info("flag_gems vLLM plugin (pid %d): backend and ops registered; %s=%s", os.getpid(), ENV,
                ",".join(modes) or "(nothing else)")
