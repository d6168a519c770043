"""ImageFolder data: layout checks before training, images that fail with the file's name, the bundled digits set."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import shutil
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from .errors import UserError
from .runs import counted
from .sampling import SeededSamples

BAD_IMAGE_POLICIES = ("fail", "skip")
logger = logging.getLogger(__name__)


class DataError(UserError):
    """A dataset folder or image that cannot be used as it is."""


def _class_folders(split_dir: Path) -> list[Path]:
    """The class folders of ``split_dir``, sorted; hidden folders (``.ipynb_checkpoints``, ...) are never classes."""
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def check_num_classes(split_dir: str | Path, num_classes: int, setting: str, how_to_fix: str) -> None:
    """Raise :class:`DataError` when ``split_dir`` does not hold ``num_classes`` class folders (``setting`` names the
    value, e.g. ``model.num_classes``; ``how_to_fix`` says how to set it or point at the right folder)."""
    found = len(_class_folders(Path(split_dir)))
    if found != num_classes:
        raise DataError(
            f"{split_dir} has {found} class folders but {setting} = {num_classes}; {how_to_fix.format(found=found)}"
        )


def _walk_class_folder(folder: Path) -> Iterator[tuple[str, list[str]]]:
    """``(folder path, file names)`` for every folder below class folder ``folder``, as torchvision's ImageFolder walks
    it (links to files are files). A link to a folder below it is a DataError naming the link: ImageFolder follows such
    links, so one that loops back (to the class folder, the split, ...) or leads to another class would add images again
    and again, or under the wrong label. The class folder itself may be a link."""
    for root, folders, files in os.walk(folder):  # not following links: os.walk lists links to folders in `folders`
        for name in folders:
            link = os.path.join(root, name)
            if os.path.islink(link):
                raise DataError(
                    f"class folder {folder} holds {link}, a link to the folder {os.readlink(link)}: links to folders "
                    f"below a class folder are refused (one that loops back or leads to another class would add "
                    f"images again and again, or under the wrong label) — remove it, or link the image files or the "
                    f"whole class folder instead"
                )
        yield root, files


def _check_images(folder: Path, on_bad_image: str) -> None:
    """DataError when ``folder`` holds a link to a folder (:func:`_walk_class_folder`), no image, or (``on_bad_image:
    fail``) an image file of 0 bytes."""
    found = False
    for root, files in _walk_class_folder(folder):
        for name in files:
            if os.path.splitext(name)[1].lower() not in IMG_EXTENSIONS or (found and on_bad_image != "fail"):
                continue
            image = Path(root, name)
            if not image.is_file():
                continue
            found = True
            if on_bad_image == "fail" and image.stat().st_size == 0:
                raise DataError(f"image {image} is empty (0 bytes) — replace or delete it, or set on_bad_image: skip")
    if not found:
        raise DataError(
            f"class folder {folder} holds no images ({', '.join(IMG_EXTENSIONS[:4])}, ...) "
            f"— add images or remove the folder"
        )


def check_image_folder(
    root: str | Path,
    splits: tuple[str, ...] = ("train", "val"),
    how_to_set: str = "set the data path",
    on_bad_image: str = "fail",
) -> None:
    """Check ``root/<split>/<class>/<image>`` before any work: every split exists, no class folder is empty or holds a
    link to a folder, every split has the same classes as the first, and (``on_bad_image: fail``) no image file is
    empty. Raises
    :class:`DataError` naming the path and the fix (``how_to_set`` tells the user how to point the run at their
    data)."""
    root = Path(root)
    expected = " and ".join(f"{root / s}/<class>/<image>" for s in splits)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist — expected {expected}; {how_to_set}")
    reference: list[str] | None = None
    for split in splits:
        split_dir = root / split
        if not split_dir.is_dir():
            raise DataError(f"dataset split folder {split_dir} is missing — expected {expected}")
        classes = _class_folders(split_dir)
        if not classes:
            raise DataError(f"{split_dir} has no class folders — expected {split_dir}/<class>/<image>")
        for folder in classes:
            _check_images(folder, on_bad_image)
        names = [c.name for c in classes]
        if reference is None:
            reference = names
        elif names != reference:
            missing = sorted(set(reference) - set(names))
            extra = sorted(set(names) - set(reference))
            raise DataError(
                f"classes of {split_dir} differ from {root / splits[0]}: missing {missing[:5]}, "
                f"extra {extra[:5]} — both splits need the same class folders"
            )


UNREADABLE_IMAGE_ERRORS = (
    UnidentifiedImageError,
    OSError,
    SyntaxError,
    ValueError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)
_PIXEL_LIMIT = threading.Lock()  # warnings.catch_warnings is process-wide: one image is opened under it at a time


def open_image(handle: BinaryIO) -> Image.Image:
    """``PIL.Image.open(handle)``, where an image over Pillow's pixel limit (``PIL.Image.MAX_IMAGE_PIXELS``, a
    possible decompression bomb) raises ``DecompressionBombWarning`` instead of only warning: such an image is
    unreadable (Pillow itself refuses those over twice the limit with ``DecompressionBombError``)."""
    with _PIXEL_LIMIT, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(handle)


JPEG_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}  # markers without a length field (RSTn, TEM)
JPEG_START_OF_SCAN = 0xDA


def is_jpeg_frame(marker: int) -> bool:
    """Whether ``marker`` starts a JPEG frame header (SOF0-SOF15 save DHT, JPG and DAC)."""
    return 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)


def jpeg_segments(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(marker, position of its 0xFF, length field) of each length-framed segment of JPEG ``data``, from the first
    after SOI up to and including the first start of scan; the walk ends early, without a start of scan, where
    ``data`` is not a JPEG or its headers are not well formed."""
    if data[:2] != b"\xff\xd8":
        return
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in JPEG_STANDALONE:
            position += 2
            continue
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        if length < 2:
            return
        yield marker, position, length
        if marker == JPEG_START_OF_SCAN:
            return
        position += 2 + length


