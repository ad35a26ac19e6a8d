"""The API's response models (pydantic), so `/openapi.json` describes what each route answers
and a generated client (openapi-python-client) gets typed Image, Tag, Job, ... classes.

Rows keep every field the library gives (`extra="allow"`: a plugin's query rows, new status
fields): the models name the fields clients rely on, never drop others. Routes answer with
`response_model_exclude_unset`, so an optional field a row does not have stays absent, as
before. Every time is RFC 3339 with its zone, UTC (`2026-11-23T07:01:02Z`): the library stores
naive UTC times, and `UtcDatetime` says so.

`errors(...)` declares the one error body (`{"error": {"code", "message"}}`, errors.py) on the
statuses a route answers.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


def to_utc(value: Any) -> Any:
    """A stored time (naive UTC, as `piaa_index.catalog.store.utcnow` makes them, or an ISO string of
    one) as an aware UTC datetime; an aware one converted to UTC."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            value = datetime.fromisoformat(text)
        except ValueError:
            return value  # pydantic says what is wrong with it
    if isinstance(value, datetime):
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)
    return value


UtcDatetime = Annotated[datetime, BeforeValidator(to_utc)]


def utc_text(value: Any) -> str | None:
    """`to_utc` as RFC 3339 text (`...Z`), for times kept outside a model (jobs.py)."""
    moment = to_utc(value)
    if not isinstance(moment, datetime):
        return None if moment is None else str(moment)
    return moment.isoformat().replace("+00:00", "Z")


class Open(BaseModel):
    """A JSON object that may carry more fields than it names."""

    model_config = ConfigDict(extra="allow")


# -- errors ---------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    code: str = Field(description="A stable snake_case code, e.g. `not_found`, `needs_fit`.")
    message: str = Field(description="What went wrong, for a person.")


class Error(BaseModel):
    """Every 4xx and 5xx answer, from our routes and from the framework alike."""

    error: ErrorDetail


ERROR_TEXT = {
    400: "Bad request (`bad_request`): a bad parameter, value, label or cursor; a Host not "
    "served here (`host_not_allowed`); a NUL byte; JSON nested too deep.",
    401: "No key, or an unknown or revoked one (`unauthorized`).",
    403: "A read key on a write (`forbidden`), a cross-site request (`origin_not_allowed`), a "
    "path outside the allowed index roots.",
    404: "No such image, job or query (`not_found`).",
    409: "Another process is indexing (`busy`); the vocabulary changed since the last fit "
    "(`needs_fit`: run a fit job); a file changed since it was indexed "
    "(`changed_since_indexing`); the library changed while paging (`cursor_expired`).",
    413: "The body is over the limit (`body_too_large`).",
    415: "The body is not JSON (`unsupported_media_type`).",
    422: "A parameter or body of the wrong shape (`invalid_request`).",
    429: "Too many jobs queued or running (`too_many_jobs`; see Retry-After).",
    500: "The library could not do its job (`library_error`), or a bug (`internal_error`).",
}

