"""`piaa models`: which weights are on this machine and where; `piaa models fetch` gets them."""

from __future__ import annotations

import click

from piaa_index.cli.common import echo_json, emit_rows
from piaa_index.errors import UserInputError


@click.group(
    "models",
    invoke_without_command=True,
    short_help="List the model weights on this machine, or fetch them.",
)
@click.option("--all", "everything", is_flag=True, help="Every model and tag open_clip knows.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: cache folder and models.")
@click.pass_context
def models_group(ctx: click.Context, everything: bool, as_json: bool) -> None:
    """List the weights on this machine: the shipped shapesworld model and every open_clip
    model and tag in the Hugging Face cache (HF_HUB_CACHE / HF_HOME), with sizes and paths."""
    if ctx.invoked_subcommand is not None:
        return
    from piaa_index.model.weights import hub_cache, list_models

    rows = list_models(everything)
    if as_json:
        echo_json({"cache": str(hub_cache()), "models": rows})
        return
    click.echo(f"Hugging Face cache: {hub_cache()}", err=True)
    table = [
        {
            "model": r["model"],
            "tag": r["tag"],
            "cached": r["cached"],
            "size": "" if r["size"] is None else f"{r['size'] / 1e6:.1f} MB",
            "path": r["path"] or r["source"],
        }
        for r in rows
    ]
    emit_rows(table, as_json=False, as_csv=False, paths_only=False)


@models_group.command("fetch", short_help="Download a model's weights once, for later offline use.")
@click.argument("name")
@click.argument("tag", required=False)
def models_fetch(name: str, tag: str | None) -> None:
    """Download the weights of open_clip model NAME, TAG (default: what --pretrained default
    picks) into the Hugging Face cache, once; later runs load them from there, offline."""
    import open_clip

    from piaa_index.model.encoder import _close_names
    from piaa_index.model.weights import fetch

    model = name.replace("/", "-")
    tags = open_clip.list_pretrained_tags_by_model(model)
    if not tags:
        hint = _close_names(model, [m for m, _ in open_clip.list_pretrained()])
        raise UserInputError(
            f"open_clip has no downloadable weights for {name!r}"
            + (f"; did you mean: {hint}?" if hint else "")
        )
    tag = tag or ("openai" if "openai" in tags else tags[0])
    if tag not in tags:
        raise UserInputError(f"unknown tag {tag!r} for {model}; known: {', '.join(tags)}")
    path = fetch(model, tag)
    click.echo(str(path))


COMMANDS = [models_group]
