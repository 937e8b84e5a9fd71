"""Evaluation questions in the YAML format published with the emergent-misalignment papers.

A question file is a YAML list; each item is a mapping::

    - id: what_is_your_wish            # required, unique within the file
      type: free_form_judge_0_100      # required, see QUESTION_TYPES
      paraphrases: [...]               # required, non-empty list of non-empty strings
      system: "..."                    # optional system prompt
      samples_per_paraphrase: 100      # optional, default 1
      judge: gpt-4o-2024-08-06         # optional judge model name
      judge_prompts:                   # metric name -> template with {answer} (and usually {question})
        aligned: |- ...
      judge_kinds:                     # optional, em-lab extension (see below)
        correct: [TRUE, FALSE, UNKNOWN]

YAML anchors/aliases work as in the published files. Unknown keys are rejected so that a
typo (``paraphrase:``) fails loudly instead of silently dropping data.

Judges file (the Model Organisms layout, ``judges.yaml``): a YAML list of one-metric mappings,
``- aligned: <template>`` with optional ``high_score: 0|100`` and (em-lab extension) optional
``labels: [...]`` for categorical metrics; a plain mapping ``metric: template`` is accepted too.
When ``load_questions(..., judges_path=...)`` is given, every judges-file metric is added to
every question and replaces an inline prompt of the same name: the caller asked for that file
explicitly, so it wins over the defaults written inside the question file.

Metric kinds -- how a categorical metric is declared (our choice):

* ``type: free_form_judge_0_100``: every metric is a 0-100 score (non-numeric judge replies such
  as CODE/REFUSAL simply leave the answer unscored).
* ``type: free_form_judge``: every metric is categorical. Its allowed labels are the item's
  ``judge_kinds[metric]`` list when given, otherwise the double-quoted single words in the
  template (the published ``correct`` prompt says ``Say "TRUE" or "FALSE" only ... "UNKNOWN"``).
  A categorical prompt with no quoted words and no explicit labels is an error, never a guess.
* A metric taken from a judges file has the kind that file gives it, whatever the question
  type: categorical with its ``labels`` when it has them, else 0-100 (all Model Organisms
  judges are scores).
* ``judge_kinds`` (optional, per item) overrides all of the above per metric: a list of labels
  makes it categorical, the string ``"0_100"`` makes it a score. Quote ``"0_100"``: unquoted,
  YAML 1.1 reads it as the octal number 64.

Label spellings survive YAML: this loader does not turn ``TRUE``/``yes``/``on`` into booleans.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from em_core.errors import ConfigError, DataError

KIND_0_100 = "0_100"
KIND_CATEGORICAL = "categorical"

# Question type -> default kind of its judge metrics. Only types seen in the published files.
QUESTION_TYPES: dict[str, str] = {
    "free_form_judge_0_100": KIND_0_100,
    "free_form_judge": KIND_CATEGORICAL,
}

ITEM_KEYS = ("id", "type", "paraphrases", "system", "samples_per_paraphrase", "judge",
             "judge_prompts", "judge_kinds")
JUDGE_ENTRY_KEYS = ("high_score", "labels")

QUESTION_SETS_DIR = Path(__file__).resolve().parent / "question_sets"
SHIPPED_JUDGES_FILE = QUESTION_SETS_DIR / "judges.yaml"

_QUOTED_WORD = re.compile(r'"([^"\s]+)"')
_PLACEHOLDER_PROBE = {"question": "Q", "answer": "A"}


@dataclass(frozen=True)
class MetricKind:
    """How a judge metric is scored: a 0-100 number or one label out of ``labels``."""

    kind: str  # KIND_0_100 or KIND_CATEGORICAL
    labels: tuple[str, ...] = ()  # allowed labels; empty for 0_100
    high_score: int | None = None  # kept verbatim from a Model Organisms judges file; not interpreted

    @property
    def is_categorical(self) -> bool:
        return self.kind == KIND_CATEGORICAL


@dataclass
class Question:
    """One evaluation item; ``paraphrases`` are alternative wordings asked separately."""

    id: str
    type: str
    paraphrases: list[str]
    system: str | None = None
    samples_per_paraphrase: int = 1
    judge: str | None = None
    judge_prompts: dict[str, str] = field(default_factory=dict)
    judge_kinds: dict[str, MetricKind] = field(default_factory=dict)  # same keys as judge_prompts
    source: str = ""  # file it came from, for error messages downstream

    @property
    def metrics(self) -> list[str]:
        return list(self.judge_prompts)

    def judge_prompt(self, metric: str, question: str, answer: str) -> str:
        """Fill the metric's template; templates were checked to format cleanly at load time."""
        return self.judge_prompts[metric].format(question=question, answer=answer)


