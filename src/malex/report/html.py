"""A self-contained HTML page: headings, paragraphs, tables and PNG images beside it.

The page needs nothing online and runs no script: styles are inline, images are files referenced by
relative paths. Every text is escaped. `write` refuses a page whose images are missing.
"""

from __future__ import annotations

import html
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from malex.errors import InputError

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1400px; padding: 0 1em; color: #222; line-height: 1.4; }
h1, h2, h3 { line-height: 1.2; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; max-width: 70em; }
nav ul { columns: 2; }
p.note { color: #555; font-size: 0.9em; max-width: 70em; }
"""


@dataclass
class HtmlPage:
    """Blocks appended in order; `write(path)` produces the page."""

    title: str
    blocks: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    _toc: list[tuple[str, str]] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> "HtmlPage":
        """A heading; level-2 headings are listed in the page's contents."""
        anchor = f"s{len(self.blocks)}"
        if level == 2:
            self._toc.append((anchor, text))
        self.blocks.append(f'<h{level} id="{anchor}">{html.escape(text)}</h{level}>')
        return self

    def paragraph(self, text: str, note: bool = False) -> "HtmlPage":
        cls = ' class="note"' if note else ""
        self.blocks.append(f"<p{cls}>{html.escape(text)}</p>")
        return self

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]], caption: str | None = None
              ) -> "HtmlPage":
        """A table; columns whose cells all read as numbers (or '–') are right-aligned."""
        numeric = [bool(rows) and all(re.match(r"^(–|-?\d)", str(r[i])) for r in rows) for i in range(len(header))]
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join(
            "<tr>" + "".join(f'<td{" class=num" if numeric[i] else ""}>{html.escape(str(v))}</td>'
                             for i, v in enumerate(row)) + "</tr>" for row in rows)
        cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
        self.blocks.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        return self

    def image(self, src: str, caption: str = "", alt: str | None = None) -> "HtmlPage":
        """An image by a path relative to the page, with a caption."""
        if Path(src).is_absolute() or src.startswith(("http:", "https:", "//", "data:")):
            raise InputError(f"image {src!r}: expected a path relative to the page (the report works offline)")
        self.images.append(src)
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self.blocks.append(f'<figure><img src="{html.escape(src)}" alt="{html.escape(alt or caption or src)}">'
                           f"{cap}</figure>")
        return self

    def render(self) -> str:
        toc = "".join(f'<li><a href="#{a}">{html.escape(t)}</a></li>' for a, t in self._toc)
        nav = f"<nav><ul>{toc}</ul></nav>" if toc else ""
        return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
                f"<title>{html.escape(self.title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
                f"<h1>{html.escape(self.title)}</h1>\n{nav}\n" + "\n".join(self.blocks) + "\n</body>\n</html>\n")

    def write(self, path: str | Path) -> Path:
        """Write the page (atomically); every image must exist beside it."""
        path = Path(path)
        missing = [src for src in self.images if not (path.parent / src).is_file()]
        if missing:
            raise InputError(f"{path}: images {', '.join(missing)} do not exist beside the page")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.partial")
        tmp.write_text(self.render(), encoding="utf-8")
        os.replace(tmp, path)
        return path
