"""Datasets: the digits default, IDX and CIFAR files made here in tmp_path, the synthetic
mixture, the public split, and the errors a user meets."""
from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from mhd_fast.data import DATASETS, FASHION_MNIST_DIR, load_dataset, read_idx, split_public


def _check_dataset(d, num_classes, input_shape):
    assert d.num_classes == num_classes
    assert d.input_shape == input_shape
    assert d.x_train.dtype == d.x_test.dtype == torch.float32
    assert d.y_train.dtype == d.y_test.dtype == torch.int64
    assert d.x_train.shape[0] == d.y_train.shape[0] and d.x_test.shape[0] == d.y_test.shape[0]
    assert d.x_test.shape[1:] == d.x_train.shape[1:]
    assert torch.isfinite(d.x_train).all() and torch.isfinite(d.x_test).all()
    assert 0 <= int(d.y_train.min()) and int(d.y_train.max()) < num_classes
    # standardized per channel with the training statistics
    axes = [0] + list(range(2, d.x_train.dim()))
    assert torch.allclose(d.x_train.mean(dim=axes), torch.zeros(d.x_train.shape[1]), atol=1e-4)
    assert torch.allclose(d.x_train.std(dim=axes, correction=0), torch.ones(d.x_train.shape[1]), atol=1e-2)


# ---- digits -------------------------------------------------------------------------------

def test_digits_default_split_is_stratified_and_seeded():
    d = load_dataset("digits")
    _check_dataset(d, 10, (1, 8, 8))
    assert len(d.y_train) + len(d.y_test) == 1797
    assert len(d.y_test) == pytest.approx(0.25 * 1797, abs=1)
    # stratified: every class keeps ~25 % of its samples in test
    frac = d.y_test.bincount(minlength=10) / (d.y_test.bincount(minlength=10)
                                              + d.y_train.bincount(minlength=10))
    assert torch.allclose(frac, torch.full((10,), 0.25, dtype=frac.dtype), atol=0.02)
    same = load_dataset("digits", seed=0)
    other = load_dataset("digits", seed=1)
    assert torch.equal(d.x_train, same.x_train) and torch.equal(d.y_test, same.y_test)
    assert not torch.equal(d.y_train, other.y_train)
    # the split is a partition of the 1797 images: no image in both
    train = {tuple(r) for r in d.x_train.flatten(1).tolist()}
    assert sum(tuple(r) in train for r in d.x_test.flatten(1).tolist()) < 5  # a few duplicate images exist


def test_digits_test_fraction_option():
    d = load_dataset("digits", test_fraction=0.5)
    assert len(d.y_test) == pytest.approx(0.5 * 1797, abs=1)
    with pytest.raises(ValueError, match="test_fraction"):
        load_dataset("digits", test_fraction=1.0)


# ---- synthetic ----------------------------------------------------------------------------

@pytest.mark.parametrize("num_classes", [2, 10, 37])
def test_synthetic_any_number_of_classes(num_classes):
    d = load_dataset("synthetic", num_classes=num_classes, dim=8, samples_per_class=20,
                     test_samples_per_class=5, seed=3)
    _check_dataset(d, num_classes, (8,))
    assert torch.equal(d.y_train.bincount(), torch.full((num_classes,), 20))
    assert torch.equal(d.y_test.bincount(), torch.full((num_classes,), 5))
    again = load_dataset("synthetic", num_classes=num_classes, dim=8, samples_per_class=20,
                         test_samples_per_class=5, seed=3)
    assert torch.equal(d.x_train, again.x_train)
    other = load_dataset("synthetic", num_classes=num_classes, dim=8, samples_per_class=20,
                         test_samples_per_class=5, seed=4)
    assert not torch.equal(d.x_train, other.x_train)


def _nearest_centroid_accuracy(d):
    centroids = torch.stack([d.x_train[d.y_train == v].mean(0) for v in range(d.num_classes)])
    pred = torch.cdist(d.x_test, centroids).argmin(1)
    return (pred == d.y_test).float().mean().item()


def test_synthetic_separation_controls_difficulty():
    kw = dict(num_classes=5, dim=16, samples_per_class=100, test_samples_per_class=100, seed=0)
    easy = _nearest_centroid_accuracy(load_dataset("synthetic", separation=12.0, **kw))
    hard = _nearest_centroid_accuracy(load_dataset("synthetic", separation=0.0, **kw))
    assert easy > 0.99
    assert hard < 0.4  # chance is 0.2: no signal but the noise of the centroids


