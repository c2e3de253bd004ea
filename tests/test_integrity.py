"""Nothing lost, nothing mixed (issue 27): one writer per run folder (a lock, tried with two real processes),
artifacts whose meta is sealed as well as their arrays (every byte of a .npz and a .pt flipped in turn), a report
that appears as one set (a kill between two renames, simulated), faults on write as one line (the kernel's own
ENOSPC from /dev/full, a read-only folder), the temp files of dead processes removed and never a live one's, and
04 resumed after a kill to the same report."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, write_items

from common import UserError
from sgm import artifacts
from sgm.artifacts import (check_set, disk_fault, load_npz, load_pt, lock_folder, release_locks,
                           remove_stale_temps, save_npz, save_pt, write_set)

# A process that takes a folder's lock as a stage does, says so, and holds it until killed.
HOLDER = ("import sys, time; from sgm.artifacts import lock_folder; lock_folder(sys.argv[1], '01_collect.py'); "
          "print('locked', flush=True); time.sleep(600)")


class Killed(BaseException):
    """A kill at a chosen point (no `except Exception` in the stages catches it), simulated in-process."""


def hold(folder):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def stage(cwd, script, *args):
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True)
    return done, time.perf_counter() - started


@pytest.fixture
def dead_pid():
    """The pid of a process that has ended (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# ---- 1. one writer per run ------------------------------------------------------------------------------------

def test_a_second_run_on_a_locked_run_refuses_at_once_naming_the_holder(tmp_path):
    """The issue's mix: 01 --pooling max on a run another 01 is writing. It refuses in one line naming the run and
    the holder's pid, before the data or the model loads, and touches nothing of the first run's."""
    data = write_items(tmp_path / "items.jsonl")
    partial = tmp_path / "runs/mix/activations.partial"
    partial.mkdir(parents=True)
    (partial / "key.txt").write_text("the first run's")
    holder = hold(tmp_path / "runs/mix")
    try:
        done, seconds = stage(tmp_path, "01_collect.py", "--model", "tiny", "--run", "mix", "--data", data,
                              "--mode", "prompts", "--pooling", "max")
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    [line] = done.stderr.strip().splitlines()
    assert line == (f"error: run runs/mix is in use by 01_collect.py (pid {holder.pid}), which holds "
                    "runs/mix/.lock: wait for it to finish, or use another --run")
    assert "items," not in done.stdout  # stopped before the data and the model (the line after the model loads)
    assert (partial / "key.txt").read_text() == "the first run's"  # the first run's pieces untouched


def test_every_stage_takes_the_lock(tmp_path):
    """02, 03 (and its --export target) and 04, each run in this process while another process holds the lock."""
    from test_pipeline import run_stage
    holder = hold(tmp_path / "runs/r")
    export_holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from sgm.artifacts import lock_folder; "
        "lock_folder(Path(sys.argv[1]), '03_suppress.py', Path(sys.argv[1]) / '.out.lock', 'export out'); "
        "print('locked', flush=True); time.sleep(600)"), str(tmp_path / "exports")], stdout=subprocess.PIPE, text=True,
        cwd=REPO)
    assert export_holder.stdout.readline().strip() == "locked"
    try:
        for script, *args in (["02_score.py", "--run", "r"], ["03_suppress.py", "--run", "r"],
                              ["04_evaluate.py", "--model", "tiny", "--run", "r"]):
            with pytest.raises(UserError) as error:
                run_stage(script, *args, cwd=tmp_path)
            assert error.value.message.startswith(f"run runs/r is in use by 01_collect.py (pid {holder.pid})"), script
        with pytest.raises(UserError) as error:
            run_stage("03_suppress.py", "--run", "elsewhere", "--export", "exports/out", cwd=tmp_path)
        assert error.value.message == (f"export exports/out is in use by 03_suppress.py (pid {export_holder.pid}), "
                                       "which holds exports/.out.lock: wait for it to finish, or use another --export "
                                       "folder")
    finally:
        for process in (holder, export_holder):
            process.kill()
            process.wait()


