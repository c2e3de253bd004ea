"""Artifacts: how the stages write and read what they hand each other (.npz, .pt, text), atomically, without
pickle, each with its metadata and two digests: `fingerprint` (sha256 of the arrays, the one docs/RESULTS.md and
the next stage's `upstream` cite) and `meta_sha256` (sha256 of the meta itself, fingerprint included), both
checked on every load; and StoredMatrix, which reads a matrix inside an .npz a chunk at a time (02 never holds
01's activations). Also what keeps a run folder whole: one writer at a time (lock_folder), faults on write as one
line (disk_fault), a stage's outputs swapped in as one set behind a manifest (write_set, check_set), and the
temp files of dead processes removed (remove_stale_temps). Used by every stage, tools/plant.py, tools/tune.py and
tools/bench.py.
"""
import atexit
import errno
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import struct
import sys
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


def _atomic_write(path, write, needed=None):
    """Write through a temp file in the same folder, then rename: a crash never leaves a half artifact, and a
    full disk or a folder that cannot be written is one line (disk_fault) with the temp file gone."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except Exception as e:
        disk_fault(e, path, needed)
        raise
    finally:
        tmp.unlink(missing_ok=True)


# ---- faults on write: one line naming the path, what failed and what it needed --------------------------------

def os_error_in(error):
    """The OSError behind `error`: itself, one it was raised from or during (torch.save and zipfile wrap the
    disk's error in their own), or the `os error N` in a message (safetensors' SafetensorError); else None."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return seen
        seen = seen.__cause__ or seen.__context__
    found = re.search(r"os error (\d+)|\[Errno (\d+)\]", str(error))
    if found:
        number = int(found.group(1) or found.group(2))
        return OSError(number, os.strerror(number))
    return None


def mount_of(path):
    path = Path(os.path.abspath(path))
    while not path.exists() or not os.path.ismount(path):
        path = path.parent
    return path


def size_text(n):
    return f"{n / 2 ** 20:,.1f} MB" if n >= 2 ** 20 else f"{n / 2 ** 10:,.1f} KB"


def disk_fault(error, path, needed=None):
    """If `error` is a fault of the disk or the folder (no space, read-only, no permission, a missing folder), stop
    with one line: which path, what failed, the space it needed and had (when known), the fix. Else return (the
    caller re-raises: a bug keeps its traceback)."""
    fault = os_error_in(error)
    if fault is None or isinstance(error, (KeyboardInterrupt, SystemExit)):
        return
    folder = Path(path).parent
    what = f"cannot write {path} ({errno.errorcode.get(fault.errno, fault.errno)}: {fault.strerror})"
    if fault.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f"{size_text(shutil.disk_usage(mount_of(folder)).free)} free on {mount_of(folder)}"
        except OSError:
            free = "free space unknown"
        fail((f"{what}: it needs about {size_text(needed)}, {free}" if needed else f"{what}: {free}")
             + "; free some space (or write elsewhere) and rerun; the earlier artifacts are intact")
    if fault.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fail(f"{what}: {folder} is read-only or immutable (a read-only mount, permissions, `chattr +i`: see "
             f"`lsattr -d {folder}`); make it writable or write elsewhere (another --run)")
    if fault.errno == errno.ENOENT:
        fail(f"{what}: a folder on the way is missing (deleted while the stage ran?); rerun")
    fail(f"{what}: fix the disk or folder and rerun")


def disk_faults_in_one_line():
    """Any disk fault no write site caught (a library writing on its own) still ends as one line, not a traceback:
    uncaught OSErrors that only a write raises (no space, a read-only file system) go through it; everything else
    (a permission error may be a read's) keeps its traceback."""
    def hook(kind, error, traceback):
        fault = os_error_in(error) if isinstance(error, Exception) else None
        if fault is not None and fault.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            try:
                disk_fault(error, fault.filename or "a file")
            except SystemExit as stop:
                print(stop.code, file=sys.stderr)
                return
        previous(kind, error, traceback)
    previous = sys.excepthook
    if getattr(previous, "__name__", "") != "hook":
        sys.excepthook = hook


# ---- one writer per folder ------------------------------------------------------------------------------------

