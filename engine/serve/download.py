"""Fetching a hub checkpoint: only the files serving reads, disk space checked first, progress the load line
shows (bytes, speed, time left), and large files that resume after Ctrl+C, a lost SSH session or a dropped
network.

Files land in the Hugging Face cache in its own layout, so transformers, a later offline start
(HF_HUB_OFFLINE=1) and other tools find them. The hub's own downloader resumes within one process only: it
writes each file to a process-unique temporary name and deletes it when interrupted. Here each large file
streams into `blobs/<etag>.tandem-part`, which outlives the process, and the next start asks for the rest
with an HTTP Range request; once a blob is whole, `snapshot_download` links it into the snapshot without
downloading it again and fetches the small files itself.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

Progress = Callable[[str, float], None]

# The hub matches patterns with fnmatch, where `*` also matches `/`: "*.safetensors" alone would also take
# original/model.safetensors (another ~13 GB that Tandem never reads) and "*" would take metal/model.bin.
# So the allowed names are top-level kinds, and anything in a subfolder is ignored.
SERVED = ["*.safetensors", "*.json", "*.jinja", "tokenizer.model"]
TOP_LEVEL_ONLY = ["*/*"]
LARGE = 16 * 2**20  # files from this size on are fetched resumably here; smaller ones by the hub in one go
MARGIN = 256 * 2**20  # free space kept on top of what the download needs
TICK_S = 1.0  # how often the progress line is refreshed
SPEED_WINDOW_S = 10.0  # the speed is the mean over this many seconds


class DownloadError(RuntimeError):
    """The checkpoint could not be fetched; the message is one line that says what to do."""


@dataclass(frozen=True)
class Needed:
    """One file of the served set that is not in the cache yet."""

    path: str
    size: int | None  # None when the hub does not say


def served(paths: Iterable[str]) -> list[str]:
    """The repository files the serving path reads, matched as the hub matches them."""
    from huggingface_hub.utils import filter_repo_objects

    return list(filter_repo_objects(list(paths), allow_patterns=SERVED, ignore_patterns=TOP_LEVEL_ONLY))


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_folder(repo_id: str, cache_dir: Path | None = None) -> Path | None:
    """The served files of `repo_id` from the local hub cache, without any network call; None unless whole."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=SERVED, ignore_patterns=TOP_LEVEL_ONLY,
                                        cache_dir=cache_dir, local_files_only=True))
    except Exception:  # (not cached, partly cached, unreadable: all mean "fetch it")
        return None
    return folder if complete(folder) else None


def complete(folder: Path) -> bool:
    """A config and every shard the index names (or, without an index, at least one shard)."""
    import json

    if not (folder / "config.json").is_file():
        return False
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return all((folder / s).is_file() for s in shards)
    return any(folder.glob("*.safetensors"))


def fetch(repo_id: str, progress: Progress | None = None, fraction: float = 0.1, cache_dir: Path | None = None,
          endpoint: str | None = None) -> Path:
    """The local snapshot folder of `repo_id`'s served files: from the cache when whole, else downloaded
    (disk space checked first). Raises DownloadError with a one-line reason."""
    from huggingface_hub.utils import disable_progress_bars, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError:
        raise DownloadError(f"{repo_id!r} is neither a folder that exists nor a hub id (owner/name)") from None
    disable_progress_bars()  # the hub's bars would print over the app; the load line shows progress instead
    say = progress or (lambda _m, _f: None)
    folder = cached_folder(repo_id, cache_dir)
    if folder is not None:
        return folder
    cache = Path(cache_dir) if cache_dir else hub_cache()
    commit, needed = _plan(repo_id, cache, endpoint)
    storage = cache / _repo_folder(repo_id)
    meter = _Meter(repo_id, storage, needed, say, fraction)
    check_space(repo_id, cache, meter.remaining())
    meter.start()
    try:
        for f in needed:
            if f.size is None or f.size >= LARGE:
                _fetch_blob(repo_id, commit, f, storage, endpoint, meter)
        folder = Path(_snapshot(repo_id, cache, endpoint))
    except OSError as e:  # a read-only or full cache folder (network errors arrive as DownloadError)
        raise DownloadError(f"{repo_id}: cannot write to {cache} ({e.strerror or e}): free space there or set "
                            "HF_HUB_CACHE to a folder of yours, or set [model] name to a local folder") from e
    finally:
        meter.stop()
    if not complete(folder) and not (folder / "adapter_config.json").is_file():  # an adapter: the caller says so
        raise DownloadError(f"{repo_id}: the download ended without a config.json and every shard in {folder}")
    say(f"downloaded {repo_id}: {gb(meter.total)} in {meter.elapsed():.0f} s", fraction)
    return folder


