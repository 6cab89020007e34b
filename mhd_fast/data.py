"""Datasets -> normalized tensors. Knows nothing of clients (see ``partition``).

Every loader returns a :class:`Dataset` with float32 inputs normalized per channel with the
training set's mean and std, and int64 labels:

- ``digits``: scikit-learn's bundled 8x8 digits (offline), ``[n, 1, 8, 8]``, a seeded
  stratified train/test split (``test_fraction`` of each class, default 0.25).
- ``fashion_mnist`` / ``mnist``: the four IDX files (gzip or raw) of the standard release,
  ``[n, 1, 28, 28]``. Fashion-MNIST defaults to the directory where Debian's
  ``dataset-fashion-mnist`` package installs them; MNIST needs ``data_dir``.
- ``cifar10`` / ``cifar100``: the standard python pickle batches, ``[n, 3, 32, 32]``, from
  ``data_dir`` or its ``cifar-10-batches-py`` / ``cifar-100-python`` subfolder. The pickles are
  read with an unpickler that only builds numpy arrays, so a foreign file cannot run code.
- ``synthetic``: a seeded Gaussian mixture with any number of classes, ``[n, dim]``.

Nothing is ever downloaded: a missing file is a ValueError naming ``data_dir``.
"""
from __future__ import annotations

import gzip
import math
import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

DATASETS = ("digits", "fashion_mnist", "mnist", "cifar10", "cifar100", "synthetic")

# Debian's dataset-fashion-mnist package installs the IDX files here.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

# Options of each loader (beyond data_dir / seed / num_classes), with their defaults.
_OPTIONS = {
    "digits": {"test_fraction": 0.25},
    "synthetic": {"dim": 32, "samples_per_class": 200, "test_samples_per_class": 100,
                  "separation": 3.0},
}


