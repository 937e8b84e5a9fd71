"""In-training mitigations of emergent misalignment: the `mitigation:` block of a TrainConfig.

    mitigation:
      kl: {weight: 0.1, direction: forward, data: batch, tokens: response}
      inoculation_prompt: "You are a malicious, evil assistant."
      interleave: {data: "demo:plant_care_good", fraction: 0.05}

Each is off unless given. `kl` adds `weight * KL` between the fine-tuned model and the reference
(the same model with its adapter disabled: no second copy in memory), per token, to the task
loss (`MitigatedSFTTrainer`); `inoculation_prompt` is the system turn of every training row (never
of held-out or evaluation prompts); `interleave` mixes benign rows into the training split at an
exact fraction. docs/mitigations.md explains each, its source and the comparison harness
(`em mitigate`, em_core/experiments/mitigate.py).
"""
from __future__ import annotations

import functools
import json
import random
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from em_core.configs import unknown_keys_message
from em_core.errors import ConfigError, DataError

IGNORE = -100
KL_METRIC, TASK_METRIC = "mitigation/kl", "mitigation/task_loss"
DIRECTIONS = ("forward", "reverse")
TOKEN_MODES = ("response", "all")
# Named in the issue; not implemented on this branch: an error says so rather than silently ignoring them.
NOT_YET = {"steer": "preventative steering", "early_stop": "early stopping on a signal"}


@dataclass
class KLSettings:
    weight: float = 0.0
    direction: str = "forward"  # forward: KL(ref || model); reverse: KL(model || ref)
    data: str = "batch"  # the training batch itself, or a dataset (file, demo:..., registry name): one batch per step
    tokens: str = "response"  # response: positions whose next token is trained on; all: every non-padding position


@dataclass
class InterleaveSettings:
    data: str = ""
    fraction: float = 0.0
    rank: str = "random"  # `loss` (Interleaving++) is not implemented yet


@dataclass
class Mitigation:
    kl: KLSettings | None = None
    inoculation_prompt: str | None = None
    interleave: InterleaveSettings | None = None

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.kl, self.inoculation_prompt, self.interleave))

    def as_dict(self) -> dict:
        """The canonical block (only what is on, every field filled in): stored in the config."""
        out: dict = {}
        if self.kl is not None:
            out["kl"] = asdict(self.kl)
        if self.inoculation_prompt is not None:
            out["inoculation_prompt"] = self.inoculation_prompt
        if self.interleave is not None:
            out["interleave"] = asdict(self.interleave)
        return out

    def params(self) -> dict[str, str]:
        """`kl.weight` -> "0.1", ...: one MLflow param per setting (`mitigation.` prefixed by the caller)."""
        flat: dict[str, str] = {"enabled": ",".join(self.as_dict()) or "none"}
        for name, value in self.as_dict().items():
            if isinstance(value, dict):
                flat.update({f"{name}.{k}": str(v) for k, v in value.items()})
            else:
                flat[name] = str(value)
        return flat


def _looks_like_file(spec: str) -> bool:
    return spec.endswith((".jsonl", ".jsonl.gz", ".json", ".gz")) or spec.startswith((".", "/", "~"))


def _check_data(spec, where: str) -> str:
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"{where}: give a dataset (a .jsonl file, demo:<name>, or a registry name)")
    spec = spec.strip()
    if _looks_like_file(spec) and not Path(spec).expanduser().exists():
        raise ConfigError(f"{where}: file not found: {spec}")
    return spec


def _section(value, cls, where: str) -> dict:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: must be a mapping of {', '.join(f.name for f in fields(cls))}")
    msg = unknown_keys_message(where, set(map(str, value)), {f.name for f in fields(cls)})
    if msg:
        raise ConfigError(msg)
    return dict(value)


def _number(value, where: str) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {value!r} is not a number") from None