@pytest.mark.parametrize("options, name", [({"dim": 0}, "dim"), ({"samples_per_class": 0}, "samples_per_class"),
                                           ({"separation": -1.0}, "separation"),
                                           ({"num_classes": 1}, "num_classes"),
                                           ({"colour": 3}, "colour")])
def test_synthetic_bad_options(options, name):
    with pytest.raises(ValueError, match=name):
        load_dataset("synthetic", **options)


# ---- IDX (Fashion-MNIST / MNIST) ----------------------------------------------------------

def _idx_bytes(array: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def _write_idx_set(directory, *, compress: bool, n_train=30, n_test=10, dotted=False, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for name, arr in arrays.items():
        if dotted:
            name = name.replace("-idx", ".idx")
        data = _idx_bytes(arr)
        path = os.path.join(directory, name + (".gz" if compress else ""))
        with open(path, "wb") as f:
            f.write(gzip.compress(data) if compress else data)
    return arrays


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
@pytest.mark.parametrize("name", ["fashion_mnist", "mnist"])
def test_idx_files_gz_and_raw(tmp_path, compress, name):
    arrays = _write_idx_set(tmp_path, compress=compress)
    d = load_dataset(name, data_dir=str(tmp_path))
    _check_dataset(d, 10, (1, 28, 28))
    assert d.name == name
    assert torch.equal(d.y_train, torch.from_numpy(arrays["train-labels-idx1-ubyte"]).long())
    assert torch.equal(d.y_test, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long())
    # normalization is monotone per pixel: the order of raw pixel values is kept
    raw = torch.from_numpy(arrays["t10k-images-idx3-ubyte"].astype(np.float32))
    flat = d.x_test.flatten()
    order = raw.flatten().argsort()
    assert (flat[order].diff() >= -1e-6).all()


def test_idx_torchvision_layout_and_dotted_names(tmp_path):
    _write_idx_set(tmp_path / "MNIST" / "raw", compress=False, dotted=True)
    d = load_dataset("mnist", data_dir=str(tmp_path))
    assert len(d.y_train) == 30 and len(d.y_test) == 10


def test_read_idx_dtypes_roundtrip(tmp_path):
    for arr in (np.arange(24, dtype=">i4").reshape(2, 3, 4),
                np.linspace(0, 1, 6, dtype=">f4").reshape(3, 2)):
        path = tmp_path / "x.idx"
        path.write_bytes(_idx_bytes(arr))
        out = read_idx(str(path))
        assert out.shape == arr.shape and np.array_equal(out, arr)
        assert out.dtype.isnative


def test_idx_errors(tmp_path):
    with pytest.raises(ValueError, match="data_dir"):
        load_dataset("mnist")  # no default directory for MNIST
    with pytest.raises(ValueError, match="data_dir"):
        load_dataset("fashion_mnist", data_dir=str(tmp_path / "nowhere"))
    _write_idx_set(tmp_path, compress=False)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte")
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte"):
        load_dataset("fashion_mnist", data_dir=str(tmp_path))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"not an idx file")
    with pytest.raises(ValueError, match="not an IDX file"):
        load_dataset("fashion_mnist", data_dir=str(tmp_path))
    # a truncated file: header says 10 labels, 9 are there
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(10, np.uint8))[:-1])
    with pytest.raises(ValueError, match="implies"):
        load_dataset("fashion_mnist", data_dir=str(tmp_path))
    # label count that does not match the image count
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(9, np.uint8)))
    with pytest.raises(ValueError, match="test IDX files"):
        load_dataset("fashion_mnist", data_dir=str(tmp_path))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x1f\x8b broken gzip")
    with pytest.raises(ValueError, match="gzip"):
        load_dataset("fashion_mnist", data_dir=str(tmp_path))


