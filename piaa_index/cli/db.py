"""`piaa db …`: schema and storage maintenance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from piaa_index.cli.common import AppContext, echo_json, pass_app
from piaa_index.errors import DAMAGED_DATABASE_WAY_OUT, is_damaged_database


@click.group("db", short_help="Check, upgrade and compact the database and vectors.")
def db_group() -> None:
    """Database schema and storage."""


@db_group.command("upgrade", short_help="Upgrade the schema (also done automatically on open).")
@pass_app
def db_upgrade(app: AppContext) -> None:
    """Upgrade the schema to this version's (also done automatically on open)."""
    from piaa_index.catalog.store import Store
    from piaa_index.config import Settings

    settings = Settings.resolve(app.home, app.db)
    store = Store.open(settings.db_url)
    click.echo(f"schema at revision {store.schema_revision()}")


@db_group.command("info", short_help="Show where the database and vectors are, and failed files.")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def db_info(app: AppContext, as_json: bool) -> None:
    """Where the database and vectors are, the schema revision, failed files."""
    library = app.library()
    failed = [{"path": p, "error": e} for p, e in library.store.failed_images()]
    info: dict[str, object] = {
        "database": library.store.engine.url.render_as_string(hide_password=True),
        "schema_revision": library.store.schema_revision(),
        "vectors_dir": str(library.vectors_dir),
        "failed": failed,
    }
    if as_json:
        echo_json(info)
        return
    for key in ("database", "schema_revision", "vectors_dir"):
        click.echo(f"{key}: {info[key]}")
    for failure in failed:
        click.echo(f"failed: {failure['path']}: {failure['error']}")


@db_group.command(
    "check", short_help="Verify the database and every vector shard; exit 1 on damage."
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@pass_app
def db_check(app: AppContext, as_json: bool) -> None:
    """Verify the database and every vector shard (checksums); exit 1 when damage is found.

    Images of a damaged shard are sent back to be re-encoded: run `piaa index` on their
    folders afterwards.
    """
    try:
        report = app.library().check(progress=app.progress)
    except Exception as exc:  # noqa: BLE001 - a damaged SQLite file still gets its report
        damaged = _damaged_database_report(app, exc)
        if damaged is None:
            raise
        report = damaged
    if as_json:
        echo_json(report)
    else:
        db, vec = report["database"], report["vectors"]
        click.echo(f"database: {'ok' if db['ok'] else 'DAMAGED'}")
        for problem in db["problems"]:
            click.echo(f"  {problem}")
        if db.get("way_out"):
            click.echo(f"  way out: {db['way_out']}")
        if db.get("image_counts_rewritten") is not None:
            click.echo(
                f"  images per status were stored as {db['image_counts_rewritten']}; "
                "rewritten from a real count"
            )
        if vec is None:  # the database could not be read: nothing else was checked
            raise SystemExit(1)
        if report.get("manifest"):
            item = report["manifest"]
            click.echo(f"vector manifest DAMAGED ({item['problem']}): {item['action']}")
        click.echo(
            f"vectors: {vec['shards']} shards, {len(vec['damaged'])} damaged"
            + (f", {vec['without_checksum']} without checksum" if vec["without_checksum"] else "")
        )
        for item in vec["damaged"]:
            click.echo(f"  shard {item['shard']}: {item['problem']}")
        if vec["images_to_reencode"]:
            click.echo(
                f"{vec['images_to_reencode']} images will be re-encoded by the next "
                "`piaa index` of their folders"
            )
        scores = report.get("scores") or {"segments": 0, "damaged": [], "without_checksum": 0}
        if scores["segments"]:
            click.echo(
                f"scores: {scores['segments']} segments, {len(scores['damaged'])} damaged"
                + (
                    f", {scores['without_checksum']} without checksum"
                    if scores["without_checksum"]
                    else ""
                )
            )
        for item in scores["damaged"]:
            click.echo(
                f"  score segment {item['segment']}: {item['problem']}: removed, its images "
                "are scored again by the next query"
            )
        if report.get("classifier"):
            item = report["classifier"]
            click.echo(
                f"classifier {item['version']} DAMAGED ({item['problem']}): {item['action']}"
            )
        for item in report.get("derived_damaged", []):
            click.echo(
                f"{item['index']} index damaged ({', '.join(item['files'])}): removed, "
                "rebuilt by the next query that needs it"
            )
    if not report["ok"]:
        raise SystemExit(1)


def _damaged_database_report(app: AppContext, exc: Exception) -> dict[str, Any] | None:
    """The report of a SQLite file too damaged to open the library with: what SQLite's own
    integrity check says (read through SQLite, read-only). None for other failures."""
    import sqlite3

    from piaa_index.config import Settings

    reason = getattr(exc, "orig", None) or exc
    if not is_damaged_database(reason):
        return None
    settings = Settings.resolve(app.home, app.db)
    if not settings.db_url.startswith("sqlite:///"):
        return None
    path = Path(settings.db_url.removeprefix("sqlite:///")).expanduser().absolute()
    try:
        probe = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
        try:
            rows = [str(r[0]) for r in probe.execute("PRAGMA integrity_check(20)")]
        finally:
            probe.close()
    except (sqlite3.Error, UnicodeDecodeError) as err:  # text SQLite quotes may be garbled
        rows = [str(err)]
    lines = [line for row in rows for line in row.splitlines() if line != "ok"]
    problems = lines[:20] or [str(reason)]
    return {
        "ok": False,
        "database": {"ok": False, "problems": problems, "way_out": DAMAGED_DATABASE_WAY_OUT},
        "vectors": None,
    }


@db_group.command("vacuum", short_help="Reclaim unused vector space and merge small shards.")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def db_vacuum(app: AppContext, as_json: bool) -> None:
    """Reclaim vector space left by pruned or re-indexed images; merge small shards."""
    report = app.library().vacuum()
    if as_json:
        echo_json(report)
        return
    click.echo(
        f"rewrote {report['shards_rewritten']} shards ({report['images_moved']} images), "
        f"vectors {report['bytes_before'] / 1e6:.1f} MB -> {report['bytes_after'] / 1e6:.1f} MB"
    )


COMMANDS = [db_group]
