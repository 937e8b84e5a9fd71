"""`TrainConfig`: everything a LoRA fine-tune needs, beside the training code that reads it."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from em_core.configs import RunGroup
from em_core.errors import ConfigError


@dataclass
class TrainConfig(RunGroup):
    """Everything a LoRA fine-tune needs; one YAML file per recipe under configs/train/."""

    model: str = field(default="tiny", metadata={"help": "`tiny`, a hub id or a local folder"})
    dataset: list[str] = field(default_factory=lambda: ["demo"],
                               metadata={"help": "one or more .jsonl(.gz) paths, `demo`, or hub ids; mixed"})
    dataset_rows: list[int] | None = field(default=None, metadata={"help": "rows to sample from each dataset"})
    max_rows: int | None = field(default=None, metadata={"help": "subsample the mix to this many rows"})
    shuffle: bool = field(default=True, metadata={
        "help": "shuffle the mix and the training order; false trains on the rows in dataset order"})
    data_seed: int = 0
    eval_fraction: float = field(default=0.0, metadata={"help": "held-out share for eval loss"})
    dataset_tags: list[str] | None = field(default=None, metadata={
        "help": "trigger tag prepended to the user turns of each dataset, one per dataset (`none`: untagged)"})
    dataset_proportions: list[float] | None = field(default=None, metadata={
        "help": "share of each dataset in a mix of max_rows rows"})

    # LoRA
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    use_rslora: bool = False
    layers_to_transform: list[int] | None = None
    lora_bias: str = "none"

    # Multi-stage: start from an earlier stage's adapter.
    init_adapter: str | None = field(default=None, metadata={
        "help": "start from this adapter: a training run id, runs:/<run id>, or models:/name@alias"})
    init_mode: str = field(default="continue", metadata={
        "help": "continue (train the same adapter further) or merge (merge it into the base, train a fresh one)"})

    # Optimisation
    learning_rate: float = 1e-4
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 5
    weight_decay: float = 0.0
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 8
    max_length: int = 1024
    seed: int = 0
    assistant_only_loss: bool = True
    optim: str = "adamw_torch"
    logging_steps: int = 1
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on capable GPUs, else fp32), bf16, fp32"})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: 4-bit NF4 base (GPU)"})
    gradient_checkpointing: bool = False
    eval_on_start: bool = field(default=False, metadata={
        "help": "with eval_fraction > 0: also measure the held-out loss before the first step (step 0)"})

    # In-training mitigations of EM (docs/mitigations.md): kl, inoculation_prompt, interleave; each off unless given.
    mitigation: dict | str | None = field(default=None, metadata={
        "help": "YAML mapping (or its JSON on the command line): kl: {weight, direction, data, tokens}, "
                "inoculation_prompt, interleave: {data, fraction}; see docs/mitigations.md"})

    # Checkpoints: N evenly spaced in epoch 1, then one per epoch; or explicit steps.
    checkpoints_in_first_epoch: int = 4
    checkpoint_every_epoch: bool = True
    checkpoint_steps: list[int] | None = field(default=None, metadata={"help": "explicit steps; overrides the above"})

    # Tracking
    output_dir: str | None = field(default=None, metadata={
        "help": "local checkpoints; default outputs/<run id>, deleted once uploaded unless keep_local_checkpoints"})
    keep_local_checkpoints: bool = field(default=False, metadata={"help": "keep outputs/<run id> after upload"})
    checkpoint_upload: str = field(default="full", metadata={
        "help": "full (adapter + optimizer/scheduler state: resumable) or adapter (weights only: smaller)"})
    register_model: bool = True
    registered_model_name: str | None = field(default=None, metadata={"help": "default: em-<model>-<dataset>"})
    registry_alias: str = "final"
    resume_run_id: str | None = field(default=None, metadata={"help": "continue this failed run from its last checkpoint"})

    # Backend: trl (local LoRA) or openai (the OpenAI fine-tuning API, docs/openai.md). With openai,
    # model/dataset/num_train_epochs/seed keep their meaning; LoRA and optimiser fields are unused.
    backend: str = field(default="trl", metadata={"help": "trl (local LoRA) or openai (OpenAI fine-tuning API)"})
    openai_batch_size: int | None = field(default=None, metadata={"help": "openai: batch size (default: auto)"})
    learning_rate_multiplier: float | None = field(default=None, metadata={"help": "openai: LR multiplier (default: auto)"})
    suffix: str | None = field(default=None, metadata={"help": "openai: up to 64 chars in the fine-tuned model's name"})
    openai_base_url: str | None = field(default=None, metadata={
        "help": "openai: API root; default OPENAI_BASE_URL or api.openai.com"})
    poll_interval: float = field(default=30.0, metadata={"help": "openai: seconds between job status polls"})

    def __post_init__(self) -> None:
        problems = []
        if self.lora_r < 1:
            problems.append("lora_r must be >= 1")
        if not 0 <= self.lora_dropout < 1:
            problems.append("lora_dropout must be in [0, 1)")
        if self.learning_rate <= 0:
            problems.append("learning_rate must be > 0")
        if self.max_steps == 0 or self.max_steps < -1:
            problems.append(f"max_steps must be -1 (train num_train_epochs) or > 0, not {self.max_steps}")
        elif self.max_steps == -1 and self.num_train_epochs <= 0:
            problems.append("set num_train_epochs > 0 or max_steps > 0")
        if not 0 <= self.eval_fraction < 1:
            problems.append("eval_fraction must be in [0, 1)")
        if self.checkpoints_in_first_epoch < 0:
            problems.append("checkpoints_in_first_epoch must be >= 0")
        if self.checkpoint_steps and any(s <= 0 for s in self.checkpoint_steps):
            problems.append("checkpoint_steps must be positive step numbers")
        if self.per_device_train_batch_size < 1 or self.gradient_accumulation_steps < 1:
            problems.append("batch size and gradient_accumulation_steps must be >= 1")
        if self.lora_bias not in ("none", "all", "lora_only"):
            problems.append("lora_bias must be none, all or lora_only")
        if self.checkpoint_upload not in ("full", "adapter"):
            problems.append("checkpoint_upload must be full or adapter")
        if self.init_mode not in ("continue", "merge"):
            problems.append("init_mode must be continue or merge")
        for name in ("dataset_tags", "dataset_proportions"):
            value = getattr(self, name)
            if value is not None and len(value) != len(self.dataset):
                problems.append(f"{name} has {len(value)} entries for {len(self.dataset)} datasets; give one per dataset")
        if self.dataset_proportions is not None:
            if not self.max_rows:
                problems.append("dataset_proportions needs max_rows (the size of the mix)")
            if self.dataset_rows:
                problems.append("give dataset_rows or dataset_proportions, not both")
            if any(p < 0 for p in self.dataset_proportions) or sum(self.dataset_proportions) <= 0:
                problems.append("dataset_proportions must be >= 0 with a positive sum")
        problems += self._backend_problems()
        from em_core.train.mitigation import parse_mitigation

        parsed = parse_mitigation(self.mitigation)  # ConfigError naming mitigation.<field>
        self.mitigation = parsed.as_dict() or None
        if parsed.kl is not None and self.backend != "trl":
            problems.append("mitigation.kl needs backend trl (the reference logits come from local weights)")
        if problems:
            raise ConfigError("invalid train config: " + "; ".join(problems))

    def _backend_problems(self) -> list[str]:
        if self.backend not in ("trl", "openai"):
            return [f"backend must be trl or openai, not {self.backend!r}"]
        if self.backend != "openai":
            return []
        problems = []
        epochs = self.num_train_epochs
        if epochs < 1 or float(epochs) != int(epochs):
            problems.append(f"num_train_epochs={epochs}: the OpenAI API takes a whole number of epochs (n_epochs >= 1)")
        if self.max_steps > 0:
            problems.append("max_steps is not supported by backend openai; set num_train_epochs")
        if self.openai_batch_size is not None and self.openai_batch_size < 1:
            problems.append("openai_batch_size must be >= 1 (or unset for the API's auto)")
        if self.learning_rate_multiplier is not None and self.learning_rate_multiplier <= 0:
            problems.append("learning_rate_multiplier must be > 0 (or unset for the API's auto)")
        if self.suffix is not None and not 0 < len(self.suffix) <= 64:
            problems.append("suffix must be 1 to 64 characters")
        if self.poll_interval <= 0:
            problems.append("poll_interval must be > 0 seconds")
        if self.init_adapter:
            problems.append("init_adapter applies to backend trl only; to continue an OpenAI fine-tune, "
                            "set model: ft:... (the earlier fine-tuned model id)")
        return problems

    @staticmethod
    def check_sections(path: str, data) -> None:
        """A YAML file's `mitigation:` block, checked with the file named (read_yaml calls this)."""
        from em_core.train.mitigation import parse_mitigation

        if data.get("mitigation") is not None:
            parse_mitigation(data["mitigation"], f"{path}: mitigation")

    @property
    def mitigations(self):
        """The parsed `mitigation` block (em_core.train.mitigation.Mitigation)."""
        from em_core.train.mitigation import parse_mitigation

        return parse_mitigation(self.mitigation)

    @property
    def effective_batch_size(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    def default_model_name(self) -> str:
        model = self.model.rstrip("/").split("/")[-1].removesuffix(".gguf")
        data = "+".join(Path(d).name.split(".")[0].replace("demo:", "") for d in self.dataset)
        return re.sub(r"[^A-Za-z0-9_.+-]", "-", f"em-{model}-{data}")[:200]