@pytest.mark.skipif(not os.path.isfile(os.path.join(FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz")),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_default_location():
    d = load_dataset("fashion_mnist")
    _check_dataset(d, 10, (1, 28, 28))
    assert len(d.y_train) == 60000 and len(d.y_test) == 10000
    assert torch.equal(d.y_test.bincount(), torch.full((10,), 1000))


# ---- CIFAR --------------------------------------------------------------------------------

def _write_cifar(directory, name, *, per_batch=8, str_keys=False, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    if name == "cifar10":
        files, label_key, classes = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "labels", 10
    else:
        files, label_key, classes = ["train", "test"], "fine_labels", 100
    labels = {}
    for f in files:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = rng.integers(0, classes, per_batch).tolist()
        labels[f] = y
        batch = {"data": data, label_key: y, "batch_label": "made in a test"}
        if not str_keys:  # as the release's Python-2 pickles have them
            batch = {k.encode(): v for k, v in batch.items()}
        with open(os.path.join(directory, f), "wb") as fh:
            pickle.dump(batch, fh, protocol=2 if not str_keys else pickle.HIGHEST_PROTOCOL)
    return labels


@pytest.mark.parametrize("name, classes, subdir", [("cifar10", 10, "cifar-10-batches-py"),
                                                    ("cifar100", 100, "cifar-100-python")])
@pytest.mark.parametrize("in_subdir", [False, True])
def test_cifar_pickles(tmp_path, name, classes, subdir, in_subdir):
    labels = _write_cifar(tmp_path / subdir if in_subdir else tmp_path, name, str_keys=in_subdir)
    d = load_dataset(name, data_dir=str(tmp_path))
    _check_dataset(d, classes, (3, 32, 32))
    train_files = [f for f in labels if "test" not in f]
    expected = sum((labels[f] for f in train_files), [])
    assert d.y_train.tolist() == expected
    assert d.y_test.tolist() == labels["test_batch" if name == "cifar10" else "test"]


def test_cifar_pixel_layout(tmp_path):
    """Rows are channel-major 3x32x32 (R plane, then G, then B), as the release documents."""
    _write_cifar(tmp_path, "cifar10", per_batch=1)
    batch = {k.encode(): v for k, v in {"data": np.zeros((1, 3072), np.uint8), "labels": [3]}.items()}
    batch[b"data"][0, 1024:2048] = 255  # the green plane only
    for f in ["test_batch"]:
        with open(tmp_path / f, "wb") as fh:
            pickle.dump(batch, fh, protocol=2)
    d = load_dataset("cifar10", data_dir=str(tmp_path))
    x = d.x_test[0]
    assert (x[1] > x[0].max()).all() and (x[1] > x[2].max()).all()


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_errors_and_refuses_code(tmp_path):
    with pytest.raises(ValueError, match="data_dir"):
        load_dataset("cifar10")
    with pytest.raises(ValueError, match="data_dir"):
        load_dataset("cifar100", data_dir=str(tmp_path))
    _write_cifar(tmp_path, "cifar10")
    with open(tmp_path / "test_batch", "wb") as fh:
        pickle.dump({b"data": _Evil(), b"labels": [0]}, fh)
    with pytest.raises(ValueError, match="refusing"):
        load_dataset("cifar10", data_dir=str(tmp_path))
    with open(tmp_path / "test_batch", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, fh)
    with pytest.raises(ValueError, match="3072"):
        load_dataset("cifar10", data_dir=str(tmp_path))
    with open(tmp_path / "test_batch", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, fh)
    with pytest.raises(ValueError, match="labels must be in"):
        load_dataset("cifar10", data_dir=str(tmp_path))
    with open(tmp_path / "test_batch", "wb") as fh:
        pickle.dump({b"pixels": np.zeros((2, 3072), np.uint8)}, fh)
    with pytest.raises(ValueError, match="lacks the keys"):
        load_dataset("cifar10", data_dir=str(tmp_path))


# ---- names and options --------------------------------------------------------------------

def test_unknown_dataset_and_options():
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="dim"):
        load_dataset("digits", dim=3)  # a synthetic option given to digits
    assert set(DATASETS) == {"digits", "fashion_mnist", "mnist", "cifar10", "cifar100", "synthetic"}


# ---- public split -------------------------------------------------------------------------

def test_split_public_partitions_the_training_set():
    private, public = split_public(1000, 0.2, seed=0)
    assert private.dtype == public.dtype == torch.int64
    assert len(public) == 200 and len(private) == 800
    assert torch.equal(torch.cat([private, public]).sort().values, torch.arange(1000))
    assert torch.equal(private, private.sort().values)
    again = split_public(1000, 0.2, seed=0)
    assert torch.equal(again[1], public)
    assert not torch.equal(split_public(1000, 0.2, seed=1)[1], public)
    private, public = split_public(5, 0.0, seed=0)
    assert len(public) == 0 and len(private) == 5
    private, public = split_public(3, 0.99, seed=0)
    assert len(private) == 1  # at least one sample stays private


@pytest.mark.parametrize("args, name", [((0, 0.1), "num_train"), ((10, 1.0), "public_fraction"),
                                        ((10, -0.1), "public_fraction")])
def test_split_public_errors(args, name):
    with pytest.raises(ValueError, match=name):
        split_public(*args, seed=0)
