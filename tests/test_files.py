"""dynadiff.files: atomic writes through a temporary path, and the file-stamp digest."""

import hashlib
import os

import pytest

from dynadiff.files import atomic_path, part_path, stamp_digest, write_text


def test_atomic_path_renames_when_the_block_ends(tmp_path):
    target = tmp_path / "x.npy"
    with atomic_path(target) as tmp:
        assert tmp == part_path(target) == tmp_path / ".x.npy.part"
        tmp.write_bytes(b"new")
        assert not target.exists()  # nothing under the final name while it is written
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]


def test_atomic_path_keeps_the_previous_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "x.json"
    write_text(target, "old")
    with pytest.raises(OSError, match="No space left"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise OSError(28, "No space left on device")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]  # the temporary file removed


def test_atomic_path_suffix_for_writers_that_read_the_format_from_the_name(tmp_path):
    with atomic_path(tmp_path / "bold.nii.gz", suffix=".nii.gz") as tmp:
        assert tmp.name == ".bold.nii.gz.part.nii.gz"
        tmp.write_bytes(b"x")
    assert (tmp_path / "bold.nii.gz").read_bytes() == b"x"


def _stamp(files_and_names) -> str:
    h = hashlib.sha1()
    for path, name in files_and_names:
        st = path.stat()
        h.update(f"{name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "ckpt" / "sub").mkdir(parents=True)
    for rel, size in (("ckpt/b.bin", 7), ("ckpt/a.bin", 8), ("ckpt/sub/c.json", 9), ("other.txt", 5)):
        (tmp_path / rel).write_bytes(b"x" * size)
        os.utime(tmp_path / rel, ns=(1_000_000_000 + size, 1_700_000_000_123_456_789 + size))
    return tmp_path


def test_stamp_digest_of_a_file_and_of_a_folder(tree):
    ckpt = tree / "ckpt"
    assert stamp_digest(tree / "other.txt") == _stamp([(tree / "other.txt", "other.txt")])
    assert stamp_digest(str(ckpt)) == stamp_digest(ckpt) == _stamp(  # sorted, names relative to the folder
        [(ckpt / "a.bin", "a.bin"), (ckpt / "b.bin", "b.bin"), (ckpt / "sub" / "c.json", "sub/c.json")])


def test_stamp_digest_of_a_list_keeps_its_order_and_sees_a_rewrite(tree):
    files = [tree / "other.txt", tree / "ckpt" / "b.bin"]
    assert stamp_digest(files) == stamp_digest(iter(files)) == _stamp([(f, f.name) for f in files])
    assert stamp_digest(files) != stamp_digest(files[::-1])
    before = stamp_digest(files)
    os.utime(files[1], ns=(1, 2))
    assert stamp_digest(files) != before


def test_stamp_digest_of_a_missing_file_is_an_error(tree):
    with pytest.raises(FileNotFoundError):
        stamp_digest([tree / "other.txt", tree / "gone.bin"])
