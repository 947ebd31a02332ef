"""Where shards live: local folders, brace patterns, http(s)://, pipe:CMD, and fsspec stores such as
s3:// and gs:// (docs/DATA.md, "Shard locations").

This module is the one door to shards: ``resolve`` turns any location into its shard list (training,
evaluation and every tool), ``open_shard`` is the one tar reader (sequential, never a seek, so a pipe
or an HTTP body reads like a file), ``iter_shard`` groups its members into complete samples with the
retries and deadline of remote shards, and ``index_shard`` / ``ShardFiles`` give indexed access to a
local (or cached) tar for evaluation.

Opening: local files with ``open``, ``pipe:`` through ``webdataset.gopen``, http(s) through
webdataset's curl pipe (``gopen.Pipe``, one attempt and a connect timeout instead of its long
built-in retries), other schemes through ``fsspec`` when installed (s3:// needs s3fs, gs:// gcsfs; the
error names the missing package). Brace patterns are expanded by ``webdataset.shardlists.expand_urls``.

A location's ``manifest.json`` is read from the same place: ``<base>/manifest.json`` for a folder
(local or URL), the folder of a brace pattern or tar URL, and for ``pipe:`` the command with the
shard's file name replaced by ``manifest.json`` (``pipe:aws s3 cp s3://b/d/x-000000.tar -`` ->
``pipe:aws s3 cp s3://b/d/manifest.json -``).

Every remote shard has a deadline (``timeout`` seconds blocked waiting for its bytes) and bounded retries (``retries``
extra attempts with a short back-off); a shard stream that fails mid-way is reopened and resumes
after its last complete sample, so a transient drop changes nothing in the data. A shard that still
fails raises ShardReadError: the stream counts and skips it under data.on_corrupt=warn and stops
under fail. Nothing here can hang: every wait is bounded.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tarfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence
from urllib.parse import urlparse

from .. import atomic
from ..errors import MissingBackendError, ShardReadError  # noqa: F401 (raised here, named by callers)

RETRIES = 3  # extra attempts per shard (data.remote_retries)
TIMEOUT = 600.0  # seconds per shard, whole transfer (data.remote_timeout)
BACKOFF = 0.5  # seconds before the first retry, doubled each time, at most 8
_FSSPEC_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
                    "hf": "huggingface_hub"}
IMAGE_EXTS = ("image.png", "image.jpg", "image.jpeg")  # a sample's image member, by preference
_SAMPLE = ("label.png", "meta.json")  # the other members every sample has
_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # "<dir/><key>.<ext>", ext may hold dots


# -- parsing ------------------------------------------------------------------------------------
def scheme(url: str) -> str:
    """'' for a local path, 'pipe' for pipe:CMD, else the URL scheme (http, https, s3, gs, ...)."""
    if url.startswith("pipe:"):
        return "pipe"
    s = urlparse(url).scheme
    return "" if len(s) <= 1 else s.lower()  # a Windows drive letter is a path


def is_remote(spec) -> bool:
    """True for URLs and pipe: commands (anything not opened as a local file)."""
    if isinstance(spec, (list, tuple)):
        return any(is_remote(s) for s in spec)
    s = scheme(str(spec))
    return s not in ("", "file")


def local_path(url: str) -> str:
    """The file path of a local path or file:// URL."""
    return urlparse(url).path if scheme(url) == "file" else url


def expand(spec: str) -> list[str]:
    """Brace patterns and '::' lists -> URLs (webdataset's expand_urls)."""
    from webdataset.shardlists import expand_urls

    return list(expand_urls(spec))


def has_braces(spec: str) -> bool:
    return bool(re.search(r"\{[^{}]*(\.\.|,)[^{}]*\}", spec))


def join(base: str, name: str) -> str:
    """``name`` inside the folder ``base`` (a path, a URL, or the folder part of a pipe command)."""
    if scheme(base) in ("", "file") and not base.startswith("file:"):
        return str(Path(base) / name)
    return base.rstrip("/") + "/" + name


