"""The image datasets of the experiment runner: MNIST, Fashion-MNIST and CIFAR-10 as tensors.

:func:`load` reads the files itself, in torchvision's on-disk layout under a data root
(``MNIST/raw/`` and ``FashionMNIST/raw/`` holding the idx-ubyte files, plain or ``.gz``;
``cifar-10-batches-py/`` holding the python pickles), so that no torchvision is needed once the
data is there and generated files (:func:`write_fake`) load like the real ones. Only a download
uses torchvision, imported then. Images come back as [n, C, H, W] float32 in [0, 1] (pixels /
255), labels as int64; MNIST loads bitwise equal to :func:`fa_triton.experiments.mnist.load_mnist`.

BioTorch's preprocessing (``jsalbert/biotorch``, ``biotorch/datasets``) is here as functions on
batches: :func:`resize32` (MNIST-family images to 32×32, as torchvision's ``Resize``),
:func:`normalize` (their per-channel means and stds, :data:`MEAN_STD`), :func:`augment` (their
CIFAR-10 training transforms, random horizontal flip then random 32×32 crop of the image padded
by 4) and :func:`validation_indices` (their CIFAR-10 benchmark's 5,000 held-out training images).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import pickle
import random
import struct
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = ("mnist", "fashion-mnist", "cifar10")
ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "cifar-10": "cifar10",
           "cifar_10": "cifar10"}
"""Other spellings :func:`load` and the rest accept for a name of :data:`DATASETS`."""

MEAN_STD: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2859,), (0.3530,)),
    "cifar10": ((0.4914, 0.4821, 0.4465), (0.2470, 0.2435, 0.2616)),
}
"""Per-channel (means, stds) of the pixels in [0, 1], BioTorch's values."""

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_FILES = (*CIFAR_TRAIN_BATCHES, "test_batch", "batches.meta")
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

_SUBFOLDER = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "cifar-10-batches-py"}
_TITLE = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST", "cifar10": "CIFAR-10"}
_TORCHVISION_CLASS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10"}
_IDX_IMAGES, _IDX_LABELS = 2051, 2049  # magic numbers: 0x0803 (ubyte, 3 dims), 0x0801 (ubyte, 1 dim)


class MissingDataError(FileNotFoundError):
    """A dataset is not in the data folder and could not be downloaded, or one of its files is
    unreadable (``fa_triton.experiments.mnist.MissingDataError`` is this class)."""


class ImageData(NamedTuple):
    x_train: torch.Tensor
    """[n, C, H, W] float32, pixels / 255: MNIST-family [60000, 1, 28, 28], CIFAR-10 [50000, 3, 32, 32]."""
    y_train: torch.Tensor
    """[n] int64 class labels (0..9)."""
    x_test: torch.Tensor
    """[10000, C, H, W] float32."""
    y_test: torch.Tensor
    """[10000] int64."""


# ------------------------------------------------------------------------------------ names, folders

def _canonical(name) -> str:
    key = name.strip().lower() if isinstance(name, str) else name
    key = ALIASES.get(key, key) if isinstance(key, str) else key
    if key not in DATASETS:
        raise ValueError(f"dataset name must be one of {', '.join(DATASETS)}; got {name!r}")
    return key


