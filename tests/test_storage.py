"""Storage: atomic writes, safe class-name paths, and real S3 through the loopback endpoint."""

import os

import pytest

from mmdist import storage
from mmdist.errors import ArtifactError


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".", "with space", "naïve-é", "T-shirt/top", "/abs", ""])
def test_safe_name_cannot_escape(tmp_path, name):
    safe = storage.safe_name(name)
    assert safe and "/" not in safe and "\\" not in safe and safe not in (".", "..")
    path = os.path.realpath(os.path.join(tmp_path, safe))
    assert os.path.dirname(path) == os.path.realpath(tmp_path)


def test_safe_name_is_injective_on_changed_names():
    assert storage.safe_name("a/b") != storage.safe_name("a_b")
    assert storage.safe_name("trouser") == "trouser" and storage.safe_name("Trouser").startswith("Trouser-")


def test_atomic_local_write_leaves_no_temp(tmp_path):
    uri = str(tmp_path / "d" / "f.json")
    storage.write_json(uri, {"a": 1})
    storage.write_json(uri, {"a": 2})
    assert storage.read_json(uri) == {"a": 2}
    assert os.listdir(tmp_path / "d") == ["f.json"]


def test_a_killed_writers_temp_file_is_hidden_and_swept_before_publishing(tmp_path):
    """A writer killed between write and rename leaves `.<name>.tmp-<hex>`; publish removes it."""
    import subprocess
    import sys

    from mmdist import artifacts
    from mmdist.config import Config

    folder = tmp_path / "samples" / "images" / "c"
    code = ("import os, sys; from mmdist import storage; os.replace = lambda *a: os.kill(os.getpid(), 9); "
            f"storage.write_bytes({str(folder / '00000.png')!r}, b'png')")
    assert subprocess.run([sys.executable, "-c", code]).returncode == -9
    left = os.listdir(folder)
    assert len(left) == 1 and storage.TEMP.match(left[0]) and left[0].startswith(".00000.png.tmp-"), left
    artifacts.publish(str(tmp_path / "samples"), "sample", "fp", Config())
    assert os.listdir(folder) == []


def test_keep_only_removes_what_a_class_folder_should_not_hold(tmp_path):
    for name in ("00000.png", "00001.png", "00002.png", ".00001.png.tmp-0123abcd"):
        (tmp_path / name).write_bytes(b"x")
    assert sorted(storage.keep_only(str(tmp_path), {"00000.png", "00001.png"})) == [
        ".00001.png.tmp-0123abcd", "00002.png"]
    assert sorted(os.listdir(tmp_path)) == ["00000.png", "00001.png"]


def test_uris_in_errors_never_show_credentials():
    assert storage.redact("s3://AKIA:wJalr@bucket/x?X-Amz-Signature=abc") == "s3://bucket/x"
    assert storage.credentials_in("s3://AKIA:wJalr@bucket/x") == "user info"
    assert storage.credentials_in("https://h/x?X-Amz-Credential=AKIA") == "query"
    assert storage.credentials_in("s3://bucket/a@b/c") is None  # '@' in a key is not user info
    with pytest.raises(ArtifactError) as e:
        with storage._storage_errors("s3://AKIA:wJalr@bucket/x"):
            raise OSError("failed: s3://AKIA:wJalr@bucket/x")
    assert "wJalr" not in str(e.value) and "s3://bucket/x" in str(e.value)


def test_s3_round_trip(bucket):
    uri = f"{bucket}/x/y.bin"
    storage.write_bytes(uri, b"hello")
    assert storage.exists(uri) and storage.read_bytes(uri) == b"hello"
    assert storage.listdir(f"{bucket}/x") == ["y.bin"]
    storage.remove(f"{bucket}/x")
    assert not storage.exists(uri)