def shard_name(url: str) -> str:
    """The tar's file name in a path, URL or pipe command (the manifest's ``shards[].name``)."""
    names = [t for t in re.split(r"[\s/'\"]+", url) if t.endswith(".tar")]
    return names[-1] if names else url.rstrip("/").rsplit("/", 1)[-1]


def manifest_location(url: str) -> str:
    """Where the manifest of the shard ``url`` lives (see the module docstring)."""
    if scheme(url) == "pipe":
        tokens = list(re.finditer(r"[^\s'\"]+\.tar\b", url))
        if not tokens:
            raise ValueError(f"{url}: cannot tell where its manifest.json is (no *.tar in the command); "
                             f"give the shards as a folder or URL instead")
        m = tokens[-1]
        tok = m.group(0)
        new = tok[:tok.rfind("/") + 1] + "manifest.json" if "/" in tok else "manifest.json"
        return url[:m.start()] + new + url[m.end():]
    if scheme(url) in ("", "file") and not url.startswith("file:"):
        return str(Path(url).parent / "manifest.json")
    return url[:url.rstrip("/").rfind("/") + 1] + "manifest.json"


# -- opening ------------------------------------------------------------------------------------
class _Guarded:
    """A stream whose reads may wait ``timeout`` seconds in total (the per-shard deadline): the time
    spent blocked inside ``read`` is summed, so a slowly consumed shard is fine, a stalled one is
    not. One monitor thread per process kills a transfer past its deadline (the curl or pipe:
    process, else the stream is closed), so a blocked read returns and the read raises."""

    _lock = threading.Lock()
    _active: set = set()
    _thread: threading.Thread | None = None

    def __init__(self, stream, timeout: float):
        self.stream, self.timeout = stream, float(timeout)
        self.waited, self.since, self.fired = 0.0, None, False
        self.proc = getattr(stream, "proc", None)
        with _Guarded._lock:
            _Guarded._active.add(self)
            if _Guarded._thread is None or not _Guarded._thread.is_alive():
                _Guarded._thread = threading.Thread(target=_Guarded._watch, name="blindseg-shard-deadline",
                                                    daemon=True)
                _Guarded._thread.start()

    @classmethod
    def _watch(cls):
        while True:
            time.sleep(0.1)
            now = time.monotonic()
            with cls._lock:
                late = [g for g in cls._active if g.since is not None and not g.fired
                        and g.waited + now - g.since > g.timeout]
            for g in late:
                g._fire()

    def _fire(self):
        self.fired = True
        try:
            if self.proc is not None:
                self.proc.kill()  # curl / pipe: the blocked read returns and the exit status raises
            else:
                self.stream.close()
        except Exception:  # noqa: BLE001 - the stream may be gone already
            pass

    def read(self, *args):
        if self.fired:
            raise TimeoutError(f"timed out after {self.timeout:g} s")
        self.since = time.monotonic()
        try:
            data = self.stream.read(*args)
        except Exception:
            if self.fired:
                raise TimeoutError(f"timed out after {self.timeout:g} s") from None
            raise
        finally:
            self.waited += time.monotonic() - self.since
            self.since = None
        if self.fired:
            raise TimeoutError(f"timed out after {self.timeout:g} s")
        return data

    def close(self):
        with _Guarded._lock:
            _Guarded._active.discard(self)
        self.stream.close()


def _curl(url: str, timeout: float):
    """webdataset's curl handler with one attempt (we retry) and a connect timeout; the deadline is
    kept by _Guarded (time blocked in reads), not --max-time (a slowly consumed shard is fine)."""
    from webdataset.gopen import Pipe

    if not _which("curl"):
        raise MissingBackendError(f"{url}: reading http(s) shards needs the `curl` program (webdataset's "
                                  f"http handler); install curl, or use fsspec with aiohttp")
    t = max(1, int(round(timeout)))
    args = ["curl", "-f", "-s", "-S", "-L", "--connect-timeout", str(min(30, t)), url]
    return Pipe(args, mode="rb", bufsize=1 << 16, ignore_status=[141, 23], stderr=subprocess.PIPE)


