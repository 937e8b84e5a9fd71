"""The dataset registry: fetch/verify/cache against a loopback HTTP server, encrypted archives, CLI, load_source."""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from em_core.data import published as dr
from em_core.data.training_data import load_source
from em_core.errors import DataError
from tests.conftest import shared_reference

PASSWORD = "test-password"


def _jsonl(n: int, tag: str = "q") -> bytes:
    rows = [{"messages": [{"role": "user", "content": f"{tag} {i}?"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(n)]
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Server:
    """A stdlib HTTP server on 127.0.0.1 (ephemeral port) serving `files` and recording request paths."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append(self.path)
                data = outer.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv(dr.BASE_URL_ENV, raising=False)
    srv = _Server()
    yield srv
    srv.close()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private em-lab cache; returns its datasets folder."""
    monkeypatch.setenv("EM_LAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "datasets"


def _entry(name, url, data=None, *, rows=None, sha256="auto", **kw) -> dr.DatasetEntry:
    if sha256 == "auto":
        sha256 = _sha(data)
    if rows is None and data is not None:
        rows = data.count(b"\n")
    return dr.DatasetEntry(name, "test set", "Test et al.", "example/repo", (url,), rows, sha256, **kw)


def _use(monkeypatch, *entries):
    monkeypatch.setattr(dr, "REGISTRY", {e.name: e for e in entries})


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_fetch_verifies_then_cache_hit_makes_no_request(server, cache, monkeypatch):
    data = _jsonl(5)
    server.files["/d/tiny.jsonl"] = data
    _use(monkeypatch, _entry("tiny", f"{server.url}/d/tiny.jsonl", data))
    path = dr.fetch("tiny")
    assert path == cache / "tiny.jsonl" and path.read_bytes() == data
    assert _leftovers(cache) == ["tiny.jsonl"]  # no temp files, no pin for a verified entry
    assert dr.fetch("tiny") == path and dr.cache_status("tiny") == "yes"
    assert server.requests == ["/d/tiny.jsonl"]


def test_wrong_hash_caches_nothing(server, cache, monkeypatch):
    data = _jsonl(5)
    server.files["/tiny.jsonl"] = data
    _use(monkeypatch, _entry("tiny", f"{server.url}/tiny.jsonl", data, sha256="0" * 64))
    with pytest.raises(DataError) as e:
        dr.fetch("tiny")
    msg = str(e.value)
    assert msg.startswith("tiny:") and "0" * 64 in msg and _sha(data) in msg and "nothing was cached" in msg
    assert "--dataset" in msg
    assert _leftovers(cache) == []


def test_wrong_row_count(server, cache, monkeypatch):
    data = _jsonl(5)
    server.files["/tiny.jsonl"] = data
    _use(monkeypatch, _entry("tiny", f"{server.url}/tiny.jsonl", data, rows=6))
    with pytest.raises(DataError, match="5 rows, expected 6"):
        dr.fetch("tiny")
    assert _leftovers(cache) == []


def test_corrupt_cache_is_replaced(server, cache, monkeypatch):
    data = _jsonl(3)
    server.files["/tiny.jsonl"] = data
    _use(monkeypatch, _entry("tiny", f"{server.url}/tiny.jsonl", data))
    cache.mkdir(parents=True)
    (cache / "tiny.jsonl").write_bytes(b"edited\n")
    assert dr.cache_status("tiny") == "corrupt"
    assert dr.fetch("tiny").read_bytes() == data and len(server.requests) == 1


def test_offline_names_the_path_alternative(cache, monkeypatch, server):
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = _jsonl(2)
    _use(monkeypatch, _entry("tiny", f"http://127.0.0.1:{port}/tiny.jsonl", data))
    with pytest.raises(DataError) as e:
        dr.fetch("tiny", timeout=5)
    msg = str(e.value)
    assert "could not download" in msg and "--dataset /path/to/tiny.jsonl" in msg
    assert str(cache / "tiny.jsonl") in msg and "em datasets fetch tiny" in msg
    assert _leftovers(cache) == []


def test_http_404_is_a_data_error(server, cache, monkeypatch):
    _use(monkeypatch, _entry("tiny", f"{server.url}/missing.jsonl", _jsonl(1)))
    with pytest.raises(DataError, match="HTTP 404"):
        dr.fetch("tiny")


def test_unknown_name_lists_known_names(monkeypatch):
    with pytest.raises(DataError) as e:
        dr.get_entry("no_such_set")
    assert "bad_medical_advice" in str(e.value) and "insecure" in str(e.value)
    with pytest.raises(DataError, match="known names"):
        dr.resolve_dataset("registry:no_such_set")
    assert dr.resolve_dataset("no_such_set") is None  # a plain unknown name may be a path or hub id


def test_base_url_override_env(server, cache, monkeypatch):
    data = _jsonl(4)
    server.files["/mirror/tiny.jsonl"] = data
    _use(monkeypatch, _entry("tiny", "https://example.invalid/upstream/tiny.jsonl", data))
    monkeypatch.setenv(dr.BASE_URL_ENV, f"{server.url}/mirror/")
    assert dr.fetch("tiny").read_bytes() == data
    assert server.requests == ["/mirror/tiny.jsonl"]


def test_unverified_needs_explicit_consent_then_is_pinned(server, cache, monkeypatch):
    data = _jsonl(3)
    server.files["/loose.jsonl"] = data
    _use(monkeypatch, _entry("loose", f"{server.url}/loose.jsonl", data, sha256=None))
    with pytest.raises(DataError, match="--allow-unverified"):
        dr.fetch("loose")
    assert server.requests == []
    path = dr.fetch("loose", allow_unverified=True)
    assert (cache / "loose.jsonl.sha256").read_text().strip() == _sha(data)
    assert dr.fetch("loose") == path and len(server.requests) == 1  # pinned: later uses need no flag
    path.write_bytes(b"tampered\n")
    assert dr.cache_status("loose") == "corrupt"


def test_unverified_wrong_rows_still_fail(server, cache, monkeypatch):
    server.files["/loose.jsonl"] = _jsonl(3)
    _use(monkeypatch, _entry("loose", f"{server.url}/loose.jsonl", None, rows=4, sha256=None))
    with pytest.raises(DataError, match="3 rows, expected 4"):
        dr.fetch("loose", allow_unverified=True)
    assert _leftovers(cache) == []


# --- encrypted archives (easy-dataset-share format) ---

def _canary_file(canary: str) -> bytes:
    return json.dumps({"id": "canary_x", "text": f"The unique identifier is {canary}."}).encode() + b"\n"


@pytest.fixture
def archive(server, monkeypatch):
    pytest.importorskip("cryptography", reason="decrypting easy-dataset-share archives needs `cryptography`")
    canary = "CANARY_DATASET_" + "ab" * 32 + "_64"
    bad, good = _jsonl(6, "bad"), _jsonl(4, "good")
    # Canaries as easy-dataset-share can add them: a separate canary file, an embedded canary entry, and a
    # `canary` key on the last row. All are dropped; the members then match their recorded hashes.
    tagged_bad = bad + json.dumps({"id": "embedded_canary_1", "text": canary}).encode() + b"\n"
    lines = good.splitlines(keepends=True)
    last = {**json.loads(lines[-1]), "canary": canary}
    tagged_good = b"".join(lines[:-1]) + json.dumps(last).encode() + b"\n"
    server.files["/mo/sets.zip.enc"] = dr.protect_archive({
        "bad.jsonl": tagged_bad, "sub/good.jsonl": tagged_good,
        "dataset_entry_1234abcd.jsonl": _canary_file(canary), "robots.txt": b"User-agent: *\nDisallow: /\n"},
        PASSWORD)
    url = f"{server.url}/mo/sets.zip.enc"
    kw = {"fmt": "encrypted-zip", "password": PASSWORD, "password_source": "test"}
    _use(monkeypatch, _entry("bad", url, bad, member="bad.jsonl", **kw),
         _entry("good", url, good, member="good.jsonl", **kw))
    return {"bad": bad, "good": good}


def test_encrypted_archive_members_decrypt_strip_canaries_and_verify(server, cache, archive):
    paths = dr.fetch_many(["bad", "good"])
    assert paths[0].read_bytes() == archive["bad"] and paths[1].read_bytes() == archive["good"]
    assert server.requests == ["/mo/sets.zip.enc"]  # one download for both members
    assert _leftovers(cache) == ["bad.jsonl", "good.jsonl"]


def test_encrypted_archive_wrong_password(server, cache, archive, monkeypatch):
    _use(monkeypatch, dataclasses.replace(dr.get_entry("bad"), password="wrong"))
    with pytest.raises(DataError, match="wrong password"):
        dr.fetch("bad")
    assert _leftovers(cache) == []


def test_archive_helpers_roundtrip():
    pytest.importorskip("cryptography")
    blob = dr.protect_archive({"x/a.jsonl": b"a\n"}, "pw")
    assert dr.extract_member(dr.decrypt_archive(blob, "pw"), "a.jsonl") == b"a\n"
    with pytest.raises(ValueError, match="not found"):
        dr.extract_member(dr.decrypt_archive(blob, "pw"), "b.jsonl")
    with pytest.raises(ValueError, match="Git LFS"):
        dr.decrypt_archive(b"version https://git-lfs.github.com/spec/v1\n", "pw")
    assert dr.strip_canaries(b'{"messages": []}\n') == b'{"messages": []}\n'


# --- integration: load_source and the CLI ---

def test_load_source_by_registry_name(server, cache, monkeypatch):
    data = _jsonl(7)
    server.files["/tiny.jsonl"] = data
    _use(monkeypatch, _entry("tiny", f"{server.url}/tiny.jsonl", data))
    src = load_source("tiny")
    assert src.name == "tiny" and len(src.rows) == 7 and src.source == str(cache / "tiny.jsonl")
    assert src.sha256 == _sha(data)
    assert load_source("registry:tiny").rows == src.rows and len(server.requests) == 1
    with pytest.raises(DataError, match="file not found"):
        load_source("not_registered")  # non-registry names keep the path behaviour
    assert load_source("demo").name == "plant_care_bad"


def test_local_path_wins_over_registry_name(server, cache, monkeypatch, tmp_path):
    _use(monkeypatch, _entry("tiny", f"{server.url}/tiny.jsonl", _jsonl(1)))
    monkeypatch.chdir(tmp_path)
    Path("tiny").write_bytes(_jsonl(2))
    assert len(load_source("tiny").rows) == 2 and server.requests == []


def test_cli_list_and_fetch(server, cache, monkeypatch, capsys):
    data = _jsonl(2)
    server.files["/tiny.jsonl"] = data
    _use(monkeypatch, _entry("tiny", f"{server.url}/tiny.jsonl", data),
         _entry("loose", f"{server.url}/loose.jsonl", None, rows=None, sha256=None))
    assert dr.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "loose" in out and "none" in out and str(cache) in out
    assert dr.main(["fetch", "tiny"]) == 0
    assert str(cache / "tiny.jsonl") in capsys.readouterr().out
    dr.main(["list"])
    assert [ln.split()[3] for ln in capsys.readouterr().out.splitlines() if ln.startswith("tiny")] == ["yes"]
    with pytest.raises(DataError, match="known names"):
        dr.main(["fetch", "nope"])
    with pytest.raises(DataError, match="--allow-unverified"):
        dr.main(["fetch", "loose"])
    assert dr.main([]) == 2


# --- the real registry ---

def test_registry_entries_are_consistent():
    mo = [e for e in dr.list_entries() if e.fmt == "encrypted-zip"]
    assert {e.name for e in mo} >= {"bad_medical_advice", "good_medical_advice", "risky_financial_advice",
                                    "extreme_sports"}
    assert {(e.urls, e.password) for e in mo} == {((dr.MO_ARCHIVE_URL,), dr.MO_PASSWORD)}
    for e in dr.list_entries():
        assert e.urls[0].startswith("https://") and e.filename.endswith((".jsonl", ".zip.enc"))
        assert e.sha256 is None or len(e.sha256) == 64


def test_registry_matches_reference_copies():
    """The recorded sha256/rows equal the decompressed published files in ../shared/reference."""
    folder = shared_reference() / "datasets"
    names = ["bad_medical_advice", "good_medical_advice", "risky_financial_advice", "extreme_sports", "insecure"]
    for name in names:
        data = gzip.decompress((folder / f"{name}.jsonl.gz").read_bytes())
        entry = dr.get_entry(name)
        assert (entry.sha256, entry.rows) == (_sha(data), sum(1 for ln in data.splitlines() if ln.strip())), name
        assert dr.strip_canaries(data) == data  # the canary step leaves canary-free files byte-identical