def test_a_lock_left_by_a_killed_process_is_taken_over_saying_so(tmp_path, capsys):
    holder = hold(tmp_path / "runs/r")
    holder.send_signal(signal.SIGKILL)  # no clean-up runs: its record stays, the kernel drops its lock
    holder.wait()
    assert (tmp_path / "runs/r/.lock").read_text() == f"{holder.pid} 01_collect.py\n"
    try:
        lock_folder(tmp_path / "runs/r", "02_score.py")
        assert (tmp_path / "runs/r/.lock").read_text() == f"{os.getpid()} 02_score.py\n"
    finally:
        release_locks()
    assert capsys.readouterr().out.strip() == (f"note: run {tmp_path}/runs/r was left locked by 01_collect.py "
                                               f"(pid {holder.pid}, dead): taking it over")
    assert (tmp_path / "runs/r/.lock").read_text() == ""  # a clean end leaves nothing to take over
    lock_folder(tmp_path / "runs/r", "02_score.py")  # and the next one says nothing
    release_locks()
    assert capsys.readouterr().out == ""


def test_a_stage_that_stops_before_writing_leaves_no_run_folder(tmp_path):
    from test_pipeline import run_stage
    with pytest.raises(UserError, match="01_collect.py first"):
        run_stage("02_score.py", "--run", "nothing-here", cwd=tmp_path)
    assert not (tmp_path / "runs").exists()


# ---- 2. sealed artifacts -------------------------------------------------------------------------------------

def made(tmp_path, kind):
    meta = {"stage": "03_suppress", "settings": {"strength": 1.0, "method": "aura"}}
    if kind == "pt":
        return save_pt(tmp_path / "suppression.pt", {"alpha": torch.linspace(0, 1, 20)}, meta), load_pt
    return save_npz(tmp_path / "expertise.npz", {"auroc": np.linspace(0, 1, 20)}, meta), load_npz


@pytest.mark.parametrize("kind", ["npz", "pt"])
def test_a_flipped_meta_byte_is_refused_naming_file_and_stage(tmp_path, kind):
    """The issue's case: "strength": 1.0 -> 0.0 by one byte in the file; and the same edit made with a fresh zip
    (valid CRCs), which only meta_sha256 catches."""
    saved, load = made(tmp_path, kind)
    path = next(tmp_path.iterdir())
    raw, encoding = path.read_bytes(), "utf-8" if kind == "pt" else "utf-32-le"  # numpy stores str as UTF-32
    one, zero = ('"strength": 1.0'.encode(encoding), '"strength": 0.0'.encode(encoding))
    assert raw.count(one) == 1 and sum(x != y for x, y in zip(one, zero)) == 1  # one byte
    path.write_bytes(raw.replace(one, zero))
    with pytest.raises(UserError) as error:
        load(path, rerun_hint="03_suppress.py")
    assert str(path) in error.value.message and error.value.message.endswith("rerun 03_suppress.py")
    edited = json.dumps(dict(saved, settings={"strength": 0.0, "method": "aura"}), sort_keys=True)
    if kind == "pt":
        torch.save({"alpha": torch.linspace(0, 1, 20), "meta": edited}, path)
    else:
        np.savez(path, auroc=np.linspace(0, 1, 20), meta=np.array(edited))
    with pytest.raises(UserError, match="its meta does not match the meta_sha256 in it"):
        load(path, rerun_hint="03_suppress.py")


@pytest.mark.parametrize("kind", ["npz", "pt"])
def test_every_single_flipped_byte_is_refused_or_changes_nothing(tmp_path, kind):
    """Each byte of a small artifact flipped in turn: the load refuses it, or gives exactly the saved arrays and
    meta (a byte nothing reads: zip padding, a timestamp). Never a changed value."""
    saved, load = made(tmp_path, kind)
    path = next(tmp_path.iterdir())
    raw, [(_, original)] = path.read_bytes(), load(path, rerun_hint="03_suppress.py")[0].items()
    refused = harmless = 0
    for position in range(len(raw)):
        path.write_bytes(raw[:position] + bytes([raw[position] ^ 0x01]) + raw[position + 1:])
        try:
            arrays, meta = load(path, rerun_hint="03_suppress.py")
        except UserError:
            refused += 1
            continue
        [(name, values)] = arrays.items()
        assert meta == saved and np.array_equal(np.asarray(values), np.asarray(original))
        harmless += 1
    print(f"{kind}: {refused} of {len(raw)} single-byte flips refused, {harmless} change nothing read")
    assert refused > 0.5 * len(raw)


