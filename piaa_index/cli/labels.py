"""`piaa labels …`: the user's own labels, which the next fit learns from (keywords.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from piaa_index.cli.common import AppContext, echo_json, pass_app
from piaa_index.errors import UserInputError


@click.group("labels", short_help="Your own labels (keywords, confirmed tags) the fit learns from.")
def labels_group() -> None:
    """Your own labels of images: keywords you already have, tags you confirmed or rejected.

    They are kept apart from the tags piaa computes. The tags stand until `piaa fit` learns from them
    and uses what it learnt for a label only where that beats the training-free score on your
    labels held out (`piaa fit --json` says which labels and why).
    """


@labels_group.group("import", short_help="Import labels from a CSV file or XMP keywords.")
def import_group() -> None:
    """Import labels you already have."""


@import_group.command("csv", short_help="Import a `path,label` CSV (each image listed completely).")
@click.argument("csv_file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
@pass_app
def import_csv(app: AppContext, csv_file: str, as_json: bool) -> None:
    """Import CSV_FILE: a `path,label` header, then one row per image and label (relative paths
    are relative to the file's folder; a row with an empty label lists an image with none).

    An image the file lists is labelled completely: every vocabulary label it does not list is
    recorded as absent from it. Labels outside the vocabulary are kept too (they count once you
    add the label). Images not in the index are listed and skipped.
    """
    from piaa_index.library.keywords import read_label_csv

    by_path = read_label_csv(csv_file)
    library = app.library()
    vocab = library.vocabulary()
    names = vocab.names if vocab is not None else []
    ids = library.store.image_ids_by_path(list(by_path))
    rows: list[tuple[int, str, bool]] = []
    unknown = [p for p in by_path if p not in ids]
    for path, labels in by_path.items():
        if path not in ids:
            continue
        listed = {_key(n) for n in labels}
        rows += [(ids[path], name, True) for name in sorted(labels)]
        rows += [(ids[path], name, False) for name in names if _key(name) not in listed]
    written = library.store.set_user_labels(rows, "csv")
    known = {_key(v) for v in names}
    outside = sorted({n for ls in by_path.values() for n in ls if _key(n) not in known})
    report = {
        "images": len(by_path) - len(unknown),
        "labels_written": written,
        "not_indexed": unknown,
        "outside_vocabulary": outside,
    }
    if as_json:
        echo_json(report)
        return
    click.echo(
        f"imported {written} labels of {report['images']} images; `piaa fit` learns from them"
    )
    if unknown:
        click.echo(
            f"{len(unknown)} images are not in the index (skipped), e.g. {unknown[0]}", err=True
        )
    if outside:
        click.echo("not in the vocabulary (kept): " + ", ".join(outside[:20]), err=True)


@import_group.command(
    "xmp", short_help="Import your keywords from XMP sidecars and embedded XMP/IPTC."
)
@click.argument("paths", nargs=-1, type=click.Path())
@click.option(
    "--complete",
    is_flag=True,
    help="An image with any keyword of yours is labelled completely: every vocabulary label "
    "it lacks is stored as absent (for a DAM whose editors tag each asset fully).",
)
@click.option(
    "--prefix",
    default="piaa",
    show_default=True,
    help="The prefix `piaa export xmp --prefix` gave piaa's keywords (never imported).",
)
@click.option("--json", "as_json", is_flag=True)
@pass_app
def import_xmp(
    app: AppContext, paths: tuple[str, ...], complete: bool, prefix: str, as_json: bool
) -> None:
    """Import the keywords you gave the indexed images under PATHS (default: every indexed
    image): from their XMP sidecars (IMG.jpg.xmp, IMG.xmp) and the XMP and IPTC embedded in
    the files; dc:subject, lr:hierarchicalSubject, digiKam:TagsList and the other keyword lists
    piaa export xmp knows, and IPTC Keywords. The keywords piaa wrote are left out.

    A keyword becomes the vocabulary label equal to it (case and spacing aside), else the one
    equal to its last level (`animals|dog`, `animals/dog` → dog); the others are listed as
    unmapped and not stored. Labels are stored present, with source `xmp`; one an earlier
    import stored that the files no longer hold is forgotten. A file that cannot be read is
    listed as unreadable and the run goes on.
    """

    from piaa_index.catalog.schema import INDEXED
    from piaa_index.xmp.keywords import SOURCE, label_rows, read_keywords
    from piaa_index.xmp.sidecars import check_options

    check_options(prefix, "append")
    roots: list[str] = []
    for given in paths:
        root = Path(given).expanduser()
        if not os.path.lexists(root):
            raise UserInputError(f"no such file or folder: {given}")
        roots.append(str(root.resolve()))
    library = app.library()
    store = library.store
    known = store.images_under(roots if paths else [os.sep])
    images = {p: k.id for p, k in known.items() if k.status == INDEXED}
    if not images:
        where = " under " + ", ".join(paths) if paths else ""
        raise UserInputError(f"no indexed images{where} (run `piaa index` on their folder)")
    vocab = library.vocabulary()
    names = list(vocab.names) if vocab is not None else []
    plan = read_keywords(images, names, prefix=prefix, progress=app.progress)
    rows, forget = label_rows(plan, names, store.user_labels(), complete=complete)
    written = store.set_user_labels(rows, SOURCE) if rows else 0
    by_label: dict[str, list[int]] = {}
    for image_id, name in forget:
        by_label.setdefault(name, []).append(image_id)
    forgotten = sum(store.forget_user_labels(ids, name) for name, ids in by_label.items())
    present = sum(1 for r in rows if r[2])
    unmapped = dict(sorted(plan.unmapped.items(), key=lambda kv: (-kv[1], kv[0])))
    report = {
        "images": len(images),
        "with_keywords": len(plan.with_keywords),
        "sidecars": plan.sidecars,
        "embedded": plan.embedded,
        "labels_written": written,
        "present": present,
        "absent": len(rows) - present,
        "forgotten": forgotten,
        "labels": dict(sorted(plan.mapped.items())),
        "unmapped": unmapped,
        "unreadable": plan.unreadable,
    }
    if as_json:
        echo_json(report)
        return
    absent = f" and {report['absent']} absent" if complete else ""
    click.echo(
        f"imported {present} present{absent} labels of {report['with_keywords']} images with "
        f"keywords ({len(images)} images read); `piaa fit` learns from them"
    )
    if plan.unmapped:
        shown = ", ".join(f"{k} ({n})" for k, n in list(unmapped.items())[:20])
        click.echo(f"not in the vocabulary (not stored): {shown}", err=True)
    for item in plan.unreadable[:10]:
        click.echo(f"unreadable: {item['path']}: {item['reason']}", err=True)
    if len(plan.unreadable) > 10:
        click.echo(
            f"… and {len(plan.unreadable) - 10} more unreadable (--json lists them)", err=True
        )


@labels_group.command("set", short_help="Confirm (yes) or reject (no) a label of one image.")
@click.argument("image", type=click.Path())
@click.argument("label")
@click.argument("value", type=click.Choice(["yes", "no", "forget"]))
@click.option("--json", "as_json", is_flag=True)
@pass_app
def labels_set(app: AppContext, image: str, label: str, value: str, as_json: bool) -> None:
    """Say that IMAGE holds LABEL (yes) or not (no); `forget` removes what you said."""
    if not label.strip():
        raise UserInputError("the label is empty")
    library = app.library()
    image_id = library.image_id(image)
    if value == "forget":
        n = library.store.forget_user_labels([image_id], label)
    else:
        n = library.store.set_user_labels([(image_id, label, value == "yes")], "cli")
    if as_json:
        echo_json({"image": image, "label": label.strip(), "value": value, "changed": n})
    else:
        click.echo(f"{image}: {label.strip()} = {value} (`piaa fit` learns from it)")


@labels_group.command("export", short_help="Write your labels as a `path,label` CSV.")
@click.option(
    "--output", "-o", default="-", show_default=True, help="CSV file to write (`-`: stdout)."
)
@pass_app
def labels_export(app: AppContext, output: str) -> None:
    """Write the labels you gave as a `path,label` CSV of the images' present labels (the
    file `piaa labels import csv` reads back: an image whose labels you all rejected is one
    row with an empty label)."""
    library = app.library()
    rows = library.store.user_labels()
    paths = library.store.paths(sorted({r[0] for r in rows}))
    present: dict[str, list[str]] = {}
    for image_id, _label_key, name, is_present, _source in rows:
        labels = present.setdefault(paths[image_id], [])
        if is_present:
            labels.append(name)
    if output == "-":
        from piaa_index.library.keywords import label_csv

        sys.stdout.write(label_csv(present)[0])
        return
    from piaa_index.library.keywords import write_label_csv

    n = write_label_csv(Path(output), present)
    click.echo(f"wrote {n} rows for {len(present)} images to {output}", err=True)


@click.command("teach", short_help="Teach a concept of your own from a few example images.")
@click.argument("name")
@click.argument("examples", nargs=-1, required=True, type=click.Path())
@click.option(
    "--not",
    "counter",
    multiple=True,
    type=click.Path(),
    help="An image without the concept (repeatable): sharpens what sets it apart.",
)
@click.option("--no-fit", is_flag=True, help="Only record it; the next fit learns it.")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def teach_command(
    app: AppContext,
    name: str,
    examples: tuple[str, ...],
    counter: tuple[str, ...],
    no_fit: bool,
    as_json: bool,
) -> None:
    """Teach NAME from EXAMPLES (indexed images that show it): "Rex", "grandma's house", a
    product. No text prompt is needed: NAME becomes a label like any other (search, tags,
    evidence maps, XMP, the API), found by what its examples share and most other photos
    lack (other photos may hold it too). Ten or so varied examples work better than two;
    teach again to add more."""
    from piaa_index.library.vocabulary import clean_labels

    label = clean_labels([name])[0]
    library = app.library()
    ids = [library.image_id(p) for p in examples]
    not_ids = [library.image_id(p) for p in counter]
    done = library.teach(label, ids, not_ids)
    if _key(label) not in {_key(n) for n in library.labels()}:
        library.add_labels([label])
        done["added_to_vocabulary"] = True
    if not no_fit:
        report = library.fit(progress=app.progress)
        done["fit"] = {
            "status": report.labels.get(label, {}).get("status"),
            "tagged": report.tagged_present.get(label, 0),
            "learning": report.learning.get("labels", {}).get(label),
        }
    if as_json:
        echo_json(done)
        return
    tail = "" if no_fit else f"; tagged in {done['fit']['tagged']} images"
    click.echo(f"taught {label!r} from {len(ids)} examples{tail}")


def _key(name: str) -> str:
    from piaa_index.query.language import normalize_label

    return normalize_label(name)


COMMANDS = [labels_group, teach_command]
