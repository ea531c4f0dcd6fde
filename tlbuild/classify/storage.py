"""Object storage for classify: s3://, gs:// (and any fsspec URL) beside plain local paths.

fsspec is already installed with fastparquet, so local paths need nothing more; a URL loads the
protocol's package (s3fs, gcsfs) on first use, and a missing one is a UsageError naming the
extra to install. Credentials and endpoints come from the usual places (AWS_* / GOOGLE_*
variables, ~/.aws, instance roles) or fsspec's FSSPEC_<PROTOCOL>_<OPTION> variables, e.g.
FSSPEC_S3_ENDPOINT_URL for MinIO.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tlbuild.artifacts import NOVELTY_NPZ
from tlbuild.errors import UsageError
from tlbuild.fileio import MAX_RECORD_BYTES, sha256_file
from tlbuild.manifest import FileHash, Manifest

# Which extra brings each protocol's fsspec implementation.
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


def is_url(text: str) -> bool:
    """True for 'scheme://...' (s3, gs, memory, ...) except file://, which is a local path."""
    head, sep, _ = text.partition("://")
    return bool(sep) and head.isalnum() and head.lower() != "file"


def local_path(text: str) -> str:
    """A file:// URL as a plain path; anything else unchanged."""
    return text[len("file://") :] if text.lower().startswith("file://") else text


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for a URL; a UsageError if its package is missing."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        protocol = url.partition("://")[0].lower()
        extra = _EXTRAS.get(protocol)
        hint = f"pip install 'tlbuild[{extra}]'" if extra else str(e)
        raise UsageError(f"{url}: reading {protocol}:// needs its fsspec package: {hint}") from None
    except ValueError as e:
        raise UsageError(f"{url}: not a storage URL tlbuild can open ({e})") from None


def read_bytes(url: str) -> bytes:
    """The whole object at `url` (images are small; one request each)."""
    fs, path = filesystem(url)
    return fs.cat_file(path)


def exists(url: str) -> bool:
    """Whether `url` names an object or a prefix holding objects."""
    fs, path = filesystem(url)
    try:
        return bool(fs.exists(path))
    except Exception as e:  # credentials, network: say so instead of "not found"
        raise UsageError(f"cannot reach {url}: {type(e).__name__}: {e}") from None


def default_model_cache() -> Path:
    """Where fetched models are kept: $TLBUILD_MODEL_CACHE, else ~/.cache/tlbuild/models."""
    return Path(os.environ.get("TLBUILD_MODEL_CACHE") or Path.home() / ".cache/tlbuild/models")


def local_model(source: str, cache: Path, artifact: str | None = None) -> Path:
    """--model on this machine: a local folder or file as it is, a URL fetched (once) into
    `cache`; with `artifact`, the path of that file in the folder."""
    if not is_url(source):
        return Path(local_path(source))
    folder = fetch_model(source, cache, artifact)
    return folder / artifact if artifact else folder


def _remote_manifest(fs: Any, root: str, url: str) -> tuple[bytes, dict[str, FileHash]]:
    """The manifest's bytes at `root` and its artifact entries, validated as every manifest is:
    its file names are plain names inside the folder, so none can make this machine write
    outside its cache (the sha256 cannot vouch for a name: whoever can write the files can
    write the manifest too)."""
    try:
        if fs.size(f"{root}/manifest.json") > MAX_RECORD_BYTES:
            raise UsageError(f"{url}/manifest.json is far larger than any tlbuild manifest")
        raw = fs.cat_file(f"{root}/manifest.json")
    except UsageError:
        raise
    except FileNotFoundError:
        raise UsageError(f"{url} has no manifest.json; is it a tlbuild export folder?") from None
    except Exception as e:
        raise UsageError(f"cannot read {url}/manifest.json: {type(e).__name__}: {e}") from None
    try:
        return raw, Manifest.model_validate_json(raw).artifacts
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise UsageError(
            f"{url}/manifest.json is not a usable tlbuild manifest ({where}: {first['msg']}); "
            "re-upload the export folder"
        ) from None


def _download_checked(fs: Any, root: str, url: str, entry: FileHash, name: str, dst: Path) -> None:
    """One listed file into `dst`, its size checked before (a file far larger than its manifest
    says would fill this machine's disk before its sha256 is refused) and its sha256 after."""
    if fs.size(f"{root}/{name}") != entry.bytes:
        raise UsageError(
            f"{url}/{name} is not the size its manifest gives ({entry.bytes} bytes); "
            "re-upload the export folder"
        )
    fs.get_file(f"{root}/{name}", str(dst))
    if sha256_file(dst) != entry.sha256:
        raise UsageError(
            f"{url}/{name} does not match the sha256 in its manifest; re-upload the export folder"
        )


def fetch_model(url: str, cache: Path, artifact: str | None = None) -> Path:
    """Copy an export folder from storage into `cache` once per machine; returns the local folder.

    The folder is keyed by the manifest's own sha256, so a new export at the same URL is fetched
    again and an unchanged one never is. Every file is checked against the manifest's size and
    sha256 before it is published (renamed into place), and a lock makes the processes of one
    machine (Ray actors) wait for the first one's download instead of each fetching it.
    """
    fs, root = filesystem(url.rstrip("/"))
    if artifact is None and not root.endswith("manifest.json") and fs.isfile(root):
        root, artifact = root.rsplit("/", 1)
    manifest_bytes, listed = _remote_manifest(fs, root, url)
    key = hashlib.sha256(manifest_bytes).hexdigest()[:20]
    # Only what a Predictor may open: the chosen artifact, or every model file for `auto`.
    # Every name fetched is one the manifest lists, so a plain name.
    wanted = [artifact] if artifact else [n for n in listed if n.endswith((".onnx", ".engine"))]
    # What scoring needs beside the model: the novelty score's file, where the build made one.
    wanted += [n for n in (NOVELTY_NPZ,) if n in listed]
    missing = [n for n in wanted if n not in listed]
    if missing:
        raise UsageError(f"{missing[0]} is not listed in {url}/manifest.json")
    cache.mkdir(parents=True, exist_ok=True)
    folder = cache / key
    with open(cache / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, a crash included
        todo = [n for n in wanted if not (folder / n).is_file()]
        if not todo:
            return folder
        staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache))
        try:
            (staging / "manifest.json").write_bytes(manifest_bytes)
            for name in todo:
                _download_checked(fs, root, url, listed[name], name, staging / name)
            if folder.is_dir():
                # An earlier fetch of fewer artifacts is never replaced (another process may be
                # loading from it): the checked files join it, one rename each.
                for name in todo:
                    os.replace(staging / name, folder / name)
            else:
                os.replace(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder
