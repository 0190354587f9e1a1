"""The report's documents (common.document): Markdown that renders as what it says."""

from __future__ import annotations

from markdown_it import MarkdownIt

from common.document import Section, Table, markdown, to_html


def test_a_pipe_inside_a_cell_keeps_the_markdown_table_a_table():
    """'mean |contribution|' in a header made four cells against a two-column rule, and
    GitHub showed the whole table as one paragraph of pipes; the HTML shows the pipes."""
    sections = [Section("s", [Table(["input", "mean |contribution| to the log-odds"], [["GCS", 0.41], ["a|b", 0.2]])])]
    page = MarkdownIt("commonmark").enable("table").render(markdown("t", sections))
    assert page.count("<table>") == 1 and page.count("<th>") == 2 and page.count("<td>") == 4
    assert "<th>mean |contribution| to the log-odds</th>" in page and "<td>a|b</td>" in page
    html = to_html("t", sections)
    assert "mean |contribution| to the log-odds" in html and "\\|" not in html
