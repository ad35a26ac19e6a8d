"""Media of indexed images (thumbnails, patch-evidence maps): the gallery's routes go here,
`GET /api/images/{id}/thumbnail` and `GET /api/images/{id}/evidence`. Included by app.py."""

from __future__ import annotations

from fastapi import APIRouter
from piaa_index_plugins.http_api.auth import require_read

router = APIRouter(prefix="/api", tags=["media"], dependencies=[require_read])
