"""MNIST: the IDX reader on files the tests write, downloads from a local server,
the real test set when it is here, and ``fastbp mnist``."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from fastbp.data import mnist

from .helpers import run_cli

REAL_DATA = Path(
    os.environ.get("FASTBP_MNIST_DIR", Path(__file__).parents[2] / "shared/data/mnist")
)
needs_real_mnist = pytest.mark.skipif(
    not (REAL_DATA / "t10k-images-idx3-ubyte.gz").exists(),
    reason=f"real MNIST test set not found in {REAL_DATA} (set FASTBP_MNIST_DIR)",
)


def idx_bytes(array: np.ndarray, magic: int, shape=None) -> bytes:
    shape = array.shape if shape is None else shape
    return struct.pack(f">{1 + len(shape)}I", magic, *shape) + array.astype(np.uint8).tobytes()


def write_split(folder: Path, images: np.ndarray, labels: np.ndarray, split="test", compress=True):
    names = mnist.FILES[split]
    blobs = (idx_bytes(images, mnist.IMAGES_MAGIC), idx_bytes(labels, mnist.LABELS_MAGIC))
    for name, blob in zip(names, blobs, strict=True):
        if compress:
            (folder / name).write_bytes(gzip.compress(blob))
        else:
            (folder / name.removesuffix(".gz")).write_bytes(blob)


def _small(count=5):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (count, 28, 28)), rng.integers(0, 10, count)


@pytest.mark.parametrize("compress", [True, False])
def test_reader_round_trips_gzip_and_raw(tmp_path, monkeypatch, compress):
    images, labels = _small()
    write_split(tmp_path, images, labels, compress=compress)
    if compress:  # the md5 of the files this test wrote
        for name in mnist.FILES["test"]:
            digest = hashlib.md5((tmp_path / name).read_bytes()).hexdigest()
            monkeypatch.setitem(mnist.MD5, name, digest)
    x, y = mnist.load_mnist(tmp_path, "test", download=False)
    assert x.dtype.is_floating_point is False and tuple(x.shape) == (5, 28, 28)
    np.testing.assert_array_equal(x.numpy(), images)
    np.testing.assert_array_equal(y.numpy(), labels)


@pytest.mark.parametrize(
    "blob, words",
    [
        (b"\x00\x00", "truncated header"),
        (struct.pack(">4I", 2049, 1, 28, 28) + bytes(784), "magic number 2049, expected 2051"),
        (struct.pack(">4I", 2051, 2, 28, 28) + bytes(784), "data truncated"),
        (struct.pack(">4I", 2051, 1, 28, 28) + bytes(785), "longer than its header says"),
        (struct.pack(">4I", 2051, 10**9, 28, 28) + bytes(784), "data truncated"),
        (struct.pack(">4I", 2051, 2**32 - 1, 2**32 - 1, 2**32 - 1), "data truncated"),
    ],
)
@pytest.mark.parametrize("compress", [True, False])
def test_corrupt_files_get_a_named_error(tmp_path, blob, words, compress):
    path = tmp_path / "images"
    path.write_bytes(gzip.compress(blob) if compress else blob)
    with pytest.raises(mnist.IDXError, match=words) as raised:
        mnist.read_idx(path, mnist.IMAGES_MAGIC)
    assert str(path) in str(raised.value)


def _mutant(rng: random.Random, valid: bytes) -> bytes:
    """One seeded corruption of ``valid`` (an IDX file), raw or gzip-compressed."""
    blob = bytearray(valid)
    kind = rng.choice(["flip", "truncate", "extend", "header", "splice", "gzip-flip"])
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            blob[rng.randrange(len(blob))] = rng.randrange(256)
    elif kind == "truncate":
        del blob[rng.randrange(len(blob)) :]
    elif kind == "extend":
        blob += rng.randbytes(rng.randint(1, 100))
    elif kind == "header":  # counts and sizes up to 2³²-1: huge claims
        field = rng.randrange(4)
        blob[4 * field : 4 * field + 4] = struct.pack(
            ">I", rng.choice([0, 1, 2**31, 2**32 - 1, rng.getrandbits(32)])
        )
    elif kind == "splice":
        start = rng.randrange(len(blob))
        blob[start : start + rng.randint(1, 50)] = rng.randbytes(rng.randint(0, 50))
    if kind == "gzip-flip":
        packed = bytearray(gzip.compress(bytes(blob)))
        for _ in range(rng.randint(1, 4)):
            packed[rng.randrange(len(packed))] = rng.randrange(256)
        return bytes(packed)
    return gzip.compress(bytes(blob)) if rng.random() < 0.5 else bytes(blob)


def fuzz_idx_reader(folder: Path, cases: int, seed: int = 0) -> dict[str, int]:
    """Read ``cases`` mutants; every outcome must be an array or an IDXError."""
    rng = random.Random(seed)
    valid = idx_bytes(*[_small(3)[0]], mnist.IMAGES_MAGIC)
    outcomes = {"read": 0, "IDXError": 0}
    path = folder / "mutant"
    tracemalloc.start()
    try:
        for case in range(cases):
            path.write_bytes(_mutant(rng, valid))
            try:
                array = mnist.read_idx(path, mnist.IMAGES_MAGIC)
            except mnist.IDXError:
                outcomes["IDXError"] += 1
                continue
            except Exception as error:  # noqa: BLE001 - the finding this test exists for
                raise AssertionError(f"case {case} (seed {seed}): {error!r}") from error
            assert array.dtype == np.uint8 and array.ndim == 3, case
            outcomes["read"] += 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"peak allocation {peak} bytes"
    return outcomes


def test_fuzzed_idx_files_read_or_raise_idx_error(tmp_path):
    outcomes = fuzz_idx_reader(tmp_path, cases=2000)
    assert outcomes["IDXError"] > 1000 and outcomes["read"] > 0, outcomes


@pytest.mark.slow
def test_fuzzed_idx_files_long_run(tmp_path):
    for seed in range(1, 21):
        fuzz_idx_reader(tmp_path, cases=5000, seed=seed)


def test_a_billion_image_claim_is_rejected_before_reading(tmp_path):
    path = tmp_path / "bomb"
    path.write_bytes(gzip.compress(struct.pack(">4I", 2051, 10**9, 28, 28) + bytes(10**6)))
    tracemalloc.start()
    try:
        with pytest.raises(mnist.IDXError, match="cannot hold them"):
            mnist.read_idx(path, mnist.IMAGES_MAGIC)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20


def test_count_mismatch_and_md5_mismatch_are_named(tmp_path):
    images, labels = _small()
    write_split(tmp_path, images, labels[:4], compress=False)
    with pytest.raises(mnist.IDXError, match="5 images but .* 4 labels"):
        mnist.load_mnist(tmp_path, "test", download=False)
    write_split(tmp_path, images, labels)  # gzip beside raw: remove raw to reach the md5 check
    for name in mnist.FILES["test"]:
        (tmp_path / name.removesuffix(".gz")).unlink()
    with pytest.raises(mnist.IDXError, match="md5 mismatch"):
        mnist.load_mnist(tmp_path, "test", download=False)


def test_offline_names_the_missing_files_and_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as raised:
        mnist.load_mnist(tmp_path, "train", download=False)
    message = str(raised.value)
    assert "train-images-idx3-ubyte.gz" in message and str(tmp_path) in message


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving ``tmp_path / "served"``."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()


def test_download_checks_md5_caches_and_falls_back_to_the_next_mirror(
    tmp_path, server, monkeypatch
):
    served, url = server
    images, labels = _small()
    write_split(served, images, labels)
    for name in mnist.FILES["test"]:
        monkeypatch.setitem(mnist.MD5, name, hashlib.md5((served / name).read_bytes()).hexdigest())
    cache = tmp_path / "cache"
    down = "http://127.0.0.1:9/"  # the discard port: nothing answers
    x, _ = mnist.load_mnist(cache, "test", mirrors=(down, url))
    np.testing.assert_array_equal(x.numpy(), images)
    for name in mnist.FILES["test"]:  # cached: the next load needs no server
        (served / name).unlink()
    x, _ = mnist.load_mnist(cache, "test", download=False)
    np.testing.assert_array_equal(x.numpy(), images)


def test_download_with_bad_md5_leaves_nothing(tmp_path, server, monkeypatch):
    served, url = server
    write_split(served, *_small())
    monkeypatch.setitem(mnist.MD5, mnist.FILES["test"][0], "0" * 32)
    cache = tmp_path / "cache"
    with pytest.raises(mnist.IDXError, match="md5|hash"):
        mnist.load_mnist(cache, "test", mirrors=(url,))
    assert not (cache / mnist.FILES["test"][0]).exists()
    assert not [p for p in cache.iterdir() if p.name.startswith("tmp")]


@needs_real_mnist
def test_real_test_set_counts_shapes_and_labels():
    images, labels = mnist.load_mnist(REAL_DATA, "test", download=False)
    assert tuple(images.shape) == (10000, 28, 28) and tuple(labels.shape) == (10000,)
    counts = labels.bincount().tolist()
    assert counts == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@needs_real_mnist
def test_fastbp_mnist_trains_to_90_percent_and_saves(tmp_path):
    import torch

    saved = tmp_path / "model.pt"
    result = run_cli(
        "mnist",
        "--data-dir",
        str(REAL_DATA),
        "--epochs",
        "3",
        "--no-download",
        "--save",
        str(saved),
    )
    assert result.returncode == 0, result.stderr
    assert "first 8,000 test images" in result.stderr
    accuracy = float(result.stdout.split("test accuracy ")[1].split()[0])
    assert accuracy >= 0.90
    sequential = torch.nn.Sequential(
        torch.nn.Linear(784, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 10),
    )
    sequential.load_state_dict(torch.load(saved))


def _learnable_split(folder: Path, count: int = 200) -> None:
    """A test split where class c lights its own band of rows: a linear model separates it."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, count)
    images = rng.integers(0, 40, (count, 28, 28))
    for image, label in zip(images, labels, strict=True):
        image[2 * label + 4 : 2 * label + 6] = 255
    write_split(folder, images, labels, compress=False)


