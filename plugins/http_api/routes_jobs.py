"""Index and fit as background jobs (piaa_index_plugins/http_api/jobs.py): 202 with the job,
then poll `GET /api/jobs/{id}`.

Index jobs take absolute paths of existing folders or regular files (what `piaa index`
takes; folders are walked for regular image files only, so FIFOs and devices are never
read). With `--index-root`, only paths under those folders.
"""

from __future__ import annotations

import os
from pathlib import Path as FsPath
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path
from piaa_index_plugins.http_api.auth import require_read, require_write
from piaa_index_plugins.http_api.errors import ApiError
from piaa_index_plugins.http_api.jobs import QueueFull
from piaa_index_plugins.http_api.models import BODY, KEYED, Job, JobBrief, errors
from piaa_index_plugins.http_api.state import ApiState, get_state
from pydantic import BaseModel, ConfigDict, Field, StrictBool

router = APIRouter(prefix="/api/jobs", tags=["jobs"])


class IndexBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    paths: list[str] = Field(description="Absolute paths of folders or image files.")
    prune: StrictBool = Field(default=False, description="Forget images gone from these folders.")


def _check_paths(state: ApiState, paths: list[str]) -> list[str]:
    cfg = state.config
    if not paths:
        raise ApiError(400, "bad_request", "'paths' is empty")
    if len(paths) > cfg.max_paths:
        raise ApiError(400, "bad_request", f"at most {cfg.max_paths} paths")
    roots = [os.path.realpath(r) for r in cfg.index_roots]
    out = []
    for raw in paths:
        if len(raw) > 4096 or not os.path.isabs(raw):
            raise ApiError(400, "bad_request", f"not an absolute path: {raw[:200]!r}")
        real = os.path.realpath(raw)
        if roots and not any(
            real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots
        ):
            raise ApiError(403, "forbidden", f"{raw!r} is outside the allowed index roots")
        p = FsPath(real)
        if not (p.is_dir() or p.is_file()):
            raise ApiError(400, "bad_request", f"not an existing folder or regular file: {raw!r}")
        out.append(raw)
    return out


@router.post(
    "/index",
    status_code=202,
    operation_id="start_index_job",
    summary="Index folders or files in the background",
    dependencies=[require_write],
    response_model=JobBrief,
    responses=errors(*BODY, 429),
)
def start_index(body: IndexBody, state: Annotated[ApiState, Depends(get_state)]) -> dict[str, Any]:
    paths = _check_paths(state, body.paths)
    return _submit(state, "index", {"paths": paths, "prune": body.prune})


@router.post(
    "/fit",
    status_code=202,
    operation_id="start_fit_job",
    summary="Fit the classifier and re-tag every image in the background",
    dependencies=[require_write],
    response_model=JobBrief,
    responses=errors(*KEYED, 413, 415, 429),
)
def start_fit(state: Annotated[ApiState, Depends(get_state)]) -> dict[str, Any]:
    return _submit(state, "fit", {})


@router.get(
    "",
    operation_id="list_jobs",
    summary="Recent jobs, newest first",
    dependencies=[require_read],
    response_model=list[Job],
    responses=errors(*KEYED),
)
def list_jobs(state: Annotated[ApiState, Depends(get_state)]) -> list[dict[str, Any]]:
    return state.jobs.list()


@router.get(
    "/{job_id}",
    operation_id="get_job",
    summary="One job: state, progress, result or error",
    dependencies=[require_read],
    response_model=Job,
    responses=errors(*KEYED, 404, 422),
)
def get_job(
    job_id: Annotated[str, Path(max_length=20)], state: Annotated[ApiState, Depends(get_state)]
) -> dict[str, Any]:
    job = state.jobs.get(job_id)
    if job is None:
        raise ApiError(404, "not_found", f"no job {job_id!r}")
    return job


def _submit(state: ApiState, kind: str, params: dict[str, Any]) -> dict[str, Any]:
    """Queue a job, or 429 when too many are queued or running already."""
    try:
        return _brief(state.jobs.submit(kind, params))
    except QueueFull as exc:
        raise ApiError(429, "too_many_jobs", str(exc), {"Retry-After": "5"}) from None


def _brief(job: dict[str, Any]) -> dict[str, Any]:
    return {"id": job["id"], "kind": job["kind"], "state": job["state"]}
