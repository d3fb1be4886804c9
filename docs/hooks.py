"""MkDocs hooks: the reference pages are generated from the code when the site is built.

`<!-- config-reference -->` becomes a table per config section (from the dataclasses and their
docstrings, through `skinray.config.describe_key`); `<!-- cli-reference -->` becomes the `--help`
of every command (from `skinray.cli.build_parser`). Neither can then disagree with the code.
"""

from __future__ import annotations

import argparse
import dataclasses


def on_page_markdown(markdown: str, page, config, files) -> str:
    if "<!-- config-reference -->" in markdown:
        markdown = markdown.replace("<!-- config-reference -->", config_reference())
    if "<!-- cli-reference -->" in markdown:
        markdown = markdown.replace("<!-- cli-reference -->", cli_reference())
    return markdown


def config_reference() -> str:
    from skinray.config import Config, describe_key

    parts = []
    for section in dataclasses.fields(Config):
        cls = section.default_factory
        summary = (cls.__doc__ or "").strip().splitlines()[0]
        rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
        for field in dataclasses.fields(cls):
            info = describe_key(f"{section.name}.{field.name}")
            kind = getattr(info.type, "__name__", str(info.type)).replace("|", "or")
            default = "unset" if info.default is None else repr(info.default)
            meaning = " ".join(info.help.split()).replace("|", "\\|")
            rows.append(f"| `{info.key}` | {kind} | `{default}` | {meaning} |")
        parts.append(f"### `{section.name}`\n\n{summary}\n\n" + "\n".join(rows))
    return "\n\n".join(parts) + "\n"


def cli_reference() -> str:
    from skinray.cli import build_parser

    parser = build_parser()
    parts = [f"## `skinray`\n\n```\n{parser.format_help()}```"]
    for name, sub in _subcommands(parser):
        parts.append(f"## `skinray {name}`\n\n```\n{sub.format_help()}```")
    return "\n\n".join(parts) + "\n"


def _subcommands(parser: argparse.ArgumentParser, prefix: str = ""):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix}{name}", sub
                yield from _subcommands(sub, f"{prefix}{name} ")