def default_data_dir() -> Path:
    """The data root without ``data_dir``: ``$XDG_CACHE_HOME/fa_triton`` (``~/.cache/fa_triton``)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "fa_triton"


def _resolve_root(name: str, data_dir) -> Path:
    """torchvision's root for ``name``; the dataset's own folder (``.../MNIST``, ``.../MNIST/raw``,
    ``.../cifar-10-batches-py``) is accepted too."""
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    sub = _SUBFOLDER[name]
    if (root / sub).is_dir():
        return root
    if name == "cifar10":
        if root.name == sub and root.is_dir():
            return root.parent
    else:
        if root.name == sub and (root / "raw").is_dir():
            return root.parent
        if root.name == "raw" and root.parent.name == sub and root.is_dir():
            return root.parent.parent
    return root


def _folder_in(name: str, root: Path) -> Path:
    return root / "cifar-10-batches-py" if name == "cifar10" else root / _SUBFOLDER[name] / "raw"


def folder(name: str, data_dir=None) -> Path:
    """Where :func:`load` looks for the files of ``name``: ``<root>/MNIST/raw``,
    ``<root>/FashionMNIST/raw`` or ``<root>/cifar-10-batches-py``."""
    name = _canonical(name)
    return _folder_in(name, _resolve_root(name, data_dir))


def expected_files(name: str) -> tuple[str, ...]:
    """The files :func:`load` needs in :func:`folder` (idx files may also be there as ``NAME.gz``)."""
    return CIFAR_FILES if _canonical(name) == "cifar10" else IDX_FILES


def _missing_message(name: str, where: Path, reason: str) -> str:
    # One line: the CLI prints it as its whole error message.
    layout = "cifar-10-batches-py/" if name == "cifar10" else f"{_SUBFOLDER[name]}/raw/"
    return (
        f"{_TITLE[name]} not found: expected the files {', '.join(expected_files(name))} in {where} ({reason}); "
        f"pass --data-dir DIR for a folder that holds {layout} with these files"
        + ("" if reason.startswith("download failed") else ", or allow the download on a machine with network access")
    )


def _present(name: str, where: Path) -> list[str]:
    """The expected files that are missing from ``where``."""
    gz_ok = name != "cifar10"
    return [f for f in expected_files(name)
            if not ((where / f).is_file() or (gz_ok and (where / (f + ".gz")).is_file()))]


def _one_line(text) -> str:
    return " ".join(str(text).split())


def _download(name: str, root: Path) -> None:
    """Fetch ``name`` into ``root`` with torchvision's downloader (imported here). A failed
    download removes the folders it made (empty ones only: nothing of the user's is touched)."""
    import torchvision.datasets

    where = _folder_in(name, root)
    made = [folder for folder in (where, *where.parents) if not folder.exists()]
    cls = getattr(torchvision.datasets, _TORCHVISION_CLASS[name])
    try:
        cls(root=str(root), train=True, download=True)  # fetches the test set too
    except BaseException:
        for folder in made:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty
        raise


# ------------------------------------------------------------------------------------ reading

def _read_bytes(path: Path) -> bytes:
    if path.name.endswith(".gz"):
        try:
            with gzip.open(path, "rb") as f:
                return f.read()
        except (OSError, EOFError) as err:
            raise MissingDataError(f"corrupt file {path}: not a readable gzip file ({_one_line(err)})") from err
    return path.read_bytes()


def _read_idx(path: Path, magic: int, dims: tuple[int | None, ...]) -> torch.Tensor:
    """An idx-ubyte file as a uint8 tensor; ``dims`` are the sizes it must have (None: any)."""
    data = _read_bytes(path)
    ndim = len(dims)
    header = 4 + 4 * ndim
    if len(data) < header:
        raise MissingDataError(f"corrupt file {path}: {len(data)} bytes, shorter than the idx header ({header})")
    found = struct.unpack(">I", data[:4])[0]
    if found != magic:
        raise MissingDataError(f"corrupt file {path}: idx magic number {found}, expected {magic}")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if any(want is not None and got != want for got, want in zip(shape, dims)):
        raise MissingDataError(f"corrupt file {path}: idx dimensions {list(shape)}, expected "
                               f"{['any' if d is None else d for d in dims]}")
    size = int(np.prod(shape))
    if len(data) != header + size:
        raise MissingDataError(f"corrupt file {path}: {len(data) - header} bytes of data after the header, "
                               f"expected {size} for dimensions {list(shape)}")
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy())


def _idx_path(where: Path, file: str) -> Path:
    plain = where / file
    return plain if plain.is_file() else where / (file + ".gz")