_held = {}  # lock file (absolute) -> (its open file, the first folder this process created for it, or None)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def lock_folder(folder, stage, lock_file=None, what=None, fix=None, temps=""):
    """Take the exclusive lock on `folder` (its `.lock`, or `lock_file`) for the rest of this process: the kernel
    drops it when the process ends, however it ends. A second process refuses at once, in one line naming the
    folder and the holder's pid; a record left by a holder that died (kill -9) is taken over, saying so. Also
    checks the folder can be written (before any model loads) and removes dead processes' temp files there (those
    whose name starts with `.` + `temps`)."""
    folder = Path(folder)
    lock_file = Path(lock_file or folder / ".lock")
    what = what or f"run {folder}"
    key = str(lock_file.absolute())
    if key in _held:  # this process holds it already (stages run one after another in one process: tests)
        return
    created = next((f for f in [*reversed(folder.absolute().parents), folder.absolute()] if not f.exists()), None)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(lock_file, "a+")
    except OSError as e:
        disk_fault(e, lock_file)
        raise
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().split()
        handle.close()
        who = f"{holder[1]} (pid {holder[0]})" if len(holder) >= 2 else "another process"
        fail(f"{what} is in use by {who}, which holds {lock_file}: wait for it to finish, or use "
             + (fix or "another --run"))
    handle.seek(0)
    previous = handle.read().split()
    if previous and previous[0] != str(os.getpid()):
        alive = previous[0].isdigit() and pid_alive(int(previous[0]))
        print(f"note: {what} was left locked by {' '.join(previous[1:2]) or 'a process'} (pid {previous[0]}, "
              f"{'no longer holding it' if alive else 'dead'}): taking it over")
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()} {stage}\n")
    handle.flush()
    _held[key] = handle, created
    if len(_held) == 1:
        atexit.register(release_locks)
    disk_faults_in_one_line()
    check_writable(folder)
    remove_stale_temps(folder, temps)


def release_locks():
    """Clear this process's records (a clean end: nothing to take over) and drop its locks; a folder this process
    created that holds nothing but its lock (a stage that stopped before writing) is removed again. Runs at exit;
    tests that run stages in-process call it after each, as a process would end."""
    for key, (handle, created) in _held.items():
        try:
            handle.seek(0)
            handle.truncate()
            folder = Path(key).parent
            if created is not None and [p.name for p in folder.iterdir()] == [Path(key).name]:
                Path(key).unlink()
                while True:  # up to the first folder it created (runs/ itself, on a first run)
                    folder.rmdir()
                    if folder == created:
                        break
                    folder = folder.parent
        except OSError:  # not empty, or gone: leave it
            pass
        handle.close()  # closing drops the flock
    _held.clear()


def check_writable(folder, needed=None, target=None):
    """Before the long work: a file can be created in `folder`, and (when `needed` bytes are known) its disk has
    roughly that much free for `target`. One line otherwise (disk_fault)."""
    probe = Path(folder) / f".write-probe.{os.getpid()}.tmp"
    try:
        with open(probe, "wb"):
            pass
        if needed:
            free = shutil.disk_usage(mount_of(folder)).free
            if free < needed:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # no filename: the target's
    except Exception as e:
        disk_fault(e, probe if isinstance(e, OSError) and e.filename else target or folder, needed)
        raise
    finally:
        probe.unlink(missing_ok=True)


TEMP_NAME = re.compile(r"^\..+\.(\d+)\.(tmp|old)$")  # _atomic_write's .NAME.PID.tmp, an export's .NAME.PID.tmp/.old


def remove_stale_temps(folder, prefix=""):
    """Remove the temp files (and folders) of processes that are dead, in `folder` and its *.partial folders,
    saying what was removed; a live process's are never touched. An `.old` one is the complete previous version
    of something (an export) moved aside for its replacement: if the replacement never arrived (killed between
    the two renames), it is put back instead. Returns the removed paths."""
    folder = Path(folder)
    places = [folder, *(p for p in folder.glob("*.partial") if p.is_dir())]
    removed = []
    for place in places:
        for path in sorted(place.iterdir()):
            found = TEMP_NAME.match(path.name)
            if not found or not path.name.startswith("." + prefix) or int(found.group(1)) == os.getpid() \
                    or pid_alive(int(found.group(1))):
                continue
            original = path.with_name(path.name[1:-len(f".{found.group(1)}.old")])
            if found.group(2) == "old" and not original.exists():
                os.replace(path, original)
                print(f"note: {original} was missing (a run killed while replacing it): put back its previous "
                      f"version from {path.name}")
                continue
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else \
                path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        print(f"note: removed {len(removed)} temp file(s) of dead processes: " + ", ".join(map(str, removed)))
    return removed


# ---- a set of files that appear together ----------------------------------------------------------------------

def manifest_of(first):
    first = Path(first)
    return first.with_name(f"{first.stem}.manifest.json")


def write_set(files):
    """Write {path: bytes} (one folder) as one set: every file to a temp name first (a full disk stops here, the
    old set untouched), then a manifest naming each new file's sha256, then the renames. A reader that checks the
    manifest (check_set) sees the whole new set or is told the set is half-written (a kill between two renames).
    A file of the previous set that this one lacks (a sweep's -tradeoff.png) goes, so no stale file sits beside."""
    files = {Path(path): data for path, data in files.items()}
    manifest = manifest_of(next(iter(files)))
    try:
        previous = json.loads(manifest.read_text(encoding="utf-8"))["files"] if manifest.exists() else {}
    except (ValueError, KeyError, TypeError):  # a damaged manifest lists nothing worth removing
        previous = {}
    temps = {path: path.with_name(f".{path.name}.{os.getpid()}.tmp") for path in files}
    try:
        for path, data in files.items():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                temps[path].write_bytes(data)
            except Exception as e:
                disk_fault(e, path, sum(len(d) for d in files.values()))
                raise
        write_text(manifest, json.dumps({"files": {path.name: hashlib.sha256(data).hexdigest()
                                                   for path, data in files.items()}}, indent=1) + "\n")
        for path, tmp in temps.items():
            os.replace(tmp, path)
        for name in set(previous) - {path.name for path in files}:
            (manifest.parent / Path(name).name).unlink(missing_ok=True)
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)


