"""Misalignment directions: extract them, steer the base model along them, ablate them.

    em directions extract --fine_tuned models:/em-tiny-plant-care@final
    em directions steer --config configs/directions/tiny_steer.yaml --directions_run_id <extract run>
    em directions ablate --config configs/directions/tiny_ablate.yaml
    em directions compare <extract run> <extract run> [...] [--labels a,b]   (cosine per layer)
    mlflow run . -e directions --env-manager local -P action=steer -P config=configs/directions/tiny_steer.yaml

extract logs `directions/directions.safetensors` and the held-out AUROC per layer (step = layer).
steer/ablate run one parent run with a child run per condition (layer x alpha, or ablation),
each evaluated -> judged and given a probe margin, each with random-direction controls; the
parent holds `directions/conditions.csv` and the plots. See docs/directions.md.
"""
from __future__ import annotations

import sys

from em_core.configs import parse_config
from em_core.console import run_main
from em_core.errors import ConfigError

ACTIONS = ("extract", "steer", "ablate")


def _compare(argv: list[str]) -> int:
    """`em directions compare RUN_OR_FILE... [--experiment_name X] [--labels a,b]`."""
    from em_core.experiments.directions import compare_directions

    sources, opts, i = [], {}, 0
    while i < len(argv):
        if argv[i].startswith("--"):
            if i + 1 >= len(argv):
                raise ConfigError(f"em directions compare: {argv[i]} needs a value")
            opts[argv[i][2:]] = argv[i + 1]
            i += 2
        else:
            sources.append(argv[i])
            i += 1
    unknown = set(opts) - {"experiment_name", "run_name", "labels"}
    if unknown:
        raise ConfigError(f"em directions compare: unknown option(s) {sorted(unknown)}; "
                          "use --experiment_name, --run_name, --labels a,b,...")
    labels = opts["labels"].split(",") if "labels" in opts else None
    result = compare_directions(sources, opts.get("experiment_name", "em-lab"), opts.get("run_name"), labels)
    print(f"run_id={result.run_id} compared={len(sources)}")
    for layer, m in enumerate(result.cosine):
        off = [m[i][j] for i in range(len(m)) for j in range(i + 1, len(m))]
        print(f"  layer {layer:>2}: " + "  ".join(f"{v:+.3f}" for v in off))
    return 0


def _directions(argv: list[str]) -> int:
    from em_core.experiments.directions import DirectionsConfig, run_directions

    if argv and argv[0] == "compare":
        return _compare(argv[1:])

    if argv and not argv[0].startswith("-"):  # `em directions steer ...`
        if argv[0] not in ACTIONS:
            raise ConfigError(f"em directions: unknown action {argv[0]!r}; use {', '.join(ACTIONS)}")
        argv = [*argv[1:], "--action", argv[0]]
    cfg = parse_config(DirectionsConfig, argv)
    result = run_directions(cfg)
    print(f"run_id={result.run_id} action={cfg.action} directions={result.directions_path} "
          f"conditions={len(result.conditions)} seconds={result.seconds:.1f}")
    for c in result.conditions:
        shown = {k: round(c[k], 4) for k in ("em_rate", "coherent_rate", "probe/margin") if k in c}
        print(f"  {c['name']}: {shown}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_directions, argv)


if __name__ == "__main__":
    sys.exit(main())
