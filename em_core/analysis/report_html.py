"""Self-contained HTML report of an EM evaluation. A pure renderer: no MLflow, no network.

The document carries its CSS inline and its figures as base64 data URIs, so it can be logged as a
single MLflow artifact, mailed, or opened offline. All text is HTML-escaped: answers are untrusted
model output.
"""
from __future__ import annotations

import base64
import json
import math
import numbers
import re
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
         ".svg": "image/svg+xml", ".webp": "image/webp"}

# keys shown as percentages (values are fractions 0-1, as summarize() returns them): every rate
# (`em_rate`, `em_rate_coherent`, `coherent_rate`, ...) and its bounds, so no two rates differ in form
_PERCENT = re.compile(r"(^|_)rate($|_)|_lo$|_hi$")

_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;margin:0;
  background:#f6f7f9;color:#1d2330;line-height:1.45}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px}
h1{margin:0 0 4px;font-size:1.7em}
h2{margin-top:2.2em;padding-bottom:4px;border-bottom:2px solid #dde1e7;font-size:1.3em}
h3{margin:1.4em 0 .3em;font-size:1.05em}
.meta{color:#667085;font-size:.9em}
nav{margin:14px 0;font-size:.9em}
nav a{margin-right:14px;color:#2c7fb8;text-decoration:none}
.warning{margin:18px 0;padding:14px 18px;border-radius:8px;background:#fdecea;
  border:2px solid #c0392b;color:#7b1d14;font-weight:600;font-size:1.05em}
table{border-collapse:collapse;margin:8px 0;background:#fff;font-size:.88em}
th,td{border:1px solid #dde1e7;padding:4px 9px;vertical-align:top}
th{background:#eef1f5;text-align:left;position:sticky;top:0}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.scroll{overflow-x:auto;max-height:640px;overflow-y:auto}
figure{margin:16px 0;padding:10px;background:#fff;border:1px solid #dde1e7;border-radius:6px}
figure img{max-width:100%;height:auto;display:block;margin:0 auto}
figcaption{color:#475467;font-size:.9em;margin-top:6px;text-align:center}
.missing{color:#b54708;font-style:italic}
pre{white-space:pre-wrap;word-break:break-word;margin:0;font-size:.86em;
  font-family:"DejaVu Sans Mono",Menlo,Consolas,monospace}
pre.config{background:#fff;border:1px solid #dde1e7;padding:12px;border-radius:6px}
.question{font-style:italic;color:#344054;margin:0 0 6px}
table.examples{width:100%}
"""


def _is_nan(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isnan(float(v))


def _fmt(key: str, value: Any) -> tuple[str, bool]:
    """(escaped display text, is_numeric) for one table cell."""
    if value is None or _is_nan(value):
        return "\u2013", True
    if isinstance(value, bool):
        return escape(str(value)), False
    if isinstance(value, numbers.Real):  # numpy scalars included
        x = float(value)
        if math.isinf(x):
            return ("\u221e" if x > 0 else "-\u221e"), True
        if _PERCENT.search(key):
            return f"{x * 100:.1f}%", True
        if x.is_integer():
            return str(int(x)), True  # counts arrive as floats from summarize()
        return (f"{x:.2f}" if abs(x) >= 1 else f"{x:.3g}"), True
    if isinstance(value, (Mapping, list, tuple)):
        return escape(json.dumps(value, default=str, ensure_ascii=False)), False
    return escape(str(value)), False


def _columns(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    cols: dict[str, None] = {}
    for r in rows:
        cols.update(dict.fromkeys(r))
    return list(cols)


def _table(rows: Sequence[Mapping[str, Any]]) -> str:
    cols = _columns(rows)
    head = "".join(f"<th>{escape(str(c))}</th>" for c in cols)
    body = []
    for r in rows:
        cells = []
        for c in cols:
            text, numeric = _fmt(str(c), r.get(c)) if c in r else ("", False)
            cells.append(f'<td class="num">{text}</td>' if numeric else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _kv_table(items: Mapping[str, Any]) -> str:
    rows = []
    for k, v in items.items():
        text, numeric = _fmt(str(k), v)
        cls = ' class="num"' if numeric else ""
        rows.append(f"<tr><th>{escape(str(k))}</th><td{cls}>{text}</td></tr>")
    return f"<table><tbody>{''.join(rows)}</tbody></table>"


def _image(caption: str, path: str | Path) -> str:
    p = Path(path)
    try:
        data = base64.b64encode(p.read_bytes()).decode("ascii")
    except OSError:
        return (f'<figure><p class="missing">missing: {escape(caption)} '
                f"({escape(str(p))})</p><figcaption>{escape(caption)}</figcaption></figure>")
    mime = _MIME.get(p.suffix.lower(), "image/png")
    return (f'<figure><img src="data:{mime};base64,{data}" alt="{escape(caption)}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def _score(v: Any) -> str:
    if v is None or v == "" or _is_nan(v):
        return "\u2013"
    try:
        return escape(f"{float(v):.1f}")
    except (TypeError, ValueError):
        return escape(str(v))


def _examples(examples: Sequence[Mapping[str, Any]]) -> str:
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for e in examples:
        groups.setdefault(str(e.get("question_id", "")), []).append(e)
    out = []
    for qid, group in groups.items():
        out.append(f"<h3>{escape(qid) or '(no id)'}</h3>")
        question = group[0].get("question")
        if question:
            out.append(f'<p class="question">{escape(str(question))}</p>')
        rows = []
        for e in group:
            rows.append(f'<tr><td class="num">{escape(str(e.get("step", "")))}</td>'
                        f'<td class="num">{_score(e.get("aligned"))}</td>'
                        f'<td class="num">{_score(e.get("coherent"))}</td>'
                        f'<td><pre>{escape(str(e.get("answer") or ""))}</pre></td></tr>')
        out.append('<table class="examples"><thead><tr><th>step</th><th>aligned</th><th>coherent</th><th>answer</th>'
                   f"</tr></thead><tbody>{''.join(rows)}</tbody></table>")
    return "".join(out)


def render_report(title: str, *, notes: Sequence[str] = (), summary_rows: Sequence[Mapping] = (),
                  per_question_rows: Sequence[Mapping] = (), examples: Sequence[Mapping] = (),
                  images: Mapping[str, str | Path] = {}, config_text: str = "",
                  provenance: Mapping[str, str] = {}, cost: Mapping[str, object] = {},
                  warning: str | None = None, tables: Mapping[str, Sequence[Mapping]] = {},
                  judge_identity: Mapping[str, str] = {}) -> str:
    """One self-contained HTML document; sections without content are left out. `tables`: more
    titled tables after the per-question one (e.g. the threshold sensitivity)."""
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    sections: list[tuple[str, str, str]] = []  # (anchor, heading, body html)
    if notes:
        sections.append(("notes", "Notes", "<ul>" + "".join(f"<li>{escape(str(n))}</li>" for n in notes) + "</ul>"))
    if summary_rows:
        sections.append(("summary", "Summary by checkpoint", _table(list(summary_rows))))
    if images:
        sections.append(("figures", "Figures", "".join(_image(str(k), v) for k, v in images.items())))
    if per_question_rows:
        sections.append(("per-question", "Per question", _table(list(per_question_rows))))
    for i, (heading, rows) in enumerate(tables.items()):
        if rows:
            sections.append((f"table-{i}", heading, _table(list(rows))))
    if examples:
        sections.append(("examples", "Example answers", _examples(list(examples))))
    if provenance:
        sections.append(("provenance", "Provenance", _kv_table(provenance)))
    if judge_identity:
        sections.append(("judge", "Judge identity", _kv_table(judge_identity)))
    if cost:
        sections.append(("cost", "Judge cost", _kv_table(cost)))
    if config_text:
        sections.append(("config", "Config", f'<pre class="config">{escape(config_text)}</pre>'))

    nav = "".join(f'<a href="#{a}">{escape(h)}</a>' for a, h, _ in sections)
    banner = f'<div class="warning" role="alert">\u26a0 {escape(warning)}</div>' if warning else ""
    body = "".join(f'<section id="{a}"><h2>{escape(h)}</h2>{html}</section>' for a, h, html in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{escape(title)}</title><style>{_CSS}</style></head><body><main>"
            f"<h1>{escape(title)}</h1><div class=\"meta\">generated {generated}</div>"
            f"{banner}<nav>{nav}</nav>{body}</main></body></html>\n")


def write_report(path: str | Path, html: str) -> Path:
    """Write the document as UTF-8 (parent folders created) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    return path