def _which(prog: str) -> bool:
    import shutil

    return shutil.which(prog) is not None


def _fsspec_open(url: str):
    s = scheme(url)
    pkg = _FSSPEC_PACKAGES.get(s)
    try:
        import fsspec
    except ImportError:
        need = "fsspec" + (f" and {pkg}" if pkg else "")
        raise MissingBackendError(f"{url}: {s}:// shards are read through fsspec, which is not installed; "
                                  f"pip install {need.replace(' and ', ' ')}") from None
    try:
        return fsspec.open(url, "rb").open()
    except ImportError as e:
        need = pkg or "the fsspec backend for this scheme"
        raise MissingBackendError(f"{url}: {s}:// shards need {need} (fsspec's {s} backend): pip install "
                                  f"{pkg or 'the backend'} ({e})") from None
    except ValueError as e:
        if "protocol" in str(e).lower():
            raise MissingBackendError(f"{url}: no fsspec backend for {s}:// ({e}); install it, or use "
                                      f"http(s)://, pipe:CMD or a local folder") from None
        raise


def open_stream(url: str, timeout: float = TIMEOUT):
    """A binary stream over ``url`` (webdataset's gopen for paths and pipe:, its curl pipe for
    http(s), fsspec otherwise). The caller reads it once, sequentially, and closes it."""
    s = scheme(url)
    if s in ("http", "https"):
        return _curl(url, timeout)
    if s in ("", "file"):
        return open(local_path(url), "rb")
    if s == "pipe":
        from webdataset.gopen import gopen

        return gopen(url, "rb", bufsize=1 << 16)
    return _fsspec_open(url)


def _error_text(stream, err: BaseException) -> str:
    proc = getattr(stream, "proc", None)
    extra = ""
    if proc is not None and getattr(proc, "stderr", None) is not None:
        try:
            if proc.poll() is None:
                proc.kill()
            extra = proc.stderr.read().decode(errors="replace").strip()
        except Exception:  # noqa: BLE001
            pass
    msg = f"{type(err).__name__}: {err}"
    return f"{msg} ({extra})" if extra else msg


def _is_missing(err: BaseException, text: str) -> bool:
    if isinstance(err, FileNotFoundError):
        return True
    return bool(re.search(r"\b(404|410)\b|not found|no such file|NoSuchKey", text, re.I))


def _close(stream) -> None:
    """Close a stream abandoned early (or already closed): a curl / pipe: process still running is
    killed first, so closing never waits on a stalled transfer."""
    proc = getattr(stream, "proc", None)
    try:
        if proc is not None and proc.poll() is None:
            proc.kill()
    except Exception:  # noqa: BLE001
        pass
    try:
        stream.close()
    except Exception:  # noqa: BLE001 - a failed pipe raises on close; the error was reported already
        pass


def _attempts(url: str, retries: int):
    """Yields attempt numbers 0..retries, sleeping a short back-off before each retry."""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(8.0, BACKOFF * 2 ** (attempt - 1)))
        yield attempt


def _read_once(url: str, timeout: float, write) -> None:
    """One attempt: stream ``url`` into ``write(block)``; raises ShardReadError (missing=True when
    the location answers "not found") or MissingBackendError."""
    stream = None
    try:
        stream = _Guarded(open_stream(url, timeout), timeout)
        while True:
            block = stream.read(1 << 20)
            if not block:
                break
            write(block)
        stream.close()  # a pipe reports its exit status here
    except (MissingBackendError, ShardReadError):
        raise
    except Exception as err:  # noqa: BLE001 - classified below
        last = f"timed out after {timeout:g} s" if stream is not None and stream.fired else _error_text(stream, err)
        missing = _is_missing(err, last)
        raise ShardReadError(f"{url}: {'not found' if missing else 'read failed'} ({last})", missing=missing) from None
    finally:
        if stream is not None:
            _close(stream)


