"""`piaa vocab …` and `piaa fit`."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from piaa_index.cli.common import AppContext, echo_json, pass_app
from piaa_index.errors import UsageError


@click.group("vocab", short_help="Set, add, remove or list the labels to tag with.")
def vocab_group() -> None:
    """The labels to tag with. Changing them makes the tags stale (the next query refits)."""


def _show(app: AppContext, as_json: bool) -> None:
    listing = None
    if not app.library_is_open:  # a fresh `vocab list`: read-only, without SQLAlchemy
        from piaa_index.catalog import readonly as store_readonly

        listing = store_readonly.vocabulary_listing(app.settings())
    if listing is None:
        vocab = app.library().vocabulary()
        listing = {
            "version": vocab.id if vocab else None,
            "labels": vocab.names if vocab else [],
            "templates": vocab.templates if vocab else [],
        }
    if as_json:
        echo_json(listing)
    elif not listing["labels"]:
        click.echo("(empty vocabulary)", err=True)
    else:
        for name in listing["labels"]:
            click.echo(name)


@vocab_group.command("check", short_help="Find label pairs the model may confuse, and what to do.")
@click.option("--top", default=10, show_default=True, help="Pairs to show.")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def vocab_check(app: AppContext, top: int, as_json: bool) -> None:
    """Label pairs whose text features are entangled (their text cosine stands out among the
    vocabulary's pairs), how often they are tagged together in this collection against chance,
    and what to do. Training-free; fits first when the tags are stale."""
    from piaa_index.library.vocab_check import entangled_pairs

    library = app.library()
    vocab = library.ensure_tags(progress=app.progress)
    matrix = library.tag_matrix()
    report = entangled_pairs(vocab.names, library.text_prototypes(vocab), matrix.present, top)
    if as_json:
        echo_json(report)
        return
    click.echo(
        f"{report['labels']} labels, {report.get('images', 0)} images; typical text cosine "
        f"between two labels: {report['typical_cosine']}"
    )
    for pair in report["pairs"]:
        a, b = pair["labels"]
        mark = "!" if pair["entangled"] else " "
        click.echo(
            f"{mark} {a} / {b}: cosine {pair['text_cosine']} (z {pair['z']}), tagged "
            f"{pair['tagged'][0]} / {pair['tagged'][1]}, together {pair['tagged_together']}"
            f" -> {pair['advice']}"
        )


def read_label_file(source: str) -> list[str]:
    """The labels of a text file (`-`: standard input): one a line, UTF-8; blank lines and
    lines whose first character is `#` are skipped (a `#` inside a label is kept)."""
    shown = "standard input" if source == "-" else source
    try:
        data = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read the label file {shown}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark some editors write is not a label
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"the label file {shown} is not UTF-8 text (byte {exc.start}): save it as UTF-8, "
            "one label per line"
        ) from None
    if "\0" in text:
        raise UsageError(f"the label file {shown} holds NUL bytes: it is not a text file")
    labels = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            labels.append(line)
    if not labels:
        raise UsageError(
            f"the label file {shown} holds no labels (one per line; blank lines and "
            "# comments are skipped)"
        )
    return labels


def label_sources(func: Callable[..., Any]) -> Callable[..., Any]:
    """LABELS as arguments and/or `--from FILE`."""
    func = click.option(
        "--from",
        "label_file",
        metavar="FILE",
        help="Read labels from FILE, one per line (UTF-8; blank lines and lines starting with "
        "# are skipped); - reads standard input. Adds to any LABELS given.",
    )(func)
    return click.argument("labels", nargs=-1)(func)


def _labels(labels: tuple[str, ...], label_file: str | None) -> list[str]:
    out = list(labels)
    if label_file is not None:
        out += read_label_file(label_file)
    if not out:
        raise click.UsageError("give LABELS or --from FILE")
    return out


@vocab_group.command(
    "set", short_help="Replace the vocabulary with LABELS or those of --from FILE."
)
@label_sources
@click.option(
    "--template",
    "templates",
    multiple=True,
    help='Prompt template with {} for the label, e.g. "a photo of a {}." (repeatable).',
)
@click.option("--json", "as_json", is_flag=True)
@pass_app
def vocab_set(
    app: AppContext,
    labels: tuple[str, ...],
    label_file: str | None,
    templates: tuple[str, ...],
    as_json: bool,
) -> None:
    """Replace the vocabulary with LABELS (quote multi-word labels) or those of --from FILE."""
    app.library().set_vocabulary(_labels(labels, label_file), list(templates) or None)
    _show(app, as_json)


@vocab_group.command("add")
@label_sources
@click.option("--json", "as_json", is_flag=True)
@pass_app
def vocab_add(
    app: AppContext, labels: tuple[str, ...], label_file: str | None, as_json: bool
) -> None:
    """Add LABELS (or those of --from FILE) to the vocabulary."""
    app.library().add_labels(_labels(labels, label_file))
    _show(app, as_json)


@vocab_group.command("remove")
@click.argument("labels", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True)
@pass_app
def vocab_remove(app: AppContext, labels: tuple[str, ...], as_json: bool) -> None:
    """Remove LABELS from the vocabulary."""
    app.library().remove_labels(list(labels))
    _show(app, as_json)


@vocab_group.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def vocab_list(app: AppContext, as_json: bool) -> None:
    """Show the current vocabulary."""
    _show(app, as_json)


@vocab_group.command("preset")
@click.argument("name", type=click.Choice(["voc", "coco", "nus"]))
@click.option("--json", "as_json", is_flag=True)
@pass_app
def vocab_preset(app: AppContext, name: str, as_json: bool) -> None:
    """Use a benchmark's class list: VOC-20, COCO-80 or NUS-81."""
    app.library().set_preset(name)
    _show(app, as_json)


@click.command("fit", short_help="Fit the patch classifier and re-tag every image.")
@click.option(
    "--bank-size",
    type=int,
    default=None,
    help="Patches per class bank (K). [default: 512, or 1/50 of the pool per class when smaller]",
)
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="ray: score the re-tag as Ray tasks over the shards (docs/ray.md).",
)
@click.option(
    "--address",
    metavar="ADDRESS",
    help="With --engine ray: the cluster (auto, ray://HOST:10001).",
)
@click.option(
    "--full",
    is_flag=True,
    help="Refit every label from the current collection (by default, after a vocabulary "
    "change only the new labels are fitted and the others keep their classifiers and tags).",
)
@click.option("--json", "as_json", is_flag=True)
@pass_app
def fit_command(
    app: AppContext,
    bank_size: int | None,
    engine: str,
    address: str | None,
    full: bool,
    as_json: bool,
) -> None:
    """Fit the patch classifier (PVCL) on the collection and re-tag every image."""
    report = app.library().fit(
        progress=app.progress, bank_size=bank_size, engine=engine, address=address, full=full
    )
    if as_json:
        echo_json(report.as_dict())
        return
    click.echo(
        f"fitted classifier v{report.classifier_id} on {report.n_images} images "
        f"({report.n_patches} patches) in {report.seconds:.1f}s"
    )
    if set(report.fitted_labels) != set(report.bank_sizes):
        learnt = ", ".join(report.fitted_labels) or "none"
        click.echo(f"  fitted: {learnt}; the other labels kept their classifiers (--full refits)")
    for name in report.bank_sizes:
        status = report.labels.get(name, {}).get("status", "present")
        threshold = report.thresholds[name]
        shown = "never" if threshold is None else f"{threshold:.4f}"
        click.echo(
            f"  {name}: {status}, bank {report.bank_sizes[name]}, kept {report.kept_sizes[name]}, "
            f"threshold {shown}, tagged {report.tagged_present.get(name, 0)}"
        )
    if report.absent_labels:
        click.echo(
            "look absent from the collection (never tagged): " + ", ".join(report.absent_labels),
            err=True,
        )
    if report.weak_labels:
        click.echo(
            "too little evidence (tagged only where surest): " + ", ".join(report.weak_labels),
            err=True,
        )
    for warning in report.warnings:
        click.echo(f"note: {warning}", err=True)


COMMANDS = [vocab_group, fit_command]
