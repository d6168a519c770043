"""Run folders: the config a run was started with, logs, TensorBoard events, final metrics, progress bars."""

from __future__ import annotations

import fcntl
import json
import logging
import logging.handlers
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

from .checkpoint import atomic_write
from .config import load_yaml
from .errors import OutputError, UserError, cannot_write

CONFIG_FILE = "config.yaml"
REPO_ROOT = Path(__file__).resolve().parents[2]
SOURCE_FOLDERS = ("deit", "imagenet", "projector_kd")
LOCK_FILE = ".lock"
_held_locks: dict[Path, int] = {}


def _differing_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new), key=str)
        return [k for key in keys for k in _differing_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".")]


def output_path(path: str | os.PathLike) -> Path:
    """Where a relative output path (run folder, checkpoint, log) goes: against the working directory, except inside
    one of the repository's source folders (``deit/``, ``imagenet/``, ``projector_kd/``: the release's ``cd imagenet``
    commands), where it goes against the repository root, so a run never writes into the source tree."""
    path = Path(path).expanduser()
    if path.is_absolute():
        return path
    cwd = Path.cwd().resolve()
    for folder in SOURCE_FOLDERS:
        source = REPO_ROOT / folder
        if cwd == source or source in cwd.parents:
            return REPO_ROOT / path
    return path


def run_folder(value: str | os.PathLike, flag: str) -> Path:
    """``value`` (a run folder the user named with ``flag``) as a Path; an empty name is refused, never read as the
    current folder."""
    if not str(value).strip():
        raise UserError(
            f"{flag} is empty — name the run folder, e.g. {flag} output/my_run (an empty path is never "
            f"taken to mean the current folder)"
        )
    return output_path(value)


def make_writable_folder(path: Path) -> Path:
    """Create ``path`` (and its parents) and check that a file can be created in it, before any work: an
    :class:`OutputError` names the path when a file is in the way or the folder is not writable."""
    try:
        if path.exists() and not path.is_dir():
            raise OutputError(f"output folder {path} is a file — remove it or choose another output folder")
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise cannot_write(path, error) from None
    return path


def lock_output_dir(path: Path) -> None:
    """Hold ``path`` for this process: an exclusive POSIX lock (``lockf``) on ``path/.lock``, which records who holds
    it. The lock belongs to this process alone (data-loader workers it forks do not inherit it) and the OS releases it
    when the process ends, also when it is killed, so a dead run never blocks the rerun. Another process holding it is
    an :class:`OutputError` naming it (pid, host, start time)."""
    path = path.resolve()
    if path in _held_locks:
        return
    try:
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as error:
        raise cannot_write(path / LOCK_FILE, error) from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 500).decode(errors="replace").strip() or "a process that is starting"
        os.close(fd)
        raise OutputError(
            f"output folder {path} is in use by another run ({holder}) — wait for it to end, or choose "
            f"another output folder"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
    _held_locks[path] = fd


def release_output_dirs() -> None:
    """Release the run folders this process holds (:func:`lock_output_dir`), so a later run in the same process (a
    test, a notebook) can use them."""
    for fd in _held_locks.values():
        os.close(fd)
    _held_locks.clear()


def _recorded_config(path: Path) -> dict:
    """The config a run recorded in ``path`` (its ``config.yaml``); a file that is no longer a valid YAML mapping
    (edited by hand) is a UserError naming it and the ways on."""
    try:
        return load_yaml(path, loader=yaml.SafeLoader, what="the run's config file")
    except UserError as error:
        raise UserError(
            f"{error}; fix or restore it, or pass --resume to continue that run with this command's settings "
            f"(config.yaml is then written anew)"
        ) from None


def prepare_output_dir(
    path: str | Path,
    config: dict,
    resume: bool,
    checkpoint_name: str = "checkpoint.pth",
    upgrade_recorded: Callable[[dict], dict] | None = None,
) -> Path:
    """Create the run folder, hold it for this process (:func:`lock_output_dir`) and check that ``config`` may run in
    it; :func:`record_config` writes ``config.yaml`` once the run's other checks have passed too, so a refused run
    changes nothing in the folder.

    A folder holding another run — a different recorded config and that run's ``checkpoint_name`` — is refused (naming
    the differing keys) unless ``resume`` is True, in which case the new config will replace the recorded one. A
    recorded config without a checkpoint is a start that failed before saving anything: the corrected rerun takes its
    place. ``upgrade_recorded`` brings a recorded config written by an older version to today's key names before
    comparing.
    """
    path = make_writable_folder(Path(path))
    lock_output_dir(path)
    recorded_file = path / CONFIG_FILE
    normalised = yaml.safe_load(yaml.safe_dump(config))
    if recorded_file.is_file() and (path / checkpoint_name).exists() and not resume:
        recorded = _recorded_config(recorded_file)
        if upgrade_recorded is not None:
            recorded = upgrade_recorded(recorded)
        differing = _differing_keys(recorded, normalised)
        if differing:
            raise UserError(
                f"output folder {path} holds a different run (config differs in: "
                f"{', '.join(differing[:6])}) — choose a new output folder, or pass --resume to continue "
                f"that run with the new settings"
            )
    return path


def record_config(path: str | Path, config: dict) -> None:
    """Write ``config`` as the run folder ``path``'s ``config.yaml`` (atomically), the record
    :func:`prepare_output_dir` compares a rerun with."""
    normalised = yaml.safe_load(yaml.safe_dump(config))
    atomic_write(Path(path) / CONFIG_FILE, lambda h: h.write(yaml.safe_dump(normalised, sort_keys=False).encode()))


def begin_run(path: str | Path | None, config: dict, rank: int = 0) -> None:
    """Every check of a run has passed: record ``config`` in its folder ``path`` (rank 0; :func:`record_config`) and
    open the log files held back (:func:`release_held_logs`). Nothing before it writes into an existing run folder."""
    if path is not None and rank == 0:
        record_config(path, config)
    release_held_logs()


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write(Path(path), lambda handle: handle.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()))