def check_set(first):
    """Raise ValueError unless the set `first` belongs to (its manifest's files) is whole: every file there with
    the sha256 the manifest names. A set written before manifests (no manifest file) passes."""
    manifest = manifest_of(first)
    if not manifest.exists():
        return
    listed = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    for name, digest in listed.items():
        path = manifest.with_name(name)
        if not path.exists() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise ValueError(f"a half-written set: {name} is not the one {manifest.name} lists (a run killed while "
                             "swapping its files in, or an edit)")


def figure_bytes(fig, **savefig):
    """A matplotlib figure as PNG bytes (written with write_set or save_figure, never straight to its path)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", **savefig)
    return buffer.getvalue()


def save_figure(fig, path, **savefig):
    data = figure_bytes(fig, **savefig)
    _atomic_write(path, lambda f: f.write(data), len(data))


def save_npz(path, arrays, meta):
    """arrays: name -> numpy array (no object dtype), or a RowBlocks / StoredMatrix, written a block of rows at a
    time. meta (JSON) travels inside as the string `meta`. The bytes are np.savez's (a zip of uncompressed .npy
    entries, meta first), so np.load reads it and StoredMatrix can read an array of it in place."""
    meta = sealed(dict(meta, fingerprint=array_fingerprint(arrays)))
    needed = sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in arrays.values()
                 if hasattr(a, "shape") and hasattr(a, "dtype"))

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
    _atomic_write(path, write, needed)
    return meta


def meta_digest(meta):
    """sha256 of the meta as stored (sorted-key JSON), without its own `meta_sha256`: it covers `fingerprint`,
    so with the arrays checked against that, one flipped byte anywhere in what a stage reads is refused."""
    return hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "meta_sha256"},
                                     sort_keys=True).encode()).hexdigest()


def sealed(meta):
    return dict(meta, meta_sha256=meta_digest(meta))


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
        # Written before meta_sha256 existed: the zip's CRCs (checked by np.load, and for .pt in read) cover it.
        if "meta_sha256" in meta and meta_digest(meta) != meta["meta_sha256"]:
            raise ValueError("its meta does not match the meta_sha256 in it")
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
    meta = sealed(dict(meta, fingerprint=fingerprint))
    _atomic_write(path, lambda f: torch.save({**tensors, "meta": json.dumps(meta, sort_keys=True)}, f),
                  sum(v.numel() * v.element_size() for v in tensors.values()))
    return meta


def load_pt(path, rerun_hint, required=None):
    def read(path):
        with zipfile.ZipFile(path) as archive:  # torch.load does not check the zip's CRCs; a flipped byte in an
            damaged = archive.testzip()          # older file's meta would otherwise load
        if damaged:
            raise ValueError(f"{damaged} fails its CRC check")
        payload = torch.load(path, weights_only=True, map_location="cpu")  # tensors only, never code
        return payload, payload.pop("meta")
    return _load_artifact(path, rerun_hint, read, required)


def carried_over(upstream):
    """What a stage's artifact carries over from the artifact it read: the model it was made on (its name, neuron
    sites and dtype, and for the seeing demo the eyes' fingerprint, which check_same_model compares) and the data."""
    kept = {k: upstream[k] for k in ("model", "sites", "dtype", "data", "data_checksum")}
    return dict(kept, eyes=upstream["eyes"]) if "eyes" in upstream else kept


def check_same_model(meta, model_meta, artifact, rerun_hint):
    """Refuse an artifact made for another model (or another set of neuron sites, or other eyes)."""
    if meta["model"] != model_meta["model"]:
        fail(f"{artifact} was made for model '{meta['model']}', not '{model_meta['model']}': "
             f"rerun {rerun_hint} with --model {model_meta['model']}")
    if meta["sites"] != model_meta["sites"]:
        fail(f"{artifact} has other neuron sites than model '{model_meta['model']}' "
             f"({len(meta['sites'])} vs {len(model_meta['sites'])} layers): rerun {rerun_hint}")
    if meta.get("eyes") != model_meta.get("eyes"):  # demo: the same LM behind other eyes sees other images
        made = (f"with the eyes {meta['eyes']}" if meta.get("eyes")
                else "without eyes (on the blind demo: `demo` until 2026-12-06, `demo-blind` now)")
        fail(f"{artifact} was made {made}, not with the eyes {model_meta.get('eyes')} that "
             f"'{model_meta['model']}' has now (SGM_EYES or sgm/eyes.safetensors): rerun {rerun_hint}")


def write_bytes(path, data):
    _atomic_write(path, lambda f: f.write(data), len(data))


def write_text(path, text):
    write_bytes(path, text.encode())
