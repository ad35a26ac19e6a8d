"""`piaa demo`: the whole product offline, on the shipped model and a generated library."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import click

from piaa_index.cli.common import AppContext, pass_app


def _step(message: str) -> None:
    click.secho(f"\n==> {message}", bold=True, err=True)


@click.command("demo", short_help="Try piaa offline: generated scenes and the shipped model.")
@click.option(
    "--dir",
    "workdir",
    type=click.Path(file_okay=False),
    help="Where to put the sample library and its index. [default: HOME/demo]",
)
@click.option("--images", "n_images", default=1000, show_default=True, help="Test scenes.")
@click.option("--fit-images", default=1000, show_default=True, help="Unlabelled scenes to fit on.")
@click.option("--seed", default=2026, show_default=True)
@pass_app
def demo_command(
    app: AppContext, workdir: str | None, n_images: int, fit_images: int, seed: int
) -> None:
    """Generate ShapesWorld scenes, index them with the shipped model, tag, search, evaluate."""
    from piaa_index.config import Settings
    from piaa_index.eval.ablation import format_table as ablation_table
    from piaa_index.eval.ablation import run_ablation
    from piaa_index.eval.datasets import load_dataset
    from piaa_index.library.core import Library
    from piaa_index.shapes.dataset import generate_dataset

    started = time.perf_counter()
    root = Path(workdir) if workdir else Settings.resolve(app.home).home / "demo"
    progress = not app.quiet
    test_dir, fit_dir = root / "library", root / "unlabelled"
    _step(f"generating {n_images} + {fit_images} ShapesWorld scenes in {root}")
    if not (test_dir / "labels.txt").exists():
        generate_dataset(test_dir, n_images, seed=seed, progress=progress)
    if not (fit_dir / "labels.txt").exists():
        generate_dataset(fit_dir, fit_images, seed=seed + 1, progress=progress)

    library = Library.open(
        home=root / "index",
        db=f"sqlite:///{root / 'index' / 'piaa.sqlite3'}",
        model="shapesworld",
        pretrained="default",
        front_end=app.front_end,
        device=app.device,
    )
    with library:
        _step("indexing the library with the shipped shapesworld model")
        report = library.index([test_dir / "images"], progress=progress)
        click.echo(
            f"indexed {report.indexed} images ({report.unchanged} unchanged) "
            f"in {report.seconds:.1f}s"
        )
        test = load_dataset(test_dir)
        _step(f"vocabulary: {len(test.classes)} ShapesWorld classes; fitting PVCL")
        library.set_vocabulary(test.classes)
        fit = library.fit(progress=progress)
        click.echo(
            f"fitted on {fit.n_images} images / {fit.n_patches} patches in {fit.seconds:.1f}s"
            + (f"; too little evidence: {', '.join(fit.weak_labels)}" if fit.weak_labels else "")
        )

        _step("tags of three images (truth in brackets)")
        for item in test.items[:3]:
            truth = ", ".join(test.classes[c] for c in sorted(item.labels))
            tags = [t for t in library.tags(item.path) if t["present"]]
            click.echo(f"{item.path.name} [{truth}]")
            for t in tags[:5]:
                click.echo(f"    {t['label']:<22} {t['score']:.3f}")

        a, b = _frequent_pair(test)
        query = f'"{a}" AND "{b}"'
        _step(f"search: {query}")
        rows = library.search(query, limit=5)
        labels_of = {str(it.path): it.labels for it in test.items}
        ia, ib = test.classes.index(a), test.classes.index(b)
        for row in rows:
            ok = ia in labels_of.get(row["path"], ()) and ib in labels_of.get(row["path"], ())
            click.echo(
                f"    {Path(row['path']).name}  score {row['score']:.3f}  "
                f"{'(both really there)' if ok else '(not both in truth)'}"
            )

        _step("ablation on the library, PVCL fitted on the other (unlabelled) scenes")
        ablation = run_ablation(library, test, load_dataset(fit_dir), progress=progress)
        click.echo(ablation_table(ablation))
    # `piaa serve` serves the demo's library while the default one is empty.
    default_root = Settings.resolve(app.home).home / "demo"
    serve = "piaa serve" if root == default_root else f"piaa --home {root / 'index'} serve"
    click.echo(
        f"\ndemo finished in {time.perf_counter() - started:.0f}s; "
        f'try: piaa --home {root / "index"} search --text "{a}"\n'
        f"     {serve}    (then open the URL it prints: the gallery of this demo library)",
        err=True,
    )


def _frequent_pair(dataset) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    """The two classes that co-occur most often (so the AND search has answers)."""

    pairs: Counter[tuple[int, int]] = Counter()
    for item in dataset.items:
        labels = sorted(item.labels)
        for i, x in enumerate(labels):
            for y in labels[i + 1 :]:
                pairs[(x, y)] += 1
    (x, y), _ = pairs.most_common(1)[0]
    return dataset.classes[x], dataset.classes[y]


COMMANDS = [demo_command]