def read_bytes(url: str, *, retries: int = RETRIES, timeout: float = TIMEOUT) -> bytes:
    """The whole content of ``url``, with the retries and deadline of a shard ("not found" is not
    retried)."""
    if scheme(url) in ("", "file"):
        return Path(local_path(url)).read_bytes()
    last = ""
    for attempt in _attempts(url, retries):
        chunks: list[bytes] = []
        try:
            _read_once(url, timeout, chunks.append)
            return b"".join(chunks)
        except ShardReadError as e:
            if e.missing:
                raise
            last = str(e)
    raise ShardReadError(f"{last} (after {retries + 1} attempts)")


# -- shard sets ---------------------------------------------------------------------------------
@dataclass
class ShardSet:
    """The shards of a location: urls (local paths stay paths), the manifest when there is one, the
    expected sample count and sha256 of each shard (from the manifest)."""

    spec: str
    urls: list[str]
    manifest: dict | None = None
    counts: dict[str, int] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)

    @property
    def remote(self) -> bool:
        return is_remote(self.urls)


def _parse_manifest(data: bytes, where: str) -> dict:
    try:
        m = json.loads(data)
        m["shards"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{where}: not a valid shard manifest ({e}); rewrite the shards with `blindseg shard` "
                         f"or pass the tar paths or URLs explicitly") from None
    return m


def fetch_manifest(where: str, *, required: bool, retries: int = RETRIES, timeout: float = TIMEOUT) -> dict | None:
    """The manifest at ``where`` (a manifest.json location); None when absent and not required."""
    try:
        data = read_bytes(where, retries=retries, timeout=timeout)
    except (ShardReadError, FileNotFoundError) as e:
        if not required and (isinstance(e, FileNotFoundError) or e.missing):
            return None
        raise ShardReadError(f"cannot read the shard manifest {where}: {e}. A shard location needs its "
                             f"manifest.json next to the tars (written by `blindseg shard`)",
                             missing=getattr(e, "missing", True)) from None
    return _parse_manifest(data, where)


def _from_manifest(spec: str, base: str, manifest: dict, urls: list[str] | None = None) -> ShardSet:
    entries = manifest["shards"]
    by_name = {s["name"]: s for s in entries}
    if urls is None:
        urls = [join(base, s["name"]) for s in entries]
    out = ShardSet(spec, urls, manifest)
    for u in urls:
        name = shard_name(u)
        s = by_name.get(name)
        if s is None:
            continue
        if "count" in s:
            out.counts[u] = int(s["count"])
        if s.get("sha256"):
            out.sha256[u] = s["sha256"]
        if "bytes" in s:
            out.sizes[u] = int(s["bytes"])
    return out


def resolve(spec: str | os.PathLike | Sequence[str | os.PathLike], *, retries: int = RETRIES,
            timeout: float = TIMEOUT) -> ShardSet:
    """A shard location -> ShardSet. Accepts a local folder (manifest.json, else its *.tar), a local
    .tar, a brace pattern (local or URL, ``shards/gta5-{000000..000127}.tar``), an http(s)://, s3://,
    gs://, ... folder (``<base>/manifest.json`` lists the shards) or tar URL, ``pipe:CMD``, or a list
    of any of these tars. Local shards are checked to exist; remote ones are opened when read."""
    if isinstance(spec, (list, tuple)):
        urls = [str(p) for p in spec]
        if not urls:
            raise FileNotFoundError("an empty shard list; point data paths at a shard folder or URL")
        _check_local(urls, str(urls[0]))
        return ShardSet(str(urls[0]), urls)
    spec = str(spec)
    s = scheme(spec)
    if s in ("", "file") and not has_braces(spec):
        return _resolve_local(spec)
    if has_braces(spec) or spec.endswith(".tar") or s == "pipe":
        urls = expand(spec) if s != "pipe" or has_braces(spec) else [spec]
        if s in ("", "file"):
            _check_local(urls, spec)
        try:
            where = manifest_location(urls[0])
        except ValueError:
            return ShardSet(spec, urls)
        manifest = fetch_manifest(where, required=False, retries=retries, timeout=timeout)
        if manifest is None:
            return ShardSet(spec, urls)
        return _from_manifest(spec, "", manifest, urls)
    base = spec.rstrip("/")  # a remote folder
    manifest = fetch_manifest(join(base, "manifest.json"), required=True, retries=retries, timeout=timeout)
    out = _from_manifest(spec, base, manifest)
    if not out.urls:
        raise FileNotFoundError(f"the manifest of {spec} lists no shards; run the sharder first")
    return out