def _read_idx_pair(where: Path, images: str, labels: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = _read_idx(_idx_path(where, images), _IDX_IMAGES, (None, None, None))
    y = _read_idx(_idx_path(where, labels), _IDX_LABELS, (len(x),))
    if len(y) and int(y.max()) > 9:
        raise MissingDataError(f"corrupt file {_idx_path(where, labels)}: labels above 9 (max {int(y.max())})")
    return x.unsqueeze(1), y.long()


def _read_cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="latin1")  # a pickle, as torchvision reads it: trusted files only
    except Exception as err:  # UnpicklingError, EOFError, ValueError, ... on a damaged file
        raise MissingDataError(f"corrupt file {path}: not a readable CIFAR-10 pickle "
                               f"({type(err).__name__}: {_one_line(err)})") from err
    if not isinstance(batch, dict) or "data" not in batch or ("labels" not in batch and "fine_labels" not in batch):
        raise MissingDataError(f"corrupt file {path}: expected a dict with keys 'data' and 'labels'")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch.get("labels", batch.get("fine_labels")))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise MissingDataError(f"corrupt file {path}: 'data' is {data.dtype} {list(data.shape)}, "
                               "expected uint8 [N, 3072]")
    if labels.shape != (len(data),) or (len(labels) and (labels.min() < 0 or labels.max() > 9)):
        raise MissingDataError(f"corrupt file {path}: 'labels' must be {len(data)} integers in 0..9, "
                               f"got shape {list(labels.shape)}")
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return x, torch.from_numpy(labels.astype(np.int64))


