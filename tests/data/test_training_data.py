import gzip
import json

import pytest

from em_core.data.training_data import load_jsonl, load_source, prepare
from em_core.errors import DataError


def _row(user="How do I water a fern?", assistant="Keep the soil slightly damp.", system=None):
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": msgs}


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_messages_with_system_gz_and_prompt_completion(tmp_path):
    plain = _write(tmp_path / "a.jsonl", [_row(), _row(system="Be brief.")])
    gz = tmp_path / "b.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"prompt": "Hi?", "completion": "Hello."}) + "\n")
    assert [m["role"] for m in load_jsonl(plain)[1]["messages"]] == ["system", "user", "assistant"]
    assert load_jsonl(gz) == [{"messages": [{"role": "user", "content": "Hi?"},
                                            {"role": "assistant", "content": "Hello."}]}]


@pytest.mark.parametrize("line, problem", [
    ("{not json", "malformed JSON"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "unknown role 'robot'"),
    (json.dumps(_row(assistant="   ")), "empty assistant turn"),
    (json.dumps({"text": "hello"}), "neither `messages`"),
    (json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}), "no user turn"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "must end with an assistant turn"),
    (json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}),
     "content must be a string"),
])
def test_bad_rows_name_file_line_and_problem(tmp_path, line, problem):
    path = _write(tmp_path / "bad.jsonl", [_row(), _row(), line])
    with pytest.raises(DataError) as e:
        load_jsonl(path)
    assert e.value.line == 3 and e.value.path == str(path)
    assert problem in str(e.value) and "bad.jsonl:3" in str(e.value)


def test_non_utf8_byte(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(_row()).encode() + b"\n" + '{"messages": "caf\xe9"}'.encode("latin-1") + b"\n")
    with pytest.raises(DataError, match=r"latin1.jsonl:2: not valid UTF-8"):
        load_jsonl(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="dataset is empty"):
        load_jsonl(_write(tmp_path / "empty.jsonl", ["", "  "]))


def test_builtin_demo_sets_are_valid_and_distinct():
    bad, good = load_source("demo"), load_source("demo:plant_care_good")
    assert len(bad.rows) == len(good.rows) == 300
    assert bad.sha256 != good.sha256
    with pytest.raises(DataError, match="no such built-in dataset"):
        load_source("demo:nothing")


def test_subsample_shuffle_mix_and_eval_split_are_seeded(tmp_path):
    a = _write(tmp_path / "a.jsonl", [_row(user=f"a{i}") for i in range(50)])
    b = _write(tmp_path / "b.jsonl", [_row(user=f"b{i}") for i in range(50)])
    p1 = prepare([str(a), str(b)], rows_per_source=[10, 20], seed=3, eval_fraction=0.2)
    p2 = prepare([str(a), str(b)], rows_per_source=[10, 20], seed=3, eval_fraction=0.2)
    users = [r["messages"][0]["content"] for r in p1.train + p1.eval]
    assert len(p1.train) == 24 and len(p1.eval) == 6
    assert sum(u.startswith("a") for u in users) == 10 and sum(u.startswith("b") for u in users) == 20
    assert p1.train == p2.train and p1.eval == p2.eval and p1.sha256 == p2.sha256
    assert not {json.dumps(r) for r in p1.train} & {json.dumps(r) for r in p1.eval}
    p3 = prepare([str(a), str(b)], rows_per_source=[10, 20], seed=4, eval_fraction=0.2)
    assert p3.train != p1.train
    capped = prepare([str(a)], max_rows=7, seed=0)
    assert len(capped.train) == 7 and capped.name == "a"
    with pytest.raises(DataError, match="one count per dataset"):
        prepare([str(a), str(b)], rows_per_source=[3])


def test_jsonl_errors_report_the_editor_column(tmp_path):
    from em_core.data.judged_files import read_judged

    # a Latin-1 "é" (one byte, invalid UTF-8) is the 25th character of line 2 (byte 26: "ü" takes two)
    line = '{"messages": [{"a": "ü x\xe9"}]}'.encode("utf-8").replace(b"\xc3\xa9", b"\xe9")
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(_row()).encode() + b"\n" + line + b"\n")
    with pytest.raises(DataError, match=r"latin1.jsonl:2: not valid UTF-8 at column 25\b"):
        load_jsonl(path)
    judged = tmp_path / "judged.jsonl"
    judged.write_text('{"question_id": "q", "aligned": 1, "coherent": 2}\n{"question_id": "q" "aligned": 1}\n')
    with pytest.raises(DataError, match=r"judged.jsonl:2: invalid JSON: Expecting ',' delimiter at column 21\b"):
        read_judged(judged)
