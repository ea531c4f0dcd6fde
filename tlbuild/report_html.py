"""report.html: report.md as one self-contained page (plots embedded as data URIs, styles
inline), so it opens from a downloaded CI artifact with no server and no folder beside it.

Rendered from report.md itself with markdown-it (CommonMark and tables; it comes with rich),
so the page and the markdown never say different things.
"""

from __future__ import annotations

import base64
import html
import mimetypes
from pathlib import Path

from markdown_it import MarkdownIt

from tlbuild.fileio import write_text

REPORT_HTML = "report.html"

# The verdict banner's colours: the screenshot test looks for them.
PASSED_RGB = (26, 127, 55)
FAILED_RGB = (207, 34, 46)
NONE_RGB = (87, 96, 106)

_STYLE = """
body { font: 15px/1.5 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       margin: 0 auto; max-width: 1100px; padding: 0 24px 48px; color: #1f2328; }
h1 { border-bottom: 1px solid #d1d9e0; padding-bottom: .3em; }
h2 { border-bottom: 1px solid #d1d9e0; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 8px 0 16px; display: block; overflow-x: auto; }
th, td { border: 1px solid #d1d9e0; padding: 4px 10px; }
tr:nth-child(2n) td { background: #f6f8fa; }
code { background: #eff1f3; border-radius: 4px; padding: .1em .3em; font-size: 90%; }
img { max-width: 100%; }
.verdict { color: #fff; font-weight: 600; font-size: 18px; padding: 12px 16px;
           border-radius: 6px; margin: 16px 0; }
"""


def _data_uri(path: Path) -> str:
    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def markdown_to_html(text: str, folder: Path) -> str:
    """The page's body: `text` rendered, each image that is a file in `folder` embedded (a
    missing one keeps its name, shown as its alt text)."""
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(text)
    for token in tokens:
        for child in token.children or []:
            if child.type != "image":
                continue
            src = str(child.attrGet("src") or "")
            local = folder / src
            if src and "/" not in src and local.is_file():
                child.attrSet("src", _data_uri(local))
    return md.renderer.render(tokens, md.options, {})


def verdict_banner(passed: int, failed: int) -> str:
    """The coloured line at the top: every gate passed, some failed, or none configured."""
    if failed:
        rgb, words = FAILED_RGB, f"Gates FAILED: {failed} of {passed + failed}"
    elif passed:
        rgb, words = PASSED_RGB, f"Gates passed: {passed} of {passed}"
    else:
        rgb, words = NONE_RGB, "No gates configured"
    return f'<div class="verdict" style="background: rgb{rgb}">{html.escape(words)}</div>'


def write_report_html(md_path: Path, title: str, passed: int, failed: int) -> Path:
    """report.html beside `md_path`, written atomically."""
    folder = md_path.parent
    body = markdown_to_html(md_path.read_text(encoding="utf-8"), folder)
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"{verdict_banner(passed, failed)}\n{body}</body>\n</html>\n"
    )
    path = folder / REPORT_HTML
    write_text(path, page)
    return path