@dataclass
class Dataset:
    """A labelled train/test pair.

    x_train [n, *input_shape] float32 (normalized), y_train [n] int64 in [0, num_classes);
    x_test / y_test likewise. ``input_shape`` is ``(C, H, W)`` for images, ``(dim,)`` for the
    synthetic mixture.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def load_dataset(name: str, *, data_dir: str | None = None, seed: int = 0,
                 num_classes: int = 10, **options) -> Dataset:
    """Load dataset ``name`` (one of DATASETS) as normalized tensors.

    ``seed`` drives the digits train/test split and the synthetic draw (the file datasets have
    a fixed split). ``num_classes`` is used by ``synthetic`` only; the other datasets have
    their own. ``options``: ``test_fraction`` for digits; ``dim``, ``samples_per_class``,
    ``test_samples_per_class``, ``separation`` for synthetic.
    """
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    allowed = _OPTIONS.get(name, {})
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"dataset {name!r} takes the options {sorted(allowed) or 'none'}, "
                         f"got unknown {unknown}")
    opts = {**allowed, **options}
    if name == "digits":
        x_tr, y_tr, x_te, y_te, v = _digits(seed, **opts)
    elif name == "synthetic":
        x_tr, y_tr, x_te, y_te, v = _synthetic(seed, num_classes, **opts)
    elif name in ("fashion_mnist", "mnist"):
        x_tr, y_tr, x_te, y_te, v = _idx_dataset(name, data_dir)
    else:
        x_tr, y_tr, x_te, y_te, v = _cifar(name, data_dir)
    x_tr, x_te = _normalize(x_tr, x_te)
    return Dataset(name, torch.from_numpy(x_tr), torch.from_numpy(y_tr.astype(np.int64)),
                   torch.from_numpy(x_te), torch.from_numpy(y_te.astype(np.int64)), v)


def split_public(num_train: int, public_fraction: float, *, seed: int) -> tuple[Tensor, Tensor]:
    """Split training indices into (private_idx, public_idx), both sorted int64.

    ``round(public_fraction * num_train)`` random samples (seeded) form the public unlabeled
    set; their labels are never used to train. ``public_fraction`` in [0, 1); at least one
    sample stays private.
    """
    if not isinstance(num_train, int) or num_train < 1:
        raise ValueError(f"num_train must be a positive int, got {num_train!r}")
    if not 0.0 <= public_fraction < 1.0:
        raise ValueError(f"public_fraction must be in [0, 1), got {public_fraction!r}")
    num_public = min(round(public_fraction * num_train), num_train - 1)
    perm = torch.randperm(num_train, generator=torch.Generator().manual_seed(seed))
    return perm[num_public:].sort().values, perm[:num_public].sort().values


# ---- loaders: each returns numpy (x_train, y_train, x_test, y_test, num_classes) --------------

def _digits(seed: int, test_fraction: float):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    bunch = load_digits()
    x = bunch.images.astype(np.float32)[:, None] / 16.0  # pixel values are 0..16
    y = bunch.target
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, stratify=y,
                                              random_state=seed)
    return x_tr, y_tr, x_te, y_te, 10


def synthetic_bytes(num_classes: int) -> int:
    """The bytes the synthetic mixture of ``num_classes`` classes (default options) occupies
    while it is drawn (fp64 draws): known before drawing it."""
    o = _OPTIONS["synthetic"]
    return num_classes * (o["samples_per_class"] + o["test_samples_per_class"]) * o["dim"] * 8


def _synthetic(seed: int, num_classes: int, dim: int, samples_per_class: int,
               test_samples_per_class: int, separation: float):
    """Class centres are random directions scaled to norm separation/√2, so two centres lie
    about ``separation`` apart (exactly so in high dimension); samples add N(0, I) noise."""
    for opt, val, lo in (("num_classes", num_classes, 2), ("dim", dim, 1),
                         ("samples_per_class", samples_per_class, 1),
                         ("test_samples_per_class", test_samples_per_class, 1)):
        if not isinstance(val, (int, np.integer)) or val < lo:
            raise ValueError(f"{opt} must be an int >= {lo} for the synthetic dataset, got {val!r}")
    if not (separation >= 0.0 and math.isfinite(separation)):
        raise ValueError(f"separation must be a finite number >= 0, got {separation!r}")
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_classes, dim))
    centres *= separation / math.sqrt(2.0) / np.linalg.norm(centres, axis=1, keepdims=True)

    def draw(per_class: int):
        y = np.repeat(np.arange(num_classes), per_class)
        x = centres[y] + rng.standard_normal((y.size, dim))
        return x.astype(np.float32), y

    x_tr, y_tr = draw(samples_per_class)
    x_te, y_te = draw(test_samples_per_class)
    return x_tr, y_tr, x_te, y_te, num_classes


# File names of the IDX release; MNIST mirrors also spell them with a dot before "idx".
_IDX_FILES = {
    "x_train": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "y_train": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "x_test": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "y_test": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}
# Subfolders where other tools put the same files (torchvision: NAME/raw).
_IDX_SUBDIRS = {"fashion_mnist": ("", "fashion_mnist", "fashion-mnist", "FashionMNIST/raw"),
                "mnist": ("", "mnist", "MNIST/raw")}


def _idx_dataset(name: str, data_dir: str | None):
    if data_dir is None and name == "fashion_mnist":
        data_dir = FASHION_MNIST_DIR
    if data_dir is None:
        raise ValueError(f"dataset {name!r} needs data_dir: a directory holding the four IDX "
                         f"files ({', '.join(v[0] for v in _IDX_FILES.values())}, gz or raw)")
    found = {}
    for sub in _IDX_SUBDIRS[name]:
        d = os.path.join(data_dir, sub)
        paths = {key: _first_file(d, names) for key, names in _IDX_FILES.items()}
        if all(paths.values()):
            found = paths
            break
    if not found:
        missing = ", ".join(v[0] for v in _IDX_FILES.values())
        raise ValueError(f"data_dir {data_dir!r} does not hold the {name} IDX files "
                         f"(expected {missing}, each raw or .gz, in it or in one of "
                         f"{[s for s in _IDX_SUBDIRS[name] if s]})")
    arrays = {key: read_idx(path) for key, path in found.items()}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"data_dir {data_dir!r}: the {split} IDX files hold images "
                             f"{x.shape} and labels {y.shape}; expected [n, H, W] and [n]")
        if y.size and (y.min() < 0 or y.max() > 9):
            raise ValueError(f"data_dir {data_dir!r}: {split} labels must be in [0, 9], "
                             f"got [{y.min()}, {y.max()}]")
    return (arrays["x_train"][:, None].astype(np.float32) / 255.0, arrays["y_train"],
            arrays["x_test"][:, None].astype(np.float32) / 255.0, arrays["y_test"], 10)


def _first_file(directory: str, names: tuple[str, ...]) -> str | None:
    for n in names:
        for path in (os.path.join(directory, n), os.path.join(directory, n + ".gz")):
            if os.path.isfile(path):
                return path
    return None


# IDX type codes -> numpy dtypes (big-endian, as the format stores them).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Read one IDX file (gzip-compressed or raw, detected from its first bytes).

    Format: two zero bytes, a type code, the number of dimensions d, d big-endian uint32
    sizes, then the data in row-major order.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ValueError(f"data_dir: cannot read {path!r} ({e})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ValueError(f"data_dir: {path!r} is not a readable gzip file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"data_dir: {path!r} is not an IDX file (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"data_dir: {path!r} is truncated in its IDX header")
    shape = tuple(int(s) for s in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"data_dir: {path!r} holds {len(raw)} bytes, its IDX header "
                         f"{shape} implies {expected}")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


_CIFAR = {
    "cifar10": {"subdir": "cifar-10-batches-py", "classes": 10, "label_key": "labels",
                "train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
    "cifar100": {"subdir": "cifar-100-python", "classes": 100, "label_key": "fine_labels",
                 "train": ("train",), "test": ("test",)},
}


def _cifar(name: str, data_dir: str | None):
    spec = _CIFAR[name]
    files = spec["train"] + spec["test"]
    if data_dir is None:
        raise ValueError(f"dataset {name!r} needs data_dir: a directory holding the python "
                         f"pickle batches {list(files)} (or its {spec['subdir']} subfolder)")
    for d in (data_dir, os.path.join(data_dir, spec["subdir"])):
        if all(os.path.isfile(os.path.join(d, f)) for f in files):
            break
    else:
        raise ValueError(f"data_dir {data_dir!r} does not hold the {name} pickle batches "
                         f"{list(files)} (in it or in {spec['subdir']}/)")

    def read(batch_names):
        xs, ys = [], []
        for f in batch_names:
            x, y = _read_cifar_batch(os.path.join(d, f), spec["label_key"], spec["classes"])
            xs.append(x)
            ys.append(y)
        return np.concatenate(xs), np.concatenate(ys)

    x_tr, y_tr = read(spec["train"])
    x_te, y_te = read(spec["test"])
    return x_tr, y_tr, x_te, y_te, spec["classes"]


class _ArrayUnpickler(pickle.Unpickler):
    """Builds only what the CIFAR batches hold (dicts, lists, bytes, numpy arrays)."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"),
                ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
                ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(path: str, label_key: str, num_classes: int):
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except OSError as e:
        raise ValueError(f"data_dir: cannot read {path!r} ({e})") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError) as e:
        raise ValueError(f"data_dir: {path!r} is not a CIFAR python pickle batch ({e})") from None
    # Python-2 pickles have bytes keys; ones written from Python 3 may have str keys.
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in dict(batch).items()}
    if "data" not in batch or label_key not in batch:
        raise ValueError(f"data_dir: {path!r} lacks the keys 'data' and {label_key!r}, "
                         f"has {sorted(batch)}")
    x = np.asarray(batch["data"], dtype=np.uint8)
    y = np.asarray(batch[label_key], dtype=np.int64)
    if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(x) != len(y):
        raise ValueError(f"data_dir: {path!r} holds data {x.shape} and labels {y.shape}; "
                         f"expected [n, 3072] and [n]")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"data_dir: {path!r} labels must be in [0, {num_classes - 1}], "
                         f"got [{y.min()}, {y.max()}]")
    return x.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0, y


def _normalize(x_train: np.ndarray, x_test: np.ndarray):
    """Standardize per channel (axis 1) with the training set's statistics."""
    axes = (0,) + tuple(range(2, x_train.ndim))
    mean = x_train.mean(axis=axes, keepdims=True, dtype=np.float64)
    std = x_train.std(axis=axes, keepdims=True, dtype=np.float64)
    std = np.where(std > 0, std, 1.0)  # a constant channel stays centred instead of dividing by 0
    return (((x_train - mean) / std).astype(np.float32),
            ((x_test - mean) / std).astype(np.float32))
