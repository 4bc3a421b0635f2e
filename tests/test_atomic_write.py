"""Nothing lost: a writer killed mid-write leaves the old file whole and no half file.

Writers go through ``heterodyne.files.atomic_write``: the bytes go to a hidden temporary
file ``.NAME.PID.<random>.tmp`` beside the target, unique to each writer, published under
the target's name once complete. The tests kill
real processes with SIGKILL while they write, so they run on POSIX only.
"""

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import heterodyne as hd
from heterodyne.errors import FileFormatError
from heterodyne.files import atomic_write

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL")

# Writes half a file, tells the parent where, then waits to be killed.
SLOW_WRITER = """
import sys, time
from heterodyne.files import atomic_write

def write(tmp):
    with open(tmp, "wb") as f:
        f.write(b"half" * 1000)
        f.flush()
        print(tmp, flush=True)
        time.sleep(120)
        f.write(b"rest")

atomic_write(write, sys.argv[1], overwrite=True)
"""

# Saves two Datasets in turn with hd.to_netcdf, printing after each save, until killed.
LOOPING_WRITER = """
import sys
sys.path.insert(0, sys.argv[3])
import heterodyne as hd
from test_atomic_write import _dataset

versions = [_dataset(seed, int(sys.argv[2])) for seed in (1, 2)]
for k in range(10_000):
    hd.to_netcdf(versions[k % 2], sys.argv[1], overwrite=True)
    print(k, flush=True)
"""


def _dataset(seed, n=8):
    """Three angles of random symmetric ``c2``; random so that saving takes a while."""
    c2 = np.random.default_rng(seed).uniform(1.0, 1.5, (3, n, n))
    t = 0.1 * np.arange(1, n + 1)
    return hd.from_arrays(c2 + np.swapaxes(c2, 1, 2), t, [0.0, 45.0, 90.0], 0.01)


def _start(script, *args):
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE, text=True
    )


def _line(proc, timeout=120.0):
    """The child's next line of output; fails if it prints none within ``timeout`` s."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "the writer printed nothing"
    line = proc.stdout.readline()
    assert line, f"the writer exited with {proc.wait()} before writing"
    return line.strip()


def _kill(proc):
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


@pytest.mark.parametrize("old", [True, False], ids=["replacing a file", "new file"])
def test_writer_killed_mid_write_leaves_the_old_file(tmp_path, old):
    path = tmp_path / "data.nc"
    if old:
        hd.to_netcdf(_dataset(1), path)
        before = path.read_bytes()
    proc = _start(SLOW_WRITER, path)
    tmp = Path(_line(proc))
    assert tmp.read_bytes() == b"half" * 1000  # killed while the temporary file is half full
    _kill(proc)
    if old:
        assert path.read_bytes() == before
        assert hd.load(path).identical(_dataset(1))
    else:
        assert not path.exists()
    # The stale temporary file is hidden, ends in .tmp and is not a file heterodyne reads.
    assert tmp.parent == tmp_path and tmp.name.startswith(f".data.nc.{proc.pid}.")
    assert tmp.suffix == ".tmp"
    assert [p.name for p in tmp_path.glob("*.nc")] == (["data.nc"] if old else [])
    with pytest.raises(FileFormatError, match="is not an HDF5 file"):
        hd.load(tmp)
    # The next write replaces the file and leaves the stale one alone.
    hd.to_netcdf(_dataset(2), path, overwrite=True)
    assert hd.load(path).identical(_dataset(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == [tmp.name, "data.nc"]


def test_to_netcdf_killed_at_any_moment_leaves_a_whole_file(tmp_path):
    path, n = tmp_path / "data.nc", 200
    proc = _start(LOOPING_WRITER, path, n, Path(__file__).parent)
    for _ in range(3):
        _line(proc)
    start = time.perf_counter()
    saved = int(_line(proc))
    # Half the time one save takes: most likely in the middle of writing the next one.
    time.sleep((time.perf_counter() - start) / 2)
    _kill(proc)
    # Killed during save number saved + 1 or just after save number saved: either way
    # the file holds one of the two versions, whole.
    back = hd.load(path)
    assert back.identical(_dataset(1, n)) or back.identical(_dataset(2, n))
    assert saved == 3
    assert [p.name for p in tmp_path.glob("*.nc")] == ["data.nc"]
    for stale in tmp_path.glob(".data.nc.*.tmp"):
        with pytest.raises(FileFormatError, match="cannot be read as HDF5"):
            hd.load(stale)


def test_a_failing_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "data.nc"
    hd.to_netcdf(_dataset(1), path)
    before = path.read_bytes()

    def write(tmp):
        Path(tmp).write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(write, path, overwrite=True)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["data.nc"]


def test_to_netcdf_refuses_to_overwrite_unless_asked(tmp_path):
    path = hd.to_netcdf(_dataset(1), tmp_path / "data.nc")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        hd.to_netcdf(_dataset(2), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["data.nc"]
    hd.to_netcdf(_dataset(2), path, overwrite=True)
    assert hd.load(path).identical(_dataset(2))
    assert [p.name for p in tmp_path.iterdir()] == ["data.nc"]


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc to name descriptors")
def test_the_whole_file_then_its_folder_entry_reach_the_disk_around_the_rename(
    tmp_path, monkeypatch
):
    synced = []
    real_fsync = os.fsync

    def fsync(descriptor):
        target = Path(os.readlink(f"/proc/self/fd/{descriptor}"))
        synced.append((target.name, target.is_file() and target.read_bytes()))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    path = atomic_write(lambda tmp: Path(tmp).write_bytes(b"whole"), tmp_path / "out.bin")
    # the temporary file, complete, before the rename; then the folder, after it
    (tmp_name, content), folder = synced
    assert tmp_name.startswith(f".out.bin.{os.getpid()}.") and tmp_name.endswith(".tmp")
    assert content == b"whole" and folder == (tmp_path.name, False)
    assert path.read_bytes() == b"whole"


# Waits at a barrier with its rival, then saves its own Dataset to the same new file.
RACING_WRITER = """
import sys
sys.path.insert(0, sys.argv[3])
import heterodyne as hd
from test_atomic_write import _dataset