def test_artifacts_keep_their_fingerprints_meaning(tmp_path):
    """`fingerprint` is still the arrays' digest (docs/RESULTS.md cites them); meta_sha256 is the meta's."""
    saved, _ = made(tmp_path, "pt")
    assert saved["fingerprint"] == artifacts.array_fingerprint({"alpha": torch.linspace(0, 1, 20).numpy()})
    assert saved["meta_sha256"] == __import__("hashlib").sha256(json.dumps(
        {k: v for k, v in saved.items() if k != "meta_sha256"}, sort_keys=True).encode()).hexdigest()


# ---- 3. a report is one set ----------------------------------------------------------------------------------

def test_a_kill_between_two_renames_leaves_a_set_that_says_it_is_half_written(tmp_path, monkeypatch):
    folder = tmp_path / "runs/r"
    old = {folder / "results.json": b'{"old": 1}\n', folder / "results-answers.jsonl": b"old\n",
           folder / "results.md": b"# old\n"}
    write_set(old)
    check_set(folder / "results.json")
    renames = []

    def killed_after_one(src, dst):  # the manifest, one file of the set, then the process dies (simulated)
        if len(renames) == 2:
            raise Killed
        renames.append(dst)
        os.rename(src, dst)
    monkeypatch.setattr(artifacts.os, "replace", killed_after_one)
    with pytest.raises(Killed):
        write_set({path: data.replace(b"old", b"new") for path, data in old.items()})
    monkeypatch.undo()
    assert (folder / "results.json").read_bytes() == b'{"new": 1}\n' and (folder / "results.md").read_bytes() == \
        b"# old\n"  # a mixed set on disk ...
    with pytest.raises(ValueError, match="a half-written set: results-answers.jsonl is not the one "
                                         "results.manifest.json lists"):
        check_set(folder / "results.json")  # ... that says so
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]  # its temp files went with it


def test_a_full_disk_while_writing_a_set_keeps_the_old_set_whole(tmp_path, monkeypatch):
    folder = tmp_path / "runs/r"
    old = {folder / "results.json": b"old\n", folder / "results.md": b"# old\n"}
    write_set(old)
    real_write = Path.write_bytes

    def full(self, data):
        if self.name.startswith(".results.md"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, data)
    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(UserError, match=r"^error: cannot write .*results.md \(ENOSPC: No space left on device\): it "
                                        r"needs about 0.0 KB, [\d,.]+ [KM]B free on /"):
        write_set({path: b"new" for path in old})
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith(".")} == {
        "results.json": b"old\n", "results.md": b"# old\n", "results.manifest.json":
        (folder / "results.manifest.json").read_bytes()}
    check_set(folder / "results.json")
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


# ---- 4. faults in one line -----------------------------------------------------------------------------------

# Runs a stage with the writes under a folder made to fail: `full` sends every temp file there to /dev/full (the
# kernel's own ENOSPC, through the real writers: zipfile, torch.save, matplotlib), `readonly` refuses to open any
# file there for writing (EROFS), as a read-only mount or an immutable folder would (root ignores chmod).
FAULTY = """
import builtins, errno, os, runpy, sys
folder, how, script = os.path.abspath(sys.argv[1]), sys.argv[2], sys.argv[3]
real_open = builtins.open
def faulty_open(file, mode="r", *args, **kwargs):
    name = os.path.abspath(os.fspath(file)) if isinstance(file, (str, os.PathLike)) else ""
    if name.startswith(folder) and any(m in mode for m in "wax+"):
        if how == "readonly":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), name)
        if name.endswith(".tmp") and not os.path.basename(name).startswith(".write-probe"):
            return real_open("/dev/full", mode, *args, **kwargs)
    return real_open(file, mode, *args, **kwargs)
builtins.open = faulty_open
sys.argv = sys.argv[3:]
runpy.run_path(script, run_name="__main__")
"""


