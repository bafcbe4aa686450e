"""`atomic_dir` on a real full disk (a small tmpfs): whichever library's write fails (Python's, torch's,
safetensors'), the error is `DiskFull` naming the folder, nothing is left behind, and once space returns
the same write succeeds. Errors that are not a full disk pass through unchanged."""
from __future__ import annotations

import pytest
import torch

from core.atomic import DiskFull, atomic_dir, reports_disk_full
from core.context import JobCancelled
from tests.conftest import REPO
from tests.reliability.services import SmallDisk


@pytest.fixture
def disk(tmp_path):
    try:
        d = SmallDisk(tmp_path / "disk", 4).mount()
    except RuntimeError as e:
        pytest.fail(f"{e}: these tests fill a real (small) disk")
    yield d
    d.unmount()


def _write(writer: str, folder) -> None:
    weights = {"w": torch.arange(20_000, dtype=torch.float32)}  # 80 kB: more than a full disk takes
    if writer == "torch":  # torch's zip writer: a plain RuntimeError ("unexpected pos") on a short write
        torch.save(weights, folder / "state.pt")
    elif writer == "safetensors":  # safetensors: SafetensorError("... No space left on device (os error 28)")
        from safetensors.torch import save_file
        save_file(weights, str(folder / "adapter_model.safetensors"))
    else:  # Python's own: OSError(ENOSPC)
        (folder / "records.jsonl").write_bytes(b"x" * 80_000)


@pytest.mark.parametrize("writer", ["python", "torch", "safetensors"])
def test_a_full_disk_is_disk_full_naming_the_folder_and_nothing_is_left(disk, writer):
    target = disk.path / "adapters" / "job-7" / "checkpoints" / "step_000004"
    disk.fill()
    with pytest.raises(DiskFull) as e:
        with atomic_dir(target) as tmp:
            _write(writer, tmp)
    msg = str(e.value)
    assert msg.startswith("the disk is full (no space left on device) under ") and str(target) in msg, msg
    assert "free space there" in msg and e.value.errno == 28 and e.value.folder == target
    assert list(target.parent.iterdir()) == []  # neither the folder nor its temp folder
    disk.free()
    with atomic_dir(target) as tmp:  # space is back: the same write succeeds
        _write(writer, tmp)
    assert [p.name for p in target.parent.iterdir()] == ["step_000004"]


def test_errors_that_are_not_a_full_disk_pass_through(disk):
    target = disk.path / "datasets" / "job-1"
    with pytest.raises(RuntimeError, match="boom"):  # a RuntimeError with space left: not a full disk
        with atomic_dir(target):
            raise RuntimeError("boom")
    disk.fill()
    with pytest.raises(JobCancelled):  # a cancel while the disk happens to be full stays a cancel
        with atomic_dir(target):
            raise JobCancelled("job 1 cancelled")
    with pytest.raises(ValueError):
        with atomic_dir(target):
            raise ValueError("bad spec")
    assert list(target.parent.iterdir()) == []


def test_reports_disk_full_names_the_folder_of_a_write_outside_atomic_dir(disk):
    run = disk.path / "adapters" / "job-3"
    run.mkdir(parents=True)
    disk.fill()
    with pytest.raises(DiskFull) as e:
        with reports_disk_full(run):
            with (run / "metrics.jsonl").open("a") as f:  # an append (training's metrics.jsonl)
                f.write("{}\n" * 50_000)
    assert str(run) in str(e.value)
    with pytest.raises(KeyError):
        with reports_disk_full(run):
            raise KeyError("not a disk error")


def test_a_temp_folder_left_by_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    """A worker SIGKILLed mid-write runs no `finally`: its temp folder stayed for good (found by the soak,
    issue #27: exports/.job-22.tmp-...). The next atomic_dir in the same folder removes it, whatever its target
    (a resumed training writes the next checkpoint, not the one it was killed in); a live writer's stays."""
    import signal
    import subprocess
    import sys
    root = tmp_path / "checkpoints"
    code = ("import sys, time; from pathlib import Path; from core.atomic import atomic_dir\n"
            "with atomic_dir(Path(sys.argv[1])) as tmp:\n"
            "    (tmp / 'adapter_model.safetensors').write_bytes(b'x' * 1000)\n"
            "    print('writing', flush=True); time.sleep(60)\n")
    killed = subprocess.Popen([sys.executable, "-c", code, str(root / "step_000004")], stdout=subprocess.PIPE,
                              text=True, cwd=REPO)
    live = subprocess.Popen([sys.executable, "-c", code, str(root / "step_000002")], stdout=subprocess.PIPE,
                            text=True, cwd=REPO)
    try:
        assert killed.stdout.readline().strip() == "writing" and live.stdout.readline().strip() == "writing"
        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
        left = [p.name for p in root.iterdir()]
        assert len(left) == 2 and all(n.startswith((".step_000004.tmp-", ".step_000002.tmp-")) for n in left), left
        with atomic_dir(root / "step_000006") as tmp:  # the resumed run's next checkpoint
            (tmp / "adapter_model.safetensors").write_bytes(b"y")
        names = sorted(p.name for p in root.iterdir())
        assert names[-1] == "step_000006" and len(names) == 2 and names[0].startswith(".step_000002.tmp-"), names
    finally:
        for p in (killed, live):
            p.kill()
            p.wait(10)


def test_torchs_short_write_error_is_a_full_disk_even_once_space_is_back(tmp_path):
    """Found by the soak (seed 2, third run): a checkpoint's torch.save failed on the full disk with
    "[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0", and by the time the error was judged
    the filler had been freed, so it was reported as a plain RuntimeError. torch's short write says so itself."""
    from core.atomic import is_disk_full
    err = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    assert is_disk_full(err, tmp_path)  # tmp_path's disk has room now
    assert not is_disk_full(RuntimeError("something else went wrong"), tmp_path)
