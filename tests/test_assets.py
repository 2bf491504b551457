"""Offline assets: a cache shared by many processes (a sweep's workers on a fresh machine)."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import shutil
import sys
import time
import zipfile
from pathlib import Path

import pytest

from geodistill import assets
from geodistill.assets import Asset, AssetError, AssetUnavailable, archive_path, asset_path

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="file locks are POSIX-only")


@pytest.fixture
def fake_asset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A registered asset "fake" whose download is slow (written in pieces, as over a network)
    and counted: returns (the wheel as served, the file that counts downloads)."""
    served = tmp_path / "served" / "fake-1.0-py3-none-any.whl"
    served.parent.mkdir()
    with zipfile.ZipFile(served, "w") as z:
        z.writestr("fake/data/rows.txt", "".join(f"row {i}\n" for i in range(2000)))
        z.writestr("fake/data/other.txt", "other\n")
    digest = hashlib.sha256(served.read_bytes()).hexdigest()
    asset = Asset("fake", "1.0", served.name, digest, "MIT", "a test archive")
    monkeypatch.setitem(assets.ASSETS, "fake", asset)
    monkeypatch.setenv("GEODISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GEODISTILL_ASSET_DIR", raising=False)
    calls = tmp_path / "downloads.txt"

    def slow_download(asset: Asset, dest: Path) -> None:
        with open(calls, "a") as f:
            f.write(f"{os.getpid()}\n")
        data = served.read_bytes()
        part = dest.with_suffix(dest.suffix + ".part")  # the old shared temp name: racing writers collide
        with open(part, "ab") as f:
            for i in range(0, len(data), 1024):
                f.write(data[i : i + 1024])
                f.flush()
                time.sleep(0.002)
        part.replace(dest)

    monkeypatch.setattr(assets, "_download", slow_download)
    return served, calls


def _use(member: str, out: multiprocessing.Queue) -> None:
    try:
        out.put(("ok", str(asset_path("fake", member))))
    except Exception as e:  # reported to the parent, which fails the test with it
        out.put(("error", repr(e)))