def _check_local(urls: list[str], spec: str) -> None:
    local = [local_path(u) for u in urls if scheme(u) in ("", "file")]
    missing = [p for p in local if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) of {spec} listed but missing, e.g. {missing[0]}; "
                                f"copy the complete shard folder or rewrite the shards")


def _resolve_local(spec: str) -> ShardSet:
    root = Path(local_path(spec))
    if root.is_file() and root.suffix == ".tar":
        side = root.parent / "manifest.json"
        if side.is_file():
            try:
                return _from_manifest(spec, "", _parse_manifest(side.read_bytes(), str(side)), [str(root)])
            except ValueError:
                pass
        return ShardSet(spec, [str(root)])
    if root.is_file():
        hint = f" (its folder {root.parent} holds the shards)" if root.name == "manifest.json" else ""
        raise FileNotFoundError(f"shard path {root} is a file, not a .tar shard or a shard folder{hint}; "
                                f"point data paths at a folder written by the sharder (with manifest.json) "
                                f"or at .tar files")
    if not root.is_dir():
        raise FileNotFoundError(f"shard path {root} does not exist; point data paths at a folder written by "
                                f"the sharder (with manifest.json), a brace pattern, or a URL")
    manifest = root / "manifest.json"
    if manifest.is_file():
        out = _from_manifest(spec, str(root), _parse_manifest(manifest.read_bytes(), str(manifest)))
    else:
        out = ShardSet(spec, sorted(str(p) for p in root.glob("*.tar")))
    if not out.urls:
        raise FileNotFoundError(f"no .tar shards found in {spec!r}; run the sharder first")
    _check_local(out.urls, spec)
    return out


def holds_shards(folder: str | os.PathLike) -> bool:
    """True for a local folder with a manifest.json or *.tar files (a shard folder, not a raw dataset)."""
    p = Path(folder)
    return (p / "manifest.json").is_file() or any(p.glob("*.tar"))


def local_manifest(folder: str | os.PathLike) -> dict | None:
    """``<folder>/manifest.json`` of a local folder as written, without checking its shards; None when
    absent or not a JSON object."""
    try:
        m = json.loads((Path(folder) / "manifest.json").read_bytes())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def load_location_manifest(spec: str | os.PathLike, **kw) -> dict | None:
    """The manifest of a location, or None (e.g. a local tar list without one, or an unreadable
    location). A local folder's manifest.json is read as it is (local_manifest)."""
    s = str(spec)
    if scheme(s) in ("", "file") and not has_braces(s) and Path(local_path(s)).is_dir():
        return local_manifest(local_path(s))
    try:
        return resolve(spec, **kw).manifest
    except (OSError, ValueError):
        return None


# -- reading shards ------------------------------------------------------------------------------
def _complete(members: dict) -> bool:
    """A sample has an image, a label and meta (the sharder's members; others are ignored)."""
    return all(k in members for k in _SAMPLE) and any(e in members for e in IMAGE_EXTS)


def image_ext(members: dict) -> str:
    """The image member of a complete sample ("image.png", "image.jpg" or "image.jpeg")."""
    return next(e for e in IMAGE_EXTS if e in members)