def _read(name: str, where: Path) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test), images uint8 [n, C, H, W]."""
    if name == "cifar10":
        train = [_read_cifar_batch(where / f) for f in CIFAR_TRAIN_BATCHES]
        x_test, y_test = _read_cifar_batch(where / "test_batch")
        return torch.cat([x for x, _ in train]), torch.cat([y for _, y in train]), x_test, y_test
    x_train, y_train = _read_idx_pair(where, *IDX_FILES[:2])
    x_test, y_test = _read_idx_pair(where, *IDX_FILES[2:])
    if x_train.shape[1:] != x_test.shape[1:]:
        raise MissingDataError(f"corrupt files in {where}: train images {list(x_train.shape[2:])} and test images "
                               f"{list(x_test.shape[2:])} differ in size")
    return x_train, y_train, x_test, y_test


def load(name: str, data_dir=None, *, download: bool = True, device="cpu") -> ImageData:
    """``name`` (one of :data:`DATASETS`) as tensors on ``device``: images [n, C, H, W] float32 in
    [0, 1] (pixels / 255), labels int64.

    ``data_dir`` is torchvision's root (holding ``MNIST/raw/``, ``FashionMNIST/raw/`` or
    ``cifar-10-batches-py/``), default :func:`default_data_dir`; the dataset's folder itself is
    accepted too. Missing files are downloaded there by torchvision when ``download`` is True.
    Raises :class:`MissingDataError` (one line) when the files are absent and cannot be fetched, or
    one is damaged; ``ValueError`` for an unknown name.
    """
    where = ensure_present(name, data_dir, download=download)
    x_train, y_train, x_test, y_test = _read(_canonical(name), where)
    return _as_image_data(name, x_train, y_train, x_test, y_test, device)


def ensure_present(name: str, data_dir=None, *, download: bool = True) -> Path:
    """The folder holding ``name``'s files, downloaded first where they are missing and
    ``download`` is True; :class:`MissingDataError` (one line) as :func:`load` raises it. Cheap
    when the files are there: it checks their presence, it does not read them."""
    name = _canonical(name)
    root = _resolve_root(name, data_dir)
    where = _folder_in(name, root)
    missing = _present(name, where)
    if missing:
        if not download:
            raise MissingDataError(_missing_message(name, where, f"missing {', '.join(missing)}; download=False"))
        try:
            _download(name, root)
        except ImportError as err:
            reason = (f"download failed: it needs torchvision, in the train extra (python3 -m pip install -e "
                      f"\".[train]\"): {_one_line(err)}")
            raise MissingDataError(_missing_message(name, where, reason)) from err
        except Exception as err:  # URLError, RuntimeError, OSError, ...: all mean "not fetched"
            reason = f"download failed: {type(err).__name__}: {_one_line(err)}"
            raise MissingDataError(_missing_message(name, where, reason)) from err
        missing = _present(name, where)
        if missing:
            raise MissingDataError(_missing_message(name, where, f"still missing {', '.join(missing)} after "
                                                                 "the download"))
    return where


def _as_image_data(name, x_train, y_train, x_test, y_test, device) -> ImageData:
    def images(x):  # move the bytes, then scale in place: the same values as load_mnist's x.float() / 255
        return x.to(device).to(torch.float32).div_(255)

    return ImageData(images(x_train), y_train.to(device), images(x_test), y_test.to(device))


# ------------------------------------------------------------------------------------ preprocessing

def normalize(x: torch.Tensor, name: str) -> torch.Tensor:
    """``(x - mean) / std`` per channel (dimension -3 of [..., C, H, W]) with :data:`MEAN_STD` of ``name``."""
    mean, std = MEAN_STD[_canonical(name)]
    if x.dim() < 3 or x.shape[-3] != len(mean):
        raise ValueError(f"normalize({name!r}) needs images [..., {len(mean)}, H, W]; got {list(x.shape)}")
    shape = (len(mean), 1, 1)
    mean_t = torch.tensor(mean, dtype=x.dtype).view(shape).to(x.device)
    std_t = torch.tensor(std, dtype=x.dtype).view(shape).to(x.device)
    return (x - mean_t) / std_t


def resize32(x: torch.Tensor) -> torch.Tensor:
    """Images [n, C, H, W] in [0, 1] resized to [n, C, 32, 32] as BioTorch's MNIST pipeline does
    (torchvision's ``Resize(32)``: bilinear, antialiased, on the pixel values 0..255), scaled back to [0, 1]."""
    if x.dim() != 4:
        raise ValueError(f"resize32 needs images [n, C, H, W]; got {list(x.shape)}")
    pixels = (x * 255).round()
    return F.interpolate(pixels, size=(32, 32), mode="bilinear", align_corners=False, antialias=True) / 255


def validation_indices(name: str, n_train: int) -> torch.Tensor | None:
    """The training images a run holds out for validation, or None where BioTorch validates on the test set.

    CIFAR-10: BioTorch's benchmark split, ``random.seed(0); random.sample(range(n_train), 5000)``
    (45k train, 5k validation), in that order. Fewer than 50,000 training images (generated data)
    hold out a tenth, ``min(5000, n_train // 10)``, drawn the same way. MNIST, Fashion-MNIST: None.
    """
    if _canonical(name) != "cifar10":
        return None
    if isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 0:
        raise ValueError(f"n_train must be a non-negative int, got {n_train!r}")
    k = min(5000, n_train // 10)
    return torch.tensor(random.Random(0).sample(range(n_train), k), dtype=torch.long)


def augment(x: torch.Tensor, generator: torch.Generator, *, padding: int = 4,
            fill: float | Sequence[float] | torch.Tensor = 0.0) -> torch.Tensor:
    """BioTorch's CIFAR-10 training augmentation on a batch [n, C, H, W], vectorised.

    Per image: a horizontal flip with probability 1/2, then a random H×W crop of the image padded
    by ``padding`` pixels of ``fill`` on every side (torchvision's ``RandomHorizontalFlip()`` then
    ``RandomCrop(32, padding=4)``). The flips (``torch.rand(n) < 0.5``), then the crop's row offsets
    and column offsets (``torch.randint(0, 2 * padding + 1, (n,))`` each) are drawn from
    ``generator`` in that order, on its device, and moved to ``x``'s: the same generator state gives
    the same batch on the CPU and on CUDA. ``fill`` is a number or one value per channel: BioTorch
    pads the raw image with black, which is ``normalize(zeros)`` (``-mean / std``) after :func:`normalize`.
    """
    if x.dim() != 4:
        raise ValueError(f"augment needs images [n, C, H, W]; got {list(x.shape)}")
    n, c, h, w = x.shape
    gdev = generator.device
    flip = (torch.rand(n, generator=generator, device=gdev) < 0.5).to(x.device)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=gdev).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=gdev).to(x.device)
    # Output pixel (i, j) is padded-flipped[dy + i, dx + j] = x[dy + i - p, w - 1 - (dx + j - p)] when flipped.
    rows = dy[:, None] - padding + torch.arange(h, device=x.device)  # [n, h]
    cols = dx[:, None] - padding + torch.arange(w, device=x.device)  # [n, w]
    valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]  # [n, h, w]
    cols = torch.where(flip[:, None], w - 1 - cols, cols)
    index = rows.clamp(0, h - 1)[:, :, None] * w + cols.clamp(0, w - 1)[:, None, :]  # [n, h, w]
    out = x.reshape(n, c, h * w).gather(2, index.reshape(n, 1, h * w).expand(n, c, h * w)).view(n, c, h, w)
    fill_t = torch.as_tensor(fill, dtype=x.dtype, device=x.device)
    if fill_t.dim() == 1:
        fill_t = fill_t.view(c, 1, 1)
    return torch.where(valid[:, None], out, fill_t)


