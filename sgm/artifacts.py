"""Artifacts: how the stages write and read what they hand each other (.npz, .pt, text), atomically, without
pickle, each with its metadata and a fingerprint of its contents; and StoredMatrix, which reads a matrix inside an
.npz a chunk at a time (02 never holds 01's activations). Used by every stage, tools/plant.py, tools/tune.py and tools/bench.py.
"""
import hashlib
import json
import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch

from common import fail


def array_fingerprint(arrays):
    """sha256 over array names, dtypes, shapes and bytes: equal arrays give equal fingerprints. An array may also
    be a matrix read in row blocks (RowBlocks, StoredMatrix): the same digest, fed a block at a time."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        lazy = hasattr(arrays[name], "row_blocks")
        array = arrays[name] if lazy else np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        for block in array.row_blocks() if lazy else [array]:  # the array's own buffer: no copy of its bytes
            digest.update(np.ascontiguousarray(block))
    return digest.hexdigest()


class RowBlocks:
    """A matrix given as blocks of rows, in order (`row_blocks()` yields them): what save_npz and array_fingerprint
    take in place of an array that should never be whole in memory (01's activations, from its batch pieces)."""

    def __init__(self, shape, dtype, row_blocks):
        self.shape, self.dtype, self.row_blocks = tuple(shape), np.dtype(dtype), row_blocks


class StoredMatrix:
    """A 2-D array inside an .npz, read straight from the file: save_npz (like np.savez) stores each array
    uncompressed as a .npy, so its rows sit at a fixed offset. `[:, a:b]` gives columns a..b-1 of every row (one
    read per row), `rows(indices)` some rows, `row_blocks()` all rows in order: never the whole matrix, and no
    memory map (whose touched pages would count as this process's memory)."""

    def __init__(self, path, name):
        self.path = Path(path)
        with zipfile.ZipFile(path) as npz, open(path, "rb") as f:
            entry = npz.getinfo(f"{name}.npy")
            if entry.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"{name} is compressed")
            f.seek(entry.header_offset + 26)  # a zip entry's local header: 30 bytes, then its name and extra field
            name_length, extra_length = struct.unpack("<HH", f.read(4))
            start = entry.header_offset + 30 + name_length + extra_length
            f.seek(start)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}[np.lib.format.read_magic(f)]
            self.shape, fortran_order, self.dtype = read_header(f)
            self.offset = f.tell()
        if fortran_order or len(self.shape) != 2 or self.dtype.hasobject:
            raise ValueError(f"{name} is not a C-order 2-D numeric array")
        self.row_bytes = self.shape[1] * self.dtype.itemsize
        if self.offset + self.shape[0] * self.row_bytes > start + entry.compress_size:
            raise ValueError(f"{name} is cut short")

    def _read(self, f, position, out):
        f.seek(position)
        if f.readinto(memoryview(out).cast("B")) != out.nbytes:
            raise ValueError(f"{self.path} is cut short")
        return out

    def __getitem__(self, index):  # [:, a:b] only: what the scoring functions take from an array too
        rows, columns = index
        if rows != slice(None) or not isinstance(columns, slice) or columns.step not in (None, 1):
            raise IndexError("StoredMatrix gives column chunks [:, a:b] only")
        start, stop, _ = columns.indices(self.shape[1])
        out = np.empty((self.shape[0], max(stop - start, 0)), dtype=self.dtype)
        with open(self.path, "rb", buffering=0) as f:
            for row, buffer in enumerate(out):
                self._read(f, self.offset + row * self.row_bytes + start * self.dtype.itemsize, buffer)
        return out

    def rows(self, indices):
        out = np.empty((len(indices), self.shape[1]), dtype=self.dtype)
        with open(self.path, "rb", buffering=0) as f:
            for row, buffer in zip(indices, out):
                self._read(f, self.offset + int(row) * self.row_bytes, buffer)
        return out

    def row_blocks(self, block_bytes=2 ** 23):
        """All rows in order, as many as block_bytes hold at a time (at least one)."""
        step = max(1, block_bytes // max(1, self.row_bytes))
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            for start in range(0, self.shape[0], step):
                block = np.empty((min(step, self.shape[0] - start), self.shape[1]), dtype=self.dtype)
                yield self._read(f, f.tell(), block)


def _atomic_write(path, write):
    """Write through a temp file in the same folder, then rename: a crash never leaves a half artifact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_npz(path, arrays, meta):
    """arrays: name -> numpy array (no object dtype), or a RowBlocks / StoredMatrix, written a block of rows at a
    time. meta (JSON) travels inside as the string `meta`. The bytes are np.savez's (a zip of uncompressed .npy
    entries, meta first), so np.load reads it and StoredMatrix can read an array of it in place."""
    meta = dict(meta, fingerprint=array_fingerprint(arrays))

    def write(f):
        with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as npz:
            for name, array in [("meta", np.array(json.dumps(meta, sort_keys=True))), *arrays.items()]:
                with npz.open(f"{name}.npy", "w", force_zip64=True) as entry:  # as np.savez writes each entry
                    if not hasattr(array, "row_blocks"):
                        np.lib.format.write_array(entry, np.asanyarray(array), allow_pickle=False)
                        continue
                    np.lib.format.write_array_header_1_0(entry, dict(
                        descr=np.lib.format.dtype_to_descr(array.dtype), fortran_order=False, shape=array.shape))
                    for block in array.row_blocks():
                        entry.write(np.ascontiguousarray(block, dtype=array.dtype).data)
    _atomic_write(path, write)
    return meta


def _load_artifact(path, rerun_hint, read, required):
    """`read(path)` -> (arrays, meta JSON). Any failure (truncated, another format, bad meta, contents unlike
    the saved fingerprint, a `required` array missing) is one line naming the file and the stage to rerun."""
    path = Path(path)
    if not path.exists():
        fail(f"{path} not found: run {rerun_hint} first")
    try:
        arrays, meta = read(path)
        meta = json.loads(meta)
        if array_fingerprint({k: v if hasattr(v, "row_blocks") else np.asarray(v) for k, v in arrays.items()}) \
                != meta["fingerprint"]:
            raise ValueError("contents do not match the fingerprint in its meta")
    except Exception as e:  # what a damaged file raises depends on where it breaks: zip, pickle, JSON, ...
        reason = (str(e).splitlines() or [""])[0][:120]
        fail(f"{path} is damaged or not a {path.suffix} artifact ({type(e).__name__}: {reason}): rerun {rerun_hint}")
    missing = [name for name in required or () if name not in arrays]
    if missing:
        fail(f"{path} lacks array {missing[0]!r}: rerun {rerun_hint}")
    return arrays, meta


def load_npz(path, rerun_hint, required=None, in_file=()):
    """(arrays, meta) of an artifact, its fingerprint checked. Arrays named in `in_file` stay in the file and come
    back as StoredMatrix (read a chunk at a time, checked a block at a time): 02 never holds 01's activations."""
    def read(path):
        with np.load(path, allow_pickle=False) as npz:  # no pickle: loading an artifact never runs code
            return ({k: StoredMatrix(path, k) if k in in_file else npz[k] for k in npz.files if k != "meta"},
                    str(npz["meta"]))
    return _load_artifact(path, rerun_hint, read, required)


