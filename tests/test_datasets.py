"""The runner's dataset layer: file reading, errors, BioTorch's preprocessing, generated data."""

import ast
import gzip
import pickle
import random
import sys
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fa_triton.experiments import datasets, mnist
from fa_triton.experiments.datasets import (
    DATASETS,
    MEAN_STD,
    ImageData,
    MissingDataError,
    augment,
    expected_files,
    folder,
    load,
    normalize,
    resize32,
    validation_indices,
    write_fake,
)

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # as tests/test_mnist.py
SHAPES = {"mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


def require_mnist() -> Path:
    if not all((DATA_DIR / "MNIST" / "raw" / name).is_file() for name in mnist.MNIST_FILES):
        pytest.skip(f"MNIST files not found under {DATA_DIR / 'MNIST' / 'raw'} (the ../shared/data folder)")
    return DATA_DIR


def trust_generated_cifar(monkeypatch, tv) -> None:
    """torchvision's CIFAR10 checks md5s, which generated files do not have."""
    monkeypatch.setattr(tv.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv.cifar, "check_integrity", lambda *args, **kwargs: True)


def single_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------ generated data

@pytest.mark.parametrize("name", DATASETS)
def test_write_fake_then_load_round_trips(tmp_path, name):
    where = write_fake(name, tmp_path, n_train=230, n_test=60, seed=3)
    assert where == folder(name, tmp_path)
    assert sorted(p.name for p in where.iterdir()) == sorted(expected_files(name))
    data = load(name, tmp_path, download=False)
    assert isinstance(data, ImageData)
    assert data.x_train.shape == (230, *SHAPES[name]) and data.x_test.shape == (60, *SHAPES[name])
    assert data.y_train.shape == (230,) and data.y_test.shape == (60,)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    for x in (data.x_train, data.x_test):
        assert 0 <= x.min() and x.max() <= 1 and x.max() > 0.9 and x.min() < 0.1
        assert torch.equal((x * 255).round() / 255, x)  # pixels / 255
    for y, n in ((data.y_train, 230), (data.y_test, 60)):
        counts = torch.bincount(y, minlength=10)
        assert len(counts) == 10 and counts.max() - counts.min() <= 1 and counts.sum() == n
    # Same arguments, same files; another seed, other images.
    write_fake(name, tmp_path / "again", n_train=230, n_test=60, seed=3)
    again = load(name, tmp_path / "again", download=False)
    assert all(torch.equal(a, b) for a, b in zip(data, again))
    other = load(name, write_fake(name, tmp_path / "other", n_train=230, n_test=60, seed=4), download=False)
    assert not torch.equal(other.x_train, data.x_train)


@pytest.mark.parametrize("name", DATASETS)
def test_fake_data_has_a_learnable_class_signal(tmp_path, name):
    data = load(name, write_fake(name, tmp_path), download=False)
    means = torch.stack([data.x_train[data.y_train == c].mean(0) for c in range(10)]).flatten(1)
    guess = torch.cdist(data.x_test.flatten(1), means).argmin(1)
    assert (guess == data.y_test).float().mean() > 0.8  # nearest class mean; chance is 0.1


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_fake_idx_files_read_by_torchvision_alike(tmp_path, name):
    tv_mnist = pytest.importorskip("torchvision.datasets.mnist")
    where = write_fake(name, tmp_path, n_train=40, n_test=20)
    data = load(name, tmp_path, download=False)
    assert torch.equal(tv_mnist.read_image_file(str(where / "train-images-idx3-ubyte")),
                       (data.x_train[:, 0] * 255).round().to(torch.uint8))
    assert torch.equal(tv_mnist.read_label_file(str(where / "t10k-labels-idx1-ubyte")), data.y_test)


def test_fake_cifar_pickles_read_by_torchvision_alike(tmp_path, monkeypatch):
    tv = pytest.importorskip("torchvision.datasets")
    write_fake("cifar10", tmp_path, n_train=47, n_test=13)
    trust_generated_cifar(monkeypatch, tv)
    data = load("cifar10", tmp_path, download=False)
    for train, x, y in ((True, data.x_train, data.y_train), (False, data.x_test, data.y_test)):
        theirs = tv.CIFAR10(str(tmp_path), train=train, download=False)
        assert torch.equal(torch.from_numpy(theirs.data).permute(0, 3, 1, 2), (x * 255).round().to(torch.uint8))
        assert theirs.targets == y.tolist()
        assert theirs.classes == list(datasets.CIFAR_CLASSES)


def test_write_fake_rejects_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match="n_train must be a positive int"):
        write_fake("mnist", tmp_path, n_train=0)
    with pytest.raises(ValueError, match="n_test"):
        write_fake("cifar10", tmp_path, n_test=2.5)