def faulty_stage(cwd, folder, how, script, *args):
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", FAULTY, str(folder), how, str(REPO / script), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True)
    return done, time.perf_counter() - started


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """runs/t/ through 01 (prompts), 02 and 03 on the tiny model."""
    from test_pipeline import run_stage
    folder = tmp_path_factory.mktemp("faults")
    data = write_items(folder / "items.jsonl", n_per_label=3)
    for script, *args in (["01_collect.py", "--model", "tiny", "--run", "t", "--data", data, "--mode", "prompts"],
                          ["02_score.py", "--run", "t"], ["03_suppress.py", "--run", "t"]):
        run_stage(script, *args, cwd=folder)
    return folder


@pytest.mark.parametrize("script,artifact", [("02_score.py", "expertise.npz"), ("03_suppress.py", "suppression.pt")])
def test_a_full_disk_is_one_line_naming_the_file_and_the_space(tiny_run, script, artifact):
    """In a fresh process: torch.save and zipfile wrap the disk's error in their own (2-4 chained tracebacks)."""
    before = (tiny_run / "runs/t" / artifact).read_bytes()
    done, _ = faulty_stage(tiny_run, tiny_run / "runs/t", "full", script, "--run", "t")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot write runs/t/{artifact} (ENOSPC: No space left on device): it needs about ")
    assert " free on /" in line and line.endswith("free some space (or write elsewhere) and rerun; the earlier "
                                                  "artifacts are intact")
    assert (tiny_run / "runs/t" / artifact).read_bytes() == before  # the earlier artifact intact
    assert not [p.name for p in (tiny_run / "runs/t").iterdir() if p.name.endswith(".tmp")]  # no leftovers


def test_a_read_only_run_folder_is_one_line_before_the_work(tiny_run):
    """04 (and 02) used to find out after all their computation; now before any artifact or model loads."""
    done, seconds = faulty_stage(tiny_run, tiny_run / "runs/t", "readonly", "04_evaluate.py", "--run", "t", "--model",
                                 "tiny")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("error: cannot write runs/t/.lock (EROFS: Read-only file system): runs/t is read-only or "
                           "immutable") and line.endswith("make it writable or write elsewhere (another --run)")
    assert done.stdout == ""  # nothing computed, no model loaded (04 prints its items line after loading)


def test_faults_name_what_failed():
    cases = {errno.ENOENT: "a folder on the way is missing", errno.EACCES: "is read-only or immutable",
             errno.EIO: "fix the disk or folder and rerun"}
    for number, words in cases.items():
        with pytest.raises(UserError) as error:
            disk_fault(OSError(number, os.strerror(number)), "runs/x/a.npz")
        assert error.value.message.startswith(f"cannot write runs/x/a.npz ({errno.errorcode[number]}: ")
        assert words in error.value.message
    # safetensors (Rust) says only `os error 28` inside its own exception; a bug that is no disk fault passes on
    with pytest.raises(UserError, match=r"cannot write exports/x \(ENOSPC"):
        disk_fault(RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                                "\"No space left on device\" }) (os error 28)"), "exports/x", 2 ** 30)
    assert disk_fault(ValueError("a bug"), "runs/x/a.npz") is None


# ---- 5. no leftovers -----------------------------------------------------------------------------------------

def test_stale_temp_files_of_dead_processes_go_a_live_ones_stay(tmp_path, dead_pid, capsys):
    run = tmp_path / "runs/r"
    (run / "activations.partial").mkdir(parents=True)
    live = os.getppid()
    dead = [run / f".activations.npz.{dead_pid}.tmp", run / "activations.partial" / f".batch-00001.npz.{dead_pid}.tmp"]
    kept = [run / f".activations.npz.{live}.tmp", run / "results.json", run / f".results.json.{live}.tmp"]
    for path in dead + kept:
        path.write_text("x")
    lock_folder(run, "01_collect.py")
    release_locks()
    assert [p.exists() for p in dead] == [False, False] and all(p.exists() for p in kept)
    assert f"note: removed 2 temp file(s) of dead processes: {dead[0]}, {dead[1]}" in capsys.readouterr().out