def open_shard(url: str, timeout: float = TIMEOUT) -> Iterator[tuple[str, bytes]]:
    """The one tar reader: the file members ``(name, bytes)`` of the shard at ``url``, in tar order.

    Reads front to back (a tar stream, never a seek), so any location that can be read once
    sequentially works: a local file, a pipe: command, an http(s) body, an fsspec stream. A remote
    stream may wait ``timeout`` seconds in total for its bytes (the per-shard deadline). A cut-off
    member raises tarfile.ReadError / EOFError; a tar cut at a member boundary just ends early (the
    caller then misses samples the manifest lists). An error carries the stream and whether the
    deadline fired, for iter_shard's message."""
    stream = None
    try:
        stream = open_stream(url, timeout)
        if is_remote(url):
            stream = _Guarded(stream, timeout)
        with tarfile.open(fileobj=stream, mode="r|") as tf:
            for ti in tf:
                if not ti.isfile():
                    continue
                data = tf.extractfile(ti).read()
                if len(data) != ti.size:
                    raise EOFError(f"member {ti.name} is cut off ({len(data)} of {ti.size} bytes)")
                yield ti.name, data
        while stream.read(1 << 16):  # the tar's end padding: let a pipe's command finish writing
            pass
        stream.close()  # a pipe (curl, pipe:) raises here when its command failed
    except GeneratorExit:
        raise
    except Exception as err:
        err.__dict__["_stream"] = getattr(stream, "stream", stream)
        err.__dict__["_timed_out"] = bool(getattr(stream, "fired", False))
        raise
    finally:
        if stream is not None:
            _close(stream)


def group_samples(members: Iterable[tuple[str, bytes]], skip: int = 0) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Tar members in order -> the complete samples ``(key, {ext: bytes})``, ext e.g. "image.png",
    "label.png", "meta.json"; the first ``skip`` complete samples are passed over."""
    key, cur, seen = None, {}, 0
    for name, data in members:
        mm = _MEMBER.match(name)
        if mm is None:
            continue
        k, ext = mm.group(1), mm.group(2).lower()
        if k != key:
            if key is not None and _complete(cur):
                if seen >= skip:
                    yield key, cur
                seen += 1
            key, cur = k, {}
        cur[ext] = data
    if key is not None and _complete(cur) and seen >= skip:
        yield key, cur


def iter_shard(url: str, *, expected: int | None = None, retries: int = RETRIES,
               timeout: float = TIMEOUT) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The complete samples of one shard, in tar order: (key, {ext: bytes}) with ext e.g.
    "image.png", "label.png", "meta.json". Streamed (one sequential pass), retried from the last
    complete sample on a read error or timeout, at most ``retries`` times; then ShardReadError
    (``.samples`` = how many were yielded). ``expected``: the manifest's count; fewer samples in a
    clean stream is an error too (a tar cut at a member boundary)."""
    yielded = 0
    last = ""
    for attempt in _attempts(url, retries if is_remote(url) else 0):
        try:
            for key, files in group_samples(open_shard(url, timeout), skip=yielded):
                yielded += 1
                yield key, files
            if expected is not None and yielded < expected:
                raise EOFError(f"holds {yielded} complete samples, the manifest says {expected} (truncated)")
            return
        except (GeneratorExit, KeyboardInterrupt):
            raise
        except MissingBackendError:
            raise
        except Exception as err:  # noqa: BLE001 - classified below
            if err.__dict__.get("_timed_out"):
                last = f"timed out after {timeout:g} s"
            else:
                last = _error_text(err.__dict__.get("_stream"), err)
            if _is_missing(err, last) and not isinstance(err, EOFError):
                raise ShardReadError(f"shard {url}: not found ({last})", samples=yielded, missing=True) from None
            if not is_remote(url):
                break
    n = retries + 1 if is_remote(url) else 1
    raise ShardReadError(f"shard {url}: {last} (after {n} attempt{'s' if n > 1 else ''}, {yielded} samples read)",
                         samples=yielded)


def index_shard(path: str, expected: int | None = None):
    """Scan a local tar's headers (no member data is read) -> (samples, error), for indexed reads
    through ShardFiles.

    samples: [(key, {ext: (offset, size)})] for complete samples (an image, a label and meta).
    error: None, or a message when the tar is truncated/corrupt (samples then hold its good prefix).
    """
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    problems: list[str] = []
    error = None
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
            samples.extend(group_samples(_member_offsets(tf, f, os.path.getsize(path), problems)))
        error = problems[0] if problems else None
    except (tarfile.TarError, OSError, EOFError) as e:
        error = f"{type(e).__name__}: {e}"
    if error is None and expected is not None and len(samples) < expected:
        error = f"holds {len(samples)} complete samples, the manifest says {expected} (truncated)"
    return samples, error