# What any route can answer: a foreign Host or a NUL byte (400), a cross-site request (403), a
# failure (500); what any route behind a key can answer besides (401).
ANY = (400, 403, 500)
KEYED = (*ANY, 401)
BODY = (*KEYED, 413, 415, 422)


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route: the error body on each of `statuses`."""
    return {
        status: {"model": Error, "description": ERROR_TEXT[status]}
        for status in sorted(set(statuses))
    }


# -- meta -----------------------------------------------------------------------------------------


class Health(BaseModel):
    status: Literal["ok"]
    version: str


class ImageCounts(Open):
    indexed: int = 0
    failed: int = 0
    pending: int = 0


class VocabularyInfo(Open):
    version: int | None = None
    labels: list[str] = []
    templates: list[str] = []


class ClassifierInfo(Open):
    version: int | None = None
    vocabulary_version: int | None = None
    fitted_at: UtcDatetime | None = None
    n_images: int | None = None
    images_added_since: int | None = None
    absent_labels: list[str] | None = None
    weak_labels: list[str] | None = None
    warnings: list[str] | None = None
    tagged: dict[str, int] | None = None


class RunningJobs(BaseModel):
    running: list[str] = Field(description="Ids of the jobs running now.")


class Status(Open):
    """What `piaa status --json` prints, plus `jobs`."""

    home: str | None = None
    database: str | None = None
    schema_revision: str | None = None
    model: dict[str, Any] | None = None
    images: ImageCounts | None = None
    vectors_bytes: int | None = None
    vocabulary: VocabularyInfo | None = None
    classifier: ClassifierInfo | None = None
    stale: bool | None = None
    labels_changed: bool | None = Field(
        default=None,
        description="True when your labels changed since the last fit learnt from them (the "
        "tags stand; a fit job learns from them).",
    )
    jobs: RunningJobs


# -- vocabulary -----------------------------------------------------------------------------------


class Vocabulary(BaseModel):
    version: int | None = Field(description="The vocabulary's id (null before the first one).")
    labels: list[str]
    templates: list[str]
    stale: bool = Field(description="True until a fit job has fitted this vocabulary.")


class LabelCount(BaseModel):
    label: str
    count: int = Field(description="Images tagged with the label.")


class LabelCompletion(BaseModel):
    labels: list[LabelCount]


# -- images and tags ------------------------------------------------------------------------------


class Image(Open):
    """An indexed image."""

    id: int = Field(description="Stable image id.")
    path: str
    content_hash: str | None = None
    width: int | None = None
    height: int | None = None
    size: int | None = Field(default=None, description="File size in bytes.")
    indexed_at: UtcDatetime | None = None


class ImagePage(BaseModel):
    images: list[Image]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null: done.")


class Tag(Open):
    """One label of an image, as `piaa tags --json` gives it: scores and the decision."""

    label: str
    score: float | None = Field(default=None, description="Fused score (confidence).")
    present: bool | None = Field(default=None, description="Decided present.")
    patch_score: float | None = None
    cls_score: float | None = None
    threshold: float | None = None
    label_status: str | None = None
    learnt: bool | None = Field(
        default=None,
        description="Scored by what the fit learnt from the user's labels (else training-free).",
    )
    why: str | None = None


class ImageWithTags(Image):
    tags: list[Tag] = Field(description="Every label of the vocabulary, best first.")
    tags_error: str | None = Field(
        default=None, description="Why `tags` is empty (no vocabulary, not fitted), or null."
    )


class Exif(BaseModel):
    """What a photographer reads off an image: camera, lens, when it was taken, the exposure
    (from the file's EXIF; null where the file has none), and its pixel and byte size."""

    id: int = Field(description="Stable image id.")
    width: int | None = None
    height: int | None = None
    size: int | None = Field(default=None, description="File size in bytes.")
    camera: str | None = Field(default=None, description="Make and model, e.g. `Canon EOS R6`.")
    lens: str | None = None
    taken: str | None = Field(
        default=None,
        description="DateTimeOriginal as ISO 8601, in the camera's local time (with its "
        "offset when the file gives one).",
    )
    exposure: str | None = Field(default=None, description="Exposure time, e.g. `1/250 s`.")
    aperture: str | None = Field(default=None, description="F-number, e.g. `f/2.8`.")
    iso: int | None = None
    focal_length: str | None = Field(default=None, description="e.g. `35 mm`.")
    readable: bool = Field(description="False when the file could not be read for EXIF.")


class FeedTag(BaseModel):
    label: str
    score: float | None


class FeedImage(Image):
    tags: list[FeedTag] = Field(description="The image's present tags.")


class TagFeed(BaseModel):
    version: int = Field(description="The feed version this listing reads: pass it as `since`.")
    since: int | None
    images: list[FeedImage]
    removed: list[int] = Field(description="Ids of images removed since `since`.")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null: done.")


# -- the user's own labels -----------------------------------------------------------------------

LabelSource = Literal["api", "gallery"]


class UserLabel(BaseModel):
    """A label you gave an image (kept apart from our tags; the next fit learns from it)."""

    label: str = Field(description="As you spelt it (labels match case-insensitively).")
    present: bool = Field(description="True: the image shows it (confirmed); false: rejected.")
    source: str = Field(description="Where it came from: api, gallery, csv, cli, xmp, ...")
    updated_at: UtcDatetime


class ImageLabels(BaseModel):
    image: int = Field(description="The image id.")
    labels: list[UserLabel] = Field(description="Your labels of the image, by label.")
    labels_changed: bool = Field(
        description="True when your labels changed since the last fit learnt from them."
    )


class ListedLabel(UserLabel):
    image: int = Field(description="The image id.")
    path: str = Field(description="The image's path.")


class LabelPage(BaseModel):
    labels: list[ListedLabel] = Field(description="By image id, then label.")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null: done.")


class LabelsWritten(BaseModel):
    written: int = Field(description="Labels recorded (one per image and case-folded label).")
    images: int = Field(description="Distinct images labelled.")
    labels_changed: bool = Field(
        description="True when your labels changed since the last fit learnt from them."
    )


# -- queries --------------------------------------------------------------------------------------


class QueryParam(BaseModel):
    name: str
    type: str = Field(description="str, int, float, bool, ...")
    required: bool
    default: Any = None
    multiple: bool
    help: str


class QueryInfo(BaseModel):
    name: str
    help: str
    params: list[QueryParam]


class QueryRow(Open):
    """One result row. Rows that name an image by `path` also carry its `id` and
    `content_hash`; each query adds its own fields (e.g. search: `match`, `labels`; tags:
    `label`, `present`, ...)."""

    id: int | None = None
    content_hash: str | None = None
    path: str | None = None
    score: float | None = None


class QueryResult(BaseModel):
    query: str
    results: list[QueryRow]
    next_cursor: str | None = Field(
        description="Pass as `cursor` (with the same parameters) for the next page; null: done."
    )


# -- jobs -----------------------------------------------------------------------------------------

JobKind = Literal["index", "fit"]
JobState = Literal["queued", "running", "done", "failed"]


class JobBrief(BaseModel):
    id: str
    kind: JobKind
    state: JobState


class JobProgress(BaseModel):
    stage: str | None
    done: int
    total: int


class Job(JobBrief):
    params: dict[str, Any]
    progress: JobProgress
    result: dict[str, Any] | None = Field(
        description="What the job returned (an index or fit report) once done."
    )
    error: str | None
    created_at: UtcDatetime
    started_at: UtcDatetime | None
    finished_at: UtcDatetime | None


class TeachJob(JobBrief):
    """`POST /api/teach`: the concept is stored and its label in the vocabulary; the fit job
    that makes it a tag is queued (poll `GET /api/jobs/{id}`; its result's `labels[label]`,
    `tagged_present[label]` and `learning.labels[label]` say what the fit made of it)."""

    label: str = Field(description="The concept's label, whitespace-normalised.")
    examples: int = Field(description="Example images stored as the label's user labels.")
    counter_examples: int = Field(description="Images stored as not showing it.")
    added_to_vocabulary: bool = Field(description="False when the label was already there.")
