"""Bulk tags through the HTTP API: a synthetic library of N images (built through the index
write path, tools/scale.py), fitted, then every image's present tags fetched through
`GET /api/tags` cursor paging over a real socket (uvicorn on 127.0.0.1, httpx client), and a
change-feed sync after a re-tag. Prints one JSON object.

    python benchmarks/bench_api.py --images 50000 --home /tmp/bench-api
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from piaa_index_plugins.http_api.app import create_app
from piaa_index_plugins.http_api.state import ServerConfig

# tools/ (development only, not shipped) sits beside benchmarks/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools import scale  # noqa: E402

KEY = "piaa_bench-key"


def _sync(client: httpx.Client, limit: int, since: int | None) -> tuple[int, int, int, int]:
    """(images, tag rows, pages, version) of one full listing."""
    images = tags = pages = 0
    cursor = None
    version = 0
    while True:
        params: dict[str, Any] = {"limit": limit}
        if cursor:
            params["cursor"] = cursor
        elif since is not None:
            params["since"] = since
        response = client.get("/api/tags", params=params)
        response.raise_for_status()
        body = response.json()
        version = body["version"]
        images += len(body["images"])
        tags += sum(len(im["tags"]) for im in body["images"])
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            return images, tags, pages, version


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--labels", type=int, default=80)
    ap.add_argument("--limit", type=int, default=1000, help="page size")
    ap.add_argument("--home", required=True)
    ap.add_argument("--db", default=None, help="SQLAlchemy URL (default: SQLite in --home)")
    args = ap.parse_args()

    home = Path(args.home)
    if home.exists() and any(home.iterdir()):
        sys.exit(f"{home} is not empty")
    world = scale.World.make(args.labels)
    lib = scale.open_library(home, world, args.db)
    t = time.perf_counter()
    scale.add_images(lib, world, args.images)
    lib.set_vocabulary(scale.label_names(args.labels))
    lib.fit()
    build_s = time.perf_counter() - t

    app = create_app(lib, ServerConfig(session_key=KEY))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    out: dict[str, Any] = {
        "images": args.images,
        "labels": args.labels,
        "page_size": args.limit,
        "database": lib.store.engine.dialect.name,
        "build_and_fit_s": round(build_s, 1),
    }
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=120) as c:
        t = time.perf_counter()
        n, tags, pages, version = _sync(c, args.limit, None)
        out["full_listing"] = {
            "seconds": round(time.perf_counter() - t, 3),
            "images": n,
            "tags": tags,
            "pages": pages,
        }
        # A re-tag: a vocabulary without the last 10 labels, fitted; then a sync since `version`.
        lib.set_vocabulary(scale.label_names(args.labels)[:-10])
        t = time.perf_counter()
        lib.fit()
        out["retag_fit_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        n2, tags2, pages2, _ = _sync(c, args.limit, version)
        out["sync_after_retag"] = {
            "seconds": round(time.perf_counter() - t, 3),
            "changed_images": n2,
            "tags": tags2,
            "pages": pages2,
        }
    server.should_exit = True
    thread.join(timeout=30)
    lib.close()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