def test_an_export_killed_between_its_two_renames_is_put_back(tmp_path, dead_pid, capsys):
    """The earlier export moved aside to .NAME.PID.old, the new one never renamed in: the next run puts the
    earlier one back; a dead run's half-written .NAME.PID.tmp folder goes."""
    (tmp_path / f".exp.{dead_pid}.old").mkdir()
    (tmp_path / f".exp.{dead_pid}.old" / "SGM_EXPORT.md").write_text("earlier")
    (tmp_path / f".exp.{dead_pid}.tmp").mkdir()
    (tmp_path / f".exp.{dead_pid}.tmp" / "model.safetensors").write_text("half")
    remove_stale_temps(tmp_path, "exp.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]
    assert (tmp_path / "exp/SGM_EXPORT.md").read_text() == "earlier"
    out = capsys.readouterr().out
    assert f"note: {tmp_path}/exp was missing (a run killed while replacing it): put back" in out
    assert f"removed 1 temp file(s) of dead processes: {tmp_path}/.exp.{dead_pid}.tmp" in out


# ---- 6. 04 resumes after a kill -------------------------------------------------------------------------------

def evaluate(folder, data):
    from test_pipeline import run_stage
    run_stage("04_evaluate.py", "--model", "tiny", "--run", "r", "--data", data, "--methods", "base,sgm",
              "--max-new-tokens", "4", "--batch-size", "2", "--limits", "0", "--selectivity", "false", cwd=folder)


def test_04_killed_mid_generation_resumes_to_the_same_report(tiny_run, tmp_path, monkeypatch, capsys):
    import shutil

    from sgm import endpoint
    data = tiny_run / "items.jsonl"
    for name in ("uninterrupted", "killed"):
        (tmp_path / name / "runs/r").mkdir(parents=True)
        shutil.copy(tiny_run / "runs/t/suppression.pt", tmp_path / name / "runs/r/suppression.pt")
    evaluate(tmp_path / "uninterrupted", data)
    real_add, added = endpoint.AnswerCache.add, []

    def killed(self, key, value):  # the process dies as it is about to keep its 9th answer (sgm's 3rd)
        if len(added) == 8:
            raise Killed
        added.append(key)
        real_add(self, key, value)
    monkeypatch.setattr(endpoint.AnswerCache, "add", killed)
    with pytest.raises(Killed):
        evaluate(tmp_path / "killed", data)
    monkeypatch.undo()
    run = tmp_path / "killed/runs/r"
    assert not (run / "results.json").exists() and len((run / "results.partial/generation.jsonl").read_text()
                                                       .splitlines()) == 8
    capsys.readouterr()
    evaluate(tmp_path / "killed", data)
    assert "note: resuming a killed run: 8 answers kept in runs/r/results.partial/generation.jsonl" in \
        capsys.readouterr().out
    assert not (run / "results.partial").exists()  # gone once the report is written
    whole = tmp_path / "uninterrupted/runs/r"
    for name in ("results-answers.jsonl", "results.md", "results.png"):
        assert (run / name).read_bytes() == (whole / name).read_bytes(), name
    resumed, straight = (json.loads((r / "results.json").read_text()) for r in (run, whole))
    for report in (resumed, straight):
        report["meta"].pop("peak_rss_mb")  # this process's memory: the one number two runs never share
    assert resumed == straight
    check_set(run / "results.json")


def test_an_export_without_room_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    """check_writable with the size known (an export's: its source's weight files): a disk with less free says so."""
    from sgm.artifacts import check_writable
    monkeypatch.setattr(artifacts.shutil, "disk_usage", lambda path: shutil_usage(total=2 ** 30, used=0, free=2 ** 20))
    with pytest.raises(UserError) as error:
        check_writable(tmp_path, 3 * 2 ** 30, tmp_path / "exports/demo-sgm")
    assert error.value.message.startswith(f"cannot write {tmp_path}/exports/demo-sgm (ENOSPC: No space left on "
                                          f"device): it needs about 3,072.0 MB, 1.0 MB free on /")
    assert not list(tmp_path.iterdir())  # its probe file is gone


def shutil_usage(**fields):
    from collections import namedtuple
    return namedtuple("usage", fields)(**fields)


def test_a_new_set_removes_the_files_of_the_old_one_it_lacks(tmp_path):
    """A sweep's report (with -tradeoff.png) rewritten without strengths: no stale plot stays beside the new set."""
    write_set({tmp_path / "sweep.json": b"1", tmp_path / "sweep-tradeoff.png": b"plot"})
    write_set({tmp_path / "sweep.json": b"2"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.json", "sweep.manifest.json"]
    check_set(tmp_path / "sweep.json")
