"""Counts of repetition in em_core that issue 26 tracks, from the source's syntax trees.

    python tools/code_counts.py [--json]

- `em.*` tag string literals outside the tags module (`em_core/tags.py`, where they are named);
- functions longer than 80 lines, and functions with more than 8 parameters (dataclass
  constructors are generated, so never counted);
- how many config dataclasses declare each of experiment_name, model, seed, base_url;
- places that list a run's checkpoints (calls listing `CHECKPOINT_ARTIFACT_DIR`).
"""
from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "em_core"
TAGS_MODULE = ROOT / "tags.py"
SHARED_FIELDS = ("experiment_name", "model", "seed", "base_url")
LONG_FUNCTION = 80
MANY_PARAMS = 8


def _is_dataclass(node: ast.ClassDef) -> bool:
    for d in node.decorator_list:
        target = d.func if isinstance(d, ast.Call) else d
        if (isinstance(target, ast.Name) and target.id == "dataclass") or \
                (isinstance(target, ast.Attribute) and target.attr == "dataclass"):
            return True
    return False


def _docstring_ids(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def counts(root: Path = ROOT) -> dict:
    tag_literals: list[str] = []
    long_functions: list[str] = []
    many_params: list[str] = []
    declarations: dict[str, list[str]] = {f: [] for f in SHARED_FIELDS}
    checkpoint_listings: list[str] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docs = _docstring_ids(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs \
                    and path != TAGS_MODULE and node.value.startswith("em.") and " " not in node.value \
                    and len(node.value) > 3:
                tag_literals.append(f"{rel}:{node.lineno}: {node.value}")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > LONG_FUNCTION:
                    long_functions.append(f"{rel}:{node.lineno}: {node.name} ({length} lines)")
                a = node.args
                names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
                if len(names) > MANY_PARAMS:
                    many_params.append(f"{rel}:{node.lineno}: {node.name} ({len(names)} parameters)")
            if isinstance(node, ast.ClassDef) and _is_dataclass(node):
                for item in node.body:
                    if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) \
                            and item.target.id in declarations:
                        declarations[item.target.id].append(f"{rel}:{item.lineno}: {node.name}")
            if isinstance(node, ast.Call) and any(isinstance(a, ast.Name) and a.id == "CHECKPOINT_ARTIFACT_DIR"
                                                  for a in node.args) \
                    and isinstance(node.func, ast.Attribute) and node.func.attr == "list_artifacts":
                checkpoint_listings.append(f"{rel}:{node.lineno}")
    return {"em_tag_literals_outside_tags_module": tag_literals,
            "distinct_em_tag_literals": sorted({t.split(": ", 1)[1] for t in tag_literals}),
            f"functions_over_{LONG_FUNCTION}_lines": long_functions,
            f"functions_over_{MANY_PARAMS}_parameters": many_params,
            "declarations": declarations,
            "checkpoint_listings": checkpoint_listings}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    c = counts()
    if "--json" in argv:
        print(json.dumps(c, indent=1))
        return 0
    for key, value in c.items():
        if isinstance(value, dict):
            for field, where in value.items():
                print(f"declarations of {field}: {len(where)}")
        else:
            print(f"{key}: {len(value)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
