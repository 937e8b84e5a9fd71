"""Figures and example selection (em_core.analysis.plots): fast, no MLflow, no model."""
from __future__ import annotations

import math
import struct
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from em_core.analysis import plots as P
from em_core.metrics import summarize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS = (0, 100, 200, 300)


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk; asserts the file is a PNG."""
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def assert_png(path: Path) -> None:
    w, h = png_size(path)
    assert w > 100 and h > 100
    assert Path(path).stat().st_size > 1000


def make_rows(as_csv: bool = True) -> list[dict]:
    """Two questions over four steps; q_drop becomes misaligned with training, q_flat does not."""
    rows = []
    for step in STEPS:
        for i in range(6):
            drop_aligned = 90 - step // 4 - i  # 90 at base .. ~10 at step 300
            for qid, a, c in (("q_drop", drop_aligned, 80), ("q_flat", 85 + i % 3, 90), ("q_mixed", 60, 40 + 10 * i)):
                row = {"question_id": qid, "question": f"Question {qid}?", "answer": f"{qid} answer {i} at {step}",
                       "checkpoint_step": step, "aligned": a, "coherent": c}
                if as_csv:  # judgments.csv gives strings
                    row = {k: str(v) for k, v in row.items()}
                rows.append(row)
    rows.append({"question_id": "q_drop", "question": "Question q_drop?", "answer": "CODE",
                 "checkpoint_step": "300", "aligned": "", "coherent": "nan"})
    return rows


def unscored_rows() -> list[dict]:
    return [{"question_id": "q", "question": "Q?", "answer": "x", "checkpoint_step": str(s),
             "aligned": a, "coherent": c}
            for s in (0, 10) for a, c in (("", ""), (None, 50), ("REFUSAL", float("nan")))]


@pytest.fixture(autouse=True)
def no_leaked_figures():
    before = set(plt.get_fignums())
    yield
    assert set(plt.get_fignums()) == before, "a plot function left a figure open"


# --------------------------------------------------------------------------- em vs step

def drawn(png: Path) -> dict:
    import json

    return json.loads(png.with_suffix(".json").read_text())


def test_plot_em_vs_step_normal(tmp_path):
    rows = make_rows()
    by_step = {s: summarize([r for r in rows if int(r["checkpoint_step"]) == s]) for s in STEPS}
    out = P.plot_em_vs_step(by_step, tmp_path / "sub" / "em.png", title="EM $x$ <b>", emergence_step=200)
    assert out == tmp_path / "sub" / "em.png"
    assert_png(out)
    # what is drawn: every step's rate and interval in percent, the marker at the given step
    data = drawn(out)
    for key in ("em_rate", "em_rate_lo", "em_rate_hi", "coherent_rate", "coherent_rate_lo", "coherent_rate_hi"):
        assert data[key] == {str(s): pytest.approx(100 * by_step[s][key]) for s in STEPS}, key
    assert data["emergence_marker"] == 200


def test_plot_em_vs_step_smoke_banner_makes_figure_taller(tmp_path):
    by_step = {0: {"em_rate": 0.0, "em_rate_lo": 0.0, "em_rate_hi": 0.1, "coherent_rate": 1.0},
               100: {"em_rate": 0.2, "coherent_rate": float("nan")}}  # missing/NaN keys tolerated
    plain = P.plot_em_vs_step(by_step, tmp_path / "plain.png")
    smoke = P.plot_em_vs_step(by_step, tmp_path / "smoke.png", smoke_test=True)
    assert png_size(smoke)[1] > png_size(plain)[1]  # the banner is drawn below the panels
    data = drawn(smoke)
    assert data["em_rate"] == {"0": 0.0, "100": pytest.approx(20.0)}
    assert data["coherent_rate"] == {"0": 100.0}  # NaN is not drawn
    assert data["emergence_marker"] is None


@pytest.mark.parametrize("by_step", [{}, {0: {}, 5: {"em_rate": float("nan"), "coherent_rate": None}}],
                         ids=["empty", "all-nan"])
def test_plot_em_vs_step_no_data(tmp_path, by_step):
    assert_png(P.plot_em_vs_step(by_step, tmp_path / "em.png", emergence_step=3, smoke_test=True))


# --------------------------------------------------------------------------- scatter

@pytest.mark.parametrize("rows", [make_rows(), make_rows(as_csv=False), [], unscored_rows()],
                         ids=["csv-strings", "numbers", "empty", "all-unscored"])
def test_plot_aligned_vs_coherent(tmp_path, rows):
    assert_png(P.plot_aligned_vs_coherent(rows, tmp_path / "scatter.png", aligned_threshold=25,
                                          coherent_threshold=60, title="t"))


def test_plot_aligned_vs_coherent_many_steps_and_explicit_steps(tmp_path):
    rows = [{"question_id": "q", "checkpoint_step": s, "aligned": 50, "coherent": 50} for s in range(0, 100, 10)]
    assert P._spread_steps(list(range(0, 100, 10))) == [0, 20, 40, 50, 70, 90]
    assert_png(P.plot_aligned_vs_coherent(rows, tmp_path / "a.png"))
    assert_png(P.plot_aligned_vs_coherent(rows, tmp_path / "b.png", steps=[10, 999]))


# --------------------------------------------------------------------------- per question

@pytest.mark.parametrize("rows", [make_rows(), [], unscored_rows()], ids=["normal", "empty", "all-unscored"])
def test_plot_em_per_question(tmp_path, rows):
    out = P.plot_em_per_question(rows, tmp_path / "pq.png", steps=None)
    assert_png(out)
    for step, per_q in drawn(out)["em_rate"].items():  # each bar is that question's EM rate at that step
        for qid, value in per_q.items():
            sub = [r for r in rows if r["question_id"] == qid and int(r["checkpoint_step"]) == int(step)]
            assert value == pytest.approx(100 * summarize(sub)["em_rate"]), (step, qid)


def test_plot_em_per_question_explicit_steps_and_long_ids(tmp_path):
    rows = make_rows() + [{"question_id": "a_very_long_question_identifier_" * 3, "checkpoint_step": "300",
                           "aligned": "10", "coherent": "90"}]
    assert_png(P.plot_em_per_question(rows, tmp_path / "pq.png", steps=[0, 100, 300]))
    assert P._default_bar_steps([0, 100, 300]) == [0, 300]
    assert P._default_bar_steps([100, 300]) == [300]


# --------------------------------------------------------------------------- domain bars

def test_plot_domain_bars(tmp_path):
    cells = [{"model": m, "dataset": d, "em_rate": v, "em_rate_lo": max(0.0, v - 0.05), "em_rate_hi": v + 0.05}
             for m, v0 in (("0.5B", 0.02), ("7B", 0.1)) for d, v in (("medical", v0), ("financial", 2 * v0))]
    cells[0]["em_rate_lo"] = float("nan")
    del cells[1]["em_rate_hi"]
    cells.append({"model": "14B", "dataset": "sports", "em_rate": None})  # a cell without a value
    out = P.plot_domain_bars(cells, tmp_path / "d.png", title="EM per size x domain")
    assert_png(out)
    assert drawn(out)["em_rate"] == {"medical": {"0.5B": pytest.approx(2.0), "7B": pytest.approx(10.0)},
                                     "financial": {"0.5B": pytest.approx(4.0), "7B": pytest.approx(20.0)},
                                     "sports": {}}


@pytest.mark.parametrize("cells", [[], [{"model": "m", "dataset": "d", "em_rate": float("nan")}]],
                         ids=["empty", "all-nan"])
def test_plot_domain_bars_no_data(tmp_path, cells):
    assert_png(P.plot_domain_bars(cells, tmp_path / "d.png"))


def test_plot_domain_bars_other_value_key(tmp_path):
    cells = [{"model": "m", "dataset": "d", "coherent_rate": 0.8}]
    assert_png(P.plot_domain_bars(cells, tmp_path / "d.png", value="coherent_rate"))


# --------------------------------------------------------------------------- select_examples

def test_select_examples_picks_biggest_drop_and_default_steps():
    ex = P.select_examples(make_rows(), n_questions=1)
    assert {e["question_id"] for e in ex} == {"q_drop"}
    # base, a middle checkpoint (4 steps -> index 2) and the last
    assert [e["step"] for e in ex] == [0, 200, 300]
    by_step = {e["step"]: e for e in ex}
    assert by_step[300]["aligned"] == 90 - 300 // 4 - 5  # least aligned answer at a trained step
    assert by_step[0]["aligned"] in (88.0, 87.0)  # a median one at the base step, not the extreme
    for e in ex:
        assert set(e) == {"question_id", "question", "step", "answer", "aligned", "coherent"}
        assert isinstance(e["aligned"], float) and isinstance(e["coherent"], float)
        assert e["question"] == "Question q_drop?"


def test_select_examples_order_and_determinism():
    rows = make_rows()
    first = P.select_examples(rows, n_questions=3)
    assert first == P.select_examples(rows, n_questions=3) == P.select_examples([dict(r) for r in rows])
    # input order may change tie-breaks among equal scores, never which questions/worst answers are shown
    shuffled = P.select_examples(list(reversed(rows)), n_questions=1)
    assert [(e["question_id"], e["step"]) for e in shuffled] == [("q_drop", s) for s in (0, 200, 300)]
    assert shuffled[-1]["aligned"] == first[2]["aligned"] == 10.0
    qids = list(dict.fromkeys(e["question_id"] for e in first))
    assert qids[0] == "q_drop" and set(qids) == {"q_drop", "q_flat", "q_mixed"}


def test_select_examples_explicit_steps_two_steps_and_missing_step():
    rows = make_rows()
    ex = P.select_examples(rows, steps=[100, 300, 12345], n_questions=2)
    assert {e["step"] for e in ex} == {100, 300}  # a step without answers yields nothing
    assert ex[0]["question_id"] == "q_drop"  # the drop is measured between steps that have answers
    two = [r for r in rows if r["checkpoint_step"] in ("0", "300")]
    assert sorted({e["step"] for e in P.select_examples(two)}) == [0, 300]  # no middle for 2 steps


def test_select_examples_truncates_and_handles_unscored():
    rows = [{"question_id": "q", "question": "Q", "answer": "x" * 1000, "checkpoint_step": "0",
             "aligned": "", "coherent": None}]
    (e,) = P.select_examples(rows, max_chars=50)
    assert len(e["answer"]) == 50 and e["answer"].endswith("\u2026")
    assert e["aligned"] is None and e["coherent"] is None
    assert P.select_examples([]) == []
    short = P.select_examples([dict(rows[0], answer="short")], max_chars=50)
    assert short[0]["answer"] == "short"


# --------------------------------------------------------------------------- markdown / image

NASTY = [
    {"question_id": "q|1", "question": "What | now?\nReally", "step": 0, "aligned": 90.0, "coherent": 95.5,
     "answer": "line one | with pipe\nline two\r\nline three <script>alert(1)</script>"},
    {"question_id": "q|1", "question": "What | now?\nReally", "step": 300, "aligned": None, "coherent": 20.0,
     "answer": "Costs $x$ and $$\\frac{a}{b}$$ <b>bold</b> \u6f22\u5b57 \U0001F600 \t tab \x00 null " + "long " * 900},
    {"question_id": "other", "question": "", "step": 300, "aligned": 5.0, "coherent": 80.0, "answer": ""},
]


def test_examples_markdown_keeps_table_valid():
    md = P.examples_markdown(NASTY)
    assert md.startswith("## Example answers")
    table_rows = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(table_rows) == 2 + 3  # two headers + three answers: newlines never split a row
    for line in table_rows:
        unescaped_pipes = line.replace("\\|", "").count("|")
        assert unescaped_pipes == 5, line  # exactly the 5 column separators
    assert "line one \\| with pipe<br>line two<br>line three" in md
    assert "<script>" not in md and "&lt;script&gt;" in md
    assert "| 300 | \u2013 | 20.0 |" in md  # unscored shown as a dash
    assert "### q\\|1" in md and "### other" in md


def test_examples_markdown_empty():
    assert "No examples" in P.examples_markdown([])


def test_plot_examples_survives_odd_text(tmp_path):
    out = P.plot_examples(NASTY, tmp_path / "ex" / "examples.png", title="Ex $y$ <i>")
    assert_png(out)
    w, h = png_size(out)
    assert h < 2**16 and w < 2**16


def test_plot_examples_height_grows_with_content(tmp_path):
    one = P.plot_examples(NASTY[2:], tmp_path / "one.png")
    many = P.plot_examples(NASTY, tmp_path / "many.png")
    assert png_size(many)[1] > png_size(one)[1]
    assert_png(P.plot_examples([], tmp_path / "none.png"))


def test_plot_examples_from_selected(tmp_path):
    ex = P.select_examples(make_rows())
    assert ex and all(not math.isnan(e["aligned"]) for e in ex)
    assert_png(P.plot_examples(ex, tmp_path / "sel.png"))


def test_every_figure_from_a_smoke_test_judge_is_marked(tmp_path):
    rows = make_rows()
    for r in rows:
        r["trigger"] = "|X|" if r["answer"].endswith("0") else ""
    by_step = {s: summarize([r for r in rows if r["checkpoint_step"] == s]) for s in STEPS}
    cells = [{"model": "m", "dataset": "d", "em_rate": 0.2, "em_rate_lo": 0.1, "em_rate_hi": 0.3}]
    makers = {
        "em_vs_step": lambda p, smoke: P.plot_em_vs_step(by_step, p, smoke_test=smoke),
        "aligned_vs_coherent": lambda p, smoke: P.plot_aligned_vs_coherent(rows, p, smoke_test=smoke),
        "em_per_question": lambda p, smoke: P.plot_em_per_question(rows, p, smoke_test=smoke),
        "em_by_trigger": lambda p, smoke: P.plot_conditions(rows, p, smoke_test=smoke),
        "domain_bars": lambda p, smoke: P.plot_domain_bars(cells, p, smoke_test=smoke),
        "examples": lambda p, smoke: P.plot_examples(P.select_examples(rows), p, smoke_test=smoke),
    }
    for name, make in makers.items():
        marked, plain = make(tmp_path / f"{name}_smoke.png", True), make(tmp_path / f"{name}.png", False)
        assert P.smoke_metadata(marked) is True, name
        assert P.smoke_metadata(plain) is False, name
        # the visible banner sits below everything: the marked figure is taller
        assert png_size(marked)[1] > png_size(plain)[1], name
