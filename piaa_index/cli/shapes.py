"""`piaa shapes generate`: ShapesWorld scenes with exact multi-label ground truth."""

from __future__ import annotations

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
    as_json: bool,
) -> None:
    """Write N scenes to OUTDIR/images plus classes.json and labels.txt (the eval layout).

    classes.json always names all 24 classes; with --classes/--groups only those appear, so
    `piaa eval` can measure tags on labels the library does not hold.
    """
    from piaa_index.shapes.dataset import generate_dataset
    from piaa_index.shapes.world import CLASSES, class_subset

    if n_images < 1:
        raise click.BadParameter("must be at least 1", param_hint="--images")
    try:
        allowed = class_subset(_split(class_list), _split(groups))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--classes/--groups") from exc
    root = generate_dataset(
        Path(outdir), n_images, seed=seed, size=size, progress=app.progress, classes_allowed=allowed
    )
    names = [CLASSES[c] for c in allowed] if allowed is not None else list(CLASSES)
    if as_json:
        echo_json({"root": str(root), "images": n_images, "seed": seed, "classes": names})
    else:
        held = "" if allowed is None else f" holding {len(names)} of {len(CLASSES)} classes"
        click.echo(f"wrote {n_images} scenes to {root}{held}")


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


COMMANDS = [shapes_group]
