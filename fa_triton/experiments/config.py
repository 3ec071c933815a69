"""What one ``fa-triton train`` run is: :class:`RunConfig`, read from flags and TOML files and
written beside the results.

A config has two parts. The *experiment* (model, rule, data, optimizer, schedule, seeds) decides
the numbers: a checkpoint resumes only the experiment it was written by. The *machine* part
(device, backend, processes, threads, where the data and results live) decides where and how
fast it runs.

A TOML file holds any of the fields, named as the flags (``batch_size`` or ``batch-size``)::

    model = "lenet"
    method = "usf"
    dataset = "mnist"
    optimizer = "sgd"
    lr = 0.01
    momentum = 0.9
    weight_decay = 1e-3
    milestones = [50, 75]
    epochs = 100
    seeds = [0, 1, 2]
    init = "xavier"
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..ops.backends import BACKENDS
from ..rules.methods import INITS, METHODS

MODELS = ("mlp", "lenet", "resnet20", "resnet56")
"""Built-in models; ``package.module:factory`` names any other."""
RULES = METHODS + ("dfa",)
DATASETS = ("mnist", "fashion-mnist", "cifar10")
OPTIMIZERS = ("adam", "sgd")
VALIDATION = ("auto", "none")
"""``validation``: "auto" is BioTorch's convention (CIFAR-10: 5,000 training images held out;
MNIST and Fashion-MNIST: none, the test set is the only held-out set); "none"; or an int N, the
last N training images held out."""

_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass(frozen=True)
class RunConfig:
    """One experiment and where it runs. The defaults are the founding tutorial's job."""

    # The experiment: these decide the numbers.
    model: str = "mlp"
    method: str = "fa"
    dataset: str = "mnist"
    optimizer: str = "adam"
    lr: float = 3e-4
    momentum: float = 0.0
    weight_decay: float = 0.0
    milestones: tuple[int, ...] = ()
    """Epochs after which the learning rate is multiplied by ``gamma``."""
    gamma: float = 0.1
    epochs: int = 10
    batch_size: int = 64
    seeds: tuple[int, ...] = (0,)
    init: str = "kaiming"
    validation: str | int = "auto"
    augment: bool | None = None
    """Random flips and crops of the training images (BioTorch's CIFAR-10 ones); None: on for
    cifar10 with an image model, off otherwise."""
    train_samples: int | None = None
    test_samples: int | None = None
    # The machine: where and how fast.
    device: str = "auto"
    backend: str = "auto"
    nproc: int = 1
    threads: int | None = None
    data_dir: str | None = None
    download: bool = True
    cuda_graph: bool | None = None
    together: bool = False
    """Train the seeds in one pass (``torch.func``: the models stacked, one vmapped forward and
    backward per step, each seed its own optimizer, data order and metrics): models without
    batch norm, dropout or other buffers a forward updates (the mlp, lenet), one process, every
    method but brsf, wm and dfa; no CUDA graph."""
    out: str = "runs/mnist"
    progress: bool = True

    EXPERIMENT = ("model", "method", "dataset", "optimizer", "lr", "momentum", "weight_decay", "milestones", "gamma",
                  "batch_size", "seeds", "init", "validation", "augment", "train_samples", "test_samples")
    """The fields a resumed run must share with its checkpoint (``epochs`` may grow)."""

    def __post_init__(self) -> None:
        check(self)

    def experiment(self) -> dict:
        """The fields that decide the numbers, as plain values (what a checkpoint records)."""
        return {name: _plain(getattr(self, name)) for name in self.EXPERIMENT}

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    @property
    def uses_augmentation(self) -> bool:
        """Flips and crops: ``augment``, or by default for CIFAR-10 images (not the mlp's flat pixels)."""
        return self.dataset == "cifar10" and self.model != "mlp" if self.augment is None else self.augment

    def to_toml(self) -> str:
        """The resolved config as TOML, readable by :func:`load_toml`. A setting left to its
        automatic default (None: TOML has no null) is written as a comment saying so."""
        lines = []
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if value is not None:
                lines.append(f"{item.name} = {_toml_value(value)}")
            elif item.name == "augment":
                lines.append(f"# augment: automatic, here {_toml_value(self.uses_augmentation)}")
            else:
                lines.append(f"# {item.name}: not set (its default)")
        return "\n".join(lines) + "\n"


