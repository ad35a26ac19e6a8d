"""Audit findings on `piaa serve` (issue 18).

1. Stalled connections: a real `piaa serve --port 0` process; connections that never send a
   complete request head are closed after the header timeout (PIAA_HEADER_TIMEOUT), and one
   client address keeps at most `IDLE_PER_CLIENT` of them (the oldest beyond are closed), so
   a normal request is still answered.
2. Thumbnails keyed by what was read: a file swapped for a symlink to another picture is
   refused (409 changed_since_indexing), never rendered or served under the indexed hash.
"""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.piaa_processes import http_status, start_server, stop_server

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from fastapi.testclient import TestClient  # noqa: E402
from piaa_index_plugins.http_api.app import create_app  # noqa: E402
from piaa_index_plugins.http_api.security import IDLE_PER_CLIENT  # noqa: E402
from piaa_index_plugins.http_api.state import ServerConfig  # noqa: E402

from piaa_index.library.core import Library  # noqa: E402

KEY = "piaa_test-session-key"

# -- 1. stalled connections on a real server --------------------------------------------------

HEADER_TIMEOUT = 5.0  # seconds, given to the server as PIAA_HEADER_TIMEOUT
STALLED = 300


def _start(home: Path, **env_extra: str) -> tuple[subprocess.Popen[str], int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIAA_")}
    env.update(PIAA_HOME=str(home), **env_extra)
    served = start_server([sys.executable, "-m", "piaa_index", "-q", "serve", "--port", "0"], env)
    return served.proc, served.port


async def _closed_at(reader: asyncio.StreamReader, loop: asyncio.AbstractEventLoop) -> float:
    """Loop time when the server closes the connection (EOF or reset)."""
    try:
        while await reader.read(1024):
            pass
    except OSError:
        pass
    return loop.time()


async def _dribble(writer: asyncio.StreamWriter, port: int) -> None:
    """A slow client: a request head one header line at a time, never finished."""
    writer.write(f"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode())
    try:
        for i in range(1000):
            await asyncio.sleep(0.5)
            writer.write(f"X-Slow-{i}: y\r\n".encode())
            await writer.drain()
    except OSError:
        pass


async def _stalled_scenario(port: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(STALLED)]
    slow_reader, slow_writer = await asyncio.open_connection("127.0.0.1", port)
    opened = loop.time()
    closes = [asyncio.ensure_future(_closed_at(r, loop)) for r, _ in held]
    slow_closed = asyncio.ensure_future(_closed_at(slow_reader, loop))
    dribbler = asyncio.ensure_future(_dribble(slow_writer, port))
    out: dict[str, Any] = {}
    try:
        # Past the eviction grace, before the header timeout: the bound has done its work.
        await asyncio.sleep(HEADER_TIMEOUT / 2)
        done = [i for i, t in enumerate(closes) if t.done()]
        out["closed_by_bound"] = done
        out["health_while_stalled"] = await http_status(port, "/api/health", timeout=30)
        # Past the header timeout: every stalled connection and the slow one are closed.
        await asyncio.wait([*closes, slow_closed], timeout=HEADER_TIMEOUT + 10)
        out["all_closed"] = all(t.done() for t in closes)
        out["slow_closed_after"] = slow_closed.result() - opened if slow_closed.done() else None
        out["health_after"] = await http_status(port, "/api/health", timeout=30)
    finally:
        dribbler.cancel()
        for t in [*closes, slow_closed]:
            t.cancel()
        for _, w in [*held, (slow_reader, slow_writer)]:
            w.close()
    return out


def test_stalled_connections_are_bounded_per_client_and_timed_out(tmp_path: Path) -> None:
    """300 connections from 127.0.0.1 that send nothing, and one that sends its request head a
    line at a time: the 236 oldest silent ones are closed within about a second (at most 64
    wait per client address), the rest and the slow one when the header timeout runs out, and
    /api/health answers 200 meanwhile and after. Without the guard none is ever closed."""
    proc, port = _start(tmp_path / "home", PIAA_HEADER_TIMEOUT=str(HEADER_TIMEOUT))
    try:
        out = asyncio.run(_stalled_scenario(port))
    finally:
        stop_server(proc)
    # The oldest beyond the bound (the slow client, opened last, is among the kept ones).
    assert out["closed_by_bound"] == list(range(STALLED + 1 - IDLE_PER_CLIENT)), out
    assert out["health_while_stalled"] == 200
    assert out["all_closed"], "stalled connections outlived the header timeout"
    slow = out["slow_closed_after"]
    assert slow is not None and HEADER_TIMEOUT - 1 <= slow <= HEADER_TIMEOUT + 3, slow
    assert out["health_after"] == 200


def test_bad_header_timeout_is_refused(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIAA_")}
    env.update(PIAA_HOME=str(tmp_path / "home"), PIAA_HEADER_TIMEOUT="0")
    done = subprocess.run(
        [sys.executable, "-m", "piaa_index", "serve", "--port", "0"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "PIAA_HEADER_TIMEOUT" in done.stderr


# -- 2. thumbnails keyed by what was read -----------------------------------------------------


def _png(path: Path, color: tuple[int, int, int], size: tuple[int, int]) -> None:
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[:] = color
    arr[::7, ::5] = 0  # some texture, so the two files differ in more than a palette
    Image.fromarray(arr).save(path)


@pytest.fixture
def served(tiny_model_config: Path, tmp_path: Path) -> Iterator[tuple[TestClient, Library, Path]]:
    photos = tmp_path / "photos"
    photos.mkdir()
    _png(photos / "red.png", (220, 20, 20), (120, 90))
    _png(photos / "red_copy.png", (220, 20, 20), (120, 90))  # same content, same hash
    _png(photos / "touched.png", (20, 220, 20), (100, 80))
    _png(tmp_path / "blue.png", (20, 20, 220), (140, 100))  # not indexed
    library = Library.open(
        home=tmp_path / "home", model=str(tiny_model_config), pretrained="none", device="cpu"
    )
    library.index([photos])
    app = create_app(library, ServerConfig(session_key=KEY))
    auth = {"Authorization": f"Bearer {KEY}"}
    with TestClient(app, base_url="http://127.0.0.1", headers=auth) as client:
        yield client, library, photos
    library.close()


def _mean_rgb(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)).convert("RGB"), np.float64).mean((0, 1))


def _swap_for_link(path: Path, target: Path) -> None:
    path.unlink()
    path.symlink_to(target)


def test_symlink_swap_is_refused_not_served_under_the_old_hash(served, tmp_path: Path) -> None:
    """red.png is indexed, then replaced by a symlink to blue.png. A thumbnail made now (cache
    miss) or cached before must not be served as image red.png: 409 changed_since_indexing.
    The cache entry of red's hash stays red, so red_copy.png (same content) still shows red."""
    client, library, photos = served
    red = photos / "red.png"
    red_id = library.image_id(red)
    copy_id = library.image_id(photos / "red_copy.png")
    row = library.store.image_by_id(red_id)
    assert row.content_hash == library.store.image_by_id(copy_id).content_hash
    cached = client.get(f"/api/images/{red_id}/thumbnail?size=128")
    assert cached.status_code == 200 and _mean_rgb(cached.content)[0] > 150

    _swap_for_link(red, tmp_path / "blue.png")
    for size in (256, 128):  # not cached yet, cached
        resp = client.get(f"/api/images/{red_id}/thumbnail?size={size}")
        assert resp.status_code == 409, (size, resp.status_code)
        assert resp.json()["error"]["code"] == "changed_since_indexing"
        assert "re-index" in resp.json()["error"]["message"]
    thumbs = library.settings.home / "thumbnails"
    assert not (thumbs / row.content_hash[:2] / f"{row.content_hash}-256.jpg").exists()
    # The content hash's thumbnail is still the indexed (red) picture, for its duplicate too.
    copy = client.get(f"/api/images/{copy_id}/thumbnail?size=256")
    assert copy.status_code == 200 and copy.headers["etag"] == f'"{row.content_hash}-256"'
    rgb = _mean_rgb(copy.content)
    assert rgb[0] > 150 and rgb[2] < 100, rgb


def test_swap_with_same_size_and_mtime_is_caught_by_the_hash(served, tmp_path: Path) -> None:
    """A link to a different picture of the same byte size, mtime copied over: size and mtime
    match the index, but a thumbnail is only rendered from bytes whose hash is the indexed one."""
    client, library, photos = served
    red = photos / "red.png"
    red_id = library.image_id(red)
    st = red.stat()
    data = bytearray(red.read_bytes())
    fake = tmp_path / "fake.png"
    Image.new("RGB", (120, 90), (20, 20, 220)).save(fake)  # flat: smaller than red.png
    fake_bytes = fake.read_bytes()
    assert len(fake_bytes) < len(data)
    # Same length as the indexed file: padded after IEND (decoders ignore the tail).
    fake.write_bytes(fake_bytes.ljust(len(data), b"\0"))
    assert _mean_rgb(fake.read_bytes())[2] > 150
    assert fake.stat().st_size == st.st_size
    os.utime(fake, ns=(st.st_atime_ns, st.st_mtime_ns))
    _swap_for_link(red, fake)
    resp = client.get(f"/api/images/{red_id}/thumbnail?size=512")
    assert resp.status_code == 409, resp.status_code


def test_touched_file_keeps_its_thumbnail(served) -> None:
    """Only a new mtime, same bytes: the hash still matches, so the thumbnail is served."""
    client, library, photos = served
    path = photos / "touched.png"
    image_id = library.image_id(path)
    first = client.get(f"/api/images/{image_id}/thumbnail?size=128")
    assert first.status_code == 200
    later = time.time() + 100
    os.utime(path, (later, later))
    for size in (128, 256):  # cached, then rendered
        again = client.get(f"/api/images/{image_id}/thumbnail?size={size}")
        assert again.status_code == 200, again.text
        assert _mean_rgb(again.content)[1] > 150
