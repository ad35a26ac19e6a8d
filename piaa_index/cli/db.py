"""`piaa db …`: schema and storage maintenance."""

from __future__ import annotations

import click

from piaa_index.cli.common import AppContext, echo_json, pass_app


@click.group("db")
def db_group() -> None:
    """Database schema and storage."""


@db_group.command("upgrade")
@pass_app
def db_upgrade(app: AppContext) -> None:
    """Upgrade the schema to this version's (also done automatically on open)."""
    from piaa_index.config import Settings
    from piaa_index.store import Store

    settings = Settings.resolve(app.home, app.db)
    store = Store.open(settings.db_url)
    click.echo(f"schema at revision {store.schema_revision()}")


@db_group.command("info")
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


@db_group.command("check")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@pass_app
def db_check(app: AppContext, as_json: bool) -> None:
    """Verify the database and every vector shard (checksums); exit 1 when damage is found.

    Images of a damaged shard are sent back to be re-encoded: run `piaa index` on their
    folders afterwards.
    """
    report = app.library().check(progress=app.progress)
    if as_json:
        echo_json(report)
    else:
        db, vec = report["database"], report["vectors"]
        click.echo(f"database: {'ok' if db['ok'] else 'DAMAGED'}")
        for problem in db["problems"]:
            click.echo(f"  {problem}")
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
        for item in report.get("derived_damaged", []):
            click.echo(
                f"{item['index']} index damaged ({', '.join(item['files'])}): removed, "
                "rebuilt by the next query that needs it"
            )
    if not report["ok"]:
        raise SystemExit(1)


@db_group.command("vacuum")
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
