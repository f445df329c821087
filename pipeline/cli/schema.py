"""`localflow schema`: the catalog's JSON Schema, or (--reference) docs/reference.md."""

from __future__ import annotations

import sys

import orjson
import typer

from pipeline.cli.app import (
    app,
)


@app.command()
def schema(
    reference: bool = typer.Option(
        False, "--reference", help="Print the Markdown reference of every catalog and connector field instead."),
) -> None:
    """Print the catalog's JSON Schema (draft 2020-12), generated from the models `validate` uses.

    Point an editor at it for completion and inline errors in flow.yaml (the YAML language
    server reads `# yaml-language-server: $schema=flow.schema.json`). With --reference, print
    docs/reference.md: every field of the catalog and of each connector, with its type, default,
    description and example (the page `validate`'s messages point at).

    \b
    Example:
      localflow schema > flow.schema.json
      localflow schema --reference > docs/reference.md
    """

    from pipeline.cli.reference import catalog_json_schema, reference_markdown

    if reference:
        sys.stdout.write(reference_markdown())
    else:
        sys.stdout.buffer.write(orjson.dumps(catalog_json_schema(), option=orjson.OPT_INDENT_2) + b"\n")
