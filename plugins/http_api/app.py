"""The ASGI app: `create_app(library, config)`, which tests call directly (FastAPI's
TestClient) and `piaa serve` hands to uvicorn.

Layout: JSON under `/api` (routers `routes_*.py`), `/openapi.json`, `/docs` (Swagger UI) and
`/redoc` (ReDoc) served from packaged files (the fastapi-offline package's Swagger UI 5 and
ReDoc builds, under `/docs/assets`: no CDN, so they work offline), and the gallery's static
files at `/` (`static/`, mounted after the API so it never shadows a route).

A new router: a `routes_*.py` module with a module-level `router`, added to `ROUTERS`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from piaa_index_plugins.http_api import (
    errors,
    routes_images,
    routes_jobs,
    routes_labels,
    routes_media,
    routes_meta,
    routes_queries,
    routes_teach,
    routes_vocabulary,
)
from piaa_index_plugins.http_api.errors import ApiJSONResponse
from piaa_index_plugins.http_api.jobs import JobRunner
from piaa_index_plugins.http_api.security import SecurityMiddleware
from piaa_index_plugins.http_api.state import ApiState, ServerConfig
from starlette.routing import Match, Mount

from piaa_index import __version__

if TYPE_CHECKING:
    from piaa_index.library.core import Library

STATIC = Path(__file__).parent / "static"
ROUTERS = (
    routes_meta,
    routes_queries,
    routes_vocabulary,
    routes_images,
    routes_labels,
    routes_teach,
    routes_jobs,
    routes_media,
)
DOCS_ASSETS = "/docs/assets"


def docs_assets() -> Path | None:
    """The folder of Swagger UI's and ReDoc's files (the fastapi-offline package), if any."""
    try:
        import fastapi_offline
    except ImportError:
        return None
    folder = Path(fastapi_offline.__file__).parent / "static"
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


def add_docs(app: FastAPI) -> None:
    """`/docs` and `/redoc` from local files; without them, a page that says so (never a
    page that loads scripts from a CDN)."""
    assets = docs_assets()
    title = f"{app.title} {app.version}"
    if assets is not None:
        app.mount(DOCS_ASSETS, StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        if assets is None:
            return _no_docs()
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{title} - API docs",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png",
            swagger_ui_parameters={"persistAuthorization": True},
        )

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        if assets is None:
            return _no_docs()
        return get_redoc_html(
            openapi_url="/openapi.json",
            title=f"{title} - API reference",
            redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{DOCS_ASSETS}/favicon.png",
            with_google_fonts=False,
        )


def _no_docs() -> HTMLResponse:
    return HTMLResponse(
        "<!doctype html><title>API docs</title><p>The interactive docs need the "
        "<code>fastapi-offline</code> package (pip install fastapi-offline). The schema: "
        '<a href="/openapi.json">/openapi.json</a>.</p>'
    )


class _StaticMount(Mount):
    """The gallery at `/`, but never for `/api/...`: an unknown API path is a JSON 404 and a
    wrong method on an API route a JSON 405, not a static-file answer."""

    def matches(self, scope: Any) -> tuple[Match, Any]:
        path = scope.get("path", "")
        if path == "/api" or path.startswith("/api/"):
            return Match.NONE, {}
        return super().matches(scope)


def create_app(
    library: Library,
    config: ServerConfig | None = None,
    open_job_library: Callable[[], Library] | None = None,
    close_library: bool = False,
) -> FastAPI:
    """The API over `library` (used for reads, one request at a time). Jobs run on a Library
    from `open_job_library` (default: `library.reopen()`). With `close_library`, the app's
    shutdown closes `library` (the `piaa serve` case)."""
    config = config or ServerConfig()
    # A read never fits (minutes on a large library, holding every other read): it answers
    # 409 needs_fit, and a fit job does the work.
    library.auto_fit = False
    jobs = JobRunner(open_job_library or library.reopen)
    state = ApiState(library, config, jobs)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        jobs.close()
        if close_library:
            library.close()

    app = FastAPI(
        title="piaa-index",
        version=__version__,
        description="Tag and search photo collections: queries, images and tags with a change "
        "feed, vocabulary, and index/fit jobs. Keys: `Authorization: Bearer KEY` or "
        "`X-API-Key: KEY` (`piaa keys create`). See docs/http-api.md.",
        default_response_class=ApiJSONResponse,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.piaa = state
    errors.install(app)
    # Each registered query's own operation first: `/api/queries/search` before the generic
    # `/api/queries/{name}` (which serves queries registered later).
    app.include_router(routes_queries.registered_router(library))
    for module in ROUTERS:
        app.include_router(module.router)
    add_docs(app)
    if STATIC.is_dir():
        app.router.routes.append(
            _StaticMount("/", app=StaticFiles(directory=STATIC, html=True), name="gallery")
        )
    app.add_middleware(SecurityMiddleware, config=config)
    return app
