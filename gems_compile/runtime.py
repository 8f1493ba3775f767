"""Backend detection: which vendor's hardware the kernels run on, and on which torch device.

``flag_gems.vendor_name`` and ``flag_gems.device`` come from here. Detection reads only
what torch already knows at import (``torch.cuda.is_available()`` and ``torch.version.hip``):
no subprocess, no CUDA context, no device query, so ``import flag_gems`` stays cheap and
fork-safe.

| vendor   | torch build            | device   | eager-mode dispatch key |
| -------- | ---------------------- | -------- | ----------------------- |
| nvidia   | CUDA                   | ``cuda`` | ``CUDA``                |
| amd      | ROCm (``torch.version.hip``) | ``cuda`` | ``CUDA`` (HIP tensors are ``cuda`` tensors) |
| cpu      | any, no GPU            | ``cpu``  | ``CPU`` (Triton's interpreter; for CI) |

``GEMS_VENDOR=<name>`` overrides detection (upstream FlagGems' variable). A name outside
:data:`VENDORS` is an error at import, with the list; a known name that contradicts the
hardware (``nvidia`` without a CUDA device, ``amd`` on a CUDA build, ...) is honoured with a
warning, since upstream documents that a wrong value may fail later.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)

__all__ = ["VENDORS", "detect", "device", "dispatch_key", "vendor_name"]

# vendor -> torch device type its tensors live on
VENDORS: dict[str, str] = {"nvidia": "cuda", "amd": "cuda", "cpu": "cpu"}


def _detected_vendor() -> str:
    if not torch.cuda.is_available():
        return "cpu"
    return "amd" if torch.version.hip is not None else "nvidia"


def detect(environ=None) -> tuple[str, str]:
    """The vendor and torch device type this process runs kernels on.

    Args:
        environ: the environment to read ``GEMS_VENDOR`` from (default ``os.environ``).

    Returns:
        ``(vendor_name, device)``, e.g. ``("nvidia", "cuda")``.

    Raises:
        ValueError: ``GEMS_VENDOR`` names a vendor this package does not know.
    """
    environ = os.environ if environ is None else environ
    detected = _detected_vendor()
    requested = environ.get("GEMS_VENDOR", "").strip().lower()
    if not requested:
        return detected, VENDORS[detected]
    if requested not in VENDORS:
        raise ValueError(
            f"GEMS_VENDOR={environ['GEMS_VENDOR']!r} is not a vendor flag_gems (gems_compile) supports; "
            f"expected one of {', '.join(VENDORS)} (detected here: {detected}), or unset it to detect"
        )
    if requested != detected:
        logger.warning(
            "GEMS_VENDOR=%s overrides the detected backend %s; kernels may fail if the hardware does not match",
            requested,
            detected,
        )
    return requested, VENDORS[requested]


vendor_name, device = detect()

# The dispatcher key the eager mode (flag_gems.enable / use_gems) registers kernels on.
dispatch_key = "CUDA" if device == "cuda" else "CPU"