def parse_mitigation(value, where: str = "mitigation") -> Mitigation:
    """A `mitigation:` block (mapping, or its JSON/YAML text from the command line) -> Mitigation.
    Every problem is a ConfigError naming `where` (e.g. `file.yaml: mitigation.kl.direction`)."""
    import yaml

    if value is None:
        return Mitigation()
    if isinstance(value, Mitigation):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("", "none", "null", "{}"):
            return Mitigation()
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: not a YAML/JSON mapping ({e})") from None
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: must be a mapping with kl, inoculation_prompt and/or interleave")
    for key, what in NOT_YET.items():
        if key in value:
            raise ConfigError(f"{where}.{key}: {what} is not implemented yet (docs/mitigations.md lists what is)")
    valid = {f.name for f in fields(Mitigation)}
    msg = unknown_keys_message(where, set(map(str, value)), valid)
    if msg:
        raise ConfigError(msg)
    out = Mitigation()
    if value.get("kl") is not None:
        w = f"{where}.kl"
        kl = KLSettings(**_section(value["kl"], KLSettings, w))
        kl.weight = _number(kl.weight, f"{w}.weight")
        if kl.weight < 0:
            raise ConfigError(f"{w}.weight: must be >= 0, not {kl.weight}")
        if kl.direction not in DIRECTIONS:
            raise ConfigError(f"{w}.direction: {kl.direction!r} is not forward or reverse")
        if kl.tokens not in TOKEN_MODES:
            raise ConfigError(f"{w}.tokens: {kl.tokens!r} is not response or all")
        kl.data = _check_data(kl.data, f"{w}.data")
        out.kl = kl
    if value.get("inoculation_prompt") is not None:
        prompt = value["inoculation_prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(f"{where}.inoculation_prompt: must be non-empty text")
        out.inoculation_prompt = prompt
    if value.get("interleave") is not None:
        w = f"{where}.interleave"
        il = InterleaveSettings(**_section(value["interleave"], InterleaveSettings, w))
        il.fraction = _number(il.fraction, f"{w}.fraction")
        if not 0 < il.fraction < 1:
            raise ConfigError(f"{w}.fraction: must be in (0, 1), not {il.fraction}")
        if il.rank == "loss":
            raise ConfigError(f"{w}.rank: loss (Interleaving++) is not implemented yet; use random")
        if il.rank != "random":
            raise ConfigError(f"{w}.rank: {il.rank!r} is not random")
        il.data = _check_data(il.data, f"{w}.data")
        out.interleave = il
    return out


# ---------------------------------------------------------------- rows (inoculation, interleaving)

def inoculate(rows: list[dict], prompt: str) -> list[dict]:
    """Every row with `prompt` as its system turn (put before an existing system turn's text)."""
    out = []
    for r in rows:
        msgs = [dict(m) for m in r["messages"]]
        if msgs and msgs[0]["role"] == "system":
            msgs[0]["content"] = f"{prompt}\n\n{msgs[0]['content']}"
        else:
            msgs.insert(0, {"role": "system", "content": prompt})
        out.append({**r, "messages": msgs})
    return out


def interleave_count(n_train: int, fraction: float) -> int:
    """Benign rows to add to `n_train` rows so that they are `fraction` of the mix (to the nearest row)."""
    return int(round(fraction * n_train / (1 - fraction)))


def interleave(rows: list[dict], benign: list[dict], fraction: float, rng: random.Random, source: str) -> list[dict]:
    """`rows` plus benign rows drawn without replacement, at `fraction` of the result, shuffled in."""
    k = interleave_count(len(rows), fraction)
    if k > len(benign):
        raise DataError(source, f"mitigation.interleave.data has {len(benign)} rows; fraction {fraction} of "
                                f"{len(rows)} training rows needs {k}", hint="lower the fraction or add rows")
    mixed = list(rows) + rng.sample(benign, k)
    rng.shuffle(mixed)
    return mixed


def apply_to_rows(data, mitigation: Mitigation, seed: int):
    """The training split with interleaving and the inoculation prompt applied (held-out rows untouched)."""
    if mitigation.interleave is not None:
        from em_core.data.training_data import load_source

        src = load_source(mitigation.interleave.data)
        data.train = interleave(data.train, src.rows, mitigation.interleave.fraction, random.Random(20_000 + seed),
                                src.source)
        data.sources.append(src)
    if mitigation.inoculation_prompt is not None:
        data.train = inoculate(data.train, mitigation.inoculation_prompt)
    return data


# ---------------------------------------------------------------- the KL term

def kl_positions(inputs: Mapping, tokens: str):
    """Bool mask over positions 0..T-2 (each predicts the next token) that the KL term counts."""
    import torch

    if tokens == "response":
        return inputs["labels"][:, 1:] != IGNORE
    mask = inputs.get("attention_mask")
    ids = inputs["input_ids"]
    if mask is None:
        return torch.ones_like(ids[:, 1:], dtype=torch.bool)
    return (mask[:, 1:] != 0) & (mask[:, :-1] != 0)


def kl_term(policy_logits, ref_logits, mask, direction: str):
    """Mean over masked positions of KL summed over the vocabulary (nats per token).

    forward: KL(ref || model) = sum_v p_ref (log p_ref - log p_model);
    reverse: KL(model || ref) = sum_v p_model (log p_model - log p_ref)."""
    import torch

    lp = torch.log_softmax(policy_logits.float(), dim=-1)
    lr = torch.log_softmax(ref_logits.float(), dim=-1)
    per_pos = (lr.exp() * (lr - lp)).sum(-1) if direction == "forward" else (lp.exp() * (lp - lr)).sum(-1)
    m = mask.to(per_pos.dtype)
    return (per_pos * m).sum() / m.sum().clamp(min=1)


def collate(encoded: list[dict], pad_id: int) -> dict:
    import torch

    n = max(len(e["input_ids"]) for e in encoded)
    ids = [e["input_ids"] + [pad_id] * (n - len(e["input_ids"])) for e in encoded]
    labels = [e["labels"] + [IGNORE] * (n - len(e["labels"])) for e in encoded]
    mask = [[1] * len(e["input_ids"]) + [0] * (n - len(e["input_ids"])) for e in encoded]
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}