def test_concurrent_first_use_downloads_and_extracts_once(fake_asset: tuple[Path, Path]) -> None:
    served, calls = fake_asset
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue = ctx.Queue()
    procs = [ctx.Process(target=_use, args=("fake/data", out)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [status for status, _ in results] == ["ok"] * 4, results
    assert len({path for _, path in results}) == 1
    assert len(calls.read_text().split()) == 1  # one download, however many processes asked
    target = Path(results[0][1])
    assert (target / "rows.txt").read_text().count("\n") == 2000
    archives = Path(os.environ["GEODISTILL_CACHE"]) / "archives"
    assert (archives / served.name).read_bytes() == served.read_bytes()
    assert not list(archives.glob("*.part")) and not list(archives.glob("*.bad"))


def test_checksum_mismatch_names_the_file_and_sets_it_aside(
    fake_asset: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    served, _ = fake_asset
    good = assets.ASSETS["fake"]
    monkeypatch.setitem(assets.ASSETS, "fake", Asset(**{**good.__dict__, "sha256": "0" * 64}))
    with pytest.raises(AssetError, match=rf"checksum mismatch for {served.name}"):
        archive_path("fake")
    archives = Path(os.environ["GEODISTILL_CACHE"]) / "archives"
    assert (archives / (served.name + ".bad")).exists() and not (archives / served.name).exists()
    monkeypatch.setitem(assets.ASSETS, "fake", good)  # the next use downloads it again, verified
    assert archive_path("fake").read_bytes() == served.read_bytes()


def test_interrupted_extraction_is_redone(fake_asset: tuple[Path, Path]) -> None:
    target = asset_path("fake", "fake/data/other.txt")
    marker = target.parent.parent.parent / "fake__data__other.txt.done"
    assert marker.exists()
    marker.unlink()  # as if killed between the rename and the marker
    target.write_text("half")
    assert asset_path("fake", "fake/data/other.txt").read_text() == "other\n"


def test_download_reads_the_simple_index_and_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real download path against a stand-in index (PEP 691 JSON), and a failing one."""
    import io
    import json
    import urllib.request

    data = b"wheel bytes " * 1000
    asset = Asset("fake", "1.0", "fake-1.0-py3-none-any.whl", hashlib.sha256(data).hexdigest(), "MIT", "test")
    monkeypatch.setitem(assets.ASSETS, "fake", asset)
    monkeypatch.setenv("GEODISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(
        assets, "_index_urls", lambda: ["https://broken.example/simple", "https://index.example/simple"]
    )
    asked = []

    def urlopen(req: urllib.request.Request | str, timeout: float = 0) -> io.BytesIO:
        url = req.full_url if isinstance(req, urllib.request.Request) else req
        asked.append(url)
        if url.startswith("https://broken.example"):
            raise OSError("connection refused")
        if url == "https://index.example/simple/fake/":
            files = [
                {"filename": "other.whl", "url": "x"},
                {"filename": asset.filename, "url": "https://files/f.whl"},
            ]
            return io.BytesIO(json.dumps({"files": files}).encode())
        assert url == "https://files/f.whl"
        return io.BytesIO(data)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    path = archive_path("fake")
    assert path.read_bytes() == data
    assert asked == [
        "https://broken.example/simple/fake/",
        "https://index.example/simple/fake/",
        "https://files/f.whl",
    ]
    assert sorted(p.name for p in path.parent.iterdir() if not p.name.startswith(".")) == [asset.filename]

    monkeypatch.setitem(assets.ASSETS, "fake", Asset(**{**asset.__dict__, "filename": "gone.whl"}))
    with pytest.raises(
        AssetError, match=r"gone\.whl .*broken\.example.*connection refused; .*no file gone\.whl"
    ) as err:
        archive_path("fake")
    assert not isinstance(err.value, AssetUnavailable)  # one index did not answer: it may still have it
    assert not list(path.parent.glob("*.part"))


def test_a_file_no_index_serves_is_unavailable_and_a_seeded_copy_stands_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What happened to bigbench 1.0.0 on 2026-12-04: the index lists another version only, or
    lists the file and answers 403 for it. The error says so, and how to seed a copy by hand."""
    import io
    import json
    import urllib.error
    import urllib.request

    data = b"sdist bytes " * 1000
    asset = Asset("fake", "1.0", "fake-1.0.tar.gz", hashlib.sha256(data).hexdigest(), "MIT", "test")
    monkeypatch.setitem(assets.ASSETS, "fake", asset)
    monkeypatch.setenv("GEODISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GEODISTILL_ASSET_DIR", raising=False)
    monkeypatch.setattr(
        assets, "_index_urls", lambda: ["https://a.example/simple", "https://b.example/simple"]
    )

    def urlopen(req: urllib.request.Request | str, timeout: float = 0) -> io.BytesIO:
        url = req.full_url if isinstance(req, urllib.request.Request) else req
        if url == "https://a.example/simple/fake/":
            return io.BytesIO(json.dumps({"files": [{"filename": "fake-0.0.1.tar.gz", "url": "x"}]}).encode())
        if url == "https://b.example/simple/fake/":
            files = [{"filename": asset.filename, "url": "https://files.example/fake-1.0.tar.gz"}]
            return io.BytesIO(json.dumps({"files": files}).encode())
        raise urllib.error.HTTPError(url, 403, "Forbidden", {}, io.BytesIO(b"not available"))  # type: ignore[arg-type]

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    with pytest.raises(AssetUnavailable) as err:
        archive_path("fake")
    msg = str(err.value)
    assert "no configured package index serves it" in msg
    assert "a.example/simple/fake/: no file fake-1.0.tar.gz (it lists fake-0.0.1.tar.gz)" in msg
    assert "files.example/fake-1.0.tar.gz: HTTP 403 Forbidden" in msg
    assert asset.sha256 in msg and "GEODISTILL_ASSET_DIR" in msg
    archives = tmp_path / "cache" / "archives"
    assert sorted(p.name for p in archives.iterdir() if not p.name.startswith(".")) == []

    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / asset.filename).write_bytes(b"tampered" + data)
    monkeypatch.setenv("GEODISTILL_ASSET_DIR", str(seed))
    with pytest.raises(AssetError, match=r"checksum mismatch for fake-1\.0\.tar\.gz"):
        archive_path("fake")  # a seeded copy is verified like a download
    (seed / asset.filename).write_bytes(data)
    assert archive_path("fake").read_bytes() == data  # no index asked: urlopen would refuse


def test_written_whole_renames_on_success_and_cleans_up_on_error(tmp_path: Path) -> None:
    from geodistill.assets import written_whole

    path = tmp_path / "sub" / "cache.json"
    with written_whole(path) as tmp:
        assert tmp.parent == path.parent and tmp != path
        tmp.write_text("first")
        assert not path.exists()  # nothing at the final name until the block ends
    assert path.read_text() == "first"
    with pytest.raises(RuntimeError), written_whole(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "first" and sorted(p.name for p in path.parent.iterdir()) == ["cache.json"]


def test_a_new_pin_replaces_the_old_extraction(
    fake_asset: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The marker holds the extracted archive's sha256: after ASSETS pins another archive the
    member is extracted again from the new one, and nothing of the old extraction stays."""
    first = assets.ASSETS["fake"]
    old = asset_path("fake", "fake/data")
    assert sorted(p.name for p in old.iterdir()) == ["other.txt", "rows.txt"]
    seed = tmp_path / "seed"
    seed.mkdir()
    new = seed / "fake-2.0-py3-none-any.whl"
    with zipfile.ZipFile(new, "w") as z:
        z.writestr("fake/data/other.txt", "other, version 2\n")
    digest = hashlib.sha256(new.read_bytes()).hexdigest()
    monkeypatch.setitem(assets.ASSETS, "fake", Asset("fake", "2.0", new.name, digest, "MIT", "repinned"))
    monkeypatch.setenv("GEODISTILL_ASSET_DIR", str(seed))
    path = asset_path("fake", "fake/data")
    assert path == old and sorted(p.name for p in path.iterdir()) == ["other.txt"]
    assert (path / "other.txt").read_text() == "other, version 2\n"
    root = Path(os.environ["GEODISTILL_CACHE"]) / "assets" / "fake"
    assert (root / "fake__data.done").read_text() == digest
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["fake", "fake__data.done"]
    monkeypatch.setitem(assets.ASSETS, "fake", first)  # and back: the old archive is still cached
    assert (asset_path("fake", "fake/data") / "rows.txt").read_text().count("\n") == 2000


def test_an_interrupted_seed_copy_leaves_no_archive(
    fake_asset: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    served, calls = fake_asset
    monkeypatch.setenv("GEODISTILL_ASSET_DIR", str(served.parent))
    copyfile = shutil.copyfile

    def disk_full(src: Path, dst: Path) -> None:
        Path(dst).write_bytes(Path(src).read_bytes()[:100])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", disk_full)
    with pytest.raises(OSError, match="No space left"):
        archive_path("fake")
    archives = Path(os.environ["GEODISTILL_CACHE"]) / "archives"
    assert sorted(p.name for p in archives.iterdir() if not p.name.startswith(".")) == []
    monkeypatch.setattr(shutil, "copyfile", copyfile)
    assert archive_path("fake").read_bytes() == served.read_bytes()
    assert not calls.exists()  # the seeded copy, not a download


def test_relative_file_urls_resolve_against_the_index_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PEP 691 lets a file URL be relative to the project page, which may sit behind a redirect:
    a real HTTP index on localhost redirects /simple/fake/ and lists the file as ../../files/..."""
    import http.server
    import json
    import threading

    data = b"wheel bytes " * 1000
    asset = Asset("fake", "1.0", "fake-1.0-py3-none-any.whl", hashlib.sha256(data).hexdigest(), "MIT", "test")
    page = json.dumps(
        {
            "meta": {"api-version": "1.0"},
            "name": "fake",
            "files": [{"filename": asset.filename, "url": f"../../files/{asset.filename}", "hashes": {}}],
        }
    ).encode()
    asked = []

    class Index(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            if self.path == "/simple/fake/":
                self.send_response(302)
                self.send_header("Location", "/mirror/simple/fake/")
                self.end_headers()
                return
            body, kind = {
                "/mirror/simple/fake/": (page, "application/vnd.pypi.simple.v1+json"),
                f"/mirror/files/{asset.filename}": (data, "application/octet-stream"),
            }.get(self.path, (b"", ""))
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", kind or "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Index)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setitem(assets.ASSETS, "fake", asset)
        monkeypatch.setenv("GEODISTILL_CACHE", str(tmp_path / "cache"))
        monkeypatch.delenv("GEODISTILL_ASSET_DIR", raising=False)
        monkeypatch.setenv("no_proxy", "127.0.0.1")
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        monkeypatch.setattr(assets, "_index_urls", lambda: [f"http://127.0.0.1:{server.server_port}/simple"])
        assert archive_path("fake").read_bytes() == data
    finally:
        server.shutdown()
        server.server_close()
    assert asked == ["/simple/fake/", "/mirror/simple/fake/", f"/mirror/files/{asset.filename}"]


def test_index_urls_reads_index_url_then_extra_index_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As pip reads them: index-url(s) first, then extra-index-url lists (environment, then pip's
    configuration files), each URL once; PyPI stands in for a missing index-url."""
    from pip._internal import configuration
    from pip._internal.models.index import PyPI

    conf = tmp_path / "pip.conf"
    monkeypatch.setattr(
        configuration,
        "get_configuration_files",
        lambda: {
            configuration.Kind.GLOBAL: [str(conf)],
            configuration.Kind.SITE: [],
            configuration.Kind.USER: [],
        },
    )
    for var in ("PIP_CONFIG_FILE", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        monkeypatch.delenv(var, raising=False)
    conf.write_text(
        "[global]\n"
        "index-url = https://cfg.example/simple\n"
        "extra-index-url =\n"
        "    https://extra1.example/simple\n"
        "    https://env-extra.example/simple/\n"
        "    file:///opt/local/simple\n"
        "[install]\n"
        "extra-index-url = https://extra2.example/simple https://extra1.example/simple\n"
    )
    monkeypatch.setenv("PIP_INDEX_URL", "https://env.example/simple/")
    monkeypatch.setenv(
        "PIP_EXTRA_INDEX_URL", " https://env-extra.example/simple\thttps://cfg.example/simple "
    )
    assert assets._index_urls() == [
        "https://env.example/simple",
        "https://cfg.example/simple",
        "https://env-extra.example/simple",
        "https://extra1.example/simple",
        "https://extra2.example/simple",
    ]
    conf.write_text("[global]\nextra-index-url = https://extra1.example/simple\n")
    monkeypatch.delenv("PIP_INDEX_URL")
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL")
    assert assets._index_urls() == [PyPI.simple_url.rstrip("/"), "https://extra1.example/simple"]
