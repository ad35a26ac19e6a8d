"""Teach a personal concept from a few example images (issue 21), as `piaa teach NAME IMG...
--not IMG` does: `POST /api/teach` stores the concept's prototype and the examples as your
labels (source `teach`), adds NAME to the vocabulary when it is not there, and queues the fit
job that makes it a tag like any other; it answers 202 with that job, which the client polls
(`GET /api/jobs/{id}`) as after `POST /api/jobs/fit`.

All or nothing: an image that is not indexed (404), a bad name, no examples or an image in
both lists (422) store nothing; so does a full job queue (429).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from piaa_index_plugins.http_api import user_labels
from piaa_index_plugins.http_api.auth import require_write
from piaa_index_plugins.http_api.errors import ApiError
from piaa_index_plugins.http_api.models import BODY, TeachJob, errors
from piaa_index_plugins.http_api.routes_images import MAX_ID
from piaa_index_plugins.http_api.routes_jobs import _submit
from piaa_index_plugins.http_api.routes_labels import label_problem
from piaa_index_plugins.http_api.state import ApiState, get_state
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from piaa_index.errors import UserInputError
from piaa_index.library.vocabulary import clean_labels
from piaa_index.query.language import normalize_label

router = APIRouter(prefix="/api", tags=["labels"])

MAX_EXAMPLES = 1000  # images in each list

ImageRef = (
    Annotated[StrictInt, Field(ge=1, le=MAX_ID)]
    | Annotated[str, Field(min_length=1, max_length=4096)]
)


class TeachBody(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(
        max_length=200, description='The concept\'s name, e.g. "Rex" or "our house": a label.'
    )
    examples: list[ImageRef] = Field(
        max_length=MAX_EXAMPLES,
        description="Images that show it (ids, or indexed paths exactly as stored); ten or "
        "so varied ones work better than two.",
    )
    not_: list[ImageRef] = Field(
        default_factory=list,
        alias="not",
        max_length=MAX_EXAMPLES,
        description="Images that do not show it (optional): what it must not be taken for.",
    )


def _name(raw: str) -> str:
    """The label NAME makes, or 422 saying what is wrong with it."""

    problem = label_problem(raw)
    if problem:
        raise ApiError(422, "invalid_request", f"name: {problem}")
    try:
        return clean_labels([raw])[0]
    except UserInputError as exc:
        raise ApiError(422, "invalid_request", f"name: {exc}") from None


@router.post(
    "/teach",
    status_code=202,
    operation_id="teach_concept",
    summary="Teach a concept from example images: store it, add its label, queue a fit job",
    dependencies=[require_write],
    response_model=TeachJob,
    responses=errors(*BODY, 404, 409, 429),
)
def teach_concept(
    body: TeachBody, state: Annotated[ApiState, Depends(get_state)]
) -> dict[str, Any]:
    """The concept's label is found by what its examples share and other images lack (see
    `piaa teach`). Poll the job; once done, search for the label."""
    label = _name(body.name)
    if not body.examples:
        raise ApiError(422, "invalid_request", "examples: give at least one example image")
    if state.jobs.full():
        raise ApiError(
            429,
            "too_many_jobs",
            "too many jobs are queued or running to fit now; nothing was stored: try again",
            {"Retry-After": "5"},
        )

    def call() -> dict[str, Any]:
        library = state.library
        refs = [*body.examples, *body.not_]
        ids = user_labels.resolve_images(library, refs, "nothing was stored")
        examples = list(dict.fromkeys(ids[: len(body.examples)]))
        counter = list(dict.fromkeys(ids[len(body.examples) :]))
        both = [i for i in examples if i in set(counter)]
        if both:
            raise ApiError(
                422,
                "invalid_request",
                f"{len(both)} images are both examples and in 'not' (image ids "
                f"{', '.join(str(i) for i in both[:20])})",
            )
        done = library.teach(label, examples, counter)
        added = normalize_label(label) not in {normalize_label(n) for n in library.labels()}
        if added:
            library.add_labels([label])
        return {**done, "added_to_vocabulary": added}

    done = state.run(call)
    return {**_submit(state, "fit", {}), **done}
