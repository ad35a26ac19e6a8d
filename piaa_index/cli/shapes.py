"""`piaa shapes generate`: ShapesWorld scenes with exact multi-label ground truth."""

from __future__ import annotations

from pathlib import Path

import click

from piaa_index.cli.common import AppContext, echo_json, pass_app


@click.group("shapes")
def shapes_group() -> None:
    """ShapesWorld: the procedural multi-object world of the offline proof."""


@shapes_group.command("generate")
@click.argument("outdir", type=click.Path(file_okay=False))
@click.option("--images", "n_images", default=200, show_default=True, help="Number of scenes.")
@click.option(
    "--seed",
    default=1,
    show_default=True,
    help="Scenes are deterministic by seed (seed 0 made the shipped model's training scenes).",
)
@click.option("--size", default=224, show_default=True, help="Image side in pixels.")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def shapes_generate(
    app: AppContext, outdir: str, n_images: int, seed: int, size: int, as_json: bool
) -> None:
    """Write N scenes to OUTDIR/images plus classes.json and labels.txt (the eval layout)."""
    from piaa_index.shapes.dataset import generate_dataset

    if n_images < 1:
        raise click.BadParameter("must be at least 1", param_hint="--images")
    root = generate_dataset(Path(outdir), n_images, seed=seed, size=size, progress=app.progress)
    if as_json:
        echo_json({"root": str(root), "images": n_images, "seed": seed})
    else:
        click.echo(f"wrote {n_images} scenes to {root}")


COMMANDS = [shapes_group]
