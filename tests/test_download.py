"""Fetching a checkpoint from the hub: only the served files, disk space first, progress, resume, offline.

Downloads run against tests/fake_hub.py, a hub on the loopback interface, through huggingface_hub's own
client code."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.serve import download
from tests.conftest import terminal_sigint
from tests.fake_hub import FakeHub

# The file lists of the documented checkpoints, as their hub repositories ship them.
OPENAI_20B = [
    ".gitattributes", "LICENSE", "README.md", "USAGE_POLICY", "chat_template.jinja", "config.json",
    "generation_config.json", "metal/model.bin", "model-00000-of-00002.safetensors",
    "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
    "original/config.json", "original/dtypes.json", "original/model.safetensors", "special_tokens_map.json",
    "tokenizer.json", "tokenizer_config.json",
]
UNSLOTH_20B = [
    ".gitattributes", "README.md", "chat_template.jinja", "config.json", "generation_config.json",
    "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors",
    "model.safetensors.index.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
]
UNSLOTH_20B_BF16 = [
    ".gitattributes", "README.md", "chat_template.jinja", "config.json", "generation_config.json",
    *[f"model-{i:05d}-of-00009.safetensors" for i in range(1, 10)], "model.safetensors.index.json",
    "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
]
UNSLOTH_20B_BNB = [
    ".gitattributes", "README.md", "chat_template.jinja", "config.json", "generation_config.json",
    "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors",
    "model.safetensors.index.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
]
NOT_SERVED = {".gitattributes", "LICENSE", "README.md", "USAGE_POLICY"}


@pytest.mark.parametrize("files", [OPENAI_20B, UNSLOTH_20B, UNSLOTH_20B_BF16, UNSLOTH_20B_BNB],
                         ids=["openai", "unsloth", "unsloth-bf16", "unsloth-bnb-4bit"])
def test_the_filter_takes_exactly_the_top_level_files_serving_reads(files):
    expected = [f for f in files if "/" not in f and f not in NOT_SERVED]
    assert sorted(download.served(files)) == sorted(expected)
    assert not any(f.startswith(("original/", "metal/")) for f in download.served(files))


def test_the_old_patterns_took_the_original_checkpoint_too():
    """Why the filter ignores subfolders: the hub's fnmatch lets `*` cross `/`."""
    from huggingface_hub.utils import filter_repo_objects

    old = list(filter_repo_objects(OPENAI_20B, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model",
                                                                "*.jinja"]))
    assert "original/model.safetensors" in old and "original/model.safetensors" not in download.served(OPENAI_20B)


def repo_files(shard_bytes: int = 24 * 2**20) -> dict[str, bytes]:
    return {
        "config.json": b'{"model_type": "gpt_oss"}',
        "tokenizer.json": b"{}",
        "model-00001-of-00001.safetensors": os.urandom(shard_bytes),
        "model.safetensors.index.json": b'{"weight_map": {"w": "model-00001-of-00001.safetensors"}}',
        "original/model.safetensors": os.urandom(4096),
        "metal/model.bin": os.urandom(4096),
        "README.md": b"# tiny",
    }


SHARD = "model-00001-of-00001.safetensors"


def test_fetch_downloads_the_served_files_only_and_reports_bytes(tmp_path):
    files = repo_files()
    lines: list[str] = []
    with FakeHub("acme/tiny", files) as hub:
        hub.throttle_s = 0.004  # ~1.5 s for the shard: the meter ticks at least once
        folder = download.fetch("acme/tiny", lambda m, _f: lines.append(m), cache_dir=tmp_path,
                                endpoint=hub.endpoint)
    assert sorted(os.listdir(folder)) == sorted(["config.json", "tokenizer.json", SHARD,
                                                 "model.safetensors.index.json"])
    assert (folder / SHARD).read_bytes() == files[SHARD]
    fetched = {p.rsplit("/", 1)[-1] for m, p, _ in hub.requests if m == "GET" and "/resolve/" in p}
    assert "model.bin" not in fetched and "README.md" not in fetched
    assert lines[0].startswith("downloading acme/tiny:") and lines[-1].startswith("downloaded acme/tiny")
    assert any(" of " in line and ("MB/s" in line or "waiting" in line) for line in lines[1:-1])
    # a second call is served from the cache without any request
    before = len(hub.requests)
    assert download.fetch("acme/tiny", cache_dir=tmp_path, endpoint="http://127.0.0.1:9") == folder
    assert len(hub.requests) == before


def test_a_part_left_by_an_interrupted_start_is_resumed_with_a_range_request(tmp_path):
    files = repo_files()
    with FakeHub("acme/tiny", files) as hub:
        blob_dir = tmp_path / "models--acme--tiny" / "blobs"
        blob_dir.mkdir(parents=True)
        have = 5_000_000
        (blob_dir / f"{hub.etag(SHARD)}.tandem-part").write_bytes(files[SHARD][:have])
        folder = download.fetch("acme/tiny", cache_dir=tmp_path, endpoint=hub.endpoint)
    gets = [r for m, p, r in hub.requests if m == "GET" and p.endswith(SHARD)]
    assert gets == [f"bytes={have}-"]
    assert (folder / SHARD).read_bytes() == files[SHARD]
    assert not list(blob_dir.glob("*.tandem-part"))