def close_logging() -> None:
    """Close the handlers :func:`setup_logging` added, so a later run in the same process (a test, a notebook) does
    not write into this run's log file."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_projector_kd", False):
            root.removeHandler(handler)
            handler.close()


class _HeldLines(logging.handlers.MemoryHandler):
    """Keeps the lines meant for log files that are not opened yet (:func:`setup_logging` with ``hold``)."""

    def __init__(self, files: list[Path], formatter: logging.Formatter) -> None:
        super().__init__(capacity=1 << 30, flushLevel=logging.CRITICAL + 1)
        self.files, self.formatter_for_files = files, formatter


def release_held_logs() -> None:
    """Open the log files :func:`setup_logging` held back (``hold=True``) and write the lines kept so far into them:
    a run calls it once every check has passed, so a refused run leaves a folder's ``log.txt`` as it was."""
    root = logging.getLogger()
    for held in [h for h in root.handlers if isinstance(h, _HeldLines)]:
        root.removeHandler(held)
        for log_file in held.files:
            try:
                handler = logging.FileHandler(log_file)
            except OSError as error:
                raise cannot_write(log_file, error) from None
            handler.setFormatter(held.formatter_for_files)
            handler._projector_kd = True  # type: ignore[attr-defined]
            for record in held.buffer:
                handler.handle(record)
            root.addHandler(handler)
        held.buffer.clear()
        held.close()


def setup_logging(
    output_dir: str | Path | None,
    rank: int = 0,
    name: str = "projector_kd",
    extra_log_file: str | Path | None = None,
    hold: bool = False,
) -> logging.Logger:
    """Log INFO to stdout and to ``output_dir/log.txt`` (and ``extra_log_file``, e.g. the release's ``--log``) on
    rank 0; only warnings elsewhere. Replaces the handlers of an earlier call. ``hold``: the files are checked but
    not opened; their lines are kept until :func:`release_held_logs`."""
    close_logging()
    root = logging.getLogger()
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    files = {Path(output_dir) / "log.txt"} if output_dir is not None else set()
    if extra_log_file is not None:
        files.add(Path(extra_log_file).expanduser())
    log_files = sorted({f.resolve() for f in files}) if rank == 0 else []
    for log_file in log_files:
        try:
            try:
                if log_file.is_dir():
                    raise OutputError(f"log file {log_file} is a folder — name a file, e.g. {log_file / 'output.txt'}")
                log_file.parent.mkdir(parents=True, exist_ok=True)
                if not hold:
                    handlers.append(logging.FileHandler(log_file))
            except OSError as error:
                raise cannot_write(log_file, error) from None
        except OutputError:
            for handler in handlers:
                handler.close()
            raise
    if hold and log_files:
        handlers.append(_HeldLines(log_files, formatter))
    for handler in handlers:
        handler.setFormatter(formatter)
        handler._projector_kd = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    return logging.getLogger(name)


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """``"1 process"``, ``"2 processes"``: ``count`` and ``noun`` in its number (``plural`` or ``noun + "s"``)."""
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


def startup_line(
    track: str,
    run: str,
    world_size: int,
    device: Any,
    fast: bool,
    batch_size: int | None = None,
    accum_iter: int = 1,
    lr: float | None = None,
    steps_per_epoch: int | None = None,
) -> str:
    """What a run trains, on what, as the entry points log it first:
    ``<track>: <run>, N processes[ x batch B x A micro-batches (global batch N*B*A)][, lr L][, S steps/epoch],
    fast path on|off, device D``."""
    parts = [f"{track}: {run}"]
    processes = counted(world_size, "process", "processes")
    if batch_size is not None:
        processes += (
            f" x batch {batch_size} x {counted(accum_iter, 'micro-batch', 'micro-batches')} "
            f"(global batch {world_size * batch_size * accum_iter})"
        )
    parts.append(processes)
    if lr is not None:
        parts.append(f"lr {lr:.3g}")
    if steps_per_epoch is not None:
        parts.append(f"{steps_per_epoch} steps/epoch")
    parts += [f"fast path {'on' if fast else 'off'}", f"device {device}"]
    return ", ".join(parts)


def progress(iterable: Iterable, rank: int = 0, **tqdm_kwargs: Any) -> Iterable:
    """A tqdm bar on rank 0 when stderr is a terminal; the plain iterable otherwise."""
    if rank != 0 or not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, dynamic_ncols=True, leave=False, **tqdm_kwargs)


def tensorboard_writer(output_dir: str | Path, rank: int = 0) -> Any:
    """A TensorBoard ``SummaryWriter`` writing to ``output_dir/tensorboard`` on rank 0; None elsewhere."""
    if rank != 0:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