def check_space(repo_id: str, cache: Path, need: int) -> None:
    """Raise DownloadError when the disk holding `cache` has less than `need` bytes free (plus a margin)."""
    probe = cache
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need + MARGIN:
        raise DownloadError(
            f"downloading {repo_id} needs {gb(need + MARGIN)} free in {cache} but the disk has {gb(free)}: free "
            "space there, set HF_HUB_CACHE to a folder on a bigger disk, or set [model] name to a local folder"
        )


def _repo_folder(repo_id: str) -> str:
    from huggingface_hub.file_download import repo_folder_name

    return repo_folder_name(repo_id=repo_id, repo_type="model")


def _offline(repo_id: str, cache: Path, error: BaseException) -> DownloadError:
    cause = getattr(error, "__cause__", None) or error
    return DownloadError(
        f"{repo_id} is not in the hub cache ({cache}) and the hub cannot be reached ({type(cause).__name__}): "
        "set [model] name to a local folder with the checkpoint, or fill the hub cache on a machine with "
        f"network (`hf download {repo_id}`) and start with HF_HUB_OFFLINE=1"
    )


def _plan(repo_id: str, cache: Path, endpoint: str | None) -> tuple[str, list[Needed]]:
    """(commit, served files not yet cached), through the hub's own dry run (its filtering and cache checks)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import DryRunError, HfHubHTTPError, RepositoryNotFoundError

    try:
        infos = snapshot_download(repo_id, allow_patterns=SERVED, ignore_patterns=TOP_LEVEL_ONLY, cache_dir=cache,
                                  endpoint=endpoint, dry_run=True)
    except (DryRunError, HfHubHTTPError, OSError) as e:  # the dry run wraps why the hub was not reached
        cause = e.__cause__ if isinstance(e, DryRunError) and e.__cause__ is not None else e
        if isinstance(cause, RepositoryNotFoundError):
            raise DownloadError(f"{repo_id}: no such model on the hub (or it is private and no token is set: "
                                "`hf auth login`)") from e
        if isinstance(cause, HfHubHTTPError):
            raise DownloadError(f"{repo_id}: the hub answered {str(cause).splitlines()[0]}") from e
        raise _offline(repo_id, cache, cause) from e
    if not infos:
        raise DownloadError(f"{repo_id} has no model files at its top level (config.json, *.safetensors)")
    return infos[0].commit_hash, [Needed(i.filename, i.file_size) for i in infos if i.will_download]


def _snapshot(repo_id: str, cache: Path, endpoint: str | None) -> str:
    """The hub's snapshot of the served files: links the blobs fetched here, downloads the small files."""
    import httpx
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:  # the default revision, not `commit`: only then does the hub write refs/main for offline starts
        return snapshot_download(repo_id, allow_patterns=SERVED, ignore_patterns=TOP_LEVEL_ONLY,
                                 cache_dir=cache, endpoint=endpoint)
    except HfHubHTTPError as e:  # before HTTPError, which it also is
        raise DownloadError(f"{repo_id}: the hub answered {str(e).splitlines()[0]}") from e
    except (httpx.HTTPError, LocalEntryNotFoundError) as e:  # the network went between the plan and now
        raise _offline(repo_id, cache, e) from e