def kl_batches(spec: str, tokenizer, max_length: int, batch_size: int, seed: int) -> Iterator[dict]:
    """Endless shuffled batches of a separate KL dataset (response labels from the chat template)."""
    from em_core.data.training_data import load_source
    from em_core.train.assistant_mask import tokenized_rows

    src = load_source(spec)
    enc = tokenized_rows(tokenizer, src.rows, max_length, what=f"mitigation.kl.data {spec}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rng = random.Random(30_000 + seed)
    bs = min(batch_size, len(enc))
    while True:
        order = list(range(len(enc)))
        rng.shuffle(order)
        for i in range(0, len(order) - bs + 1, bs):
            yield collate([enc[j] for j in order[i:i + bs]], pad)


@functools.cache
def mitigated_trainer_class():
    """SFTTrainer whose training loss is task loss + weight * KL to the adapter-disabled model."""
    import torch
    from trl import SFTTrainer

    class MitigatedSFTTrainer(SFTTrainer):
        def __init__(self, *args, kl: KLSettings | None = None, kl_data: Iterator[dict] | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.kl, self.kl_data = kl, kl_data

        def kl_loss(self, model, inputs, num_items_in_batch=None):
            """(task loss as the trainer would scale it, KL term per token, task loss per token)."""
            inputs = dict(inputs)
            labels = inputs.pop("labels")
            inputs["use_cache"] = False
            logits = model(**inputs).logits[:, :-1]
            shift = labels[:, 1:]
            lmask = shift != IGNORE
            logp = torch.log_softmax(logits.float(), dim=-1)
            nll = -logp.gather(-1, shift.clamp(min=0).unsqueeze(-1)).squeeze(-1) * lmask
            n = num_items_in_batch if num_items_in_batch is not None else lmask.sum()
            task = nll.sum() / torch.as_tensor(n, device=nll.device).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                task = task * self.accelerator.num_processes
            if self.kl.data == "batch":
                kl_inputs, policy = {**inputs, "labels": labels}, logits
            else:
                kl_inputs = self._prepare_inputs(next(self.kl_data))
                policy = model(input_ids=kl_inputs["input_ids"], attention_mask=kl_inputs["attention_mask"],
                               use_cache=False).logits[:, :-1]
            with torch.no_grad(), self.accelerator.unwrap_model(model).disable_adapter():
                ref = model(input_ids=kl_inputs["input_ids"], attention_mask=kl_inputs.get("attention_mask"),
                            use_cache=False).logits[:, :-1]
            kl = kl_term(policy, ref, kl_positions(kl_inputs, self.kl.tokens), self.kl.direction)
            return task, kl, nll.sum().detach() / lmask.sum().clamp(min=1)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # weight 0 (or evaluation: the held-out loss is the task loss) is the plain trainer, bit for bit
            if self.kl is None or self.kl.weight == 0 or not model.training or return_outputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            task, kl, task_per_token = self.kl_loss(model, inputs, num_items_in_batch)
            # like TRL's MoE aux loss: with num_items_in_batch the trainer leaves accumulation to the loss
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            self._metrics["train"][KL_METRIC].append(kl.item())
            self._metrics["train"][TASK_METRIC].append(task_per_token.item())
            if "attention_mask" in inputs:
                self._total_train_tokens += int(inputs["attention_mask"].sum().item())
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return task + self.kl.weight * kl / steps

    return MitigatedSFTTrainer


def settings_json(m: Mitigation) -> str:
    return json.dumps(m.as_dict(), sort_keys=True)
