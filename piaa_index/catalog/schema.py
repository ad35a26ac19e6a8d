"""SQL tables. Alembic (`migrations/`) owns how they are created and upgraded; this module
only describes them for queries, and must match the newest migration."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# The image status values, re-exported (most modules import them from here).
from piaa_index.catalog.status import FAILED as FAILED
from piaa_index.catalog.status import INDEXED as INDEXED
from piaa_index.catalog.status import MISSING_VECTORS as MISSING_VECTORS
from piaa_index.textio import finite_json, from_db_text, to_db_text


class FsText(TypeDecorator[str]):
    """Text that holds any file name (see `to_db_text`) or message quoting one."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return None if value is None else to_db_text(value)

    def process_result_value(self, value: str | None, dialect: Dialect) -> str | None:
        return None if value is None else from_db_text(value)


class StoredJSON(TypeDecorator[Any]):
    """JSON that every backend accepts: non-finite numbers are stored as strings (`finite_json`);
    readers of numbers that may be infinite parse them with `float()`."""

    impl = JSON
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        return None if value is None else finite_json(value)


class Base(DeclarativeBase):
    pass


class Setting(Base):
    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[dict] = mapped_column(StoredJSON)


class Image(Base):
    __tablename__ = "images"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    path: Mapped[str] = mapped_column(FsText, unique=True)
    content_hash: Mapped[str | None] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)  # files over 2 GiB exist (TIFF scans)
    mtime: Mapped[float] = mapped_column(Float)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), index=True)
    error: Mapped[str | None] = mapped_column(FsText)
    shard: Mapped[int | None] = mapped_column(Integer, index=True)
    shard_row: Mapped[int | None] = mapped_column(Integer)
    indexed_at: Mapped[datetime] = mapped_column(DateTime)


class Vocabulary(Base):
    """Every vocabulary change makes a new version; classifiers point at the one they were fit on."""

    __tablename__ = "vocabularies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    templates: Mapped[list] = mapped_column(StoredJSON)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class Label(Base):
    __tablename__ = "labels"
    __table_args__ = (Index("ix_labels_vocab_name", "vocabulary_id", "name", unique=True),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    vocabulary_id: Mapped[int] = mapped_column(ForeignKey("vocabularies.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(Text)
    templates: Mapped[list | None] = mapped_column(StoredJSON)  # None: the vocabulary's templates


class Classifier(Base):
    __tablename__ = "classifiers"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    vocabulary_id: Mapped[int] = mapped_column(ForeignKey("vocabularies.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(DateTime)
    n_images: Mapped[int] = mapped_column(Integer)
    n_patches: Mapped[int] = mapped_column(Integer)
    fit_seconds: Mapped[float] = mapped_column(Float)
    report: Mapped[dict] = mapped_column(StoredJSON)  # bank sizes, kept sizes, weak labels, params
    thresholds: Mapped[list | None] = mapped_column(StoredJSON)
    weights: Mapped[bytes] = mapped_column(LargeBinary)
    # The folder of its score matrix (piaa_index/vectors/scores.py) and the segments committed there.
    scores_key: Mapped[str | None] = mapped_column(String(40))
    score_segments: Mapped[list | None] = mapped_column(StoredJSON)


class Tag(Base):
    """Present labels only (sparse), for joins and exports; every score is in the matrix."""

    __tablename__ = "tags"
    __table_args__ = (Index("ix_tags_label_score", "label_id", "score"),)
    image_id: Mapped[int] = mapped_column(
        ForeignKey("images.id", ondelete="CASCADE"), primary_key=True
    )
    label_id: Mapped[int] = mapped_column(
        ForeignKey("labels.id", ondelete="CASCADE"), primary_key=True
    )
    classifier_id: Mapped[int] = mapped_column(ForeignKey("classifiers.id", ondelete="CASCADE"))
    score: Mapped[float] = mapped_column(Float)


class DataVersion(Base):
    """Counters bumped by triggers (migration 0003) on any change to the watched tables."""

    __tablename__ = "data_versions"
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger)


class ImageCount(Base):
    """Images per status, kept by triggers on `images` (migration 0007): one indexed read
    instead of counting a million rows. A status whose images all left keeps a row of 0."""

    __tablename__ = "image_counts"
    status: Mapped[str] = mapped_column(String(16), primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger)


class XmpSidecar(Base):
    """A sidecar file `piaa export xmp` created or changed (piaa_index/xmp/sidecars.py), for --undo."""

    __tablename__ = "xmp_sidecars"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    path: Mapped[str] = mapped_column(FsText, unique=True)
    created: Mapped[bool] = mapped_column(Boolean)  # the file did not exist before our write
    original: Mapped[bytes | None] = mapped_column(LargeBinary)  # its bytes before; None: gone
    written_sha256: Mapped[str] = mapped_column(String(64))  # of the bytes of our last write
    keywords_sha256: Mapped[str] = mapped_column(String(64))  # of the keywords it carried
    written_at: Mapped[datetime] = mapped_column(DateTime)


class ApiKey(Base):
    """A key of the HTTP API (migration 0005): only its sha256 is stored."""

    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str | None] = mapped_column(Text)
    scope: Mapped[str] = mapped_column(String(8))  # "read" or "write"
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(
        String(16)
    )  # the token's first characters, to tell keys apart
    created_at: Mapped[datetime] = mapped_column(DateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime)


class ImageChange(Base):
    """The change feed (migration 0005): the feed version of each image's last change. No
    foreign key: a removed image keeps its row so that sync clients learn of the removal."""

    __tablename__ = "image_changes"
    image_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    version: Mapped[int] = mapped_column(BigInteger, index=True)


class UserLabel(Base):
    """A user's own label of an image (migration 0006): imported keyword, confirmed or rejected
    tag, taught example. Never one of our tags; the fit learns from them (keywords.py)."""

    __tablename__ = "user_labels"
    __table_args__ = (Index("ix_user_labels_label", "label"),)
    image_id: Mapped[int] = mapped_column(
        ForeignKey("images.id", ondelete="CASCADE"), primary_key=True
    )
    label: Mapped[str] = mapped_column(Text, primary_key=True)  # normalize_label(name)
    name: Mapped[str] = mapped_column(Text)  # as the user spelt it
    present: Mapped[bool] = mapped_column(Boolean)
    source: Mapped[str] = mapped_column(String(16))  # csv, xmp, cli, api, gallery, teach
    updated_at: Mapped[datetime] = mapped_column(DateTime)
