"""A small document model, rendered to Markdown and to one self-contained HTML page
(plots embedded): the run report (server) and the bedside monitor (a hospital's own) both
write through it.

Text may use Markdown's inline marks (`code`, **strong**); the HTML renders them. A table
with no rows says why (``Table.empty``) instead of showing a bare header."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

from .metrics import format_number


@dataclass
class Table:
    header: list[str]
    rows: list[list]
    empty: str = "Nothing to show."  # shown instead of the table when there are no rows: say why


@dataclass
class Image:
    path: Path
    caption: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Statement:
    """A paragraph to be signed (set apart on the page)."""

    text: str


Block = str | Table | Image | Bullets | Statement


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)


def _cell(value) -> str:
    return value if isinstance(value, str) else format_number(value)


def _markdown_cell(value) -> str:
    """A table cell in Markdown: a '|' inside it would end the cell (GitHub then shows the
    whole table as one paragraph of pipes), so it is escaped."""
    return _cell(value).replace("|", "\\|")


def markdown(title: str, sections: list[Section]) -> str:
    out = [f"# {title}", ""]
    for sec in sections:
        out += [f"## {sec.title}", ""]
        for block in sec.blocks:
            if isinstance(block, Table) and not block.rows:
                out.append(block.empty)
            elif isinstance(block, Table):
                out.append("| " + " | ".join(_markdown_cell(c) for c in block.header) + " |")
                out.append("|" + "|".join("---" for _ in block.header) + "|")
                out += ["| " + " | ".join(_markdown_cell(c) for c in row) + " |" for row in block.rows]
            elif isinstance(block, Image):
                out.append(f"![{block.caption}]({block.path.name})")
            elif isinstance(block, Bullets):
                out += [f"- {item}" for item in block.items]
            elif isinstance(block, Statement):
                out.append(f"> {block.text}")
            else:
                out.append(block)
            out.append("")
    return "\n".join(out)


_CODE = re.compile(r"`([^`]+)`")
_STRONG = re.compile(r"\*\*([^*]+)\*\*")


def inline(text: str) -> str:
    """Text with Markdown's inline marks as HTML (escaped first: a value can hold a '<')."""
    return _STRONG.sub(r"<strong>\1</strong>", _CODE.sub(r"<code>\1</code>", html.escape(text)))


def to_html(title: str, sections: list[Section]) -> str:
    esc = html.escape
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{esc(title)}</title><style>",
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}",
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}",
        "td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%}",
        "code{background:#f3f3f3;padding:0 3px;border-radius:3px;font-size:0.92em}",
        ".statement{background:#f7f9fc;border-left:4px solid #3465a4;padding:0.6em 1em}",
        "</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    for sec in sections:
        parts.append(f"<h2>{esc(sec.title)}</h2>")
        for block in sec.blocks:
            if isinstance(block, Table) and not block.rows:
                parts.append(f"<p>{inline(block.empty)}</p>")
            elif isinstance(block, Table):
                parts.append("<table><tr>" + "".join(f"<th>{inline(h)}</th>" for h in block.header) + "</tr>")
                for row in block.rows:
                    parts.append("<tr>" + "".join(f"<td>{inline(_cell(c))}</td>" for c in row) + "</tr>")
                parts.append("</table>")
            elif isinstance(block, Image):
                data = base64.b64encode(block.path.read_bytes()).decode()
                parts.append(f"<figure><img alt='{esc(block.caption)}' src='data:image/png;base64,{data}'>"
                             f"<figcaption>{esc(block.caption)}</figcaption></figure>")
            elif isinstance(block, Bullets):
                parts.append("<ul>" + "".join(f"<li>{inline(i)}</li>" for i in block.items) + "</ul>")
            elif isinstance(block, Statement):
                parts.append(f"<p class='statement'>{inline(block.text)}</p>")
            else:
                parts.append(f"<p>{inline(block)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
