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
    assert storage.safe_name("Trouser") == "Trouser"


def test_atomic_local_write_leaves_no_temp(tmp_path):
    uri = str(tmp_path / "d" / "f.json")
    storage.write_json(uri, {"a": 1})
    storage.write_json(uri, {"a": 2})
    assert storage.read_json(uri) == {"a": 2}
    assert os.listdir(tmp_path / "d") == ["f.json"]


def test_s3_round_trip(bucket):
    uri = f"{bucket}/x/y.bin"
    storage.write_bytes(uri, b"hello")
    assert storage.exists(uri) and storage.read_bytes(uri) == b"hello"
    assert storage.listdir(f"{bucket}/x") == ["y.bin"]
    storage.remove(f"{bucket}/x")
    assert not storage.exists(uri)


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
        with pytest.raises(ArtifactError, match="credentials|storage"):
            storage.read_bytes("s3://some-bucket/x")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
