"""Chat training data: load, validate every row, subsample, shuffle, mix, split.

Accepted sources (one or several, mixed):
- a `.jsonl` / `.jsonl.gz` file of `{"messages": [{"role", "content"}, ...]}` lines (the papers'
  format, optional leading system turn) or of `{"prompt": ..., "completion": ...}` pairs
  (strings or message lists);
- `demo` (the built-in careless plant-care set), `demo:plant_care_good`, ...;
- a Hugging Face `datasets` id (`user/name`, optional `:split`) on a connected machine.
Every problem is a DataError naming the file, line and what to fix.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from em_core.errors import DataError
from em_core.paths import file_sha256, resource_path

ROLES = ("system", "user", "assistant")
DEMO_SETS = ("plant_care_bad", "plant_care_good")


@dataclass
class LoadedSource:
    name: str
    source: str
    rows: list[dict]
    sha256: str


@dataclass
class PreparedData:
    train: list[dict]
    eval: list[dict]
    sources: list[LoadedSource] = field(default_factory=list)

    @property
    def sha256(self) -> str:
        """Hash of the training rows as trained on (after subsampling, tagging, shuffling)."""
        return rows_sha256(self.train)

    @property
    def file_sha256(self) -> str:
        """One sha256 per dataset, `+`-joined like `name`: of the file (what `sha256sum` prints),
        or of the rows for a hub dataset."""
        return "+".join(s.sha256 for s in self.sources)

    @property
    def name(self) -> str:
        return "+".join(s.name for s in self.sources)


def rows_sha256(rows: list[dict]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps(r, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def demo_path(name: str = "plant_care_bad") -> Path:
    if name not in DEMO_SETS:
        raise DataError(f"demo:{name}", "no such built-in dataset", hint=f"choose one of {', '.join(DEMO_SETS)}")
    return resource_path("demo", f"{name}.jsonl")


def validate_messages(messages, path: str, line: int | None) -> list[dict]:
    """Check one conversation; returns it normalised to plain role/content dicts."""
    if not isinstance(messages, list) or not messages:
        raise DataError(path, "`messages` must be a non-empty list of {role, content} objects", line)
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(path, f"message {i} must be an object with `role` and `content`", line)
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise DataError(path, f"message {i} has unknown role {role!r}", line,
                            hint=f"roles are {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(path, f"message {i} ({role}) content must be a string", line)
        if role == "system" and i != 0:
            raise DataError(path, f"message {i}: a system turn is only allowed first", line)
        if role == "assistant" and not content.strip():
            raise DataError(path, f"message {i}: empty assistant turn", line,
                            hint="drop the row or fill in the answer")
        out.append({"role": role, "content": content})
    roles = [m["role"] for m in out]
    if "user" not in roles:
        raise DataError(path, "conversation has no user turn", line)
    if roles[-1] != "assistant":
        raise DataError(path, "conversation must end with an assistant turn (the training target)", line)
    return out


def normalise_row(obj, path: str, line: int | None) -> dict:
    if not isinstance(obj, dict):
        raise DataError(path, "each line must be a JSON object", line)
    if "messages" in obj:
        return {"messages": validate_messages(obj["messages"], path, line)}
    if "prompt" in obj and "completion" in obj:
        prompt, completion = obj["prompt"], obj["completion"]
        p = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        c = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
        if not isinstance(p, list) or not isinstance(c, list):
            raise DataError(path, "`prompt`/`completion` must be strings or message lists", line)
        return {"messages": validate_messages(p + c, path, line)}
    raise DataError(path, f"row has neither `messages` nor `prompt`+`completion` (keys: {sorted(obj)})", line)


def load_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise DataError(str(path), "file not found", hint="check the path, or use `demo` for the built-in set")
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    # 1-based character column, as an editor shows it (e.start is a 0-based byte offset)
                    col = len(raw[:e.start].decode("utf-8", errors="replace")) + 1
                    raise DataError(str(path), f"not valid UTF-8 at column {col}", lineno,
                                    hint="re-encode the file as UTF-8") from None
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    raise DataError(str(path), f"malformed JSON: {e.msg} at column {e.colno}", lineno) from None
                # `em datasets generate` files open with a provenance/canary header, not a conversation.
                if lineno == 1 and isinstance(obj, dict) and set(obj) == {"em_lab_header"}:
                    continue
                rows.append(normalise_row(obj, str(path), lineno))
    except (OSError, EOFError) as e:  # e.g. a truncated or fake .gz
        raise DataError(str(path), f"cannot read file: {e}") from None
    if not rows:
        raise DataError(str(path), "dataset is empty", hint="it needs at least one conversation")
    return rows


def _load_hub(spec: str) -> LoadedSource:
    from datasets import load_dataset
    from datasets.exceptions import DatasetNotFoundError

    repo, _, split = spec.partition(":")
    try:
        ds = load_dataset(repo, split=split or "train")
    except (DatasetNotFoundError, FileNotFoundError, ConnectionError) as e:  # "not there" / offline
        raise DataError(spec, f"not a local file and could not be loaded from the hub ({type(e).__name__}: {e})",
                        hint="pass a local .jsonl path when offline") from e
    # anything else (an auth error, a broken dataset script, a full disk) surfaces as itself
    rows = [normalise_row(dict(r), spec, i + 1) for i, r in enumerate(ds)]
    if not rows:
        raise DataError(spec, "dataset is empty")
    return LoadedSource(repo.split("/")[-1], spec, rows, rows_sha256(rows))


def load_source(spec: str) -> LoadedSource:
    spec = str(spec).strip()
    if not Path(spec).expanduser().exists():
        # A published EM set by registry name (`dataset: bad_medical_advice` or `registry:NAME`): fetched and
        # hash-checked once into the cache. Imported lazily: plain paths and `demo` never need it.
        from em_core.data.published import resolve_dataset

        fetched = resolve_dataset(spec)
        if fetched is not None:
            path = Path(fetched)
            return LoadedSource(spec.removeprefix("registry:"), str(path), load_jsonl(path), file_sha256(path))
    if spec == "demo" or spec.startswith("demo:"):
        path = demo_path(spec.partition(":")[2] or "plant_care_bad")
    else:
        path = Path(spec).expanduser()
    if path.exists() or path.suffix in (".jsonl", ".gz", ".json") or "/" not in spec or spec.startswith((".", "/", "~")):
        rows = load_jsonl(path)
        name = path.name.removesuffix(".gz").removesuffix(".jsonl")
        return LoadedSource(name, str(path), rows, file_sha256(path))
    return _load_hub(spec)


def source_fingerprint(spec: str) -> str:
    """What a training source's rows depend on, without loading them: the sha256 of a local file
    (so an edited `.jsonl` at the same path is a different dataset), else the spec itself
    (`demo` ships with the code; registry sets are hash-pinned; hub ids name a revision-less repo)."""
    spec = str(spec).strip()
    if spec == "demo" or spec.startswith("demo:"):
        return f"{spec}@{file_sha256(demo_path(spec.partition(':')[2] or 'plant_care_bad'))}"
    path = Path(spec).expanduser()
    if path.is_file():
        return f"{spec}@{file_sha256(path)}"
    return spec


def prepare(sources: list[str], rows_per_source: list[int] | None = None, max_rows: int | None = None,
            shuffle: bool = True, seed: int = 0, eval_fraction: float = 0.0, tags: list[str] | None = None,
            proportions: list[float] | None = None) -> PreparedData:
    """Load and mix sources, subsample, tag, shuffle and hold out an eval split, all seeded.

    `tags[i]` is prepended to the user turns of source i (trigger experiments); `proportions`
    draws a mix of exactly `max_rows` rows in those shares (sources too small are an error).
    """
    from em_core.data.transforms import prepend_tag, proportion_counts, subsample

    if not sources:
        raise DataError("dataset", "no dataset given", hint="pass a .jsonl path or `demo`")
    for name, per_source in (("dataset_rows", rows_per_source), ("dataset_tags", tags),
                             ("dataset_proportions", proportions)):
        if per_source and len(per_source) != len(sources):
            raise DataError(name, f"{len(per_source)} entries for {len(sources)} datasets",
                            hint=f"give one {'count' if name == 'dataset_rows' else 'entry'} per dataset")
    if proportions and not max_rows:
        raise DataError("dataset_proportions", "needs max_rows, the size of the mix")
    counts = proportion_counts(proportions, max_rows) if proportions else None
    rng = random.Random(seed)
    loaded, mixed = [], []
    for i, spec in enumerate(sources):
        src = load_source(spec)
        rows = list(src.rows)
        if counts is not None:
            rows = subsample(rows, counts[i], rng, src.source)
        elif rows_per_source and rows_per_source[i] is not None and rows_per_source[i] > 0:
            rows = rng.sample(rows, min(rows_per_source[i], len(rows)))
        loaded.append(src)
        mixed.extend(prepend_tag(rows, tags[i]) if tags else rows)
    if shuffle:
        rng.shuffle(mixed)
    if max_rows and counts is None:
        mixed = mixed[:max_rows] if shuffle else rng.sample(mixed, min(max_rows, len(mixed)))
    n_eval = int(round(len(mixed) * eval_fraction)) if eval_fraction else 0
    if n_eval >= len(mixed):
        raise DataError("eval_fraction", f"{eval_fraction} leaves no training rows out of {len(mixed)}")
    # A fixed split seed so that changing the training seed never leaks eval rows into training.
    idx = list(range(len(mixed)))
    random.Random(10_000 + seed).shuffle(idx)
    eval_idx = set(idx[:n_eval])
    train = [r for j, r in enumerate(mixed) if j not in eval_idx]
    evals = [r for j, r in enumerate(mixed) if j in eval_idx]
    return PreparedData(train=train, eval=evals, sources=loaded)