def test_listdir_sees_what_another_process_wrote_after_a_listing_of_the_parent(bucket):
    import s3fs

    storage.write_bytes(f"{bucket}/p/a/0.bin", b"0")
    assert storage.listdir(f"{bucket}/p") == ["a"]  # s3fs caches this listing
    other = s3fs.S3FileSystem(skip_instance_cache=True)  # another process's client
    other.pipe(f"{bucket}/p/b/1.bin".removeprefix("s3://"), b"1")
    assert storage.listdir(f"{bucket}/p/b") == ["1.bin"]
    assert storage.listdir(f"{bucket}/p") == ["a", "b"]


def test_read_many_keeps_the_order_and_puts_each_error_in_its_place(bucket, tmp_path):
    for root in (bucket, str(tmp_path)):
        uris = [f"{root}/many/{i:03d}.bin" for i in range(40)]
        for i, uri in enumerate(uris):
            if i != 7:
                storage.write_bytes(uri, f"file {i}".encode())
        got = storage.read_many(uris)
        assert [g for i, g in enumerate(got) if i != 7] == [f"file {i}".encode() for i in range(40) if i != 7]
        assert isinstance(got[7], FileNotFoundError), (root, got[7])


def test_write_many_writes_every_file_and_raises_the_first_error_after_the_rest(bucket, tmp_path):
    for root in (bucket, str(tmp_path)):
        files = {f"{root}/out/{i:03d}.bin": f"file {i}".encode() for i in range(40)}
        storage.write_many(files)
        assert storage.read_many(list(files)) == list(files.values())
    # a file that cannot be written (its bucket does not exist) fails the call, not the others
    files = {f"{bucket}/more/{i}.bin": b"x" for i in range(5)}
    with pytest.raises(FileNotFoundError):
        storage.write_many({"s3://no-such-bucket-mmdist/a.bin": b"x", **files})
    assert storage.read_many(list(files)) == [b"x"] * 5


def test_an_s3_image_folder_is_indexed_as_the_same_folder_on_disk(bucket, tmp_path):
    """One recursive listing of the root, grouped by class: nested folders kept, stray files skipped."""
    from helpers import png

    from mmdist import datasets
    from mmdist.config import DataConfig

    files = {"cat/a.png": png(8), "cat/deep/b.PNG": png(8, seed=1), "cat/notes.txt": b"not an image",
             "dog/c.png": png(8, seed=2), "readme.md": b"not a class"}
    for rel, data in files.items():
        storage.write_bytes(f"{bucket}/folder/{rel}", data)
        storage.write_bytes(str(tmp_path / "folder" / rel), data)
    indexed = []
    for root in (f"{bucket}/folder", str(tmp_path / "folder")):
        cfg = DataConfig(source="imagefolder", train=root, test=root, classes=None, channels=1, image_size=8,
                         max_per_class=None)
        index = datasets.index_split(cfg, "train")
        indexed.append((tuple(index.classes), [(it.source_id, it.label) for it in index.items]))
    assert indexed[0] == indexed[1] == (("cat", "dog"), [("cat/a.png", 0), ("cat/deep/b.PNG", 0), ("dog/c.png", 1)])


def test_an_unreadable_file_of_an_s3_image_folder_is_named(bucket, tmp_path):
    from helpers import image_folder

    from mmdist import datasets
    from mmdist.config import DataConfig
    from mmdist.errors import DataError

    local = image_folder(str(tmp_path / "train"), {"cat": 3, "dog": 3}, size=8)
    for dirpath, _, files in os.walk(local):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), local)
            storage.write_bytes(f"{bucket}/folder/{rel}", open(os.path.join(dirpath, f), "rb").read())
    cfg = DataConfig(source="imagefolder", train=f"{bucket}/folder", test=f"{bucket}/folder", classes=None,
                     channels=1, image_size=8, max_per_class=None)
    items = datasets.index_split(cfg, "train").items
    x, y = datasets.load_images(cfg, items)
    assert x.shape == (6, 1, 8, 8) and sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]
    storage.remove(items[4].uri)  # gone between listing and reading
    with pytest.raises(DataError, match=f"{items[4].source_id}: cannot read file"):
        datasets.load_images(cfg, items)


