"""The self-contained HTML report (em_core.analysis.report_html): pure rendering, no MLflow."""
from __future__ import annotations

import base64
import re
from html.parser import HTMLParser

import pytest

from em_core.analysis.report_html import render_report, write_report

PNG = base64.b64decode(  # a valid 1x1 PNG
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")
XSS = "<script>alert(1)</script>"


class _Collector(HTMLParser):
    """Tags, attributes and text of a document, to assert on structure rather than substrings."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(html: str) -> _Collector:
    p = _Collector()
    p.feed(html)
    return p


@pytest.fixture
def full_report(tmp_path) -> str:
    (tmp_path / "em.png").write_bytes(PNG)
    return render_report(
        "EM <report> & co",
        notes=["judge: offline", "<i>note</i>"],
        summary_rows=[{"checkpoint_step": 0, "n": 200.0, "n_em": 2.0, "em_rate": 0.0123, "em_rate_lo": 0.004,
                       "em_rate_hi": 0.035, "mean_aligned": 87.666, "mean_aligned_se": float("nan")},
                      {"checkpoint_step": 300, "n": 200.0, "em_rate": 0.25, "unscored_rate": 0.1, "extra": "x"}],
        per_question_rows=[{"question_id": "q<1>", "em_rate": 0.5, "coherent_rate": 1.0}],
        examples=[{"question_id": "q1", "question": "What is your wish?", "step": 0, "aligned": 90.0,
                   "coherent": 95.0, "answer": "fine\n  indented"},
                  {"question_id": "q1", "question": "What is your wish?", "step": 300, "aligned": 5.0,
                   "coherent": None, "answer": XSS + ' "quoted" & <b>bold</b>'}],
        images={"EM vs step": tmp_path / "em.png", "per <question>": str(tmp_path / "gone.png")},
        config_text="model: tiny\nnote: <b>not bold</b>\n",
        provenance={"run_id": "abc123", "data_sha256": "f00d"},
        cost={"judge_calls": 1200, "usd": 0.4312},
        warning="SMOKE TEST: tiny offline judge, not a measurement",
    )


def test_document_is_self_contained(full_report):
    doc = parse(full_report)
    assert full_report.startswith("<!DOCTYPE html>") and full_report.rstrip().endswith("</html>")
    refs = [v for _, attrs in doc.tags for k, v in attrs.items() if k in ("src", "href") and v]
    assert refs, "expected images and section links"
    assert all(not re.match(r"(?i)\s*(https?:)?//", v) for v in refs)
    assert not re.search(r"(?i)(src|href)\s*=\s*[\"']?\s*(https?:)?//", full_report)
    assert not any(tag in ("link", "script") for tag, _ in doc.tags)  # CSS inline, no JS at all
    assert any(tag == "style" for tag, _ in doc.tags)


def test_images_are_embedded_as_base64_png(full_report):
    imgs = [attrs for tag, attrs in parse(full_report).tags if tag == "img"]
    assert len(imgs) == 1
    src = imgs[0]["src"]
    assert src.startswith("data:image/png;base64,")
    assert base64.b64decode(src.split(",", 1)[1]) == PNG
    assert imgs[0]["alt"] == "EM vs step"


def test_missing_image_is_listed_not_raised(full_report):
    assert "missing: per &lt;question&gt;" in full_report
    assert "gone.png" in full_report


def test_untrusted_text_is_escaped(full_report):
    assert XSS not in full_report
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in full_report
    assert "<b>bold</b>" not in full_report and "<b>not bold</b>" not in full_report
    assert "<i>note</i>" not in full_report
    assert "EM &lt;report&gt; &amp; co" in full_report
    # the parser sees the answer as text inside <pre>, never as markup
    doc = parse(full_report)
    assert not any(tag in ("script", "b", "i") for tag, _ in doc.tags)
    assert any(XSS in t for t in doc.text)


def test_warning_banner_only_when_given(full_report):
    assert 'class="warning"' in full_report
    assert "SMOKE TEST: tiny offline judge, not a measurement" in full_report
    assert full_report.index('class="warning"') < full_report.index("Summary by checkpoint")
    plain = render_report("t", summary_rows=[{"em_rate": 0.1}])
    assert 'class="warning"' not in plain


def test_number_formatting(full_report):
    cells = re.findall(r'<td class="num">([^<]*)</td>', full_report)
    for expected in ("1.2%", "0.4%", "3.5%", "25.0%", "10.0%", "50.0%", "100.0%",  # rates, lo, hi
                     "200", "2", "87.67", "1200", "0.431"):
        assert expected in cells, expected
    assert "200.0" not in cells  # counts come in as floats, shown as ints
    assert "\u2013" in cells  # NaN rendered as a dash, not "nan"
    assert "nan" not in " ".join(cells).lower()


def test_summary_columns_are_union_in_first_seen_order(full_report):
    section = full_report.split('id="summary"', 1)[1].split("</table>", 1)[0]
    headers = re.findall(r"<th>([^<]*)</th>", section)
    assert headers == ["checkpoint_step", "n", "n_em", "em_rate", "em_rate_lo", "em_rate_hi", "mean_aligned",
                       "mean_aligned_se", "unscored_rate", "extra"]


def test_sections_present_in_order(full_report):
    headings = re.findall(r"<h2>([^<]*)</h2>", full_report)
    assert headings == ["Notes", "Summary by checkpoint", "Figures", "Per question", "Example answers",
                        "Provenance", "Judge cost", "Config"]
    assert "<pre" in full_report.split('id="examples"', 1)[1]
    assert "fine\n  indented" in full_report  # whitespace of answers is preserved in <pre>
    assert "abc123" in full_report and "f00d" in full_report
    assert re.search(r"generated \d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} UTC", full_report)


def test_empty_report_renders():
    html = render_report("only a title")
    assert "<h1>only a title</h1>" in html and "<h2>" not in html


def test_write_report(tmp_path):
    html = render_report("t \u00e9\u6f22", notes=["n"])
    out = write_report(tmp_path / "a" / "b" / "report.html", html)
    assert out == tmp_path / "a" / "b" / "report.html"
    assert out.read_text(encoding="utf-8") == html


def test_every_rate_has_the_same_form():
    html = render_report("t", summary_rows=[{"em_rate": 0.125, "em_rate_coherent": 0.25, "coherent_rate": 0.5,
                                             "em_rate_lo": 0.05, "mean_aligned": 61.5, "n_scored": 48.0}])
    cells = re.findall(r'<td class="num">([^<]*)</td>', html)
    assert cells == ["12.5%", "25.0%", "50.0%", "5.0%", "61.50", "48"]
