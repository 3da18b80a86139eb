"""data/atomic_write.py: the one writer behind checkpoints' small files, manifests, sidecars and predictions."""
import os

import pytest

from data.atomic_write import write_atomic


def _leftovers(folder) -> list[str]:
    return [n for n in os.listdir(folder) if n.endswith(".tmp")]


@pytest.mark.parametrize("payload, expected", [("héllo\n", "héllo\n".encode()), (b"\x00\x01", b"\x00\x01"),
                                               (lambda f: f.write(b"from a writer"), b"from a writer")])
def test_writes_text_bytes_or_through_a_function(tmp_path, payload, expected):
    path = tmp_path / "sub" / "out.bin"  # the folder is made
    assert write_atomic(path, payload) == str(path)
    assert path.read_bytes() == expected
    assert _leftovers(path.parent) == []


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "predictions.json"
    write_atomic(path, "old")

    def boom(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, boom)
    assert path.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_interrupt_leaves_no_temp(tmp_path):
    def interrupted(f):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(tmp_path / "x", interrupted)
    assert os.listdir(tmp_path) == []


def test_mode_follows_the_umask_like_open(tmp_path):
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "latest", "step_00000002")
        with open(tmp_path / "plain", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    mode = lambda name: os.stat(tmp_path / name).st_mode & 0o777  # noqa: E731
    assert mode("latest") == mode("plain") == 0o644  # readable by a cluster's other users, as before


def test_an_existing_temp_name_is_never_reused(tmp_path, monkeypatch):
    # Another writer's temporary file under the same name must not be opened: O_EXCL refuses it.
    import secrets
    monkeypatch.setattr(secrets, "token_hex", lambda n: "feed")
    clash = tmp_path / f".out.{os.getpid()}.feed.tmp"
    clash.write_text("someone else's")
    with pytest.raises(FileExistsError):
        write_atomic(tmp_path / "out", "mine")
    assert clash.read_text() == "someone else's" and not (tmp_path / "out").exists()
