"""`/api/health` (no key needed: for load balancers and scripts) and `/api/status`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from piaa_index_plugins.http_api.auth import require_read
from piaa_index_plugins.http_api.errors import jsonable
from piaa_index_plugins.http_api.models import ANY, KEYED, Health, Status, errors
from piaa_index_plugins.http_api.state import ApiState, get_state

from piaa_index import __version__

router = APIRouter(prefix="/api", tags=["meta"])


@router.get(
    "/health",
    operation_id="health",
    summary="Liveness: the server answers (no key needed)",
    response_model=Health,
    responses=errors(*ANY),
)
def health() -> dict[str, Any]:
    return {"status": "ok", "version": __version__}


@router.head("/health", include_in_schema=False)  # HEAD for probes; not a separate operation
def health_head() -> None:
    return None


@router.get(
    "/status",
    operation_id="get_status",
    summary="Counts, model, vocabulary, classifier and staleness",
    dependencies=[require_read],
    response_model=Status,
    response_model_exclude_unset=True,
    responses=errors(*KEYED, 409),
)
def status(state: Annotated[ApiState, Depends(get_state)]) -> dict[str, Any]:
    out: dict[str, Any] = jsonable(state.run(state.library.status))
    out["jobs"] = {"running": [j["id"] for j in state.jobs.list() if j["state"] == "running"]}
    return out