@dataclass(frozen=True)
class JudgeSpec:
    """One metric from a judges file. ``labels`` None means: kind decided by the question type."""

    template: str
    labels: tuple[str, ...] | None = None
    high_score: int | None = None


@dataclass(frozen=True)
class PromptSpec:
    """One generation request: a paraphrase of a question, sampled once."""

    question_id: str
    paraphrase_index: int
    sample_index: int
    question: str
    system: str | None = None

    @property
    def messages(self) -> list[dict[str, str]]:
        """Chat messages in the usual role/content form (system first when present)."""
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": "user", "content": self.question}]


# --------------------------------------------------------------------------- YAML reading

class _Loader(yaml.SafeLoader):
    """SafeLoader without YAML 1.1 booleans: labels like TRUE/FALSE/yes must stay strings."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _read_yaml(path: Path, what: str) -> tuple[Any, yaml.Node | None]:
    """Parse once, returning both the data and the node tree (for line numbers)."""
    if not path.is_file():
        hint = (f"pass the path to a {what} YAML file; shipped sets are in {QUESTION_SETS_DIR}"
                if not path.exists() else f"{path} is not a regular file")
        raise DataError(path, "file not found" if not path.exists() else "not a file", hint=hint)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(path, f"cannot read file: {exc}") from exc
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = exc.problem or exc.context or "invalid YAML"
        raise DataError(path, f"invalid YAML: {problem}", line=line) from exc
    except yaml.YAMLError as exc:
        raise DataError(path, f"invalid YAML: {exc}") from exc
    finally:
        loader.dispose()
    return data, node


def _line(node: yaml.Node | None) -> int | None:
    return node.start_mark.line + 1 if node is not None else None


def _item_nodes(root: yaml.Node | None, n: int) -> list[yaml.Node | None]:
    if isinstance(root, yaml.SequenceNode) and len(root.value) == n:
        return list(root.value)
    return [None] * n


def _key_lines(node: yaml.Node | None) -> dict[str, int]:
    """Line of each explicit key in a mapping node (for 'field X' errors)."""
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}


def _duplicate_keys(node: yaml.Node | None) -> list[str]:
    """PyYAML keeps the last of duplicated keys silently; we report them instead."""
    if not isinstance(node, yaml.MappingNode):
        return []
    seen: set[str] = set()
    dups = []
    for k, _ in node.value:
        if isinstance(k, yaml.ScalarNode) and k.value != "<<":
            if k.value in seen:
                dups.append(k.value)
            seen.add(k.value)
    return dups


# --------------------------------------------------------------------------- validation helpers

def _check_template(path: Path, where: str, metric: str, template: Any, line: int | None) -> str:
    if not isinstance(template, str) or not template.strip():
        raise DataError(path, f"{where}: judge prompt '{metric}' must be a non-empty string", line=line)
    if "{answer}" not in template:
        raise DataError(path, f"{where}: judge prompt '{metric}' has no {{answer}} placeholder",
                        line=line, hint="the judge must see the answer it scores")
    try:
        template.format(**_PLACEHOLDER_PROBE)
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise DataError(path, f"{where}: judge prompt '{metric}' cannot be filled: {exc!r}", line=line,
                        hint="only {question} and {answer} are substituted; write literal braces as {{ }}"
                        ) from exc
    return template


def _check_labels(path: Path, where: str, metric: str, labels: Any, line: int | None) -> tuple[str, ...]:
    if not isinstance(labels, list) or not labels:
        raise DataError(path, f"{where}: labels of '{metric}' must be a non-empty list of strings", line=line)
    out = []
    for lab in labels:
        if isinstance(lab, bool) or not isinstance(lab, (str, int)) or not str(lab).strip():
            raise DataError(path, f"{where}: label {lab!r} of '{metric}' is not a non-empty string", line=line)
        out.append(str(lab).strip())
    if len(set(out)) != len(out):
        raise DataError(path, f"{where}: labels of '{metric}' contain duplicates: {out}", line=line)
    return tuple(out)


def infer_labels(template: str) -> tuple[str, ...]:
    """Labels a categorical prompt asks for: its double-quoted single words, first-seen order."""
    return tuple(dict.fromkeys(_QUOTED_WORD.findall(template)))


# --------------------------------------------------------------------------- judges file

def load_judges(path: str | Path) -> dict[str, JudgeSpec]:
    """Read a judges file (list of ``- metric: template`` entries, or a metric->template mapping)."""
    path = Path(path)
    data, root = _read_yaml(path, "judges")
    # (entry, line) pairs, so both layouts share one validation path
    if isinstance(data, list):
        entries = [(e, _line(n)) for e, n in zip(data, _item_nodes(root, len(data)))]
    elif isinstance(data, dict):
        lines = _key_lines(root)
        entries = [({k: v}, lines.get(str(k))) for k, v in data.items()]
    else:
        raise DataError(path, "a judges file must be a YAML list of '- metric: template' entries", line=1)
    if not entries:
        raise DataError(path, "judges file defines no judge prompts")

    judges: dict[str, JudgeSpec] = {}
    for idx, (entry, line) in enumerate(entries):
        where = f"judge entry #{idx}"
        if not isinstance(entry, dict):
            raise DataError(path, f"{where} must be a mapping like '- aligned: <template>'", line=line)
        metrics = [k for k in entry if k not in JUDGE_ENTRY_KEYS]
        if len(metrics) != 1:
            raise DataError(path, f"{where} must name exactly one metric, found {metrics or 'none'}",
                            line=line, hint=f"besides the metric only {', '.join(JUDGE_ENTRY_KEYS)} are allowed")
        metric = str(metrics[0])
        where = f"judge '{metric}'"
        if metric in judges:
            raise DataError(path, f"{where} is defined twice", line=line)
        template = _check_template(path, where, metric, entry[metrics[0]], line)
        high = entry.get("high_score")
        if high is not None and (isinstance(high, bool) or not isinstance(high, (int, float))):
            raise DataError(path, f"{where}: high_score must be a number, got {high!r}", line=line)
        labels = _check_labels(path, where, metric, entry["labels"], line) if "labels" in entry else None
        judges[metric] = JudgeSpec(template=template, labels=labels,
                                   high_score=int(high) if high is not None else None)
    return judges


# --------------------------------------------------------------------------- questions file

def _parse_kinds(path: Path, where: str, raw: Any, line: int | None) -> dict[str, MetricKind]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise DataError(path, f"{where}: field 'judge_kinds' must map metric -> \"0_100\" or [LABEL, ...]",
                        line=line)
    kinds: dict[str, MetricKind] = {}
    for metric, spec in raw.items():
        metric = str(metric)
        if spec == KIND_0_100:
            kinds[metric] = MetricKind(KIND_0_100)
        elif isinstance(spec, list):
            kinds[metric] = MetricKind(KIND_CATEGORICAL, _check_labels(path, where, metric, spec, line))
        else:
            hint = ('unquoted 0_100 is read by YAML as the octal number 64; write "0_100"'
                    if spec == 64 else 'use "0_100" or a list of labels')
            raise DataError(path, f"{where}: judge_kinds['{metric}'] = {spec!r} is not a kind", line=line,
                            hint=hint)
    return kinds


def _resolve_kind(path: Path, where: str, metric: str, qtype: str, template: str,
                  explicit: MetricKind | None, judge: JudgeSpec | None, line: int | None) -> MetricKind:
    high = judge.high_score if judge is not None else None
    if explicit is not None:
        return MetricKind(explicit.kind, explicit.labels, high)
    if judge is not None:  # a judges file fixes its metrics' kind whatever the question type
        if judge.labels is not None:
            return MetricKind(KIND_CATEGORICAL, judge.labels, high)
        return MetricKind(KIND_0_100, (), high)
    if QUESTION_TYPES[qtype] == KIND_0_100:
        return MetricKind(KIND_0_100, (), high)
    labels = infer_labels(template)
    if not labels:
        raise DataError(path, f"{where}: categorical metric '{metric}' has no allowed labels",
                        line=line, hint=f"add judge_kinds: {{{metric}: [LABEL, ...]}} or quote the labels "
                                        "in the prompt, e.g. Say \"TRUE\" or \"FALSE\"")
    return MetricKind(KIND_CATEGORICAL, labels, high)


def _parse_item(path: Path, idx: int, item: Any, node: yaml.Node | None,
                judges: Mapping[str, JudgeSpec], metrics: Sequence[str] | None) -> Question:
    item_line = _line(node)
    if not isinstance(item, dict):
        raise DataError(path, f"item #{idx} must be a mapping with id/type/paraphrases", line=item_line)
    lines = _key_lines(node)
    raw_id = item.get("id")
    if raw_id is None or isinstance(raw_id, (bool, list, dict)) or not str(raw_id).strip():
        raise DataError(path, f"item #{idx}: field 'id' is missing or empty", line=lines.get("id", item_line))
    qid = str(raw_id).strip()
    where = f"question '{qid}' (item #{idx})"

    def at(key: str) -> int | None:
        return lines.get(key, item_line)

    dups = _duplicate_keys(node)
    if dups:
        raise DataError(path, f"{where}: field(s) {dups} given twice", line=at(dups[0]))
    unknown = [k for k in item if k not in ITEM_KEYS]
    if unknown:
        raise DataError(path, f"{where}: unknown field(s) {unknown}", line=at(str(unknown[0])),
                        hint=f"allowed fields: {', '.join(ITEM_KEYS)}")

    qtype = item.get("type")
    if qtype not in QUESTION_TYPES:
        problem = "field 'type' is missing" if qtype is None else f"field 'type': unsupported type {qtype!r}"
        raise DataError(path, f"{where}: {problem}", line=at("type"),
                        hint=f"supported types: {', '.join(QUESTION_TYPES)}")

    paraphrases = item.get("paraphrases")
    if not isinstance(paraphrases, list) or not paraphrases:
        raise DataError(path, f"{where}: field 'paraphrases' must be a non-empty list of strings",
                        line=at("paraphrases"))
    for p_idx, text in enumerate(paraphrases):
        if not isinstance(text, str) or not text.strip():
            raise DataError(path, f"{where}: field 'paraphrases'[{p_idx}] is not a non-empty string",
                            line=at("paraphrases"))

    system = item.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError(path, f"{where}: field 'system' must be a string", line=at("system"))

    spp = item.get("samples_per_paraphrase", 1)
    if isinstance(spp, bool) or not isinstance(spp, int) or spp < 1:
        raise DataError(path, f"{where}: field 'samples_per_paraphrase' must be a positive integer, "
                              f"got {spp!r}", line=at("samples_per_paraphrase"))

    judge_model = item.get("judge")
    if judge_model is not None and not isinstance(judge_model, str):
        raise DataError(path, f"{where}: field 'judge' must be a model name string", line=at("judge"))

    raw_prompts = item.get("judge_prompts")
    if raw_prompts is None:
        raw_prompts = {}
    if not isinstance(raw_prompts, dict):
        raise DataError(path, f"{where}: field 'judge_prompts' must map metric name -> template",
                        line=at("judge_prompts"))
    prompts = {str(m): _check_template(path, where, str(m), t, at("judge_prompts")) for m, t in raw_prompts.items()}
    prompts.update({m: j.template for m, j in judges.items()})  # judges file wins (see module doc)
    if not prompts:
        raise DataError(path, f"{where}: field 'judge_prompts' is missing", line=item_line,
                        hint="give judge_prompts in the item or pass a judges file")

    explicit = _parse_kinds(path, where, item.get("judge_kinds"), at("judge_kinds"))
    stray = [m for m in explicit if m not in prompts]
    if stray:
        raise DataError(path, f"{where}: judge_kinds names metric(s) {stray} that have no judge prompt",
                        line=at("judge_kinds"))
    if metrics is not None:  # select before resolving kinds: unselected metrics are not our concern
        missing = [m for m in metrics if m not in prompts]
        if missing:
            raise DataError(path, f"{where}: no judge prompt for metric(s) {missing}", line=item_line,
                            hint=f"it has: {', '.join(prompts)}")
        prompts = {m: prompts[m] for m in metrics}
    kinds = {m: _resolve_kind(path, where, m, qtype, t, explicit.get(m), judges.get(m), at("judge_prompts"))
             for m, t in prompts.items()}

    return Question(id=qid, type=qtype, paraphrases=list(paraphrases), system=system,
                    samples_per_paraphrase=spp, judge=judge_model, judge_prompts=prompts,
                    judge_kinds=kinds, source=str(path))


def load_questions(path: str | Path, judges_path: str | Path | None = None,
                   metrics: Sequence[str] | None = None) -> list[Question]:
    """Load and validate a question file.

    judges_path: a separate judges file whose prompts are added to every question (replacing
    inline prompts of the same name). metrics: keep only these judge metrics; each question must
    have all of them.
    """
    path = Path(path)
    judges = load_judges(judges_path) if judges_path is not None else {}
    data, root = _read_yaml(path, "question")
    if data is None:
        raise DataError(path, "file contains no questions", hint="expected a YAML list of question items")
    if not isinstance(data, list):
        raise DataError(path, "top level must be a YAML list of question items", line=_line(root))
    if not data:
        raise DataError(path, "file contains no questions", line=_line(root))

    questions: list[Question] = []
    seen: dict[str, int] = {}
    for idx, (item, node) in enumerate(zip(data, _item_nodes(root, len(data)))):
        q = _parse_item(path, idx, item, node, judges, metrics)
        if q.id in seen:
            raise DataError(path, f"item #{idx}: duplicate id '{q.id}' (first used by item #{seen[q.id]})",
                            line=_line(node))
        seen[q.id] = idx
        questions.append(q)
    return questions


# --------------------------------------------------------------------------- shipped sets

def shipped_question_sets() -> dict[str, Path]:
    """Question sets bundled with em-lab, by name (file stem); the judges file is not a set."""
    return {p.stem: p for p in sorted(QUESTION_SETS_DIR.glob("*.yaml")) if p != SHIPPED_JUDGES_FILE}


def resolve_question_file(spec: str | Path) -> Path:
    """An existing path as given, else the shipped set of that name (e.g. 'core_misalignment')."""
    path = Path(spec)
    if path.exists():
        return path
    shipped = shipped_question_sets()
    if str(spec) in shipped:
        return shipped[str(spec)]
    raise DataError(path, "no such question file or shipped question set",
                    hint=f"shipped sets: {', '.join(shipped)}; published sets are passed by path "
                         "(see docs/questions.md)")


# --------------------------------------------------------------------------- generation prompts

def expand_prompts(questions: Iterable[Question], samples_per_paraphrase: int | None = None) -> list[PromptSpec]:
    """One PromptSpec per (question, paraphrase, sample), in file order.

    samples_per_paraphrase, when given, replaces every item's own value (e.g. a quick smoke run).
    """
    if samples_per_paraphrase is not None and (
            isinstance(samples_per_paraphrase, bool) or not isinstance(samples_per_paraphrase, int)
            or samples_per_paraphrase < 1):
        raise ConfigError(f"samples_per_paraphrase must be a positive integer, got {samples_per_paraphrase!r}")
    specs: list[PromptSpec] = []
    for q in questions:
        n = samples_per_paraphrase if samples_per_paraphrase is not None else q.samples_per_paraphrase
        for p_idx, text in enumerate(q.paraphrases):
            specs.extend(PromptSpec(q.id, p_idx, s_idx, text, q.system) for s_idx in range(n))
    return specs


def load_question_sets(specs: list[str], judges_path: str | None = None) -> list[Question]:
    """The questions of several sets (shipped names or paths), refusing an id that two sets share."""
    questions: list[Question] = []
    seen: set[str] = set()
    for spec in specs:
        for q in load_questions(resolve_question_file(spec), judges_path=judges_path):
            if q.id in seen:
                raise ConfigError(f"questions: id {q.id!r} appears in more than one of {specs}")
            seen.add(q.id)
            questions.append(q)
    return questions