# ------------------------------------------------------------------------------------ names, folders

def test_bad_name_names_the_argument_and_the_choices(tmp_path):
    for call in (lambda: load("imagenet", tmp_path), lambda: folder("svhn"), lambda: expected_files("mnist2"),
                 lambda: normalize(torch.zeros(1, 1, 2, 2), "kmnist"), lambda: validation_indices("cifar100", 10),
                 lambda: write_fake("emnist", tmp_path), lambda: load(None, tmp_path)):
        with pytest.raises(ValueError) as err:
            call()
        message = single_line(err)
        assert "dataset name" in message and all(name in message for name in DATASETS)


def test_aliases(tmp_path):
    write_fake("fashion_mnist", tmp_path, n_train=20, n_test=10)
    assert (tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()
    assert torch.equal(load("fashion_mnist", tmp_path, download=False).y_train,
                       load("Fashion-MNIST", tmp_path, download=False).y_train)
    assert folder("CIFAR-10", tmp_path) == tmp_path / "cifar-10-batches-py"


def test_folders_and_expected_files(tmp_path):
    assert folder("mnist", tmp_path) == tmp_path / "MNIST" / "raw"
    assert folder("fashion-mnist", tmp_path) == tmp_path / "FashionMNIST" / "raw"
    assert folder("cifar10", tmp_path) == tmp_path / "cifar-10-batches-py"
    assert expected_files("mnist") == tuple(mnist.MNIST_FILES) == expected_files("fashion-mnist")
    assert expected_files("cifar10") == (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")


def test_default_data_dir_is_the_mnist_jobs(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert datasets.default_data_dir() == mnist.default_data_dir()
    assert folder("cifar10") == mnist.default_data_dir() / "cifar-10-batches-py"
    assert str(folder("mnist")).startswith(str(tmp_path))


@pytest.mark.parametrize("name, inner", [("mnist", ("MNIST",)), ("mnist", ("MNIST", "raw")),
                                         ("fashion-mnist", ("FashionMNIST", "raw")),
                                         ("cifar10", ("cifar-10-batches-py",))])
def test_the_dataset_folder_itself_is_accepted_as_data_dir(tmp_path, name, inner):
    write_fake(name, tmp_path, n_train=20, n_test=10)
    assert folder(name, tmp_path.joinpath(*inner)) == folder(name, tmp_path)
    assert torch.equal(load(name, tmp_path.joinpath(*inner), download=False).x_test,
                       load(name, tmp_path, download=False).x_test)


def test_missing_data_error_is_the_mnist_jobs():
    assert MissingDataError is mnist.MissingDataError and issubclass(MissingDataError, FileNotFoundError)


# ------------------------------------------------------------------------------------ missing, download

@pytest.mark.parametrize("name", DATASETS)
def test_missing_files_without_download_give_one_line(tmp_path, name):
    with pytest.raises(MissingDataError) as err:
        load(name, tmp_path / "nowhere", download=False)
    message = single_line(err)
    assert str(folder(name, tmp_path / "nowhere")) in message
    assert all(file in message for file in expected_files(name))
    assert "download=False" in message and "--data-dir" in message
    with pytest.raises(mnist.MissingDataError):  # the MNIST job's handlers catch it
        load(name, tmp_path / "nowhere", download=False)


def test_one_missing_file_is_named(tmp_path):
    where = write_fake("cifar10", tmp_path, n_train=20, n_test=10)
    (where / "data_batch_4").unlink()
    with pytest.raises(MissingDataError, match=r"missing data_batch_4; download=False"):
        load("cifar10", tmp_path, download=False)


OFFLINE = URLError(OSError(-3, "Temporary failure in name resolution"))


@pytest.mark.parametrize("name", DATASETS)
def test_failed_download_gives_one_line(tmp_path, monkeypatch, name):
    tv = pytest.importorskip("torchvision.datasets")
    calls = []

    def offline(self):
        calls.append(self.root)
        raise OFFLINE

    monkeypatch.setattr(tv.MNIST, "download", offline)  # FashionMNIST's too
    monkeypatch.setattr(tv.CIFAR10, "download", offline)
    with pytest.raises(MissingDataError) as err:
        load(name, tmp_path, download=True)
    message = single_line(err)
    assert calls == [str(tmp_path)]
    assert "download failed" in message and "Temporary failure in name resolution" in message
    assert str(folder(name, tmp_path)) in message and all(file in message for file in expected_files(name))


@pytest.mark.parametrize("name", DATASETS)
def test_a_failed_download_leaves_no_folders_behind(tmp_path, monkeypatch, name):
    # torchvision makes the dataset's folders before it fetches: a failed fetch must not leave
    # them behind (empty folders in the user's data folder), and must touch nothing else.
    tv = pytest.importorskip("torchvision.datasets")

    def offline(self):
        folder(name, Path(self.root)).mkdir(parents=True, exist_ok=True)
        raise OFFLINE

    monkeypatch.setattr(tv.MNIST, "download", offline)
    monkeypatch.setattr(tv.CIFAR10, "download", offline)
    (tmp_path / "mine.txt").write_text("the user's")
    root = tmp_path / "new" / "data"
    with pytest.raises(MissingDataError, match="download failed") as err:
        load(name, root, download=True)
    assert "allow the download" not in single_line(err)  # it was allowed, and failed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_download_without_torchvision_gives_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(MissingDataError) as err:
        load("mnist", tmp_path, download=True)
    message = single_line(err)
    assert "download failed: it needs torchvision" in message and str(tmp_path / "MNIST" / "raw") in message


@pytest.mark.parametrize("name", DATASETS)
def test_download_fetches_into_the_root_then_loads(tmp_path, monkeypatch, name):
    tv = pytest.importorskip("torchvision.datasets")

    def fetch(self):
        write_fake(name, self.root, n_train=30, n_test=10)

    monkeypatch.setattr(tv.MNIST, "download", fetch)
    monkeypatch.setattr(tv.CIFAR10, "download", fetch)
    trust_generated_cifar(monkeypatch, tv)
    data = load(name, tmp_path, download=True)
    assert data.x_train.shape == (30, *SHAPES[name]) and (folder(name, tmp_path) / expected_files(name)[0]).is_file()


# ------------------------------------------------------------------------------------ gz, corrupt files

def test_gzipped_idx_files_load_alike(tmp_path):
    plain = load("mnist", write_fake("mnist", tmp_path / "plain", n_train=50, n_test=20), download=False)
    where = write_fake("mnist", tmp_path / "gz", n_train=50, n_test=20)
    for file in expected_files("mnist"):
        (where / (file + ".gz")).write_bytes(gzip.compress((where / file).read_bytes()))
        (where / file).unlink()
    packed = load("mnist", tmp_path / "gz", download=False)
    assert all(torch.equal(a, b) for a, b in zip(plain, packed))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


def _extra_bytes(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"\0" * 3)


def _bad_magic(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[3] = 0x02
    path.write_bytes(bytes(data))


def _fewer_labels(path: Path) -> None:
    data = path.read_bytes()
    n = int.from_bytes(data[4:8], "big")
    path.write_bytes(data[:4] + (n - 1).to_bytes(4, "big") + data[8:-1])


def _label_eleven(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8] = 11
    path.write_bytes(bytes(data))


def _bad_gzip(path: Path) -> None:
    path.with_name(path.name + ".gz").write_bytes(b"\x1f\x8b not really gzip")
    path.unlink()


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not a pickle")


def _wrong_width(path: Path) -> None:
    path.write_bytes(pickle.dumps({"data": np.zeros((4, 1024), np.uint8), "labels": [0, 1, 2, 3]}))


@pytest.mark.parametrize("name, file, damage, says", [
    ("mnist", "train-images-idx3-ubyte", _truncate, "bytes of data after the header"),
    ("fashion-mnist", "t10k-images-idx3-ubyte", _extra_bytes, "bytes of data after the header"),
    ("mnist", "t10k-labels-idx1-ubyte", _bad_magic, "magic number 2050, expected 2049"),
    ("fashion-mnist", "train-labels-idx1-ubyte", _fewer_labels, "idx dimensions"),
    ("mnist", "t10k-labels-idx1-ubyte", _label_eleven, "labels above 9"),
    ("mnist", "t10k-images-idx3-ubyte", _bad_gzip, "not a readable gzip file"),
    ("cifar10", "data_batch_3", _truncate, "not a readable CIFAR-10 pickle"),
    ("cifar10", "test_batch", _garbage, "not a readable CIFAR-10 pickle"),
    ("cifar10", "data_batch_1", _wrong_width, "expected uint8 \\[N, 3072\\]"),
])
def test_a_damaged_file_is_named(tmp_path, name, file, damage, says):
    where = write_fake(name, tmp_path, n_train=40, n_test=20)
    damage(where / file)
    with pytest.raises(MissingDataError, match=says) as err:
        load(name, tmp_path, download=False)
    assert f"corrupt file {where / file}" in single_line(err)


# ------------------------------------------------------------------------------------ real MNIST

def test_real_mnist_equals_load_mnist():
    root = require_mnist()
    ours = load("mnist", root, download=False)
    theirs = mnist.load_mnist(root, download=False)
    assert ours.x_train.shape == (60000, 1, 28, 28) and ours.x_test.shape == (10000, 1, 28, 28)
    assert torch.equal(ours.x_train.flatten(1), theirs.x_train) and torch.equal(ours.y_train, theirs.y_train)
    assert torch.equal(ours.x_test.flatten(1), theirs.x_test) and torch.equal(ours.y_test, theirs.y_test)
    assert torch.equal(load("mnist", root / "MNIST", download=False).y_test, theirs.y_test)
    # BioTorch's normalization constants are MNIST's statistics.
    assert ours.x_train.mean().item() == pytest.approx(MEAN_STD["mnist"][0][0], abs=1e-4)
    assert ours.x_train.std().item() == pytest.approx(MEAN_STD["mnist"][1][0], abs=1e-4)


# ------------------------------------------------------------------------------------ preprocessing

def test_resize32_equals_torchvision_resize(tmp_path):
    resize = pytest.importorskip("torchvision.transforms.functional").resize
    x = load("mnist", write_fake("mnist", tmp_path, n_train=64, n_test=10), download=False).x_train
    x[:, :, 5:9] = 1.0  # sharp edges, where the antialiasing matters
    x[:, :, :, 20:] = 0.0
    ours = resize32(x)
    theirs = resize((x * 255).round(), [32, 32], antialias=True) / 255  # bench/biotorch_mnist.py's mnist_32
    assert ours.shape == (64, 1, 32, 32) and ours.dtype == torch.float32
    assert torch.equal(ours, theirs)
    corners = F.interpolate((x * 255).round(), size=(32, 32), mode="bilinear", align_corners=True) / 255
    assert not torch.equal(ours, corners)  # the comparison can tell resizes apart
    off_grid = torch.rand(8, 1, 28, 28)  # pixels are rounded to 0..255 first, as mnist_32 does
    assert torch.equal(resize32(off_grid), resize((off_grid * 255).round(), [32, 32], antialias=True) / 255)
    assert not torch.equal(resize32(off_grid), resize(off_grid, [32, 32], antialias=True))
    with pytest.raises(ValueError, match="resize32 needs images"):
        resize32(x[0])


def test_normalize_per_channel():
    x = torch.stack([torch.zeros(3, 2, 2), torch.ones(3, 2, 2)])
    mean, std = MEAN_STD["cifar10"]
    out = normalize(x, "cifar10")
    for c in range(3):
        assert torch.allclose(out[0, c], torch.full((2, 2), -mean[c] / std[c]))
        assert torch.allclose(out[1, c], torch.full((2, 2), (1 - mean[c]) / std[c]))
    assert MEAN_STD["mnist"] == ((0.1307,), (0.3081,)) and MEAN_STD["fashion-mnist"] == ((0.2859,), (0.3530,))
    assert torch.allclose(normalize(torch.full((4, 1, 3, 3), 0.5), "fashion-mnist"),
                          torch.full((4, 1, 3, 3), (0.5 - 0.2859) / 0.3530))
    assert normalize(x.double(), "cifar10").dtype == torch.float64
    with pytest.raises(ValueError, match="needs images"):
        normalize(torch.zeros(2, 3, 4, 4), "mnist")


def test_validation_indices_are_biotorchs():
    state = random.getstate()
    try:
        random.seed(0)
        biotorch = random.sample(range(0, 50000), 5000)  # biotorch/datasets/cifar.py, CIFAR10Benchmark
    finally:
        random.setstate(state)
    held_out = validation_indices("cifar10", 50000)
    assert held_out.dtype == torch.int64 and held_out.tolist() == biotorch
    assert validation_indices("mnist", 60000) is None and validation_indices("fashion-mnist", 60000) is None
    small = validation_indices("cifar10", 512)  # generated data: a tenth, distinct, in range
    assert len(small) == 51 and len(set(small.tolist())) == 51 and 0 <= small.min() and small.max() < 512
    assert torch.equal(validation_indices("cifar10", 512), small)


def reference_augment(x, generator, padding=4, fill=0.0):
    """Per image, from the definition (torchvision's RandomHorizontalFlip then RandomCrop(padding=4)),
    with the draws augment documents: flips, then row offsets, then column offsets."""
    n, _, h, w = x.shape
    flips = torch.rand(n, generator=generator) < 0.5
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    out = []
    for i in range(n):
        image = x[i].flip(-1) if flips[i] else x[i]
        padded = torch.zeros(x.shape[1], h + 2 * padding, w + 2 * padding, dtype=x.dtype)
        padded += torch.as_tensor(fill, dtype=x.dtype).view(-1, 1, 1)
        padded[:, padding:padding + h, padding:padding + w] = image
        out.append(padded[:, dy[i]:dy[i] + h, dx[i]:dx[i] + w])
    return torch.stack(out), flips, dy, dx


def test_augment_matches_the_per_image_definition():
    x = torch.rand(64, 3, 32, 32)
    ours = augment(x, torch.Generator().manual_seed(7))
    theirs, flips, dy, dx = reference_augment(x, torch.Generator().manual_seed(7))
    assert torch.equal(ours, theirs)
    # The batch really is augmented: both flip outcomes, shifts in both directions, images changed.
    assert 0 < flips.sum() < 64 and dy.min() < 4 < dy.max() and dx.min() < 4 < dx.max()
    assert (ours != x).flatten(1).any(1).sum() > 50
    flipped_only = ((flips) & (dy == 4) & (dx == 4)).nonzero().flatten()
    for i in flipped_only.tolist():
        assert torch.equal(ours[i], x[i].flip(-1))


def test_augment_with_torchvision_transforms():
    tvf = pytest.importorskip("torchvision.transforms.functional")
    x = torch.rand(16, 3, 32, 32)
    ours = augment(x, torch.Generator().manual_seed(1))
    _, flips, dy, dx = reference_augment(x, torch.Generator().manual_seed(1))
    for i in range(16):
        image = tvf.hflip(x[i]) if flips[i] else x[i]
        assert torch.equal(ours[i], tvf.crop(tvf.pad(image, 4, fill=0), int(dy[i]), int(dx[i]), 32, 32))


def test_augment_is_deterministic_per_generator():
    x = torch.rand(32, 3, 32, 32)
    a = augment(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, augment(x, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, augment(x, torch.Generator().manual_seed(4)))
    g = torch.Generator().manual_seed(3)
    first, second = augment(x, g), augment(x, g)  # the generator advances
    assert torch.equal(first, a) and not torch.equal(first, second)


def test_augment_pads_with_zeros_or_fill():
    x = torch.ones(64, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    _, _, dy, dx = reference_augment(x, torch.Generator().manual_seed(0))
    out = augment(x, g)
    for i in range(64):
        rows = ((torch.arange(32) + dy[i] - 4 >= 0) & (torch.arange(32) + dy[i] - 4 < 32))
        cols = ((torch.arange(32) + dx[i] - 4 >= 0) & (torch.arange(32) + dx[i] - 4 < 32))
        inside = rows[:, None] & cols[None, :]
        assert torch.equal(out[i], inside.float().expand(3, 32, 32))
    assert (out == 0).any()
    fill = normalize(torch.zeros(1, 3, 1, 1), "cifar10").flatten()  # black after normalize, as BioTorch pads
    filled = augment(x, torch.Generator().manual_seed(0), fill=fill.tolist())
    assert torch.equal(filled, torch.where(out == 1, out, fill.view(3, 1, 1)))
    assert torch.equal(filled, reference_augment(x, torch.Generator().manual_seed(0), fill=fill)[0])


def test_augment_keeps_dtype_and_checks_shape():
    x = torch.rand(4, 1, 28, 28, dtype=torch.float64)
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.float64
    assert torch.equal(out, reference_augment(x, torch.Generator().manual_seed(0))[0])
    with pytest.raises(ValueError, match="augment needs images"):
        augment(x[0], torch.Generator())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augment_on_cuda_equals_the_cpu():
    x = torch.rand(128, 3, 32, 32)
    cpu = augment(x, torch.Generator().manual_seed(5))
    gpu = augment(x.cuda(), torch.Generator().manual_seed(5))
    assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)
    assert torch.equal(resize32(x[:, :1, :28, :28].cuda()).cpu(), resize32(x[:, :1, :28, :28]))


def test_module_level_code_imports_no_torchvision_and_calls_no_cuda():
    """Statically (a subprocess importing torch would take seconds): the module's top level imports
    only the standard library, numpy and torch, and mentions no CUDA."""
    tree = ast.parse(Path(datasets.__file__).read_text())
    imported = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
        elif not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            assert "cuda" not in ast.unparse(node)
    assert imported <= {"__future__", "contextlib", "gzip", "os", "pickle", "random", "struct", "pathlib", "typing",
                        "numpy", "torch", "torch.nn.functional", "."}, imported