ds = _dataset(int(sys.argv[2]), 60)
print("ready", flush=True)
sys.stdin.readline()
try:
    hd.to_netcdf(ds, sys.argv[1])
    print("wrote", flush=True)
except hd.OverwriteError as err:
    print("refused", err, flush=True)
"""


def test_two_processes_writing_one_new_file_one_wins_the_other_is_refused(tmp_path):
    """Both pass the existence check at the same time; the publication (a hard link)
    lets only one through, and the file is the winner's, whole."""
    for attempt in range(3):
        path = tmp_path / f"same{attempt}.nc"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", RACING_WRITER, str(path), str(seed), Path(__file__).parent],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for seed in (1, 2)
        ]
        for proc in procs:
            assert _line(proc) == "ready"
        for proc in procs:  # the start signal, as close together as two writes allow
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outcomes = [_line(proc) for proc in procs]
        for proc in procs:
            assert proc.wait(timeout=60) == 0
        assert sorted(o.split()[0] for o in outcomes) == ["refused", "wrote"], outcomes
        winner = 1 + [o.split()[0] for o in outcomes].index("wrote")
        assert hd.load(path).identical(_dataset(winner, 60))
        assert "overwrite=True" in next(o for o in outcomes if o.startswith("refused"))
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_threads_overwriting_one_file_each_write_whole_files(tmp_path):
    """Writers in one process no longer share a temporary name: all succeed, the file is
    one of theirs, whole, and no temporary file is left."""
    from concurrent.futures import ThreadPoolExecutor

    path = tmp_path / "data.nc"
    versions = [_dataset(seed, 40) for seed in range(4)]
    with ThreadPoolExecutor(4) as pool:
        written = list(pool.map(lambda ds: hd.to_netcdf(ds, path, overwrite=True), versions * 3))
    assert written == [path] * 12
    back = hd.load(path)
    assert any(back.identical(ds) for ds in versions)
    assert [p.name for p in tmp_path.iterdir()] == ["data.nc"]


def test_a_target_name_of_251_characters_is_written_and_a_longer_one_refused(tmp_path):
    long = tmp_path / ("x" * 248 + ".nc")
    hd.to_netcdf(_dataset(1), long)
    assert hd.load(long).identical(_dataset(1))
    with pytest.raises(hd.OptionError, match="has 256 bytes; file systems allow 255"):
        hd.to_netcdf(_dataset(1), tmp_path / ("x" * 253 + ".nc"))
    with pytest.raises(hd.OptionError, match="has 256 bytes"):
        hd.load(tmp_path / ("x" * 253 + ".nc"))
