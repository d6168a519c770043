"""What both tracks' fast paths share: the CUDA backend switches and torch.compile with an eager fallback."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .errors import UserError

logger = logging.getLogger(__name__)


def enable_fast_cuda_backends(device: torch.device) -> None:
    """On CUDA: cuDNN picks the fastest algorithm per input shape (``cudnn.benchmark``; grouped and strided
    convolutions gain most) and float32 matmuls/convolutions run on TF32 tensor cores. No-op elsewhere."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def autocast_context(device_type: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast(device_type, dtype)``, or a context that changes nothing when ``dtype`` is None (float32)."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


# torch.compile raises these when (re)compiling fails inside a call, e.g. for a new input shape after the first call
COMPILE_ERRORS = (torch._dynamo.exc.BackendCompilerFailed, torch._dynamo.exc.InternalTorchDynamoError)


class CompileFallbackNotice:
    """Tells the user once per run — however many modules fall back — that torch.compile is unavailable."""

    def __init__(self) -> None:
        self.given = False

    def __call__(self, label: str, error: BaseException) -> None:
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        if self.given:
            logger.debug("fast path: running the %s eagerly too (%s)", label, reason)
            return
        self.given = True
        logger.warning(
            "fast path: torch.compile is unavailable here (%s); running the networks eagerly — the rest of the fast "
            "path stays on",
            reason,
        )


class CompiledOrEager(nn.Module):
    """``torch.compile(module)`` that falls back to the eager ``module`` when compiling fails (no C++ compiler or
    Triton, an unsupported platform): at wrapping time, at the first call (where compilation really happens; any
    error there except a :class:`UserError` means "run eager") or when a later call recompiles
    (:data:`COMPILE_ERRORS`). The fallback is logged once per ``notice`` (share one per run). A UserError raised
    inside the call propagates. ``state_dict`` keys are the eager module's under ``eager.``."""

    def __init__(self, module: nn.Module, label: str, notice: CompileFallbackNotice | None = None) -> None:
        super().__init__()
        self.eager = module
        self.label = label
        self.notice = notice if notice is not None else CompileFallbackNotice()
        self.called = False
        self.compiled: Callable | None = None
        try:
            self.compiled = torch.compile(module)
        except Exception as error:  # noqa: BLE001 - any failure means "run eager"
            self._fall_back(error)

    def _fall_back(self, error: BaseException) -> None:
        self.notice(self.label, error)
        self.compiled = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is not None:
            first_call, self.called = not self.called, True
            try:
                return self.compiled(*args, **kwargs)
            except UserError:
                raise
            except COMPILE_ERRORS as error:
                self._fall_back(error)
            except Exception as error:  # noqa: BLE001 - compile backends fail in many ways; eager is always correct
                if not first_call:
                    raise
                self._fall_back(error)
        return self.eager(*args, **kwargs)
