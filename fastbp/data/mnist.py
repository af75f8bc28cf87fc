"""MNIST: the IDX file reader, md5-checked downloads and the local cache.

IDX format (big-endian): a 4-byte magic ``0x0000 TT DD`` (TT = 0x08 for
unsigned bytes, DD = number of dimensions), DD 4-byte sizes, then the data,
row-major. MNIST uses magic 2051 (images: count, rows, columns) and 2049
(labels: count). Files may be gzip-compressed or raw.

Every check happens before an allocation that a header could inflate: the
data read is bounded by what the header claims, and a file shorter than its
claim is reported as truncated instead of reshaped.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)


class IDXError(ValueError):
    """A file that is not the IDX data it should be; the message names the file."""


class MissingFiles(FileNotFoundError):
    """Files of a split that are not in ``root`` (and were not, or could not be, downloaded)."""

    def __init__(self, split: str, root: Path, missing: list[str]) -> None:
        self.split, self.root, self.missing = split, root, missing
        super().__init__(
            f"MNIST {split} split: missing {', '.join(missing)} in {root}; put the files "
            "there, pass another root= or set FASTBP_DATA"
        )


# deflate's best ratio is about 1032:1, so a gzip file of n bytes holds at most this many
DEFLATE_MAX_RATIO = 1032


def _open(path: Path):
    """The file's data stream and the most bytes that stream can hold."""
    with open(path, "rb") as probe:
        compressed = probe.read(2) == b"\x1f\x8b"
    size = path.stat().st_size
    if compressed:
        return gzip.open(path, "rb"), size * DEFLATE_MAX_RATIO
    return open(path, "rb"), size


def _read_at_most(stream, limit: int) -> bytes:
    """Up to ``limit`` bytes, in chunks: memory follows the data actually there,
    never a header's claim (``read(n)`` would allocate n bytes up front)."""
    chunks, remaining = [], limit
    while remaining > 0:
        chunk = stream.read(min(remaining, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def read_idx(path: str | os.PathLike, magic: int) -> np.ndarray:
    """The uint8 array stored in IDX file ``path``, whose magic must be ``magic``."""
    path = Path(path)
    dims = {IMAGES_MAGIC: 3, LABELS_MAGIC: 1}[magic]
    try:
        stream, capacity = _open(path)
        with stream:
            header = stream.read(4 + 4 * dims)
            if len(header) < 4 + 4 * dims:
                raise IDXError(f"{path}: truncated header ({len(header)} of {4 + 4 * dims} bytes)")
            found, *shape = struct.unpack(f">{1 + dims}I", header)
            if found != magic:
                raise IDXError(f"{path}: magic number {found}, expected {magic}")
            size = math.prod(shape)
            if size > capacity:  # rejected before reading: no allocation follows a header's claim
                raise IDXError(
                    f"{path}: data truncated: header {shape} needs {size} bytes, "
                    f"a file of {path.stat().st_size} bytes cannot hold them"
                )
            data = _read_at_most(stream, size + 1)
    except (OSError, EOFError, zlib.error) as error:  # BadGzipFile is an OSError
        raise IDXError(f"{path}: unreadable ({error})") from None
    if len(data) != size:
        state = "truncated" if len(data) < size else "longer than its header says"
        raise IDXError(f"{path}: data {state}: header {shape} needs {size} bytes")
    return np.frombuffer(data, np.uint8).reshape(shape)


def default_root() -> Path:
    """``$FASTBP_DATA/mnist`` or the user cache directory (``pooch.os_cache``)."""
    if "FASTBP_DATA" in os.environ:
        return Path(os.environ["FASTBP_DATA"]) / "mnist"
    import pooch

    return Path(pooch.os_cache("fastbp")) / "mnist"


def _fetch(root: Path, name: str, download: bool, mirrors) -> Path:
    """The path of ``name`` under ``root``, downloaded (md5-checked) if missing."""
    import pooch

    path = root / name
    known_hash = f"md5:{MD5[name]}"
    if path.exists():
        if pooch.file_hash(str(path), alg="md5") != MD5[name]:
            raise IDXError(f"{path}: md5 mismatch; delete it to download it again")
        return path
    if not download:
        raise FileNotFoundError(name)
    failures = []
    for mirror in mirrors:
        try:  # pooch writes to a temporary file and moves it only once the md5 matches
            return Path(pooch.retrieve(mirror + name, known_hash, fname=name, path=root))
        except ValueError as error:  # md5 mismatch: nothing was kept
            raise IDXError(f"{mirror + name}: {error}") from None
        except Exception as error:  # noqa: BLE001 - any network failure: try the next mirror
            failures.append(f"{mirror}: {type(error).__name__}")
    raise FileNotFoundError(f"{name} (no mirror answered: {'; '.join(failures)})")


def load_mnist(root=None, split: str = "train", download: bool = True, *, mirrors=MIRRORS):
    """``(images uint8 (N, 28, 28), labels int64 (N,))`` as torch tensors.

    ``root`` defaults to ``default_root()``. Missing files are downloaded into it from
    ``mirrors`` in order when ``download`` is true; otherwise, or when no mirror answers,
    ``MissingFiles`` (a ``FileNotFoundError``) names the files and the folder.
    """
    import torch

    if split not in FILES:
        raise ValueError(f"split must be one of {tuple(FILES)}, got {split!r}")
    root = Path(root) if root is not None else default_root()
    paths, missing = [], []
    for name in FILES[split]:
        raw = root / name.removesuffix(".gz")
        try:
            paths.append(raw if raw.exists() else _fetch(root, name, download, mirrors))
        except FileNotFoundError as error:
            missing.append(str(error))
    if missing:
        raise MissingFiles(split, root, missing)
    images, labels = read_idx(paths[0], IMAGES_MAGIC), read_idx(paths[1], LABELS_MAGIC)
    if len(images) != len(labels):
        raise IDXError(f"{paths[0]} holds {len(images)} images but {paths[1]} {len(labels)} labels")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))