def test_fastbp_mnist_learns_a_separable_synthetic_set(tmp_path):
    _learnable_split(tmp_path)
    result = run_cli("mnist", "--data-dir", str(tmp_path), "--epochs", "15", "--lr", "0.1")
    assert result.returncode == 0, result.stderr
    assert "first 160 test images" in result.stderr
    assert "on 40 images" in result.stdout and "samples/s" in result.stdout
    accuracy = float(result.stdout.split("test accuracy ")[1].split()[0])
    assert accuracy >= 0.9, result.stdout  # chance is 0.1


def test_a_named_data_dir_is_read_never_written(tmp_path):
    _learnable_split(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run_cli("mnist", "--data-dir", str(tmp_path), "--epochs", "1")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert "Downloading" not in result.stderr
    assert f"no train split in {tmp_path} (missing train-images-idx3-ubyte.gz" in result.stderr


def test_a_missing_split_names_the_options_that_fix_it(tmp_path):
    result = run_cli("mnist", "--data-dir", str(tmp_path))
    assert result.returncode == 2
    assert f"missing t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz in {tmp_path}" in (
        result.stderr
    )
    assert "--data-dir" in result.stderr and "--download" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "arguments, words",
    [
        (["--backend", "triton"], "--backend triton does not run on --device cpu"),
        (["--no-download"], "missing t10k-images-idx3-ubyte.gz"),
        (["--no-download", "corrupt"], "md5 mismatch"),
    ],
)
def test_fastbp_mnist_user_errors_are_one_line(tmp_path, arguments, words):
    if "corrupt" in arguments:  # a file under an official name whose md5 is not the official one
        arguments = [a for a in arguments if a != "corrupt"]
        write_split(tmp_path, *_small())
    result = run_cli("mnist", "--data-dir", str(tmp_path), *arguments)
    assert result.returncode == 2
    assert words in result.stderr and "Traceback" not in result.stderr


def _sigint_as_in_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_exits_cleanly_and_leaves_the_previous_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 200)
    write_split(tmp_path, np.zeros((200, 28, 28)) + labels[:, None, None], labels, compress=False)
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"previous checkpoint")
    command = [sys.executable, "-m", "fastbp.cli", "mnist", "--data-dir", str(tmp_path),
               "--epochs", "100000", "--no-download", "--save", str(checkpoint)]  # fmt: skip
    # Ctrl-C as a terminal delivers it: a shell that starts the tests in the background
    # (`pytest &`) leaves SIGINT ignored, the child inherits that, and Python then
    # installs no KeyboardInterrupt handler at all
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                               preexec_fn=_sigint_as_in_a_terminal)  # fmt: skip
    assert process.stderr.readline().startswith("MNIST:")  # the data is loaded
    # Interrupt training, not numba's compile or cache load of the first step
    # (in a fresh checkout that takes seconds, and numba may wrap the interrupt).
    while "first step:" not in process.stderr.readline():
        assert process.poll() is None, "fastbp mnist ended before its first step"
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert checkpoint.read_bytes() == b"previous checkpoint"
    assert not list(tmp_path.glob("*.partial"))
