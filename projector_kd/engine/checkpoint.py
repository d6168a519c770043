"""Checkpoint I/O: atomic writes, safe loads with one-line errors, RNG state capture for exact resume."""

from __future__ import annotations

import glob
import os
import pickle
import random
import re
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from .errors import UserError, cannot_write


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, unsafe to unpickle, or does not match the model."""


MISMATCH_LISTED = 3  # keys named per kind of mismatch; the rest are counted
OTHER_MODEL_HINT = "it was written for another model, width or num_classes"


def _listing(items: list[str]) -> str:
    extra = len(items) - MISMATCH_LISTED
    return ", ".join(items[:MISMATCH_LISTED]) + (f" (+{extra} more)" if extra > 0 else "")


def state_mismatch(expected: Mapping[str, Any], state: Mapping[str, Any]) -> str:
    """How ``state`` differs from ``expected`` (a model's state dict), or ``""`` when it has exactly its keys and
    shapes: ``shape mismatch: k (file shape) vs model (model shape), ...; missing: k, ...; unexpected: k, ...``,
    keys in ``expected``'s order (the first layer that differs first), a few per kind then ``(+N more)``."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    kinds = (("shape mismatch", shapes), ("missing", missing), ("unexpected", unexpected))
    return "; ".join(f"{label}: {_listing(items)}" for label, items in kinds if items)


def check_state_matches(
    expected: Mapping[str, Any], state: Mapping[str, Any], path: str | os.PathLike, what: str, hint: str
) -> None:
    """CheckpointError ``checkpoint <path> does not match <what>: <state_mismatch> — <hint>`` unless ``state`` has
    exactly ``expected``'s keys and shapes."""
    problem = state_mismatch(expected, state)
    if problem:
        raise CheckpointError(f"checkpoint {os.fspath(path)} does not match {what}: {problem} — {hint}")


def load_state_exactly(
    model: torch.nn.Module, state: Any, path: str | os.PathLike, what: str, hint: str = OTHER_MODEL_HINT
) -> None:
    """``model.load_state_dict(state, strict=True)`` after :func:`check_state_matches` (``what`` is followed by the
    model's class name); a ``state`` that is no state dict is named as such."""
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(
            f"checkpoint {os.fspath(path)} holds no state dict for {what} — expected {{'model': state_dict, ...}}"
        )
    check_state_matches(model.state_dict(), state, path, f"{what} ({type(model).__name__})", hint)
    model.load_state_dict(state, strict=True)


class PickledConfig:
    """Inert stand-in for a pickled ``yacs.config.CfgNode``: unpickles as a plain ``OrderedDict`` of its keys and
    values.

    ``torch.load(weights_only=True)`` only fills ``dict``/``OrderedDict`` objects, so construction returns one.
    """

    def __new__(cls, *args: Any) -> OrderedDict:
        return OrderedDict()


class PickledNamespace(dict):
    """Inert stand-in for a pickled ``argparse.Namespace`` (the release's ResNet checkpoint stores its command line as
    ``args``): unpickles as a dict of the namespace's attributes.

    A Namespace is pickled as "new instance of the class" + "set its state"; ``torch.load(weights_only=True)`` creates
    this dict and passes the (already safely unpickled) attribute dict here, which only copies items.
    """

    def __setstate__(self, state: Any) -> None:
        attributes = state[0] if isinstance(state, tuple) and len(state) == 2 else state
        if not isinstance(attributes, dict):
            raise pickle.UnpicklingError(f"argparse.Namespace state is {type(attributes).__name__}, not a dict")
        self.update(attributes)


SAFE_STAND_INS = [(PickledConfig, "yacs.config.CfgNode"), (PickledNamespace, "argparse.Namespace")]


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(handle)`` on a temporary file in ``path``'s folder, fsync it, then rename it over ``path``.

    A process killed at any point leaves either the previous file or the new one, never a partial file. Temporaries
    left by a killed writer of the same file are removed first (one writer per file: rank 0). An ``OSError`` (no
    permission, a full disk, a file in the way) removes the temporary and raises :class:`OutputError` naming ``path``.
    """
    path = Path(path)
    try:
        _replace_atomically(path, write)
    except OSError as error:
        kept = f"the previous {path.name} is intact" if os.path.isfile(path) else "nothing was written"
        raise cannot_write(path, error, kept) from None


class _RecordingWriter:
    """Binary file wrapper that remembers the ``OSError`` a write raised: ``torch.save`` reports a failed write (a
    full disk) as a bare ``RuntimeError``, which loses the reason."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.handle.flush()

    def fileno(self) -> int:
        return self.handle.fileno()


def current_umask() -> int:
    """The process umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _replace_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 would make it private: the umask, as open() does
        with os.fdopen(fd, "wb") as handle:
            writer = _RecordingWriter(handle)
            try:
                write(writer)  # type: ignore[arg-type]
            except Exception:
                if writer.error is not None:
                    raise writer.error from None
                raise
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` through :func:`atomic_write`."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def load_checkpoint(path: str | os.PathLike, *, trusted: bool = False, map_location: Any = "cpu") -> Any:
    """Load a checkpoint with ``torch.load(weights_only=True)``; ``trusted=True`` allows full unpickling.

    A pickled yacs ``CfgNode`` (the released DeiT checkpoints hold one under ``config``) is read into an inert
    :class:`PickledConfig`, a pickled ``argparse.Namespace`` (the released ResNet checkpoint's ``args``) into a
    :class:`PickledNamespace` dict. Raises :class:`CheckpointError` naming the file when it is missing, truncated or
    corrupt, or needs unsafe unpickling.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} — check the path (or download the weights, see README)")
    if path.stat().st_size == 0:
        raise CheckpointError(
            f"checkpoint {path} is empty (0 bytes) — the file is truncated; re-download or re-create it"
        )
    try:
        if trusted:
            return torch.load(path, map_location=map_location, weights_only=False)
        with torch.serialization.safe_globals(SAFE_STAND_INS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        if found:
            raise CheckpointError(
                f"checkpoint {path} needs unsafe unpickling (it pickles {found.group(1)}); refused. If you trust this "
                f"file, pass the trust flag (--trust-checkpoint) to load it with full unpickling"
            ) from None
        raise CheckpointError(
            f"checkpoint {path} is not a readable PyTorch checkpoint (corrupt or not a checkpoint) "
            f"— re-download or re-create it"
        ) from None
    except Exception as error:  # the unpickler fails on damaged bytes in many ways (IndexError, KeyError, ...)
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({reason}) — re-download or re-create it"
        ) from None


def checkpoint_in(path: str | os.PathLike, name: str) -> Path:
    """``path``, or ``path/name`` when ``path`` is a folder: a run folder stands for its resumable checkpoint ``name``;
    a folder without one is a :class:`CheckpointError` naming both."""
    path = Path(path)
    if not path.is_dir():
        return path
    if not (path / name).is_file():
        raise CheckpointError(f"folder {path} holds no {name} to resume from — pass a run folder or a checkpoint file")
    return path / name


def latest_checkpoint(folder: str | os.PathLike, pattern: str = "checkpoint*.pth") -> Path | None:
    """Newest file matching ``pattern`` in ``folder`` by modification time, or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    candidates = [p for p in folder.glob(pattern) if p.is_file()]
    return max(candidates, key=lambda p: (p.stat().st_mtime_ns, p.name)) if candidates else None


def capture_rng_state() -> dict:
    """The python, numpy, torch CPU and CUDA generator states as tensors and plain values (``weights_only``
    loadable)."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached_gaussian)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
