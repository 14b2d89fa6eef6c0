"""Megatron's IndexedDataset files (.bin tokens, .idx index) written with numpy alone.

The bytes are exactly those of megatron-core's `IndexedDatasetBuilder` (tests/unit/test_prep.py compares
them, and reads ours back with megatron-core's `IndexedDataset`), but importing megatron-core pulls in torch:
13 s of every data-preparation run on a 2-core machine, before any work. This writer does not.

Layout of an .idx (megatron/core/datasets/indexed_dataset.py, `_IndexWriter`): the 9-byte header, version 1
(<Q), the dtype code (<B), the sequence count (<Q), the document count (<Q), then int32 sequence lengths,
int64 byte offsets of each sequence in the .bin, and int64 document boundaries (sequence indices, from 0).
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np

HEADER = b"MMIDIDX\x00\x00"
DTYPE_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3, np.dtype(np.int32): 4,
               np.dtype(np.int64): 5, np.dtype(np.float64): 6, np.dtype(np.float32): 7, np.dtype(np.uint16): 8}


def optimal_dtype(vocab_size: int | None) -> type:
    """megatron-core's rule (DType.optimal_dtype): uint16 below 65,500 ids, else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def read_index(idx_path: str | Path) -> tuple[np.dtype, np.ndarray, np.ndarray]:
    """(dtype, sequence lengths, document boundaries) of an .idx file."""
    raw = Path(idx_path).read_bytes()
    if raw[:9] != HEADER:
        raise ValueError(f"{idx_path}: not a Megatron index (bad header)")
    code = raw[17]
    dtype = next(d for d, c in DTYPE_CODES.items() if c == code)
    sequences, documents = struct.unpack_from("<QQ", raw, 18)
    lengths = np.frombuffer(raw, np.int32, sequences, 34)
    boundaries = np.frombuffer(raw, np.int64, documents, 34 + sequences * 12)
    return dtype, lengths, boundaries


class BinIdxWriter:
    """One .bin/.idx pair: add documents (one sequence each) or whole indexed datasets, then finalize."""

    def __init__(self, bin_path: str | Path, dtype):
        self.dtype = np.dtype(dtype)
        self.bin_path = Path(bin_path)
        self.data_file = open(self.bin_path, "wb")
        self.lengths: list[np.ndarray] = []
        self.boundaries: list[np.ndarray] = [np.zeros(1, np.int64)]
        self.sequences = 0

    def add_document(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=self.dtype)
        self.data_file.write(ids.tobytes(order="C"))
        self.lengths.append(np.array([ids.size], np.int32))
        self.sequences += 1
        self.boundaries.append(np.array([self.sequences], np.int64))

    def add_index(self, path_prefix: str | Path) -> None:
        """Append another dataset's documents (its .bin bytes and its index), as megatron-core's add_index."""
        dtype, lengths, boundaries = read_index(f"{path_prefix}.idx")
        if dtype != self.dtype:
            raise ValueError(f"{path_prefix}.idx: dtype {dtype} differs from this dataset's {self.dtype}")
        self.lengths.append(lengths)
        self.boundaries.append(boundaries[1:] + self.sequences)
        self.sequences += len(lengths)
        with open(f"{path_prefix}.bin", "rb") as f:
            shutil.copyfileobj(f, self.data_file)

    def finalize(self, idx_path: str | Path) -> None:
        self.data_file.close()
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int32)
        boundaries = np.concatenate(self.boundaries)
        pointers = np.zeros(len(lengths), np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        with open(idx_path, "wb") as f:
            f.write(HEADER + struct.pack("<Q", 1) + struct.pack("<B", DTYPE_CODES[self.dtype]))
            f.write(struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(boundaries)))
            f.write(lengths.astype(np.int32).tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(boundaries.astype(np.int64).tobytes(order="C"))

    def discard(self) -> None:
        """Close and delete the .bin (a failed unit leaves nothing behind)."""
        self.data_file.close()
        self.bin_path.unlink(missing_ok=True)
