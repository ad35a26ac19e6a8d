"""`piaa shapes generate`: ShapesWorld scenes with exact multi-label ground truth."""

from __future__ import annotations

import json
from pathlib import Path

import click

from piaa_index.cli.common import AppContext, echo_json, pass_app


@click.group("shapes", short_help="Generate ShapesWorld scenes, the offline test world.")
def shapes_group() -> None:
    """ShapesWorld: the procedural multi-object world of the offline proof."""


@shapes_group.command("generate", short_help="Write N labelled scenes to OUTDIR (the eval layout).")
@click.argument("outdir", type=click.Path(file_okay=False))
@click.option("--images", "n_images", default=200, show_default=True, help="Number of scenes.")
@click.option(
    "--seed",
    default=1,
    show_default=True,
    help="Scenes are deterministic by seed (seed 0 made the shipped model's training scenes).",
)
@click.option("--size", default=224, show_default=True, help="Image side in pixels.")
@click.option(
    "--classes",
    "class_list",
    default="",
    help="Comma-separated classes the scenes may hold (the others become absent labels).",
)
@click.option(
    "--groups",
    default="",
    help="Comma-separated co-occurrence groups (kitchen, street, garden, fun) whose classes "
    "the scenes may hold; combines with --classes.",
)
@click.option(
    "--long-tail",
    "long_tail",
    type=click.FloatRange(min=1.0),
    default=None,
    metavar="RATIO",
    help="Long-tailed class frequencies (as VOC-LT/COCO-LT): along a head-to-tail order of the "
    "(held) classes drawn from the seed, class rank r of C is drawn with weight "
    "RATIO^(-r/(C-1)), so image counts fall from head to tail by roughly RATIO. Writes the order "
    "and the realised per-class image counts to OUTDIR/long_tail.json. Default: uniform draws.",
)
@click.option(
    "--novel",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    metavar="K",
    help="Add K novel object kinds (novel-1..novel-K, at most 5) the shipped model never saw in "
    "training: each scene holds each one with probability 0.15 as an extra object; classes.json "
    "lists them after the 24 classes (ids 24, 25, ...).",
)
@click.option("--json", "as_json", is_flag=True)
@pass_app
def shapes_generate(
    app: AppContext,
    outdir: str,
    n_images: int,
    seed: int,
    size: int,
    class_list: str,
    groups: str,
    long_tail: float | None,
    novel: int,
    as_json: bool,
) -> None:
    """Write N scenes to OUTDIR/images plus classes.json and labels.txt (the eval layout).

    classes.json always names all 24 classes (then the novel kinds of --novel); with
    --classes/--groups only those appear, so `piaa eval` can measure tags on labels the library
    does not hold. --long-tail and --novel combine with each other and with --classes/--groups;
    without them the scenes are exactly those of earlier versions for the same seed.
    """
    from piaa_index.shapes.dataset import generate_dataset
    from piaa_index.shapes.world import CLASSES, NOVEL, class_subset

    if n_images < 1:
        raise click.BadParameter("must be at least 1", param_hint="--images")
    if novel > len(NOVEL):
        raise click.BadParameter(f"at most {len(NOVEL)} novel kinds", param_hint="--novel")
    try:
        allowed = class_subset(_split(class_list), _split(groups))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--classes/--groups") from exc
    root = generate_dataset(
        Path(outdir),
        n_images,
        seed=seed,
        size=size,
        progress=app.progress,
        classes_allowed=allowed,
        long_tail=long_tail,
        novel=novel,
    )
    names = [CLASSES[c] for c in allowed] if allowed is not None else list(CLASSES)
    lt = json.loads((root / "long_tail.json").read_text()) if long_tail is not None else None
    if as_json:
        echo_json(
            {
                "root": str(root),
                "images": n_images,
                "seed": seed,
                "classes": names,
                "novel": NOVEL[:novel],
                "long_tail": lt,
            }
        )
    else:
        held = "" if allowed is None else f" holding {len(names)} of {len(CLASSES)} classes"
        extra = f", {novel} novel kind{'s' if novel != 1 else ''}" if novel else ""
        if lt is not None:
            counts = list(lt["counts"].values())
            extra += (
                f", long tail {lt['ratio']:g} (images per class from {max(counts)} down to "
                f"{min(counts)}; see long_tail.json)"
            )
        click.echo(f"wrote {n_images} scenes to {root}{held}{extra}")


@shapes_group.command(
    "keywords", short_help="Write a random share of a dataset's labels as user keywords (CSV)."
)
@click.argument("dataset", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--fraction",
    type=click.FloatRange(0, 1, min_open=True),
    default=0.1,
    show_default=True,
    help="Share of the images whose ground truth becomes keywords.",
)
@click.option("--seed", default=0, show_default=True, help="Which images are picked.")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="CSV file.")
@pass_app
def shapes_keywords(app: AppContext, dataset: str, fraction: float, seed: int, output: str) -> None:
    """Write the labels of a random FRACTION of DATASET's images as a `path,label` CSV: the
    keywords a user would have for part of a collection (`piaa labels import csv`, `piaa eval
    --labels`)."""
    from piaa_index.eval.datasets import keyword_rows, load_dataset
    from piaa_index.library.keywords import write_label_csv

    rows = keyword_rows(load_dataset(Path(dataset)), fraction, seed)
    n = write_label_csv(Path(output), rows)
    click.echo(f"wrote {n} rows for {len(rows)} images to {output}")


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


COMMANDS = [shapes_group]