FIELDS = tuple(item.name for item in dataclasses.fields(RunConfig))


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(name: str, value, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not _is_int(value) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _number(name: str, value, *, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {'positive' if positive else 'non-negative'}, got {value!r}")


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def check(config: RunConfig) -> None:
    """Raise ValueError naming the first bad field (run when a RunConfig is made)."""
    if not (config.model in MODELS or (isinstance(config.model, str) and _FACTORY.match(config.model))):
        raise ValueError(f"model must be one of {', '.join(MODELS)} or package.module:factory; got {config.model!r}")
    _choice("method", config.method, RULES)
    _choice("dataset", config.dataset, DATASETS)
    _choice("optimizer", config.optimizer, OPTIMIZERS)
    _choice("init", config.init, INITS)
    _choice("backend", config.backend, BACKENDS)
    _number("lr", config.lr, positive=True)
    _number("momentum", config.momentum)
    _number("weight_decay", config.weight_decay)
    _number("gamma", config.gamma, positive=True)
    if config.momentum and config.optimizer != "sgd":
        raise ValueError(f"momentum={config.momentum} applies to optimizer 'sgd' only (adam has its betas), "
                         f"got optimizer {config.optimizer!r}")
    _positive_int("epochs", config.epochs)
    _positive_int("batch_size", config.batch_size)
    _positive_int("nproc", config.nproc)
    if config.together is True and config.nproc > 1:
        raise ValueError(f"together trains the seeds in one process, got nproc={config.nproc}: pass one of them")
    _positive_int("threads", config.threads, optional=True)
    _positive_int("train_samples", config.train_samples, optional=True)
    _positive_int("test_samples", config.test_samples, optional=True)
    if not isinstance(config.milestones, tuple) or not all(_is_int(m) and m > 0 for m in config.milestones) \
            or list(config.milestones) != sorted(set(config.milestones)):
        raise ValueError(f"milestones must be increasing positive epochs, got {config.milestones!r}")
    if not isinstance(config.seeds, tuple) or not config.seeds or not all(_is_int(s) and s >= 0 for s in config.seeds) \
            or len(set(config.seeds)) != len(config.seeds):
        raise ValueError(f"seeds must be distinct non-negative integers, got {config.seeds!r}")
    if not (config.validation in VALIDATION or (_is_int(config.validation) and config.validation > 0)):
        raise ValueError(f"validation must be 'auto', 'none' or a positive number of training images, "
                         f"got {config.validation!r}")
    for name in ("download", "progress", "together"):
        if not isinstance(getattr(config, name), bool):
            raise ValueError(f"{name} must be true or false, got {getattr(config, name)!r}")
    for name in ("augment", "cuda_graph"):
        if getattr(config, name) is not None and not isinstance(getattr(config, name), bool):
            raise ValueError(f"{name} must be true, false or unset, got {getattr(config, name)!r}")
    if not isinstance(config.device, str) or not isinstance(config.out, str) or not config.out:
        raise ValueError(f"device and out must be strings, got device={config.device!r}, out={config.out!r}")
    if config.augment and config.model == "mlp":
        raise ValueError("augment=True flips and crops images; the mlp takes flat pixels (use an image model)")
    if config.train_samples is not None and config.train_samples < config.batch_size:
        raise ValueError(f"train_samples={config.train_samples} holds no complete batch of "
                         f"batch_size={config.batch_size}")
    if config.nproc > 1 and config.batch_size % config.nproc:
        raise ValueError(f"batch_size={config.batch_size} must be divisible by nproc={config.nproc}")


def parse_list(name: str, text: str) -> tuple[int, ...]:
    """ "0,1,2" -> (0, 1, 2); "" -> (); ValueError naming ``name`` otherwise."""
    try:
        return tuple(int(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise ValueError(f"{name} must be comma-separated integers, got {text!r}") from None


def _coerce(name: str, value):
    """A TOML value in the field's type (lists to tuples); ValueError naming the field otherwise."""
    if name in ("milestones", "seeds"):
        if isinstance(value, str):
            return parse_list(name, value)
        if _is_int(value):
            return (value,)
        if isinstance(value, list):
            return tuple(value)
    if name in ("lr", "momentum", "weight_decay", "gamma") and _is_int(value):
        return float(value)
    return value


def from_mapping(values: dict, base: RunConfig | None = None, *, source: str = "config") -> RunConfig:
    """``base`` (default: the defaults) with ``values`` applied; unknown keys are an error naming them."""
    changes, keys = {}, {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name == "seed":  # one seed, as `fa-triton train --seed`
            name, value = "seeds", [value]
        if name not in FIELDS:
            raise ValueError(f"{source}: unknown setting {key!r}; the settings are {', '.join(FIELDS)}")
        if name in keys:
            raise ValueError(f"{source}: {keys[name]!r} and {key!r} both set {name}: keep one")
        keys[name] = key
        changes[name] = _coerce(name, value)
    try:
        return dataclasses.replace(base or RunConfig(), **changes)
    except ValueError as err:
        if source == "the flags" or str(err).startswith(source):
            raise
        raise ValueError(f"{source}: {err}") from None


def load_toml(path, base: RunConfig | None = None) -> RunConfig:
    """The config in the TOML file at ``path`` over ``base``; one-line errors naming the file."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise RuntimeError(f"reading {path} needs Python 3.11 or the tomli package (pip install tomli)") from None
    path = Path(path)
    try:
        values = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"config file {path} is a folder, not a TOML file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"config file {path} cannot be read: {getattr(err, 'strerror', None) or err}") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path} is not valid TOML: {err}") from None
    return from_mapping(values, base, source=str(path))


__all__ = ["DATASETS", "MODELS", "OPTIMIZERS", "RULES", "RunConfig", "from_mapping", "load_toml",
           "parse_list"]
