"""Atomic writes: a killed save leaves the user's file as it was, and the next save clears its leftovers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from malex.atomic import atomic_write_bytes
from malex.models import build_model, load_model, save_model

# The child saves a model over an existing file and announces when the bytes are in the temporary file;
# fsync is made to wait (in the child only), so the parent's kill -9 lands mid-save, every time.
CHILD = textwrap.dedent("""
    import sys, time
    import torch
    import malex.atomic
    from malex.models import build_model, save_model

    def stalled_fsync(fd):
        print("written", flush=True)
        time.sleep(120)

    malex.atomic.os.fsync = stalled_fsync
    torch.manual_seed(1)
    save_model(build_model("digits_cnn", (1, 8, 8), 10), sys.argv[1], "digits_cnn", overwrite=True)
""")


def test_kill_9_during_a_save_leaves_the_old_file_and_the_next_save_cleans_up(tmp_path):
    path = tmp_path / "model.safetensors"
    torch.manual_seed(0)
    save_model(build_model("digits_cnn", (1, 8, 8), 10), path, "digits_cnn")
    before = path.read_bytes()
    partial = tmp_path / ".model.safetensors.partial"

    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "written"
        assert partial.stat().st_size > 0  # the new bytes sit in the temporary file
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert path.read_bytes() == before  # the user's file is untouched
    load_model(path)
    assert partial.exists()  # what a killed save leaves behind

    torch.manual_seed(2)
    with pytest.warns(UserWarning, match=r"removed .*\.model\.safetensors\.partial.* left by an interrupted save"):
        save_model(build_model("digits_cnn", (1, 8, 8), 10), path, "digits_cnn", overwrite=True)
    assert not partial.exists() and path.read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_a_save_without_leftovers_says_nothing(tmp_path, recwarn):
    atomic_write_bytes(tmp_path / "a.bin", b"one")
    atomic_write_bytes(tmp_path / "a.bin", b"two")
    assert (tmp_path / "a.bin").read_bytes() == b"two" and not recwarn.list
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_a_folder_in_the_temporary_files_place_is_refused(tmp_path):
    (tmp_path / ".a.bin.partial").mkdir()
    with pytest.raises(IsADirectoryError, match="a.bin.partial"):
        atomic_write_bytes(tmp_path / "a.bin", b"one")
    assert not (tmp_path / "a.bin").exists()
