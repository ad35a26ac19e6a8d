"""`/api/health` (no key needed: for load balancers and scripts) and `/api/status`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from piaa_index_plugins.http_api.auth import require_read
from piaa_index_plugins.http_api.state import ApiState, get_state

router = APIRouter(prefix="/api", tags=["meta"])


@router.get("/health", summary="Liveness: the server answers (no key needed)")
def health() -> dict[str, Any]:
    from piaa_index import __version__

    return {"status": "ok", "version": __version__}


@router.head("/health", include_in_schema=False)  # HEAD for probes; not a separate operation
def health_head() -> None:
    return None


@router.get(
    "/status",
    summary="Counts, model, vocabulary, classifier and staleness",
    dependencies=[require_read],
)
def status(state: Annotated[ApiState, Depends(get_state)]) -> dict[str, Any]:
    out = state.run(state.library.status)
    out["jobs"] = {"running": [j["id"] for j in state.jobs.list() if j["state"] == "running"]}
    return out