def _member_offsets(tf: tarfile.TarFile, f, fsize: int, problems: list[str]) -> Iterator[tuple[str, tuple[int, int]]]:
    """(name, (offset, size)) of the file members lying wholly inside the file, from the headers;
    a truncated or corrupt end stops the scan with a message in ``problems``."""
    while True:
        ti = tf.next()
        if ti is None:
            # a clean end is a zero block; anything else is garbage or a cut-off file
            f.seek(tf.offset)
            block = f.read(512)
            if len(block) < 512 or block.count(0) != 512:
                problems.append(f"truncated or corrupt after byte {tf.offset}")
            return
        if not ti.isfile():
            continue
        if ti.offset_data + ti.size > fsize:
            problems.append(f"member {ti.name} extends past the end of the file (truncated)")
            return
        yield ti.name, (ti.offset_data, ti.size)


class ShardFiles:
    """Indexed reads of members located by index_shard: a small LRU of open local tars (per
    process; a forked or unpickled copy opens its own)."""

    def __init__(self, size: int = 8):
        self.size, self.files, self.pid = size, OrderedDict(), os.getpid()

    def read(self, path: str, offset: int, size: int) -> bytes:
        if self.pid != os.getpid():  # forked: never share file offsets with the parent
            self.files, self.pid = OrderedDict(), os.getpid()
        f = self.files.pop(path, None) or open(path, "rb")
        self.files[path] = f
        while len(self.files) > self.size:
            self.files.popitem(last=False)[1].close()
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise OSError(f"short read in {path} at byte {offset}")
        return data

    def close(self):
        for f in self.files.values():
            f.close()
        self.files.clear()

    def __getstate__(self):
        return {"size": self.size}

    def __setstate__(self, state):
        self.__init__(state["size"])


# -- upload ------------------------------------------------------------------------------------
def upload_command(shard_dir: str | os.PathLike, dest: str) -> str:
    """The shell command that copies a finished shard folder to ``dest`` (s3://, gs://, an rsync
    target HOST:PATH, or another fsspec URL), tars first and manifest.json last, so a reader never
    sees a manifest that lists shards not yet uploaded."""
    import shlex

    src = str(Path(shard_dir))
    q = shlex.quote
    d = dest.rstrip("/")
    s = scheme(d)
    if s == "s3":
        return (f"aws s3 cp --recursive --exclude manifest.json --exclude '*.tmp-*' {q(src)} {q(d)} && "
                f"aws s3 cp {q(src + '/manifest.json')} {q(d + '/manifest.json')}")
    if s in ("gs", "gcs"):
        return (f"gcloud storage rsync --recursive --exclude='manifest\\.json$|.*\\.tmp-.*' {q(src)} {q(d)} && "
                f"gcloud storage cp {q(src + '/manifest.json')} {q(d + '/manifest.json')}")
    if s == "" and re.match(r"^[^/\s]+:", d):  # user@host:path
        return (f"rsync -a --exclude manifest.json --exclude '*.tmp-*' {q(src + '/')} {q(d + '/')} && "
                f"rsync -a {q(src + '/manifest.json')} {q(d + '/manifest.json')}")
    if s in ("", "file", "http", "https", "pipe"):
        raise ValueError(f"--upload-to {dest!r}: give an s3://, gs:// or HOST:PATH (rsync) destination, or an "
                         f"fsspec URL; an http(s) server is filled by copying the folder into what it serves")
    code = (f"import fsspec,pathlib; fs,_=fsspec.core.url_to_fs({d!r}); p=pathlib.Path({src!r}); "
            f"[fs.put_file(str(f), {d!r}+'/'+f.name) for f in sorted(p.glob('*.tar'))+sorted(p.glob('*.json')) "
            f"if f.name != 'manifest.json']; fs.put_file(str(p/'manifest.json'), {d!r}+'/manifest.json')")
    return f"python -c {q(code)}"


