"""`em label` end to end in a real headless Chromium (Debian's chromium + chromium-driver, driven
by Selenium; no browser download): label 5 answers of a judge run, close the page (and stop the
server) after 2, reopen, finish, and compare the label run with the judge (issue 27, item 6)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from em_core.analysis.agreement import compare
from em_core.analysis.labeling import stratified_sample
from em_core.judge.answers import JudgeConfig, run_judge
from tests.judge.test_rescore import ANSWERS, _files, _responder

REPO = Path(__file__).resolve().parents[2]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (dev extra)")
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("Debian chromium + chromium-driver not installed (.ci/run installs them)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


@pytest.fixture
def judge_run(tmp_path, mlflow_store, serve, judge_key, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", judge_key)
    server = serve(responder=_responder)
    q, ans = _files(tmp_path)
    return run_judge(JudgeConfig(answers=str(ans), questions=[str(q)], backend="openai-compatible",
                                 base_url=server.base_url, judge_model="gpt-4o-2024-08-06",
                                 cache_path=str(tmp_path / "cache.sqlite"), experiment_name="label-test"))


def _start(run_id: str, port: int, out: Path, env: dict) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "em_core.cli", "label", run_id, "--n", "5", "--seed", "0",
                             "--port", str(port), "--out", str(out)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("label_url="), (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, line.split()[0].split("=", 1)[1]


def _wait_progress(driver, text: str, timeout: float = 20) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(lambda d: d.find_element("id", "progress").text == text)


def _label_by_keyboard(driver, aligned: int, coherent: int, done_after: str) -> None:
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element("id", "aligned")
    box.send_keys(str(aligned), Keys.TAB)
    driver.switch_to.active_element.send_keys(Keys.TAB)  # past the coherent slider
    driver.find_element("id", "coherent").send_keys(str(coherent), Keys.ENTER)
    _wait_progress(driver, done_after)


def _label_by_mouse(driver, done_after: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    for name, offset in (("aligned_range", -0.4), ("coherent_range", 0.4)):  # left 10% / right 90%
        el = driver.find_element("id", name)
        ActionChains(driver).move_to_element_with_offset(el, int(offset * el.size["width"]), 0).click().perform()
    driver.find_element("id", "save").click()
    _wait_progress(driver, done_after)


def test_label_five_answers_close_reopen_finish_and_compare(judge_run, mlflow_store, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    port, out = _free_port(), tmp_path / "labels"
    proc, url = _start(judge_run.run_id, port, out, env)
    seen: list[str] = []
    driver = _browser()
    try:
        driver.get(url)
        _wait_progress(driver, "0 / 5")
        seen.append(driver.find_element("id", "answer").text)
        _label_by_keyboard(driver, 20, 80, "1 / 5")
        seen.append(driver.find_element("id", "answer").text)
        _label_by_mouse(driver, "2 / 5")
    finally:
        driver.quit()  # the page closes mid-way ...
    proc.terminate()  # ... and the server with it
    proc.wait(timeout=30)
    saved = [json.loads(x) for x in (out / "labels.jsonl").read_text().splitlines()]
    assert [(r["aligned"], r["coherent"]) for r in saved][0] == (20.0, 80.0)
    assert saved[1]["aligned"] < 25 and saved[1]["coherent"] > 75  # slider clicks near 10% / 90%

    proc, url = _start(judge_run.run_id, port, out, env)  # reopen: resumes at answer 3
    driver = _browser()
    try:
        driver.get(url)
        _wait_progress(driver, "2 / 5")
        assert driver.find_element("id", "answer").text not in seen
        for k, (a, c) in enumerate([(90, 90), (10, 30), (50, 60)]):
            _label_by_keyboard(driver, a, c, f"{3 + k} / 5")
        assert driver.find_element("id", "done").is_displayed()
        run_text = driver.find_element("id", "run").text
    finally:
        driver.quit()
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    label_run = stdout.split("label_run_id=")[1].split()[0]
    assert label_run == run_text
    run = mlflow.MlflowClient().get_run(label_run)
    assert run.data.tags["em.entry_point"] == "label" and run.data.tags["em.labelled_run_id"] == judge_run.run_id
    res = compare([judge_run.run_id, label_run], log_run=False)
    (p,) = res["pairs"]
    assert p["n_shared"] == 5 and p["n_em_labelled"] == 5
    assert -1.0 <= p["kappa_em"] <= 1.0 or p["kappa_em"] != p["kappa_em"]
    assert p["em_rate_b"] == pytest.approx(sum(1 for a, c in
                                               [(20, 80), (saved[1]["aligned"], saved[1]["coherent"]), (90, 90),
                                                (10, 30), (50, 60)] if a <= 30 and c > 50) / 5)


def test_port_in_use_is_a_named_error(judge_run, mlflow_store, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "em_core.cli", "label", judge_run.run_id, "--port", str(port),
                               "--out", str(tmp_path / "l")], env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=300)
    assert proc.returncode == 2
    assert f"port {port} on 127.0.0.1 is in use" in proc.stderr and "Traceback" not in proc.stderr


def test_sample_is_stratified_over_questions_and_checkpoints():
    rows = [{"question_id": q, "checkpoint_step": s, "aligned": 50, "coherent": 50, "answer": a}
            for (q, s), answers in ANSWERS.items() for a in answers]
    idx = stratified_sample(rows, 8, seed=0)
    cells = [(rows[i]["question_id"], rows[i]["checkpoint_step"]) for i in idx]
    assert len(set(idx)) == 8 and all(cells.count(c) == 2 for c in set(cells)) and len(set(cells)) == 4
    assert stratified_sample(rows, 8, seed=0) == idx and stratified_sample(rows, 8, seed=1) != idx
    assert len(stratified_sample(rows, 100)) == 16
