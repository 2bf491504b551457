"""Offline assets: a cache shared by many processes (a sweep's workers on a fresh machine)."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
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