# ------------------------------------------------------------------------------------ generated data

def _fake_images(rng: np.random.Generator, labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """uint8 images: a fixed random pattern per class, half-blended with per-image noise."""
    templates = np.random.default_rng(12345).integers(0, 256, size=(10, *shape))
    noise = rng.integers(0, 256, size=(len(labels), *shape))
    return ((templates[labels] + noise) // 2).astype(np.uint8)


def _fake_labels(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.permutation(np.arange(n) % 10).astype(np.uint8)


def _write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_fake(name: str, root, n_train: int = 512, n_test: int = 128, seed: int = 0) -> Path:
    """Write a small generated ``name`` under ``root`` in the real on-disk format; returns the folder.

    MNIST / Fashion-MNIST: the four idx-ubyte files (uncompressed) in ``<root>/MNIST/raw`` or
    ``<root>/FashionMNIST/raw``; CIFAR-10: the pickles ``data_batch_1`` .. ``data_batch_5`` (the
    ``n_train`` images split over them), ``test_batch`` and ``batches.meta`` in
    ``<root>/cifar-10-batches-py``. Labels cycle through 0..9 (shuffled), so classes are balanced
    to within one image; each class has its own pixel pattern under the noise, so a model can learn.
    Same arguments, same bytes. :func:`load` reads the result like the real files.
    """
    name = _canonical(name)
    for arg, value in (("n_train", n_train), ("n_test", n_test)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{arg} must be a positive int, got {value!r}")
    rng = np.random.default_rng(seed)
    where = _folder_in(name, Path(root).expanduser())
    where.mkdir(parents=True, exist_ok=True)
    shape = (3, 32, 32) if name == "cifar10" else (28, 28)
    y_train, y_test = _fake_labels(rng, n_train), _fake_labels(rng, n_test)
    x_train, x_test = _fake_images(rng, y_train, shape), _fake_images(rng, y_test, shape)
    if name != "cifar10":
        for file, magic, array in zip(IDX_FILES, (_IDX_IMAGES, _IDX_LABELS) * 2, (x_train, y_train, x_test, y_test)):
            _write_idx(where / file, magic, array)
        return where

    def dump(file: str, batch: dict) -> None:
        with open(where / file, "wb") as f:
            pickle.dump(batch, f, protocol=2)

    for i, part in enumerate(np.array_split(np.arange(n_train), len(CIFAR_TRAIN_BATCHES))):
        dump(CIFAR_TRAIN_BATCHES[i], {"batch_label": f"training batch {i + 1} of 5",
                                      "labels": [int(v) for v in y_train[part]],
                                      "data": x_train[part].reshape(len(part), -1),
                                      "filenames": [f"fake_{j:05d}.png" for j in part]})
    dump("test_batch", {"batch_label": "testing batch 1 of 1", "labels": [int(v) for v in y_test],
                        "data": x_test.reshape(n_test, -1),
                        "filenames": [f"fake_test_{j:05d}.png" for j in range(n_test)]})
    dump("batches.meta", {"num_cases_per_batch": -(-n_train // 5), "label_names": list(CIFAR_CLASSES),
                          "num_vis": 3072})
    return where