def _fetch_blob(repo_id: str, commit: str, f: Needed, storage: Path, endpoint: str | None, meter: _Meter) -> None:
    """Download one large file into `blobs/<etag>`, resuming a part left by an earlier, interrupted start.
    A lock on the part keeps a second Tandem process from appending to it at the same time."""
    import fcntl

    import httpx
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.file_download import http_get

    url = hf_hub_url(repo_id, f.path, revision=commit, endpoint=endpoint)
    try:
        meta = get_hf_file_metadata(url)
    except (httpx.HTTPError, OSError) as e:
        raise _offline(repo_id, storage.parent, e) from e
    if not meta.etag:
        raise DownloadError(f"{repo_id}: the hub gave no checksum (ETag) for {f.path}")
    blob = storage / "blobs" / meta.etag
    if blob.exists():
        return
    part = blob.with_name(f"{meta.etag}.tandem-part")
    part.parent.mkdir(parents=True, exist_ok=True)
    with open(part, "ab") as out:
        try:
            fcntl.flock(out, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise DownloadError(f"{repo_id}: another process is downloading {f.path} into {part}") from None
        if meta.size is not None and out.tell() > meta.size:  # not a prefix of this file: start it over
            out.truncate(0)
            out.seek(0)  # truncate leaves the position where it was
        meter.watch(part, blob)
        try:
            http_get(url, out, resume_size=out.tell(), expected_size=meta.size, displayed_filename=f.path)
        except HfHubHTTPError as e:  # before HTTPError and OSError, which it also is
            raise DownloadError(f"{repo_id}: the hub answered {str(e).splitlines()[0]} for {f.path}") from e
        except httpx.HTTPError as e:
            raise _offline(repo_id, storage.parent, e) from e
        except OSError as e:
            if "Consistency check failed" in str(e):  # the bytes do not add up: that file starts over
                out.truncate(0)
                raise DownloadError(f"{repo_id}: {f.path} arrived with the wrong size; start again to fetch it "
                                    "anew") from e
            raise DownloadError(f"{repo_id}: could not write {part}: {e.strerror or e} (the download resumes "
                                "from there at the next start)") from e
        out.flush()
        part.replace(blob)


class _Meter:
    """Reports bytes on disk against the total, the recent speed and the time left, every TICK_S, by
    reading the sizes of the part files (so bytes an earlier start left count as done, not as speed)."""

    def __init__(self, repo_id: str, storage: Path, needed: list[Needed], say: Progress, fraction: float):
        self.repo_id, self.storage, self.say, self.fraction = repo_id, storage, say, fraction
        self.total = sum(f.size or 0 for f in needed)
        self.parts: dict[Path, Path] = {}  # part -> blob
        self.finished = 0  # bytes of needed files now whole
        self.began = time.monotonic()
        self.samples: deque[tuple[float, int]] = deque()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="download progress", daemon=True)
        self._leftover = self._parts_on_disk()

    def _parts_on_disk(self) -> int:
        blobs = self.storage / "blobs"
        return sum(p.stat().st_size for p in blobs.glob("*.tandem-part")) if blobs.is_dir() else 0

    def remaining(self) -> int:
        return max(self.total - self._leftover, 0)

    def watch(self, part: Path, blob: Path) -> None:
        self.parts[part] = blob

    def elapsed(self) -> float:
        return time.monotonic() - self.began

    def done(self) -> int:
        n = 0
        for part, blob in self.parts.items():
            try:
                n += (part if part.exists() else blob).stat().st_size
            except OSError:  # renamed between the two checks
                n += blob.stat().st_size if blob.exists() else 0
        return n

    def start(self) -> None:
        self.say(f"downloading {self.repo_id}: {gb(self.total)} to fetch", self.fraction)
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join()

    def _loop(self) -> None:
        while not self.stopped.wait(TICK_S):
            self.say(self.line(self.done(), time.monotonic()), self.fraction)

    def line(self, done: int, now: float) -> str:
        """'downloading X: 3.2 of 13.8 GB · 85 MB/s · ~128 s left' (speed over the last SPEED_WINDOW_S)."""
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[0][0] > SPEED_WINDOW_S:
            self.samples.popleft()
        (t0, d0), (t1, d1) = self.samples[0], self.samples[-1]
        speed = (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0
        text = f"downloading {self.repo_id}: {done / 1e9:.1f} of {gb(self.total)}"
        if speed <= 0:
            return text + " · waiting for data"
        left = max(self.total - done, 0) / speed
        return text + f" · {speed / 1e6:.0f} MB/s · ~{left:.0f} s left"
