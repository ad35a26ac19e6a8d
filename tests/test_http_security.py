"""Attack suite of the HTTP API, bounded and on 127.0.0.1 only: DNS rebinding (Host), cross-site
requests (Origin, CORS), non-JSON and oversized bodies, label and nesting limits, NUL bytes, no
client path opened, a fuzz of query parameters that never gives a 500; and a real `piaa serve`
process: 500 concurrent connections all answered, stalled clients, clean SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from piaa_index_plugins.http_api.app import create_app
from piaa_index_plugins.http_api.state import ServerConfig

from piaa_index.library.core import Library
from tests.piaa_processes import Served, http_status, start_server, stop_server
from tools import scale

SESSION = "piaa_attack-suite-key"
BASE = "http://127.0.0.1:8765"
AUTH = {"Authorization": f"Bearer {SESSION}"}
N_LABELS = 6


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Library]:
    world = scale.World.make(N_LABELS, seed=2)
    lib = scale.open_library(tmp_path_factory.mktemp("sec") / "home", world)
    scale.add_images(lib, world, 400)
    lib.set_vocabulary(scale.label_names(N_LABELS))
    lib.fit()
    yield lib
    lib.close()


def make_client(library: Library, **config: Any) -> TestClient:
    app = create_app(library, ServerConfig(session_key=SESSION, **config))
    return TestClient(app, base_url=BASE, headers=AUTH, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(library: Library) -> Iterator[TestClient]:
    with make_client(library, allow_hosts=("photos.example.org",)) as c:
        yield c


def error_code(response: Any) -> str:
    assert response.headers["content-type"].startswith("application/json"), response.text
    return str(response.json()["error"]["code"])


# -- DNS rebinding and cross-site requests ------------------------------------------------------


def test_foreign_host_header_is_refused(client: TestClient) -> None:
    for host in ("evil.example", "127.0.0.1.evil.example", "localhost.", "[::2]:8765"):
        response = client.get("/api/status", headers={"Host": host})
        assert response.status_code == 400 and error_code(response) == "host_not_allowed", host
    for host in ("127.0.0.1:8765", "localhost", "LOCALHOST:1", "[::1]:8765", "photos.example.org"):
        assert client.get("/api/status", headers={"Host": host}).status_code == 200, host


def test_cross_site_requests_are_refused(client: TestClient) -> None:
    evil = {"Origin": "http://evil.example"}
    response = client.get("/api/status", headers=evil)
    assert response.status_code == 403 and error_code(response) == "origin_not_allowed"
    # The classic CSRF: a form-like text/plain POST from another site, no preflight needed.
    response = client.post(
        "/api/jobs/fit", content=b"x", headers={**evil, "Content-Type": "text/plain"}
    )
    assert response.status_code == 403
    response = client.put("/api/vocabulary", json={"labels": ["x"]}, headers=evil)
    assert response.status_code == 403
    assert client.get("/api/status", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    # Another port of localhost is another origin.
    assert client.get("/api/status", headers={"Origin": "http://127.0.0.1:9999"}).status_code == 403
    assert client.get("/api/status", headers={"Origin": "null"}).status_code == 403
    # Same origin (the gallery) is fine.
    assert client.get("/api/status", headers={"Origin": BASE}).status_code == 200
    assert "access-control-allow-origin" not in client.get("/api/status").headers


def test_cors_is_opt_in(library: Library) -> None:
    dam = "https://dam.example.org"
    with make_client(library, cors_origins=(dam,)) as c:
        response = c.get("/api/status", headers={"Origin": dam})
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == dam
        preflight = c.options(
            "/api/vocabulary",
            headers={
                "Origin": dam,
                "Access-Control-Request-Method": "PUT",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == 204
        assert "PUT" in preflight.headers["access-control-allow-methods"]
        assert "Authorization" in preflight.headers["access-control-allow-headers"]
        other = c.options(
            "/api/vocabulary",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "PUT"},
        )
        assert other.status_code == 403


# -- bodies ------------------------------------------------------------------------------------


def test_json_only_bodies(client: TestClient) -> None:
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        response = client.put(
            "/api/vocabulary", content=b'{"labels": ["x"]}', headers={"Content-Type": ctype}
        )
        assert response.status_code == 415 and error_code(response) == "unsupported_media_type"
    response = client.post("/api/jobs/fit", content=b"{}", headers={"Content-Type": ""})
    assert response.status_code == 415


def test_body_size_limit(client: TestClient) -> None:
    labels = [f"label{i}" for i in range(120_000)]  # ~1.4 MB
    response = client.put("/api/vocabulary", json={"labels": labels})
    assert response.status_code == 413 and error_code(response) == "body_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"labels": ['
        for _ in range(400):
            yield b'"' + b"x" * 1000 + b'",'
        yield b'"y"]}'

    response = client.put(
        "/api/vocabulary", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413


def test_label_limits(client: TestClient) -> None:
    response = client.put("/api/vocabulary", json={"labels": [f"l{i}" for i in range(5000)]})
    assert (
        response.status_code == 400 and "at most 1000 labels" in response.json()["error"]["message"]
    )
    response = client.put("/api/vocabulary", json={"labels": ["x" * 5000]})
    assert response.status_code == 400
    response = client.put("/api/vocabulary", json={"labels": ["a"], "templates": ["{}"] * 500})
    assert response.status_code == 400


def test_deep_json_is_refused_before_parsing(client: TestClient) -> None:
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"labels": ' + b"[" * 50 + b"]" * 50 + b"}"):
        response = client.put(
            "/api/vocabulary", content=body, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 400 and "deeper" in response.json()["error"]["message"]
    # Brackets inside strings do not count.
    response = client.get("/api/labels?prefix=" + quote("[[[["))
    assert response.status_code == 200


def test_nul_bytes_are_400(client: TestClient) -> None:
    for url in (
        "/api/queries/search?expression=l000%00",
        "/api/queries/tags?image=%2Fetc%2Fpasswd%00.jpg",
        "/api/queries/sea%00rch",
        "/api/labels?prefix=%00",
        "/api/tags?cursor=%00",
    ):
        response = client.get(url)
        assert response.status_code == 400, url
        assert error_code(response) == "bad_request"
    for body in (
        b'{"labels": ["a\\u0000b"]}',
        b'{"labels": ["a\x00b"]}',
        b'{"labels": ["\\U0000"]}',
    ):
        response = client.put(
            "/api/vocabulary", content=body, headers={"Content-Type": "application/json"}
        )
        assert response.status_code in (400, 422), body
        assert response.status_code != 500


# -- no client path is opened -------------------------------------------------------------------

OPENED: list[str] = []
_WATCHING: list[bool] = [False]


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _WATCHING[0] and event == "open" and args and isinstance(args[0], (str, bytes)):
        OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


def test_no_client_path_is_opened(client: TestClient, tmp_path: Path) -> None:
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"\xff\xd8 not for you")
    probes = [str(secret), "/etc/hostname", "/etc/shadow", str(tmp_path / "missing.jpg")]
    answers = set()
    _WATCHING[0] = True
    try:
        for probe in probes:
            for query in ("similar", "tags"):
                response = client.get(f"/api/queries/{query}?" + urlencode({"image": probe}))
                assert response.status_code == 400
                answers.add(response.json()["error"]["message"].replace(probe, "P"))
    finally:
        _WATCHING[0] = False
    assert len(answers) == 1  # no existence oracle
    assert not [p for p in OPENED if any(p.startswith(x) for x in probes)]


# -- fuzz: no parameter ever gives a 500 ---------------------------------------------------------

texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
values = st.one_of(
    texts,
    st.integers(-(2**70), 2**70).map(str),
    st.sampled_from(["", "0", "1", "-1", "true", "l000", "l000 AND l001", "NOT (", "1e309"]),
)
names = st.one_of(
    st.sampled_from(["expression", "text", "limit", "all_images", "image", "present_only"]),
    texts,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    route=st.sampled_from(
        [
            "/api/queries/search",
            "/api/queries/tags",
            "/api/queries/similar",
            "/api/queries/x",
            "/api/tags",
            "/api/images",
            "/api/labels",
            "/api/images/1",
        ]
    ),
    params=st.lists(st.tuples(names, values), max_size=4),
)
def test_fuzz_query_parameters_never_500(client: TestClient, route: str, params: list) -> None:
    # `text` (open-vocabulary search) needs the model, which a synthetic library has not.
    params = [(k, v) for k, v in params if not (k == "text" and route.endswith("search"))]
    response = client.get(route + "?" + urlencode(params))
    assert response.status_code < 500, (route, params, response.text)
    assert response.headers["content-type"].startswith("application/json")


# -- a real server process ----------------------------------------------------------------------


def _start(home: Path, *args: str) -> Served:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIAA_")}
    env["PIAA_HOME"] = str(home)
    return start_server(
        [sys.executable, "-m", "piaa_index", "-q", "serve", "--port", "0", *args], env
    )


async def _burst(port: int, n: int) -> list[int | str]:
    async def one() -> int | str:
        try:
            return await http_status(port, "/api/health")
        except (OSError, asyncio.TimeoutError, IndexError, ValueError) as exc:
            return type(exc).__name__

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def _stalled_then_health(port: int, stalled: int) -> int:
    """Open connections that never send a request, then ask for /api/health."""
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(stalled)]
    try:
        return await http_status(port, "/api/health")
    finally:
        for _, w in held:
            w.close()


@pytest.mark.slow
def test_real_server_concurrency_and_sigterm(tmp_path: Path) -> None:
    served = _start(tmp_path / "home")
    proc, base, port, key = served.proc, served.base, served.port, served.key
    try:
        statuses = asyncio.run(_burst(port, 500))
        assert statuses == [200] * 500, sorted(set(map(str, statuses)))
        assert asyncio.run(_stalled_then_health(port, 200)) == 200
        assert asyncio.run(http_status(port, "/api/status")) == 401
        assert asyncio.run(http_status(port, "/api/status", key)) == 200
        import urllib.request

        with urllib.request.urlopen(base + "/openapi.json", timeout=30) as response:
            assert json.load(response)["openapi"].startswith("3.")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    err = served.stderr()
    assert code == 0, err
    assert "stopped" in err and "Traceback" not in err


def test_serve_after_demo_serves_the_demo_library(tmp_path: Path, shapes_home: Path) -> None:
    """`piaa demo` keeps its library in HOME/demo/index; a plain `piaa serve` right after (the
    default library still empty) serves that one, as the demo's closing hint promises."""
    import shutil
    import urllib.request

    home = tmp_path / "home"
    shutil.copytree(shapes_home, home / "demo" / "index")
    served = _start(home)
    base, key = served.base, served.key
    try:
        request = urllib.request.Request(
            base + "/api/status", headers={"Authorization": f"Bearer {key}"}
        )
        with urllib.request.urlopen(request, timeout=60) as answer:  # noqa: S310 - loopback
            status = json.loads(answer.read())
        assert status["images"]["indexed"] == 48
    finally:
        stop_server(served.proc)
