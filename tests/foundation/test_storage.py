import os
from pathlib import Path

import pytest

from orchestrator import storage


def test_join_and_resolve(tmp_path):
    assert storage.join("s3://b/p", "a", "c.mp4") == "s3://b/p/a/c.mp4"
    assert storage.join("s3://b/p/", "/a") == "s3://b/p/a"
    assert storage.resolve("s3://b/root", "videos/x.mp4") == "s3://b/root/videos/x.mp4"
    assert storage.resolve("s3://b/root", "s3://other/x") == "s3://other/x"
    assert storage.resolve(str(tmp_path), "/abs/x") == "/abs/x"
    assert storage.split_s3("s3://bucket/k/e/y") == ("bucket", "k/e/y")
    with pytest.raises(ValueError):
        storage.split_s3("s3:///nokey")


def _roundtrip(base):
    storage.write_bytes(storage.join(base, "a/1.bin"), b"one")
    storage.write_text(storage.join(base, "a/b/2.txt"), "two")
    assert storage.read_bytes(storage.join(base, "a/1.bin")) == b"one"
    assert storage.exists(storage.join(base, "a/b/2.txt"))
    assert not storage.exists(storage.join(base, "a/missing"))
    assert [u.rsplit("/", 1)[1] for u in storage.list_files(storage.join(base, "a"))] == ["1.bin", "2.txt"]
    assert storage.delete_prefix(storage.join(base, "a")) == 2
    assert list(storage.list_files(storage.join(base, "a"))) == []


def test_local_roundtrip(tmp_path):
    _roundtrip(str(tmp_path / "store"))


def test_s3_roundtrip_over_http(s3_bucket):
    _roundtrip(s3_bucket + "/prefix")


def test_s3_listing_paginates(s3_bucket):
    client = storage.s3_client()
    bucket = storage.split_s3(s3_bucket)[0]
    for i in range(1005):  # > one page of 1000
        client.put_object(Bucket=bucket, Key=f"many/{i:05d}", Body=b"")
    assert len(list(storage.list_files(s3_bucket + "/many"))) == 1005


def test_upload_download_dir(tmp_path, s3_bucket):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "x.txt").write_text("x")
    (src / "sub" / "y.txt").write_text("y")
    assert storage.upload_dir(src, s3_bucket + "/d") == 2
    assert storage.download_dir(s3_bucket + "/d", tmp_path / "dst") == 2
    assert (tmp_path / "dst" / "sub" / "y.txt").read_text() == "y"


def test_pyarrow_filesystem_reads_s3(s3_bucket):
    storage.write_bytes(s3_bucket + "/f.bin", b"hello")
    fs, path = storage.filesystem(s3_bucket + "/f.bin")
    with fs.open_input_file(path) as f:
        assert f.read() == b"hello"


def test_missing_object_is_a_clear_error(s3_bucket):
    with pytest.raises(Exception) as e:
        storage.read_bytes(s3_bucket + "/nope")
    assert "NoSuchKey" in repr(e.value) or "Not Found" in str(e.value) or "404" in str(e.value)


# --- untrusted object keys (issue 16, item 1) --------------------------------------------------

CRAFTED_KEYS = ["ckpt/../../../{victim}/x", "ckpt//{victim_abs}/x", "ckpt/a/../../../{victim}/y",
                "ckpt/..", "ckpt/sub/..\\..\\..\\x"]


@pytest.mark.parametrize("key", CRAFTED_KEYS)
def test_download_dir_refuses_keys_that_leave_the_folder(tmp_path, s3_bucket, key):
    """A key under the prefix that names a path outside the destination is refused, and nothing is
    written anywhere (the good file beside it is not half-copied either)."""
    victim = tmp_path / "victim"
    victim.mkdir()
    dst = tmp_path / "a" / "b" / "c" / "dst"
    dst.mkdir(parents=True)
    key = key.format(victim=os.path.relpath(victim, dst.parent).replace(os.sep, "/"),
                     victim_abs=str(victim).lstrip("/"))
    client = storage.s3_client()
    bucket = storage.split_s3(s3_bucket)[0]
    client.put_object(Bucket=bucket, Key="ckpt/good.txt", Body=b"ok")
    client.put_object(Bucket=bucket, Key=key, Body=b"pwned")
    assert key in [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]], "the server kept the key"
    with pytest.raises(storage.UnsafeKey):
        storage.download_dir(s3_bucket + "/ckpt", dst)
    assert list(victim.rglob("*")) == [] and list(dst.rglob("*")) == []
    assert not any(p.read_bytes() == b"pwned" for p in tmp_path.rglob("*") if p.is_file())


def test_download_dir_does_not_follow_a_symlinked_folder_out(tmp_path, s3_bucket):
    outside = tmp_path / "outside"
    outside.mkdir()
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "link").symlink_to(outside, target_is_directory=True)
    storage.write_bytes(s3_bucket + "/p/link/x", b"pwned")
    with pytest.raises(storage.UnsafeKey):
        storage.download_dir(s3_bucket + "/p", dst)
    assert not (outside / "x").exists()


