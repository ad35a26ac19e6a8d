"""Your own labels of images (issue 21): confirm or reject a label of one image, label thousands
at once, list them all. They are kept apart from our tags (the Store's `user_labels`); the
tags stand until a fit job learns from them (`labels_changed` in the answers and in
`/api/status` says when one would), and the fit job's result says, per label, whether the
learnt or the training-free score is used and why (`result.learning`).

`/api/labels` (GET) is the vocabulary's label completion (routes_vocabulary.py); the
collection of your labels is `/api/user-labels`.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query
from piaa_index_plugins.http_api import user_labels
from piaa_index_plugins.http_api.auth import require_read, require_write
from piaa_index_plugins.http_api.errors import ApiError, jsonable
from piaa_index_plugins.http_api.models import (
    BODY,
    KEYED,
    ImageLabels,
    LabelPage,
    LabelSource,
    LabelsWritten,
    errors,
)
from piaa_index_plugins.http_api.routes_images import (
    MAX_ID,
    Cursor,
    decode_cursor,
    encode_cursor,
)
from piaa_index_plugins.http_api.state import ApiState, get_state
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

from piaa_index.query.language import normalize_label

router = APIRouter(prefix="/api", tags=["labels"])

MAX_LABEL_LENGTH = 200  # as ServerConfig.max_label_length, the vocabulary's bound
ImageId = Annotated[int, Path(ge=1, le=MAX_ID, description="The image id.")]
LabelName = Annotated[
    str,
    Path(
        max_length=MAX_LABEL_LENGTH,
        description="The label (any text; matched case-insensitively). URL-encode it.",
    ),
]


def label_problem(text: str) -> str | None:
    """What is wrong with a label a client sent, or None."""
    if not text.strip():
        return "the label is empty"
    if len(text) > MAX_LABEL_LENGTH:
        return f"a label is at most {MAX_LABEL_LENGTH} characters"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # JSON can spell a lone surrogate ("\udcff"); no database takes one.
        return "the label is not valid Unicode (a lone surrogate)"
    return None


class LabelBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    present: StrictBool = Field(description="True: the image shows it; false: it does not.")
    source: LabelSource = Field(default="api", description="Who says so: `api` or `gallery`.")


class LabelRow(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: (
        Annotated[StrictInt, Field(ge=1, le=MAX_ID)]
        | Annotated[str, Field(min_length=1, max_length=4096)]
    ) = Field(description="An image id, or an indexed image's path exactly as stored.")
    label: str = Field(description="The label (any text; matched case-insensitively).")
    present: StrictBool = Field(description="True: the image shows it; false: it does not.")

    @field_validator("label")
    @classmethod
    def _label(cls, value: str) -> str:
        problem = label_problem(value)
        if problem:
            raise ValueError(problem)
        return value


class LabelsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    labels: list[LabelRow] = Field(
        description="Labels to record; a later row for the same image and label wins."
    )
    source: LabelSource = Field(default="api", description="Who says so: `api` or `gallery`.")


def _image_labels(state: ApiState, image_id: int) -> dict[str, Any]:
    return {
        "image": image_id,
        "labels": jsonable(state.library.user_labels_of(image_id)),
        "labels_changed": state.library.labels_changed(),
    }


def _require_image(state: ApiState, image_id: int) -> None:
    if state.library.image_info(image_id) is None:
        raise ApiError(404, "not_found", f"no indexed image with id {image_id}")


def _check_label(label: str) -> str:
    problem = label_problem(label)
    if problem:
        raise ApiError(422, "invalid_request", f"label: {problem}")
    return label


@router.get(
    "/images/{image_id}/labels",
    operation_id="get_image_labels",
    summary="Your labels of one image (confirmed or rejected), apart from its tags",
    dependencies=[require_read],
    response_model=ImageLabels,
    responses=errors(*KEYED, 404, 409, 422),
)
def get_image_labels(
    image_id: ImageId, state: Annotated[ApiState, Depends(get_state)]
) -> dict[str, Any]:
    def call() -> dict[str, Any]:
        _require_image(state, image_id)
        return _image_labels(state, image_id)

    return state.run(call)


@router.put(
    "/images/{image_id}/labels/{label:path}",
    operation_id="set_image_label",
    summary="Confirm (present: true) or reject (present: false) a label of one image",
    dependencies=[require_write],
    response_model=ImageLabels,
    responses=errors(*BODY, 404, 409),
)
def set_image_label(
    image_id: ImageId,
    label: LabelName,
    body: LabelBody,
    state: Annotated[ApiState, Depends(get_state)],
) -> dict[str, Any]:
    _check_label(label)

    def call() -> dict[str, Any]:
        _require_image(state, image_id)
        key = normalize_label(label)
        library = state.library
        same = [
            r
            for r in library.user_labels_of(image_id)
            if normalize_label(r["label"]) == key and r["present"] == body.present
        ]
        if not same:  # the same answer again is no change (and no refit to ask for)
            library.set_user_labels([(image_id, label, body.present)], body.source)
        return _image_labels(state, image_id)

    return state.run(call)


@router.delete(
    "/images/{image_id}/labels/{label:path}",
    operation_id="forget_image_label",
    summary="Forget what you said about a label of one image (no-op when nothing was said)",
    dependencies=[require_write],
    response_model=ImageLabels,
    responses=errors(*KEYED, 404, 409, 422),
)
def forget_image_label(
    image_id: ImageId, label: LabelName, state: Annotated[ApiState, Depends(get_state)]
) -> dict[str, Any]:
    _check_label(label)

    def call() -> dict[str, Any]:
        _require_image(state, image_id)
        # Forgetting what was never said removes nothing and moves no version (the Store).
        state.library.forget_user_labels([image_id], label)
        return _image_labels(state, image_id)

    return state.run(call)


@router.post(
    "/user-labels",
    operation_id="set_labels",
    summary="Record many labels at once (ids or paths; one write, all or nothing)",
    dependencies=[require_write],
    response_model=LabelsWritten,
    responses=errors(*BODY, 404, 409),
)
def set_labels(body: LabelsBody, state: Annotated[ApiState, Depends(get_state)]) -> dict[str, Any]:
    cfg = state.config
    if len(body.labels) > cfg.max_bulk_labels:
        raise ApiError(
            422,
            "invalid_request",
            f"labels: at most {cfg.max_bulk_labels} labels a request, not {len(body.labels)}",
        )

    def call() -> dict[str, Any]:
        library = state.library
        refs = [row.image for row in body.labels]
        ids = user_labels.resolve_images(library, refs, "nothing was written")
        rows = [(i, row.label, row.present) for i, row in zip(ids, body.labels, strict=True)]
        written = library.set_user_labels(rows, body.source) if rows else 0
        return {
            "written": written,
            "images": len({r[0] for r in rows}),
            "labels_changed": state.library.labels_changed(),
        }

    return state.run(call)


@router.get(
    "/user-labels",
    operation_id="list_labels",
    summary="All your labels (or one label's, or one source's), cursor-paged: the export",
    dependencies=[require_read],
    response_model=LabelPage,
    responses=errors(*KEYED, 409, 422),
)
def list_labels(
    state: Annotated[ApiState, Depends(get_state)],
    label: Annotated[
        str | None,
        Query(max_length=MAX_LABEL_LENGTH, description="Only this label (case-insensitive)."),
    ] = None,
    source: Annotated[
        str | None, Query(max_length=16, description="Only labels from this source (csv, api…).")
    ] = None,
    cursor: Cursor = None,
    limit: Annotated[int, Query(ge=1, le=10_000, description="Labels per page.")] = 1000,
) -> dict[str, Any]:
    after = None
    if cursor:
        fields = decode_cursor(cursor, "labels")
        after = (fields["a"], fields["l"])
    key = normalize_label(label) if label is not None and label.strip() else None
    rows, last = state.run(state.library.user_label_page, after, limit, key, source)
    return {
        "labels": jsonable(rows),
        "next_cursor": None
        if last is None
        else encode_cursor({"k": "labels", "a": last[0], "l": last[1]}),
    }