def unreadable_image(path: str, error: BaseException) -> DataError:
    """The one-line error for an image that cannot be read (``error``: why), naming the file and the fixes."""
    fix = "fix or delete the file"
    if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        fix = "shrink the file below Pillow's pixel limit (PIL.Image.MAX_IMAGE_PIXELS) or delete it"
    return DataError(f"unreadable image {path} ({type(error).__name__}: {error}) — {fix}, or set on_bad_image: skip")


WHITE = (255, 255, 255)
ALPHA_MODES = ("LA", "PA", "RGBA")


def _check_float_scale(values: np.ndarray) -> None:
    """ValueError for float pixels whose scale cannot be told (see :func:`to_rgb`)."""
    if not np.isfinite(values).all():
        raise ValueError("a 32-bit float (mode F) image with NaN or infinite values — save it as 8- or 16-bit")
    if values.size and 0 < values.max() <= 1:
        raise ValueError(
            "a 32-bit float (mode F) image with every value in [0, 1]: float images are read on the 0..255 scale, "
            "where it would be black — save it as 8-bit (values x 255) or 16-bit (values x 65535)"
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` (any mode Pillow opens) as 8-bit RGB with the intensities it shows.

    16-bit and 32-bit integer greyscale (``I;16*``, ``I``) is read on the 16-bit scale: ``round(v / 257)``, so 65535
    is white (Pillow's own conversion clips every value above 255 to white). Float greyscale (``F``) is on the 0..255
    scale, rounded and clipped, as Pillow reads it; a float image whose values all lie at or below 1 with some above 0
    (one saved on a 0..1 scale, which would load as black) and one with NaN or infinite values raise ValueError: their
    scale cannot be told. Transparency (``LA``, ``PA``, ``RGBA``, and palette, greyscale or RGB images with a
    transparent colour) is composited over white. Every other mode (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``,
    ``HSV``, ``RGB``) uses Pillow's conversion.
    """
    mode = image.mode
    if mode == "I" or mode.startswith("I;16") or mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if mode == "F":
            _check_float_scale(values)
        else:
            values = values / 257.0
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE + (255,)), rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(path: str, data: bytes | None = None) -> Image.Image:
    """Open the image at ``path`` as RGB (:func:`to_rgb`), from ``data`` when its bytes are already read; raises
    :class:`DataError` naming the file when it is unreadable (also when it is over Pillow's pixel limit:
    :func:`open_image`)."""
    try:
        with open(path, "rb") if data is None else io.BytesIO(data) as handle:
            image = open_image(handle)
            image.load()
            return to_rgb(image)
    except UNREADABLE_IMAGE_ERRORS as error:
        raise unreadable_image(path, error) from None


def check_last_batch(
    num_images: int, per_process: int, batch_size: int, world_size: int, source: str, key: str
) -> None:
    """Refuse, before training, a training loader whose last batch would hold 1 image per process: batch whitening
    needs at least 2. ``per_process``: the images one process draws per epoch; ``key``: the loader's key in the recipe
    file ``source``."""
    if batch_size > 1 and per_process % batch_size == 1:
        raise DataError(
            f"{source}: {key}: {num_images} training images over {counted(world_size, 'process', 'processes')} give "
            f"{per_process} per process, so batches of {batch_size} leave a last batch of 1 image, which "
            f"batch whitening cannot train on — set drop_last: true in {key}.kwargs (or choose a batch "
            f"size that does not leave 1 image)"
        )


class LoaderWorkerError(UserError):
    """A data-loader worker died or raised an error that is not the user's data (a bug, a lack of memory)."""


WORKER_DIED = re.compile(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\) (.*)")
WORKER_RAISED = re.compile(r"^Caught (\w+) in DataLoader worker process (\d+)\.$", re.MULTILINE)


def worker_failure(error: BaseException, during: str) -> LoaderWorkerError | None:
    """The one-line :class:`LoaderWorkerError` for an exception with which PyTorch reports a loader worker's failure
    ``during`` (e.g. ``"training"``): a worker that died or timed out, or one that raised (its traceback is logged);
    None for any other exception."""
    text = str(error)
    died = WORKER_DIED.search(text)
    if isinstance(error, RuntimeError) and died:
        how = died.group(2).split(". ")[0].rstrip(". ").replace("is killed by", "was killed by")
        if "shared memory" in text:
            cause = "the workers ran out of shared memory: raise its limit (e.g. docker run --shm-size) or lower"
        else:
            cause = "most often the system ran out of memory and killed it: lower"
        return LoaderWorkerError(
            f"a data-loader worker (pid {died.group(1)}) {how} while {during} — {cause} the number of loader workers "
            f"(num_workers) or the batch size, or free memory, then run the same command again"
        )
    if isinstance(error, RuntimeError) and text.startswith("DataLoader timed out after "):
        return LoaderWorkerError(
            f"{text.splitlines()[0]} while {during}: no worker delivered a batch in time — raise or remove the "
            f"loader's timeout, or check the storage the images are read from, then run the same command again"
        )
    raised = WORKER_RAISED.search(text)
    if raised is None or "Original Traceback" not in text:
        return None
    logger.error("data-loader worker %s failed while %s:\n%s", raised.group(2), during, text)
    name = raised.group(1)
    final = [line for line in text.splitlines() if line.split(":", 1)[0].rsplit(".", 1)[-1] == name]
    message = final[-1].split(": ", 1)[1] if final and ": " in final[-1] else "(no message)"
    return LoaderWorkerError(
        f"a data-loader worker raised {name}: {message} while {during} — fix what it names (its traceback is in the "
        f"log), or set num_workers to 0 to debug it in the main process"
    )


@contextlib.contextmanager
def worker_failures_plainly(during: str) -> Iterator[None]:
    """Within the block, PyTorch's report of a loader worker that died, timed out or raised becomes
    :func:`worker_failure`'s one line. Its SIGCHLD handler raises the report wherever the main process is (inside a
    training step too, not only while a batch is fetched), so the loops run their whole body in this block."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        failure = worker_failure(err, during)
        if failure is None:
            raise
        raise failure from None


def raise_worker_errors_plainly(batches: Iterable, during: str) -> Iterator:
    """Iterate ``batches`` (read ``during``, e.g. ``"training"``); a loader worker's failure ends in one line: a
    UserError raised in a worker (re-raised by PyTorch with the worker's traceback in its message) with just its own
    message, a worker that died, timed out or raised anything else with :func:`worker_failure`'s line."""
    with worker_failures_plainly(during):
        try:
            yield from batches
        except UserError as err:
            text = str(err)
            if "Original Traceback" not in text:
                raise
            last = text.rstrip().splitlines()[-1]
            raise type(err)(last.split(": ", 1)[1] if ": " in last else last) from None


def checkpoint_on_data_error(batches: Iterable, save: Callable[[], str | None]) -> Iterator:
    """Iterate a training loader's ``batches``; a :class:`DataError` (an image that turned out unreadable in the
    middle of an epoch) or a :class:`LoaderWorkerError` (a worker that died, timed out or raised) first calls
    ``save()``, which writes a resumable checkpoint at the current position and names it (or returns None when there
    is nothing to save), then is re-raised as one line saying so. The model is intact: only the data failed."""
    try:
        yield from raise_worker_errors_plainly(batches, "training")
    except (DataError, LoaderWorkerError) as error:
        saved = save()
        if saved is None:
            raise
        if isinstance(error, DataError):
            raise DataError(
                f"{error}. A resumable checkpoint was written first: {saved} — after fixing the file, run "
                f"the same command again to continue"
            ) from None
        raise LoaderWorkerError(f"{error}. A resumable checkpoint was written first: {saved}") from None


class CheckedImageFolder(ImageFolder):
    """``torchvision`` ImageFolder whose unreadable images either stop the run naming the file (``fail``) or are
    replaced by the next readable sample and counted (``skip``, a warning names each file once)."""

    def __init__(
        self, root: str | Path, transform: Callable | None = None, on_bad_image: str = "fail", **kwargs: Any
    ) -> None:
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise UserError(f"on_bad_image={on_bad_image!r} is not one of {', '.join(BAD_IMAGE_POLICIES)}")
        super().__init__(str(root), transform=transform, loader=load_rgb, **kwargs)
        self.on_bad_image = on_bad_image
        self.skipped: set[int] = set()

    @staticmethod
    def make_dataset(
        directory: str | Path,
        class_to_idx: dict[str, int],
        extensions: tuple[str, ...] | None = None,
        is_valid_file: Callable[[str], bool] | None = None,
        allow_empty: bool = False,
    ) -> list[tuple[str, int]]:
        """torchvision's file list, once no class folder holds a link to a folder (:func:`_walk_class_folder`, which
        torchvision would follow)."""
        for name in class_to_idx:
            for _ in _walk_class_folder(Path(directory).expanduser() / name):
                pass
        return ImageFolder.make_dataset(directory, class_to_idx, extensions, is_valid_file, allow_empty)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        """Class folders as :func:`check_image_folder` sees them: hidden folders are not classes."""
        classes = [folder.name for folder in _class_folders(Path(directory))]
        if not classes:
            raise DataError(f"{directory} has no class folders — expected {directory}/<class>/<image>")
        return classes, {name: index for index, name in enumerate(classes)}

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if self.on_bad_image == "fail":
            return super().__getitem__(index)
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            if candidate in self.skipped:
                continue
            try:
                return super().__getitem__(candidate)
            except DataError as error:
                self.skipped.add(candidate)
                logger.warning("skipping %s (%d skipped so far in this process)", error, len(self.skipped))
        raise DataError(f"no readable image left in {self.root}")


def write_digits_imagefolder(
    root: str | Path,
    image_size: int = 32,
    val_fraction: float = 0.2,
    seed: int = 0,
    train_per_class: int | None = None,
    holdout_per_class: int = 0,
    holdout: bool = False,
) -> Path:
    """Write scikit-learn's 8x8 handwritten digits (1,797 real images, 10 classes) as an RGB ImageFolder tree
    ``root/{train,val}/<digit>/<index>.png``, upsampled to ``image_size`` with bicubic resampling, with a fixed
    stratified split of each class into val (``val_fraction``), held out (``holdout_per_class`` images, in no training
    split) and train (the rest; ``train_per_class`` keeps only its first N). ``holdout`` writes the held-out images as
    ``val`` instead of the real val images: a split for choosing settings without looking at val.
    Returns ``root``. A tree already written with the same settings is reused."""
    if holdout and holdout_per_class <= 0:
        raise ValueError("holdout=True needs holdout_per_class > 0: the held-out images stand in for val")
    from sklearn.datasets import load_digits

    root = Path(root)
    stamp = root / ".digits-imagefolder"
    settings = (
        f"image_size={image_size} val_fraction={val_fraction} seed={seed} train_per_class={train_per_class} "
        f"holdout_per_class={holdout_per_class} holdout={holdout}\n"
    )
    if stamp.is_file() and stamp.read_text() == settings:
        return root
    for split in ("train", "val"):
        shutil.rmtree(root / split, ignore_errors=True)
    digits = load_digits()
    rng = np.random.default_rng(seed)
    split_of = np.full(len(digits.target), None, dtype=object)
    for label in np.unique(digits.target):
        indices = rng.permutation(np.flatnonzero(digits.target == label))
        n_val = int(round(len(indices) * val_fraction))
        val, held_out, train = np.split(indices, [n_val, n_val + holdout_per_class])
        split_of[held_out if holdout else val] = "val"
        split_of[train[:train_per_class]] = "train"
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        if split_of[index] is None:
            continue
        grey = np.clip(pixels / 16.0 * 255.0, 0, 255).astype(np.uint8)
        image = Image.fromarray(grey).resize((image_size, image_size), Image.BICUBIC).convert("RGB")
        folder = root / split_of[index] / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index:04d}.png")
    stamp.write_text(settings)
    return root


def innermost_dataset(dataset: Any) -> Any:
    """The image folder under the wrappers (:class:`SeededSamples`, torchdistill's ``org_dataset`` wrappers)."""
    while isinstance(dataset, SeededSamples) or hasattr(dataset, "org_dataset"):
        dataset = dataset.dataset if isinstance(dataset, SeededSamples) else dataset.org_dataset
    return dataset


def dataset_facts(name: str, dataset: Any) -> dict[str, str]:
    """What every rank of a run must see the same of ``dataset`` (an image folder, or a wrapper around one) named
    ``name``: ``{name: "N images in C classes, file list <digest>"}``, the digest a SHA-1 of every file's path below
    the folder's root and its label, in order."""
    folder = innermost_dataset(dataset)
    root = Path(folder.root)
    digest = hashlib.sha1()
    for path, label in folder.samples:
        digest.update(f"{Path(path).relative_to(root)}\t{label}\n".encode())
    return {name: f"{len(folder.samples)} images in {len(folder.classes)} classes, file list {digest.hexdigest()[:12]}"}