def save_pt(path, tensors, meta):
    """Torch artifact loadable with weights_only=True: a dict of tensors plus the meta JSON string."""
    fingerprint = array_fingerprint({k: v.numpy() for k, v in tensors.items()})
    meta = dict(meta, fingerprint=fingerprint)
    _atomic_write(path, lambda f: torch.save({**tensors, "meta": json.dumps(meta, sort_keys=True)}, f))
    return meta


def load_pt(path, rerun_hint, required=None):
    def read(path):
        payload = torch.load(path, weights_only=True, map_location="cpu")  # tensors only, never code
        return payload, payload.pop("meta")
    return _load_artifact(path, rerun_hint, read, required)


def check_same_model(meta, model_meta, artifact, rerun_hint):
    """Refuse an artifact made for another model (or another set of neuron sites)."""
    if meta["model"] != model_meta["model"]:
        fail(f"{artifact} was made for model '{meta['model']}', not '{model_meta['model']}': "
             f"rerun {rerun_hint} with --model {model_meta['model']}")
    if meta["sites"] != model_meta["sites"]:
        fail(f"{artifact} has other neuron sites than model '{model_meta['model']}' "
             f"({len(meta['sites'])} vs {len(model_meta['sites'])} layers): rerun {rerun_hint}")


def write_text(path, text):
    _atomic_write(path, lambda f: f.write(text.encode()))
