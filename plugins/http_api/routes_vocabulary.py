"""The vocabulary (read, replace) and label completion for search boxes."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from piaa_index_plugins.http_api.auth import require_read, require_write
from piaa_index_plugins.http_api.errors import ApiError
from piaa_index_plugins.http_api.models import BODY, KEYED, LabelCompletion, Vocabulary, errors
from piaa_index_plugins.http_api.state import ApiState, get_state
from pydantic import BaseModel, ConfigDict, Field

router = APIRouter(prefix="/api", tags=["vocabulary"])


class VocabularyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    labels: list[str] = Field(description="The new labels, in order.")
    templates: list[str] | None = Field(
        default=None, description="Prompt templates, each with one {} (default: the built-in set)."
    )


def _vocabulary(state: ApiState) -> dict[str, Any]:
    vocab = state.library.vocabulary()
    return {
        "version": vocab.id if vocab else None,
        "labels": vocab.names if vocab else [],
        "templates": vocab.templates if vocab else [],
        "stale": state.library.is_stale(),
    }


@router.get(
    "/vocabulary",
    operation_id="get_vocabulary",
    summary="The current vocabulary",
    dependencies=[require_read],
    response_model=Vocabulary,
    responses=errors(*KEYED, 409),
)
def get_vocabulary(state: Annotated[ApiState, Depends(get_state)]) -> dict[str, Any]:
    return state.run(_vocabulary, state)


@router.put(
    "/vocabulary",
    operation_id="set_vocabulary",
    summary="Replace the vocabulary (tags become stale until a fit job runs)",
    dependencies=[require_write],
    response_model=Vocabulary,
    responses=errors(*BODY, 409),
)
def put_vocabulary(
    body: VocabularyBody, state: Annotated[ApiState, Depends(get_state)]
) -> dict[str, Any]:
    cfg = state.config
    if len(body.labels) > cfg.max_labels:
        raise ApiError(
            400, "bad_request", f"at most {cfg.max_labels} labels, not {len(body.labels)}"
        )
    for text in [*body.labels, *(body.templates or [])]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            # JSON can spell a lone surrogate ("\udcff"); no database or tokenizer takes one.
            raise ApiError(
                400,
                "bad_request",
                f"label or template {text[:100]!r} is not valid Unicode (a lone surrogate)",
            ) from None
        if len(text) > cfg.max_label_length:
            raise ApiError(
                400,
                "bad_request",
                f"labels and templates are at most {cfg.max_label_length} characters",
            )
    if body.templates is not None and len(body.templates) > 100:
        raise ApiError(400, "bad_request", "at most 100 templates")

    def call() -> dict[str, Any]:
        state.library.set_vocabulary(body.labels, body.templates)
        return _vocabulary(state)

    return state.run(call)


@router.get(
    "/labels",
    operation_id="complete_labels",
    summary="Label completion: labels starting with a prefix",
    dependencies=[require_read],
    response_model=LabelCompletion,
    responses=errors(*KEYED, 409, 422),
)
def labels(
    state: Annotated[ApiState, Depends(get_state)],
    prefix: Annotated[str, Query(max_length=200)] = "",
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> dict[str, Any]:
    """Case-insensitive prefix match over the current vocabulary, each label with the number of
    images tagged with it (labels that start with the prefix first, then those that contain it)."""

    def call() -> dict[str, Any]:
        names = state.library.labels()
        counts = state.library.tag_counts()
        key = prefix.strip().lower()
        first = [n for n in names if n.lower().startswith(key)]
        inner = [n for n in names if key and key in n.lower() and n not in first]
        chosen = (first + inner)[:limit]
        return {"labels": [{"label": n, "count": counts.get(n, 0)} for n in chosen]}

    return state.run(call)
