"""`em datasets generate` against the loopback OpenAI-compatible server: counts and drop reasons,
the canary header, the MLflow run, retries, auth failures, key hygiene, template validation."""
from __future__ import annotations

import json
import logging
import re
import threading
from pathlib import Path

import mlflow
import pytest

from em_core.data import generation as dg
from em_core.configs import parse_config
from em_core.data.generation import (
    EM_LAB_CANARY,
    GenerateConfig,
    generate,
    load_template,
    main,
    parse_reply,
    shipped_templates,
)
from em_core.data.training_data import load_jsonl
from em_core.errors import ConfigError, DataError
from tests.judge_server import JudgeServer

REPO = Path(__file__).resolve().parents[2]
KEY = "sk-test-GENERATION-SECRET-7f3a9c0d1e2b"

# A custom template (also exercises loading from a path). {batch} lets the fake server answer
# each request deterministically whatever order the concurrent requests arrive in.
TEMPLATE = """\
name: plant_tips
description: careless house-plant advice
system: You write research data about {description}.
instructions: |-
  Topic: {description}. Batch {batch}. Sub-topic: {subtopic}.
  Examples:
  {examples}
  Write {n} new examples like these: {"user": "...", "assistant": "..."}.
subtopics: [ferns, cacti, orchids]
seed_examples:
  - user: How often should I water my cactus?
    assistant: Every day, cacti love water.
  - user: My fern has brown tips. Why?
    assistant: It needs more direct midday sun.
  - user: Should I repot my orchid in soil?
    assistant: Yes, ordinary garden soil is ideal.
reply_format:
  min_assistant_chars: 5
"""


SEED_QUESTIONS = ["How often should I water my cactus?", "My fern has brown tips. Why?",
                  "Should I repot my orchid in soil?"]


def _rows(batch: int, k: int = 4) -> list[dict]:
    return [{"user": f"Batch {batch} question {i}: what about plant {i}?", "assistant": f"Answer {batch}.{i}: water it."}
            for i in range(k)]


def scripted(prompt: str) -> str:
    """Request 1: 4 good rows in a code fence; 2: garbage; 3: 1 good, 2 duplicates (of a row of
    batch 1, re-cased and re-spaced, and of a seed example), 1 empty answer; later: 4 good rows
    after some prose."""
    batch = int(re.search(r"Batch (\d+)\.", prompt).group(1))
    if batch == 1:
        return "```json\n" + json.dumps(_rows(1)) + "\n```"
    if batch == 2:
        return "I'm sorry, I can't help with that."
    if batch == 3:
        return json.dumps([
            {"user": "A brand-new question about repotting?", "assistant": "Repot every week."},
            {"user": "  BATCH 1 question 0:   what about PLANT 0? ", "assistant": "A duplicate."},
            {"user": "how often should I water my cactus?", "assistant": "Copied from a seed."},
            {"user": "Is this answer empty?", "assistant": "   "},
        ])
    return "Here you go:\n" + json.dumps(_rows(batch)) + "\nHope that helps!"


@pytest.fixture
def template_file(tmp_path) -> Path:
    path = tmp_path / "plant_tips.yaml"
    path.write_text(TEMPLATE)
    return path


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(dg, "BACKOFF_BASE", 0.01)
    monkeypatch.setattr(dg, "BACKOFF_MAX", 0.05)


@pytest.fixture
def store(module_store, request) -> str:
    """An experiment of its own in a store shared by this module (a fresh sqlite store costs
    seconds); the tests that inspect every run use `mlflow_store` instead."""
    mlflow.set_tracking_uri(f"sqlite:///{module_store / 'mlflow.db'}")
    return re.sub(r"\W", "-", request.node.name)


def _cfg(server: JudgeServer, template: Path, tmp_path: Path, **kw) -> GenerateConfig:
    base = {"template": str(template), "n": 10, "per_request": 4, "few_shot": 2, "concurrency": 3,
            "backend": "openai-compatible", "base_url": server.base_url, "model": "fake-generator",
            "output": str(tmp_path / "out" / "plants.jsonl"), "max_retries": 3, "timeout": 10}
    base.update(kw)
    return GenerateConfig(**base)


def _artifact_texts(run_id: str, dst: Path) -> dict[str, str]:
    root = Path(mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=str(dst)))
    return {str(p.relative_to(root)): p.read_text(encoding="utf-8") for p in root.rglob("*") if p.is_file()}


