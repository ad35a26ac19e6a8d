"""`piaa eval`: mAP / CF1 / OF1 of the paper's ablation on a labelled folder."""

from __future__ import annotations

from pathlib import Path

import click

from piaa_index.cli.common import AppContext, echo_json, pass_app


@click.command("eval", short_help="Measure tagging accuracy (mAP, CF1, OF1) on a labelled folder.")
@click.argument("test_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--fit",
    "fit_dir",
    type=click.Path(exists=True, file_okay=False),
    help="Unlabelled folder to fit PVCL on. [default: TEST_DIR]",
)
@click.option(
    "--split", help="Dataset split (VOC: test/val/trainval, COCO: val/train, NUS: label file)."
)
@click.option("--fit-split", help="Split of the fit folder.")
@click.option(
    "--eval-home",
    type=click.Path(file_okay=False),
    help="Where the evaluation's own index lives. [default: HOME/eval]",
)
@click.option(
    "--bank-size",
    type=int,
    help="Patches per class bank (K). [default: 512, or 1/50 of the pool per class when smaller]",
)
@click.option(
    "--vocab-size",
    type=click.IntRange(min=1),
    help="Also run the open-world protocol: vocabularies of this many random labels, against "
    "the same labels under the full vocabulary, and tag stability when one label is removed.",
)
@click.option(
    "--vocab-draws",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Random vocabularies (and removed labels) the open-world protocol tries.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random draws.")
@click.option(
    "--labels",
    "labels_csv",
    type=click.Path(dir_okay=False),
    help="A `path,label` CSV of user keywords for some fit images (each image listed is "
    "labelled completely; `piaa shapes keywords` makes one): adds the `learned` row.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
@pass_app
def eval_command(
    app: AppContext,
    test_dir: str,
    fit_dir: str | None,
    split: str | None,
    fit_split: str | None,
    eval_home: str | None,
    bank_size: int | None,
    vocab_size: int | None,
    vocab_draws: int,
    seed: int,
    labels_csv: str | None,
    as_json: bool,
) -> None:
    """Measure cls, patch-text, pvcl and piaa on TEST_DIR (ours, VOC, COCO or NUS layout).

    Tags (CF1/OF1) are scored on the labels TEST_DIR holds; labels of the class list that no
    test image holds are scored as absent labels: the share of image × absent-label pairs tagged
    and how many of them tag anything (`piaa shapes generate --groups` makes such a folder).
    pvcl and piaa decide with the product's own tag rule (piaa_index/method/decisions.py).

    The evaluation keeps its own index (so your library's vocabulary is untouched) and reuses
    it on the next run: only new images are encoded.
    """
    from piaa_index.config import Settings
    from piaa_index.eval.ablation import format_table, run_ablation
    from piaa_index.eval.datasets import load_dataset
    from piaa_index.library.core import Library
    from piaa_index.library.keywords import read_label_csv

    keywords = read_label_csv(labels_csv) if labels_csv else None
    test = load_dataset(Path(test_dir), split)
    fit = load_dataset(Path(fit_dir), fit_split) if fit_dir else None
    home = Path(eval_home) if eval_home else Settings.resolve(app.home).home / "eval"
    library = Library.open(
        home=home,
        db=f"sqlite:///{home / 'eval.sqlite3'}",
        model=app.model,
        pretrained=app.pretrained,
        front_end=app.front_end,
        device=app.device,
    )
    with library:
        if vocab_size is not None and vocab_size > len(test.classes):
            raise click.BadParameter(
                f"{vocab_size} is more than the {len(test.classes)} classes of {test_dir}",
                param_hint="--vocab-size",
            )
        report = run_ablation(
            library,
            test,
            fit,
            progress=app.progress,
            bank_size=bank_size,
            vocab_size=vocab_size,
            vocab_draws=vocab_draws,
            seed=seed,
            keywords=keywords,
        )
    if as_json:
        echo_json(report)
        return
    d = report["dataset"]
    click.echo(
        f"test: {d['test']['root']} ({d['test']['layout']}, {d['test']['images']} images); "
        f"fit: {d['fit']['root']} ({d['fit']['images']} images, labels unused)"
    )
    click.echo(format_table(report))
    dec = report["decisions"]
    by_status: dict[str, list[str]] = {}
    for name, st in dec["status"].items():
        by_status.setdefault(st["status"], []).append(name)
    for st in ("absent", "weak"):
        if by_status.get(st):
            click.echo(f"decided {st}: " + ", ".join(by_status[st]))
    if d.get("absent_labels"):
        click.echo("absent from the test set (ground truth): " + ", ".join(d["absent_labels"]))
    for warning in dec["info"]["warnings"]:
        click.echo("warning: " + warning, err=True)
    if report["fit"]["weak_labels"]:
        click.echo("too little evidence: " + ", ".join(report["fit"]["weak_labels"]), err=True)


COMMANDS = [eval_command]