def test_a_part_longer_than_the_file_is_started_over(tmp_path):
    files = repo_files()
    with FakeHub("acme/tiny", files) as hub:
        blob_dir = tmp_path / "models--acme--tiny" / "blobs"
        blob_dir.mkdir(parents=True)
        (blob_dir / f"{hub.etag(SHARD)}.tandem-part").write_bytes(os.urandom(len(files[SHARD]) + 10))
        folder = download.fetch("acme/tiny", cache_dir=tmp_path, endpoint=hub.endpoint)
    assert [r for m, p, r in hub.requests if m == "GET" and p.endswith(SHARD)] == [None]
    assert (folder / SHARD).read_bytes() == files[SHARD]


def test_a_connection_lost_mid_file_is_retried_and_the_file_is_whole(tmp_path):
    files = repo_files()
    with FakeHub("acme/tiny", files) as hub:
        hub.cut_after = 12 * 2**20
        folder = download.fetch("acme/tiny", cache_dir=tmp_path, endpoint=hub.endpoint)
    assert (folder / SHARD).read_bytes() == files[SHARD]
    assert len([p for m, p, _ in hub.requests if m == "GET" and p.endswith(SHARD)]) == 2


CHILD = """
import sys
sys.path.insert(0, {root!r})
from engine.serve import download
download.fetch("acme/tiny", cache_dir={cache!r}, endpoint={endpoint!r})
"""


def test_ctrl_c_keeps_the_part_and_the_next_start_resumes_it(tmp_path):
    files = repo_files(40 * 2**20)
    root = str(Path(__file__).resolve().parent.parent)
    with FakeHub("acme/tiny", files) as hub:
        hub.hold_after = 24 * 2**20  # past two of the client's 10 MiB writes; it stops there until the child is gone
        child = subprocess.Popen([sys.executable, "-c", CHILD.format(root=root, cache=str(tmp_path),
                                                                     endpoint=hub.endpoint)],
                                 stderr=subprocess.PIPE, text=True, preexec_fn=terminal_sigint)
        part = tmp_path / "models--acme--tiny" / "blobs" / f"{hub.etag(SHARD)}.tandem-part"
        deadline = time.monotonic() + 30
        while not (part.exists() and part.stat().st_size > 0) and time.monotonic() < deadline:
            time.sleep(0.05)
        child.send_signal(signal.SIGINT)  # Ctrl+C
        _, err = child.communicate(timeout=60)
        hub.release.set()
        assert child.returncode != 0 and "KeyboardInterrupt" in err, err[-3000:]
        kept = part.stat().st_size
        assert 0 < kept < len(files[SHARD])
        folder = download.fetch("acme/tiny", cache_dir=tmp_path, endpoint=hub.endpoint)
    assert (folder / SHARD).read_bytes() == files[SHARD]
    assert [r for m, p, r in hub.requests if m == "GET" and p.endswith(SHARD)][-1] == f"bytes={kept}-"


def test_too_little_disk_space_is_refused_before_any_download(tmp_path):
    files = repo_files(1 << 20)
    free = shutil.disk_usage(tmp_path).free
    with FakeHub("acme/tiny", files) as hub:
        hub.claimed[SHARD] = free + 10**12  # what the hub says the shard weighs
        with pytest.raises(download.DownloadError) as e:
            download.fetch("acme/tiny", cache_dir=tmp_path, endpoint=hub.endpoint)
    message = str(e.value)
    assert "\n" not in message and f"needs {download.gb(free + 10**12 + download.MARGIN)} free" in message
    assert str(tmp_path) in message and "HF_HUB_CACHE" in message
    assert not [p for m, p, _ in hub.requests if m == "GET" and "/resolve/" in p]


def test_check_space_passes_when_there_is_room(tmp_path):
    download.check_space("acme/tiny", tmp_path / "not" / "yet", 1)


def test_no_network_says_so_in_one_line_with_both_ways_forward(tmp_path):
    with pytest.raises(download.DownloadError) as e:
        download.fetch("acme/tiny", cache_dir=tmp_path, endpoint="http://127.0.0.1:9")  # nothing listens
    message = str(e.value)
    assert "\n" not in message and "cannot be reached" in message
    assert "local folder" in message and "HF_HUB_OFFLINE=1" in message


@pytest.mark.parametrize("bad", ["a/b/c", "no spaces/here", "x" * 200 + "/y", "-dash/x"])
def test_a_name_that_is_no_hub_id_is_refused_before_any_request(tmp_path, bad):
    with pytest.raises(download.DownloadError, match="neither a folder that exists nor a hub id"):
        download.fetch(bad, cache_dir=tmp_path, endpoint="http://127.0.0.1:9")


def test_an_unknown_repository_is_named(tmp_path):
    with FakeHub("acme/tiny", repo_files(1024)) as hub, pytest.raises(download.DownloadError) as e:
        download.fetch("acme/other", cache_dir=tmp_path, endpoint=hub.endpoint)
    assert "acme/other: no such model" in str(e.value)


def test_the_meter_says_speed_and_time_left():
    meter = download._Meter("acme/tiny", Path("/nonexistent"), [download.Needed("a", 10_000_000_000)],
                            lambda *_: None, 0.1)
    assert meter.line(0, 100.0).endswith("waiting for data")
    line = meter.line(1_000_000_000, 110.0)  # 1 GB in 10 s
    assert line == "downloading acme/tiny: 1.0 of 10.0 GB · 100 MB/s · ~90 s left"