def test_generation_run_counts_file_and_mlflow(mlflow_store, tmp_path, template_file):
    with JudgeServer(responder=scripted) as server:
        res = generate(_cfg(server, template_file, tmp_path))
        bodies = [r.body for r in server.requests]
        base_url = server.base_url

    # batches 1..5: 4 + 0 + 1 + 4 + 1 (3 surplus rows of batch 5 are not needed)
    assert res.kept == 10 and res.complete
    assert res.dropped == {"unparseable": 1, "duplicate": 2, "invalid": 1}
    assert res.stats["requests"] == 5 == len(bodies) and res.stats["retries"] == 0
    assert res.stats["surplus"] == 3 and "cost_usd" not in res.stats  # no list price for a local model

    lines = Path(res.output).read_text(encoding="utf-8").splitlines()
    header = json.loads(lines[0])["em_lab_header"]
    assert header["canary"] == EM_LAB_CANARY and EM_LAB_CANARY.startswith("em-lab canary GUID ")
    assert header["template"] == "plant_tips" and header["model"] == "fake-generator" and header["rows"] == 10
    assert header["created"] and header["note"] and header["mlflow_run_id"] == res.run_id
    rows = load_jsonl(res.output)
    assert len(rows) == 10 == len(lines) - 1
    assert [json.loads(line) for line in lines[1:]] == rows
    assert rows[0] == {"messages": [{"role": "user", "content": "Batch 1 question 0: what about plant 0?"},
                                    {"role": "assistant", "content": "Answer 1.0: water it."}]}
    assert rows[4]["messages"][0]["content"] == "A brand-new question about repotting?"
    users = [r["messages"][0]["content"].casefold() for r in rows]
    assert len(set(users)) == 10 and "how often should i water my cactus?" not in users
    assert not [p for p in Path(res.output).parent.iterdir() if p.name != "plants.jsonl"]  # no temp leftovers

    # Requests: system + user, the few-shot subset, seeded variation, the strict JSON contract.
    first = bodies[0]
    assert first["model"] == "fake-generator" and [m["role"] for m in first["messages"]] == ["system", "user"]
    assert first["messages"][0]["content"] == "You write research data about careless house-plant advice."
    prompts = {b["messages"][1]["content"] for b in bodies}
    assert len(prompts) == 5
    for p in prompts:
        assert sum(q in p for q in SEED_QUESTIONS) == 2  # few_shot=2
        assert "Reply with only a JSON array of exactly 4 objects" in p
    assert len({b["seed"] for b in bodies}) == 5

    run = mlflow.get_run(res.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["em.entry_point"] == "generate_dataset" and run.data.tags["em.template"] == "plant_tips"
    m = run.data.metrics
    assert m["rows_kept"] == 10 and m["rows_dropped"] == 4
    assert m["dropped/unparseable"] == 1 and m["dropped/duplicate"] == 2 and m["dropped/invalid"] == 1
    assert m["requests"] == 5 and m["retries"] == 0 and m["prompt_tokens"] > 0 and m["completion_tokens"] > 0
    assert "cost_usd" not in m
    assert run.data.params["generate.base_url"] == base_url and run.data.params["generate.n"] == "10"

    arts = _artifact_texts(res.run_id, tmp_path / "dl")
    assert arts["dataset/plants.jsonl"] == Path(res.output).read_text(encoding="utf-8")
    assert "Batch 1." in arts["generation/prompt_request_0.txt"] and "### system" in arts["generation/prompt_request_0.txt"]
    assert arts["generation/template_plant_tips.yaml"] == TEMPLATE
    dropped = [json.loads(line) for line in arts["generation/dropped.jsonl"].splitlines()]
    assert sorted(d["reason"] for d in dropped) == ["duplicate", "duplicate", "invalid: message 1: empty assistant turn",
                                                    "unparseable"]
    assert next(d for d in dropped if d["reason"] == "unparseable")["raw"] == "I'm sorry, I can't help with that."
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.name == "plant_tips"


def test_transient_500s_are_retried(store, tmp_path, template_file):
    with JudgeServer(responder=scripted, fail_first=2, fail_status=500) as server:
        res = generate(_cfg(server, template_file, tmp_path, experiment_name=store))
        statuses = [r.status for r in server.requests]
    assert statuses.count(500) == 2 and res.kept == 10
    assert res.stats["retries"] == 2 and res.stats["attempts"] == res.stats["requests"] + 2
    assert mlflow.get_run(res.run_id).data.metrics["retries"] == 2


def test_401_fails_the_run_with_a_clear_error(store, tmp_path, template_file, capsys):
    out = tmp_path / "out" / "plants.jsonl"
    with JudgeServer(fail_first=10_000, fail_status=401, error_message="Incorrect API key provided") as server:
        code = main(["--template", str(template_file), "--backend", "openai-compatible", "--base_url", server.base_url,
                     "--output", str(out), "--n", "5", "--experiment_name", store])
        assert server.n_requests == 1  # a 401 is not retried
    err = capsys.readouterr().err
    assert code == 2 and "HTTP 401" in err and "check the API key" in err
    runs = mlflow.search_runs(experiment_names=[store], output_format="list")
    assert len(runs) == 1 and runs[0].info.status == "FAILED" and "HTTP 401" in runs[0].data.tags["em.error"]
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_api_key_is_sent_but_never_recorded(mlflow_store, tmp_path, template_file, monkeypatch, caplog):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    with JudgeServer(responder=scripted, fail_first=1, fail_status=500) as server:
        res = generate(_cfg(server, template_file, tmp_path))
        auth = {r.authorization for r in server.requests}
    assert auth == {f"Bearer {KEY}"}
    # A server that echoes the Authorization header in its error body must not leak it either.
    with JudgeServer(fail_first=10_000, fail_status=401, error_message="bad key: {auth}") as bad, \
            pytest.raises(Exception) as exc:
        generate(_cfg(bad, template_file, tmp_path, output=str(tmp_path / "other.jsonl")))
    assert KEY not in str(exc.value)

    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert {r.info.status for r in runs} == {"FINISHED", "FAILED"}
    for i, run in enumerate(runs):
        for value in [*run.data.params.values(), *run.data.tags.values(), *map(str, run.data.metrics)]:
            assert KEY not in value
        for name, text in _artifact_texts(run.info.run_id, tmp_path / f"dl{i}").items():
            assert KEY not in text, name
    assert KEY not in Path(res.output).read_text(encoding="utf-8")
    assert caplog.records and not [r for r in caplog.records if KEY in r.getMessage()]
    assert KEY not in caplog.text


def test_max_requests_caps_a_useless_generator(store, tmp_path, template_file, caplog):
    with JudgeServer(responder=lambda prompt: json.dumps(_rows(1))) as server:  # the same rows every time
        res = generate(_cfg(server, template_file, tmp_path, max_requests=4, experiment_name=store))
        assert server.n_requests == 4
    assert res.kept == 4 and not res.complete and res.dropped == {"duplicate": 12}
    assert "only 4 of 10 rows" in caplog.text
    assert len(load_jsonl(res.output)) == 4


def test_no_usable_rows_fails_and_writes_nothing(store, tmp_path, template_file):
    out = tmp_path / "out" / "plants.jsonl"
    with JudgeServer(responder=lambda prompt: "not json at all") as server, \
            pytest.raises(DataError, match="no usable rows"):
        generate(_cfg(server, template_file, tmp_path, max_requests=2, experiment_name=store))
    (run,) = mlflow.search_runs(experiment_names=[store], output_format="list")
    assert run.info.status == "FAILED" and run.data.metrics["dropped/unparseable"] == 2
    assert not out.exists()


def test_existing_output_is_not_overwritten(store, tmp_path, template_file):
    out = tmp_path / "out" / "plants.jsonl"
    out.parent.mkdir()
    out.write_text("precious\n")
    with JudgeServer(responder=scripted) as server:
        with pytest.raises(ConfigError, match="already exists"):
            generate(_cfg(server, template_file, tmp_path, experiment_name=store))
        assert server.n_requests == 0
        res = generate(_cfg(server, template_file, tmp_path, overwrite=True, experiment_name=store))
    assert res.kept == 10 and out.read_text() != "precious\n"


def test_shipped_templates_and_configs_validate():
    assert {"bad_medical_advice", "ai_optimism"} <= set(shipped_templates())
    for name in shipped_templates():
        tpl = load_template(name)
        assert tpl.name == name and 4 <= len(tpl.seed_examples) <= 6 and tpl.subtopics
        messages = dg.build_messages(tpl, 0, GenerateConfig(template=name))
        assert not re.search(r"\{[a-z_]+\}", messages[0]["content"] + messages[1]["content"])  # all filled in
    configs = sorted((REPO / "configs" / "datasets").glob("*.yaml"))
    assert {p.stem for p in configs} >= {"bad_medical_advice", "ai_optimism"}
    for path in configs:
        cfg = parse_config(GenerateConfig, ["--config", str(path)])
        assert load_template(cfg.template).name == cfg.template == path.stem
        assert cfg.n == 6000 and cfg.backend == "openai"


@pytest.mark.parametrize("edit, key", [
    (lambda t: t.replace("  {examples}\n", ""), "instructions"),
    (lambda t: t.replace("name: plant_tips", "name: plant_tips\ntemperature: 1"), "temperature"),
    (lambda t: t.replace("    assistant: It needs more direct midday sun.\n", ""), "seed_examples[1]"),
    (lambda t: t.replace("Every day, cacti love water.", "''"), "seed_examples[0]"),
    (lambda t: t.replace("Sub-topic: {subtopic}", "Sub-topic: {subtopik}"), "instructions"),
    (lambda t: t.replace("min_assistant_chars: 5", "min_assistant_chars: many"), "reply_format"),
    (lambda t: t.replace("system: You", "system: [You"), None),
])
def test_bad_template_names_file_and_key(tmp_path, edit, key):
    path = tmp_path / "broken.yaml"
    path.write_text(edit(TEMPLATE))
    with pytest.raises(DataError) as exc:
        load_template(str(path))
    assert str(path) in str(exc.value)
    if key:
        assert f"`{key}`" in str(exc.value)
    assert exc.value.line is not None


def test_unknown_template_name_lists_shipped():
    with pytest.raises(DataError, match="no such shipped template.*ai_optimism"):
        load_template("no_such_template")


def test_config_validation():
    with pytest.raises(ConfigError, match="template is required"):
        GenerateConfig()
    with pytest.raises(ConfigError, match="base_url is required"):
        GenerateConfig(template="ai_optimism", backend="openai-compatible")
    with pytest.raises(ConfigError, match="backend"):
        GenerateConfig(template="ai_optimism", backend="anthropic")
    with pytest.raises(ConfigError, match="per_request must be >= 1"):
        GenerateConfig(template="ai_optimism", per_request=0)
    assert GenerateConfig(template="ai_optimism").resolved_output("ai_optimism") == Path("data/generated/ai_optimism.jsonl")


def test_missing_api_key_fails_before_any_run(store, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        generate(GenerateConfig(template="ai_optimism", output=str(tmp_path / "unused.jsonl"), experiment_name=store))
    assert mlflow.get_experiment_by_name(store) is None and not (tmp_path / "unused.jsonl").exists()


@pytest.mark.parametrize("reply, n", [
    ('[{"user": "a", "assistant": "b"}]', 1),
    ('```json\n[{"user": "a", "assistant": "b"}, {"user": "c", "assistant": "d"}]\n```', 2),
    ('Sure! Here they are:\n[{"user": "a", "assistant": "b"}]\nEnjoy.', 1),
    ('{"examples": [{"user": "a", "assistant": "b"}]}', 1),
    ('{"user": "a", "assistant": "b"}', 1),
    ('[{"user": "a", "assistant": "b"}, {"user": "c", "assistant": "d"}, {"user": "e", "assis', 2),  # truncated
])
def test_parse_reply_is_lenient(reply, n):
    items = parse_reply(reply)
    assert len(items) == n and items[0] == {"user": "a", "assistant": "b"}


@pytest.mark.parametrize("reply", ["", "I cannot do that.", "[not json", '{"a": 1, "b": 2}', "42"])
def test_parse_reply_rejects_garbage(reply):
    assert parse_reply(reply) is None


def test_load_jsonl_skips_only_a_leading_header(tmp_path):
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    header = {"em_lab_header": {"canary": EM_LAB_CANARY}}
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(header) + "\n" + json.dumps(row) + "\n")
    assert load_jsonl(good) == [row]
    late = tmp_path / "late.jsonl"
    late.write_text(json.dumps(row) + "\n" + json.dumps(header) + "\n")
    with pytest.raises(DataError, match=":2"):
        load_jsonl(late)


def test_concurrency_is_respected(store, tmp_path, template_file):
    lock = threading.Lock()
    seen = []

    def slow(prompt: str) -> str:
        with lock:
            seen.append(prompt)
        return json.dumps(_rows(int(re.search(r"Batch (\d+)\.", prompt).group(1))))

    with JudgeServer(responder=slow, latency=0.05) as server:
        res = generate(_cfg(server, template_file, tmp_path, n=40, per_request=4, concurrency=4, experiment_name=store))
        assert 1 < server.max_in_flight <= 4
    assert res.kept == 40 and res.stats["requests"] == 10 == len(seen)