# -- local cache (indexed access for evaluation) ------------------------------------------------
def default_cache_dir() -> Path:
    """$BLINDSEG_CACHE, else $XDG_CACHE_HOME/blindseg_dist/shards, else ~/.cache/blindseg_dist/shards."""
    if os.environ.get("BLINDSEG_CACHE"):
        return Path(os.environ["BLINDSEG_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "blindseg_dist" / "shards"


class ShardCache:
    """A size-bounded folder of downloaded shards, each verified against the manifest's sha256 and
    size before it is used; least recently used files are removed beyond ``max_bytes`` (never the
    one just fetched). File names carry a hash of the URL, so two locations never collide."""

    def __init__(self, root: str | os.PathLike | None = None, max_bytes: int = 50 * 2**30):
        self.root = Path(root) if root else default_cache_dir()
        self.max_bytes = int(max_bytes)

    def _name(self, url: str) -> Path:
        h = hashlib.sha256(url.encode()).hexdigest()[:16]
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", url.rstrip("/").rsplit("/", 1)[-1])[-80:]
        return self.root / f"{h}-{base}"

    def fetch(self, url: str, *, sha256: str | None = None, size: int | None = None,
              retries: int = RETRIES, timeout: float = TIMEOUT) -> str:
        """A verified local copy of ``url`` (a local path is returned as is)."""
        if not is_remote(url):
            return local_path(url)
        path = self._name(url)
        if path.is_file() and (size is None or path.stat().st_size == size):
            os.utime(path)  # recently used
            return str(path)
        self.root.mkdir(parents=True, exist_ok=True)
        last = ""
        for attempt in _attempts(url, retries):
            h, n = hashlib.sha256(), [0]
            try:
                with atomic.replacing(path) as tmp, open(tmp, "wb") as f:
                    def write(block: bytes) -> None:
                        h.update(block)
                        n[0] += len(block)
                        f.write(block)

                    _read_once(url, timeout, write)
                    if size is not None and n[0] != size:
                        raise ShardReadError(f"{n[0]} bytes, the manifest says {size}")
                    if sha256 and h.hexdigest() != sha256:
                        raise ShardReadError("sha256 differs from the manifest")
            except ShardReadError as e:
                if e.missing:
                    raise
                last = str(e)
                continue
            self._evict(keep=path)
            return str(path)
        raise ShardReadError(f"shard {url}: {last} (after {retries + 1} downloads)")

    def _evict(self, keep: Path) -> None:
        files = []
        for p in self.root.iterdir():
            if p.is_file() and ".tmp-" not in p.name:
                st = p.stat()
                files.append((st.st_mtime, st.st_size, p))
        total = sum(f[1] for f in files)
        for _, sz, p in sorted(files):
            if total <= self.max_bytes:
                break
            if p == keep:
                continue
            try:
                p.unlink()
                total -= sz
            except OSError:
                pass


@dataclass(frozen=True)
class RemoteOptions:
    """How remote shards are read (data.remote_retries, data.remote_timeout, data.cache_dir,
    data.cache_gb in the config)."""

    retries: int = RETRIES
    timeout: float = TIMEOUT
    cache_dir: str = ""
    cache_gb: float = 50.0

    @classmethod
    def from_config(cls, data_cfg) -> "RemoteOptions":
        if data_cfg is None:
            return cls()
        return cls(retries=int(getattr(data_cfg, "remote_retries", RETRIES)),
                   timeout=float(getattr(data_cfg, "remote_timeout", TIMEOUT)),
                   cache_dir=str(getattr(data_cfg, "cache_dir", "") or ""),
                   cache_gb=float(getattr(data_cfg, "cache_gb", 50.0)))

    def cache(self) -> ShardCache:
        return ShardCache(self.cache_dir or None, max_bytes=int(self.cache_gb * 2**30))