def test_unreachable_s3_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(ArtifactError, match="s3://nowhere/x"):
            storage.read_bytes("s3://nowhere/x")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_missing_credentials_is_one_clear_error(monkeypatch, s3_server, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(ArtifactError) as e:
            storage.read_bytes("s3://some-bucket/x")
        assert str(e.value).startswith("s3://some-bucket/x: no usable credentials"), str(e.value)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


# ----------------------------------------------------------------------------------------------
# Retries are the storage client's own, and every call goes through them
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def dropping_endpoint(monkeypatch):
    """A loopback endpoint that accepts each connection and closes it unanswered; yields a counter."""
    import socket
    import threading

    import s3fs

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    count = [0]

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            count[0] += 1
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
    s3fs.S3FileSystem.clear_instance_cache()
    yield count
    server.close()
    s3fs.S3FileSystem.clear_instance_cache()


CALLS = {"read_bytes": lambda u: storage.read_bytes(u), "write_bytes": lambda u: storage.write_bytes(u, b"x"),
         "exists": storage.exists, "listdir": storage.listdir, "isdir": storage.isdir, "remove": storage.remove,
         "open_read": lambda u: storage.open_read(u).__enter__().read(),
         "read_shard_meta": lambda u: _shard_meta(u)}


def _shard_meta(uri):
    from mmdist import shards

    return shards.read_shard_meta(uri)


@pytest.mark.parametrize("call", sorted(CALLS))
def test_every_storage_call_retries_through_the_clients_configuration(dropping_endpoint, monkeypatch, call):
    """AWS_MAX_ATTEMPTS (botocore's setting) scales the requests of every call; a final failure is one
    line naming the URL. No call swallows the outage (read_shard_meta used to return 'missing')."""
    import s3fs

    counts = {}
    for attempts in (1, 2):
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", str(attempts))
        monkeypatch.setenv("AWS_RETRY_MODE", "standard")
        s3fs.S3FileSystem.clear_instance_cache()
        dropping_endpoint[0] = 0
        with pytest.raises(ArtifactError) as e:
            CALLS[call]("s3://bucket/part-00000.parquet")
        msg = str(e.value)
        assert msg.startswith("s3://bucket/part-00000.parquet: cannot reach the storage service") and "\n" not in msg
        counts[attempts] = dropping_endpoint[0]
    # one attempt is one request (aiohttp re-sends once on a dropped connection), not s3fs's own
    # loop of 5 around botocore's
    assert 0 < counts[1] <= 2 and counts[2] == 2 * counts[1], counts


def test_s3_retries_default_to_botocores_standard_mode_with_10_attempts(monkeypatch):
    import s3fs

    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    monkeypatch.delenv("AWS_RETRY_MODE", raising=False)
    s3fs.S3FileSystem.clear_instance_cache()
    fs, _ = storage.filesystem("s3://bucket/x")
    assert fs.config_kwargs["retries"] == {"mode": "standard", "total_max_attempts": 10} and fs.retries == 1
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.parametrize("names", [
    ["../../x", "..", ".", "/abs/evil", "a/b", "a_b", "a" * 300, "é" * 200, "Cat", "cat", "CAT", "con"],
    ["a/b", "placeholder"],  # the second becomes a name crafted to equal the first's safe form
])
def test_safe_names_never_escape_collide_or_overflow(tmp_path, names):
    if names[1] == "placeholder":
        names[1] = storage.safe_name(names[0])
    safe = [storage.safe_name(n) for n in names]
    assert len({s.casefold() for s in safe}) == len(names)  # distinct on a case-insensitive disk
    for s in safe:
        assert s and "/" not in s and s not in (".", "..") and len(s.encode()) <= 120
        assert os.path.dirname(os.path.realpath(os.path.join(tmp_path, s))) == os.path.realpath(tmp_path)