def test_download_dir_skips_folder_markers(tmp_path, s3_bucket):
    """pyarrow (Ray Train's checkpoint upload) leaves ``prefix/`` and ``prefix/sub/`` marker objects;
    they are not files and used to be refused as an empty key (issue 17: a checkpoint on S3 could
    not be downloaded)."""
    fs, path = storage.filesystem(s3_bucket + "/ckpt")
    fs.create_dir(path + "/ds")
    with fs.open_output_stream(path + "/ds/x.pt") as f:
        f.write(b"w")
    assert any(u.endswith("/") for u in storage.list_files(s3_bucket + "/ckpt")), "no marker to skip"
    assert storage.download_dir(s3_bucket + "/ckpt", tmp_path / "dst") == 1
    assert (tmp_path / "dst" / "ds" / "x.pt").read_bytes() == b"w"


@pytest.mark.parametrize("rel", ["../x", "a/../../x", "/etc/x", "a//b", "a/./b", "a\\..\\b", "", "a/\0"])
def test_safe_destination_rejects(tmp_path, rel):
    with pytest.raises(storage.UnsafeKey):
        storage.safe_destination(tmp_path, rel)


def test_safe_destination_accepts_ordinary_keys(tmp_path):
    assert storage.safe_destination(tmp_path, "ds/mp_rank_00_model_states.pt") == \
        (tmp_path / "ds" / "mp_rank_00_model_states.pt").resolve()
    assert storage.safe_destination(tmp_path, "a..b/..c") == (tmp_path / "a..b" / "..c").resolve()


def test_a_folder_is_downloaded_once_per_machine_and_removed_by_its_last_user(tmp_path, s3_bucket, monkeypatch):
    """The ranks of a node resuming from one checkpoint: one downloads while the others wait, all read
    the same folder, and the last to leave removes it; a name written again is another download."""
    import threading
    import time

    uri = s3_bucket + "/ckpt/checkpoint_step_00000004"
    storage.write_bytes(uri + "/ds/model.pt", b"weights-of-step-4")
    storage.write_bytes(uri + "/mplug2_checkpoint.json", b"{}")
    downloads, real = [], storage.download_dir

    def counted(src, dst):
        downloads.append(src)
        time.sleep(0.3)  # the other ranks arrive while it downloads
        return real(src, dst)

    monkeypatch.setattr(storage, "download_dir", counted)
    cache = tmp_path / "cache"
    seen, entered, leave = [], threading.Barrier(3), threading.Event()

    def rank():
        with storage.local_folder(uri, cache_root=cache) as d:
            seen.append((d, (Path(d) / "ds" / "model.pt").read_bytes()))
            entered.wait(10)
            leave.wait(10)

    ranks = [threading.Thread(target=rank) for _ in range(3)]
    for t in ranks:
        t.start()
    _until(lambda: len(seen) == 3)
    assert len(downloads) == 1 and len({d for d, _ in seen}) == 1
    assert {b for _, b in seen} == {b"weights-of-step-4"}
    folder = Path(seen[0][0])
    assert folder.is_dir() and oct(folder.parent.stat().st_mode & 0o777) == oct(0o700)
    leave.set()
    for t in ranks:
        t.join(10)
    assert not folder.exists()  # the last user removed it

    with storage.local_folder(uri, cache_root=cache) as d:  # written again by a later attempt: downloaded again
        storage.write_bytes(uri + "/ds/model.pt", b"weights-of-step-4, attempt 2")
        assert (Path(d) / "ds" / "model.pt").read_bytes() == b"weights-of-step-4"  # what this user holds stays
        with storage.local_folder(uri, cache_root=cache) as again:
            assert again != d and (Path(again) / "ds" / "model.pt").read_bytes() == b"weights-of-step-4, attempt 2"
    assert len(downloads) == 3


def test_a_download_left_by_a_killed_process_is_removed_and_a_shared_cache_is_refused(tmp_path, s3_bucket, monkeypatch):
    storage.write_bytes(s3_bucket + "/a/f.bin", b"a")
    cache = tmp_path / "cache"
    root = cache / f"mplug2-downloads-{os.getuid()}"
    root.mkdir(parents=True, mode=0o700)
    left = root / "0123abcd.d"  # a killed process's complete download: no lock held on it
    left.mkdir()
    (left / "f.bin").write_bytes(b"old")
    (root / "0123abcd.complete").touch()
    with storage.local_folder(s3_bucket + "/a", cache_root=cache) as d:
        assert (Path(d) / "f.bin").read_bytes() == b"a"
        assert not left.exists()
    # a cache folder others can write (planted by another user): each call downloads on its own
    root.chmod(0o777)
    planted = []
    with storage.local_folder(s3_bucket + "/a", cache_root=cache) as d:
        planted.append(d)
        assert (Path(d) / "f.bin").read_bytes() == b"a" and not d.startswith(str(root))
    assert not os.path.exists(planted[0])


def _until(cond, timeout=10.0):
    import time

    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)
