"""pipeline/local_es.py: the zip is checked against the checksum published beside it before
it is unpacked, a secure node gets a random password kept in a file only its owner reads,
and `stop` signals nothing but the Elasticsearch of its own folder."""
from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import zipfile

import pytest

from newsbeam.pipeline import local_es

ARTIFACT_PATH = f"/org/elasticsearch/distribution/integ-test-zip/elasticsearch/{local_es.VERSION}"


def _distribution() -> bytes:
    """A stand-in for the integ-test zip: what fetch() unpacks and looks for."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(f"elasticsearch-{local_es.VERSION}/bin/elasticsearch", "#!/bin/sh\n")
    return buffer.getvalue()


@pytest.fixture
def central(feed_server, tmp_path, monkeypatch):
    """A loopback server playing Maven Central; the local Maven repository is empty."""
    monkeypatch.setenv("MAVEN_REPO", str(tmp_path / "m2"))
    monkeypatch.delenv("NEWSBEAM_ES_CHECKSUM", raising=False)
    return feed_server


def _serve(central, body: bytes, checksums: dict[str, str]) -> str:
    name = f"{ARTIFACT_PATH}/elasticsearch-{local_es.VERSION}.zip"
    central.serve(name, body, headers={"Content-Type": "application/zip"})
    for algorithm, digest in checksums.items():
        central.serve(f"{name}.{algorithm}", f"{digest}  elasticsearch-{local_es.VERSION}.zip\n".encode())
    return central.url("")


def test_a_zip_that_matches_its_published_sha512_is_unpacked(central, tmp_path):
    body = _distribution()
    base = _serve(central, body, {"sha512": hashlib.sha512(body).hexdigest()})
    home = local_es.fetch(cache=tmp_path / "cache", central=base, maven=None)
    assert (home / "bin" / "elasticsearch").exists()
    assert central.hits[f"{ARTIFACT_PATH}/elasticsearch-{local_es.VERSION}.zip.sha512"] == 1


def test_a_tampered_zip_is_deleted_and_never_unpacked(central, tmp_path):
    body = _distribution()
    base = _serve(central, body + b"tampered", {"sha512": hashlib.sha512(body).hexdigest()})
    with pytest.raises(local_es.LocalEsError, match="does not match its published sha512"):
        local_es.fetch(cache=tmp_path / "cache", central=base, maven=None)
    assert not (tmp_path / "cache" / f"elasticsearch-{local_es.VERSION}").exists()
    assert not local_es._zip_path().exists()


def test_the_sha1_is_used_where_no_sha512_is_published(central, tmp_path):
    body = _distribution()
    base = _serve(central, body, {"sha1": hashlib.sha1(body).hexdigest()})
    archive = tmp_path / "elasticsearch.zip"
    archive.write_bytes(body)
    url = f"{base}{ARTIFACT_PATH}/elasticsearch-{local_es.VERSION}.zip"
    assert local_es.verify_archive(archive, url) == f"sha1 from {url}.sha1"


def test_without_a_published_checksum_the_pinned_digest_decides(central, tmp_path):
    body = _distribution()  # not the real distribution, so not what the pinned digest names
    base = _serve(central, body, {})
    assert local_es.VERSION in local_es.PINNED_SHA512
    with pytest.raises(local_es.LocalEsError, match="does not match its published sha512 .*pinned"):
        local_es.fetch(cache=tmp_path / "cache", central=base, maven=None)
    assert not (tmp_path / "cache" / f"elasticsearch-{local_es.VERSION}").exists()


def test_without_any_checksum_nothing_is_unpacked_unless_one_is_given(central, tmp_path, monkeypatch):
    monkeypatch.setattr(local_es, "PINNED_SHA512", {})
    body = _distribution()
    base = _serve(central, body, {})
    with pytest.raises(local_es.LocalEsError, match="no checksum published .*NEWSBEAM_ES_CHECKSUM"):
        local_es.fetch(cache=tmp_path / "cache", central=base, maven=None)
    monkeypatch.setenv("NEWSBEAM_ES_CHECKSUM", f"sha512:{hashlib.sha512(body).hexdigest()}")
    assert (local_es.fetch(cache=tmp_path / "cache", central=base, maven=None) / "bin" / "elasticsearch").exists()


def test_stop_leaves_alone_a_process_a_stale_pid_file_names(tmp_path):
    bystander = subprocess.Popen(["sleep", "120"])
    try:
        (tmp_path / "es.pid").write_text(str(bystander.pid))
        assert local_es.running_pid(tmp_path) is None
        local_es.stop(tmp_path, timeout=2)
        assert bystander.poll() is None, "stop killed a process that is not this folder's Elasticsearch"
    finally:
        bystander.kill()
        bystander.wait()


def test_a_secure_node_has_a_random_password_in_a_file_only_its_owner_reads(secure_es_node):
    directory = secure_es_node.directory
    assert secure_es_node.password != "newsbeam-secret" and len(secure_es_node.password) >= 24
    saved = directory / "instance.json"
    assert stat.S_IMODE(os.stat(saved).st_mode) == 0o600
    assert local_es.Instance.load(directory).password == secure_es_node.password
    assert secure_es_node.request("GET", "/_security/_authenticate")["username"] == secure_es_node.username
    # The pid check recognises the real node of this folder (and so `stop` still stops it).
    assert local_es.running_pid(directory) == int((directory / "es.pid").read_text())
