"""Pictures of indexed images: thumbnails and patch evidence maps, by image id only.

No path ever comes from the client: the id is looked up in SQL (piaa_index/library/thumbnails.py,
piaa_index/library/evidence.py), and an id that is not an indexed image is 404. A thumbnail is only
made from the content that was indexed: when the file at the image's path is not that content
any more (edited, replaced, swapped for a link to another picture), the answer is 409
`changed_since_indexing` (re-index it), never another picture under the image's id and ETag.

    GET /api/images/{id}/thumbnail?size=128|256|512|2048 image/jpeg (ETag: content hash + size)
    GET /api/images/{id}/evidence?label=L&format=png|json  the label's evidence map
    GET /api/images/{id}/exif                            camera, lens, date taken, exposure
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import FileResponse, Response
from piaa_index_plugins.http_api.auth import require_read
from piaa_index_plugins.http_api.errors import ApiError, mapped
from piaa_index_plugins.http_api.models import KEYED, Exif, errors
from piaa_index_plugins.http_api.state import ApiState, get_state

from piaa_index.library.thumbnails import SourceChanged

router = APIRouter(prefix="/api", tags=["images"], dependencies=[require_read])

MAX_ID = 2**63 - 1
ImageId = Annotated[int, Path(ge=1, le=MAX_ID, description="An image id from a result row.")]
# A thumbnail changes only when the file is re-indexed (a new content hash, so a new ETag);
# clients revalidate after an hour. `private`: reads may need a key.
CACHE_CONTROL = "private, max-age=3600"
BINARY = {"type": "string", "format": "binary"}


@router.get(
    "/images/{image_id}/thumbnail",
    operation_id="get_thumbnail",
    summary="An EXIF-upright JPEG thumbnail of an indexed image (cached on disk)",
    response_class=Response,
    responses={
        **errors(*KEYED, 404, 409, 422),
        200: {"content": {"image/jpeg": {"schema": BINARY}}, "description": "The JPEG."},
        304: {"description": "Not modified (If-None-Match)"},
    },
)
def thumbnail(
    image_id: ImageId,
    request: Request,
    state: Annotated[ApiState, Depends(get_state)],
    size: Annotated[
        int,
        Query(
            description="Longer side: 128, 256, 512, or 2048 (a screen-sized preview for zoom; a smaller picture keeps its size)."
        ),
    ] = 256,
) -> Response:
    # Only the SQL lookup holds the Library's lock (`lock=`); decoding a first-time thumbnail
    # (tens of ms for a camera JPEG) must not hold up every other read. The Library makes its
    # one thumbnail maker on the first request, so concurrent decodes share one memory budget.
    thumb = mapped(lambda: _thumbnail(state, image_id, size))
    headers = {"ETag": thumb.etag, "Cache-Control": CACHE_CONTROL}
    if thumb.etag in _etags(request.headers.get("if-none-match")):
        return Response(status_code=304, headers=headers)
    return FileResponse(thumb.path, media_type="image/jpeg", headers=headers)


def _thumbnail(state: ApiState, image_id: int, size: int) -> Any:
    try:
        return state.library.thumbnail(image_id, size, lock=state.lock)
    except SourceChanged as exc:
        raise ApiError(409, "changed_since_indexing", str(exc)) from None


def _etags(header: str | None) -> set[str]:
    if not header:
        return set()
    return {t.strip().removeprefix("W/") for t in header.split(",")}


@router.get(
    "/images/{image_id}/evidence",
    operation_id="get_evidence",
    summary="Where the classifier sees a label on an image: heatmap PNG or JSON patch grid",
    response_model=None,
    responses={
        **errors(*KEYED, 404, 409, 422),
        200: {
            "content": {
                "image/png": {"schema": BINARY},
                "application/json": {"schema": {"type": "object"}},
            },
            "description": "format=png: the heatmap; format=json: the patch grid and decision.",
        },
    },
)
def evidence(
    image_id: ImageId,
    state: Annotated[ApiState, Depends(get_state)],
    label: Annotated[str, Query(min_length=1, max_length=200, description="A vocabulary label.")],
    format: Annotated[Literal["png", "json"], Query(description="png or json.")] = "png",
    size: Annotated[int, Query(ge=16, le=1024, description="PNG's longer side.")] = 512,
) -> Any:
    from piaa_index.library.evidence import evidence_png

    ev = state.run(state.library.evidence, image_id, label)
    if format == "json":
        return ev.as_json()
    png = mapped(lambda: evidence_png(ev, size=size))  # decoding outside the lock
    # Tags change with every fit: revalidate rather than cache.
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, no-cache"})


# EXIF tags (IFD0, then the Exif sub-IFD) read for the image page.
_EXIF_IFD = 0x8769
_MAKE, _MODEL, _DATETIME = 0x010F, 0x0110, 0x0132
_EXPOSURE, _FNUMBER, _ISO, _TAKEN, _OFFSET = 0x829A, 0x829D, 0x8827, 0x9003, 0x9011
_FOCAL, _LENS = 0x920A, 0xA434


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if value is None:
        return None
    text = str(value).replace("\x00", "").strip()
    return text[:200] or None


def _number(value: Any) -> float | None:
    try:
        if isinstance(value, tuple) and len(value) == 2:  # a raw (numerator, denominator)
            value = value[0] / value[1]
        number = float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return number if number == number and number not in (float("inf"), float("-inf")) else None


def _exposure(value: Any) -> str | None:
    seconds = _number(value)
    if seconds is None or seconds <= 0:
        return None
    if seconds >= 1:
        return f"{seconds:g} s"
    return f"1/{round(1 / seconds)} s"


def _taken(value: Any, offset: Any) -> str | None:
    text = _text(value)
    if not text or len(text) < 19 or text.startswith("0000"):
        return None
    iso = f"{text[:10].replace(':', '-')}T{text[11:19]}"
    zone = _text(offset)
    return iso + zone if zone and len(zone) == 6 and zone[0] in "+-" else iso


def read_exif(path: str) -> dict[str, Any]:
    """camera, lens, taken, exposure, aperture, iso, focal_length of the file at `path` (None
    where it has none), and `readable`: whether Pillow could open it at all. Reads the headers
    only: no pixels are decoded."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            exif = img.getexif()
            sub = exif.get_ifd(_EXIF_IFD)
    except Exception:  # noqa: BLE001 - not an image Pillow reads (a RAW file, gone): no EXIF
        return {"readable": False}
    make, model = _text(exif.get(_MAKE)), _text(exif.get(_MODEL))
    camera = model if make and model and model.lower().startswith(make.lower()) else None
    camera = camera or " ".join(p for p in (make, model) if p) or None
    iso = sub.get(_ISO)
    if isinstance(iso, tuple):
        iso = iso[0] if iso else None
    iso_n = _number(iso)
    fnumber, focal = _number(sub.get(_FNUMBER)), _number(sub.get(_FOCAL))
    return {
        "readable": True,
        "camera": camera,
        "lens": _text(sub.get(_LENS)),
        "taken": _taken(sub.get(_TAKEN) or exif.get(_DATETIME), sub.get(_OFFSET)),
        "exposure": _exposure(sub.get(_EXPOSURE)),
        "aperture": f"f/{fnumber:.1f}".replace(".0", "") if fnumber else None,
        "iso": int(iso_n) if iso_n else None,
        "focal_length": f"{focal:g} mm" if focal else None,
    }


@router.get(
    "/images/{image_id}/exif",
    operation_id="get_exif",
    summary="Camera, lens, date taken and exposure of an indexed image (from its EXIF)",
    response_model=Exif,
    responses=errors(*KEYED, 404, 422),
)
def exif(image_id: ImageId, state: Annotated[ApiState, Depends(get_state)]) -> dict[str, Any]:
    info = state.run(state.library.image_info, image_id)
    if info is None:
        raise ApiError(404, "not_found", f"no indexed image with id {image_id}")
    out = {k: info.get(k) for k in ("width", "height", "size")}
    return {"id": image_id, **out, **read_exif(str(info["path"]))}  # read outside the lock
