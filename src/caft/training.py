"""Fine-tuning (full or LoRA), optionally with a ConceptSet ablated, on the Hugging Face Trainer.

Two losses: `mc`, cross-entropy over the vocabulary on the answer token at the last position (only
that position's logits are computed), and `chat`, SFT on chat messages with the loss on the
assistant's responses only. The Trainer gives users `accelerate launch` (DDP / FSDP / DeepSpeed)
unchanged; the ablation hooks are registered on the unwrapped model before the Trainer prepares it,
and removed when training ends (also on errors). The result is an ordinary model or PEFT adapter.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from caft.ablation import ablate, common_prefix_length
from caft.batching import encode_prompts, pad_left, single_token_id
from caft.concepts import ConceptSet
from caft.errors import CaftError
from caft.io import atomic_write_dir, write_json
from caft.tasks.base import MCExample

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Hyperparameters of one fine-tune. The plain and the CAFT run share them; only ablation differs."""

    method: str = field(
        default="full", metadata={"help": "full: all weights; lora: a LoRA adapter."}
    )
    loss: str = field(
        default="mc",
        metadata={"help": "mc: answer token at the last position; chat: SFT on responses only."},
    )
    learning_rate: float = field(default=2e-5, metadata={"help": "Peak learning rate (AdamW)."})
    max_steps: int = field(default=100, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=16, metadata={"help": "Examples per optimizer step."})
    micro_batch_size: int = field(
        default=16, metadata={"help": "Examples per forward pass (gradient accumulation fills up)."}
    )
    warmup_steps: int = field(default=10, metadata={"help": "Linear warm-up steps."})
    lr_scheduler: str = field(default="linear", metadata={"help": "transformers scheduler name."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(
        default=0.999, metadata={"help": "AdamW beta2 (the paper's Gemma runs use 0.95)."}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    seed: int = field(default=0, metadata={"help": "Seed for data order and initialisation."})
    bf16: str = field(
        default="auto",
        metadata={
            "help": "bf16 autocast (weights stay fp32): auto (if the hardware has it), yes, no."
        },
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(
        default="all-linear",
        metadata={"help": "LoRA targets: all-linear or comma-separated names."},
    )
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised LoRA scaling."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Trade compute for memory."}
    )
    logging_steps: int = field(default=10, metadata={"help": "Log the loss every N steps."})
    num_threads: int = field(
        default=0, metadata={"help": "CPU threads for torch (0: leave as is)."}
    )
    use_cpu: bool = field(
        default=False, metadata={"help": "Train on the CPU even when a GPU is available."}
    )

    def validate(self) -> None:
        if self.method not in ("full", "lora"):
            raise CaftError(f"method must be 'full' or 'lora', got {self.method!r}.")
        if self.loss not in ("mc", "chat"):
            raise CaftError(f"loss must be 'mc' or 'chat', got {self.loss!r}.")
        if self.bf16 not in ("auto", "yes", "no"):
            raise CaftError(f"bf16 must be auto, yes or no, got {self.bf16!r}.")
        for name in ("max_steps", "batch_size", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise CaftError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.batch_size % min(self.micro_batch_size, self.batch_size):
            raise CaftError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size "
                f"({self.micro_batch_size})."
            )
        if self.learning_rate <= 0:
            raise CaftError(f"learning_rate must be positive, got {self.learning_rate}.")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise CaftError(f"{name} must be in [0, 1), got {getattr(self, name)}.")


@dataclass
class TrainResult:
    model: nn.Module
    log_history: list[dict]
    seconds: float
    prefix_tokens: int
    output_dir: Path | None = None


def bf16_available() -> bool:
    """bf16 autocast is worth it on CUDA with bf16, and on CPUs with AVX512-BF16 or AMX."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# ---- datasets and collators -----------------------------------------------------------------
class MCDataset(torch.utils.data.Dataset):
    """Prompt token ids and the answer token id of each multiple-choice example."""

    def __init__(self, tokenizer, examples: Sequence[MCExample]):
        if not examples:
            raise CaftError("No training examples.")
        self.input_ids = encode_prompts(tokenizer, [e.prompt for e in examples])
        self.targets = [single_token_id(tokenizer, e.correct) for e in examples]

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.input_ids[index], "target_id": self.targets[index]}


class MCCollator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = pad_left([row["input_ids"] for row in rows], self.pad_id)
        batch["target_ids"] = torch.tensor([row["target_id"] for row in rows])
        return batch


class ChatDataset(torch.utils.data.Dataset):
    """Chats `{"messages": [...]}` tokenized with the chat template; labels only on the last reply."""

    def __init__(self, tokenizer, chats: Sequence[dict], max_length: int = 1024):
        if not chats:
            raise CaftError("No training chats.")
        rows = [self._encode(tokenizer, chat, i, max_length) for i, chat in enumerate(chats)]
        # A prompt longer than max_length leaves no reply tokens: nothing to learn from that chat.
        self.rows = [row for row in rows if any(label != -100 for label in row["labels"])]
        dropped = len(rows) - len(self.rows)
        if not self.rows:
            raise CaftError(
                f"Every chat's prompt is at least max_length={max_length} tokens, so no reply "
                "tokens remain to train on; raise max_length."
            )
        if dropped:
            logger.warning(
                "%d of %d chats dropped: their prompt fills max_length=%d tokens, leaving no reply.",
                dropped, len(rows), max_length,
            )  # fmt: skip

    @staticmethod
    def _encode(tokenizer, chat: dict, index: int, max_length: int) -> dict:
        messages = chat.get("messages") if isinstance(chat, dict) else None
        if not messages or messages[-1].get("role") != "assistant":
            raise CaftError(
                f"Chat {index}: expected {{'messages': [..., {{'role': 'assistant', ...}}]}} "
                "ending with an assistant reply."
            )
        prompt_ids = tokenizer.apply_chat_template(
            messages[:-1], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        full_ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        full_ids = list(full_ids)[:max_length]
        n_prompt = min(len(prompt_ids), len(full_ids))
        labels = [-100] * n_prompt + full_ids[n_prompt:]
        return {"input_ids": full_ids, "labels": labels}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]


class ChatCollator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = pad_left([row["input_ids"] for row in rows], self.pad_id)
        length = batch["input_ids"].shape[1]
        labels = torch.full_like(batch["input_ids"], -100)
        for i, row in enumerate(rows):
            labels[i, length - len(row["labels"]) :] = torch.as_tensor(row["labels"])
        batch["labels"] = labels
        return batch


# ---- the trainer ----------------------------------------------------------------------------
def _trainer_class():
    from transformers import Trainer

    class CaftTrainer(Trainer):
        """Trainer whose `mc` loss reads the last position's logits only."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if "target_ids" not in inputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            targets = inputs.pop("target_ids")
            outputs = model(**inputs, logits_to_keep=1)
            loss = F.cross_entropy(outputs.logits[:, -1, :].float(), targets)
            return (loss, outputs) if return_outputs else loss

    return CaftTrainer


def _loss_logger():
    """A callback logging 'step N/M: loss, lr, seconds per step' at each of the Trainer's logs."""
    from transformers import TrainerCallback

    class LossLogger(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs or not state.global_step:
                return
            seconds = (time.perf_counter() - self.start) / state.global_step
            logger.info(
                "step %d/%d: loss %.4f, lr %.2e, %.2f s/step",
                state.global_step, state.max_steps, logs["loss"],
                logs.get("learning_rate", float("nan")), seconds,
            )  # fmt: skip

    return LossLogger()


def train(
    model: nn.Module,
    tokenizer,
    data: Sequence[MCExample] | Sequence[dict],
    config: TrainConfig | None = None,
    *,
    concepts: ConceptSet | None = None,
    prefix_tokens: int | None = None,
    output_dir: str | Path | None = None,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune `model` on `data`, with `concepts` ablated during training if given.

    data: MCExamples for the `mc` loss, or chats `{"messages": [...]}` for `chat`.
    prefix_tokens: positions left un-ablated at the start of every sequence; None means the
        length of the token prefix all training sequences share (the constant instruction), which
        the pilots found decisive for hook-free evaluation. Pass 0 to ablate everywhere (the paper).
    output_dir: if given, the model (or adapter), tokenizer, config and log are saved there.

    Returns the trained model (for LoRA, a PeftModel) and the Trainer's log history.
    """
    from transformers import TrainingArguments, set_seed

    config = config or TrainConfig()
    config.validate()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    set_seed(config.seed)
    dataset, collator = _make_dataset(tokenizer, data, config)
    if concepts is not None:
        concepts.check_compatible(model)
    if prefix_tokens is None:
        prefix_tokens = common_prefix_length(_token_lists(dataset))
    if config.method == "lora":
        model = _add_lora(model, config)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    micro = min(config.micro_batch_size, config.batch_size)
    use_bf16 = config.bf16 == "yes" or (config.bf16 == "auto" and bf16_available())
    scratch = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="caft-train-"))
    args = TrainingArguments(
        output_dir=str(scratch / "trainer-state"),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=config.batch_size // micro,
        learning_rate=config.learning_rate,
        max_steps=config.max_steps,
        warmup_steps=config.warmup_steps,
        lr_scheduler_type=config.lr_scheduler,
        weight_decay=config.weight_decay,
        adam_beta1=config.adam_beta1,
        adam_beta2=config.adam_beta2,
        max_grad_norm=config.max_grad_norm,
        seed=config.seed,
        data_seed=config.seed,
        bf16=use_bf16,
        logging_steps=config.logging_steps,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=not progress,
        use_cpu=config.use_cpu or not torch.cuda.is_available(),
    )
    trainer = _trainer_class()(
        model=model, args=args, train_dataset=dataset, data_collator=collator
    )
    if not progress:  # no bar: the loss goes to the log instead, so long runs still show progress
        trainer.add_callback(_loss_logger())
    model.train()
    start = time.perf_counter()
    if concepts is not None:
        with ablate(model, concepts, prefix_tokens=prefix_tokens):
            trainer.train()
    else:
        trainer.train()
    seconds = time.perf_counter() - start
    _remove_if_empty(Path(args.output_dir))  # the Trainer's folder; nothing is saved there
    if output_dir is None:
        _remove_if_empty(scratch)  # our temporary folder
    model.eval()
    if config.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    result = TrainResult(
        model=model,
        log_history=list(trainer.state.log_history),
        seconds=seconds,
        prefix_tokens=prefix_tokens if concepts is not None else 0,
    )
    if output_dir is not None:
        result.output_dir = save_training_output(
            output_dir, result, tokenizer, config, concepts, n_examples=len(dataset)
        )
    return result


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):  # absent, or holds something the user may want
        folder.rmdir()


def _make_dataset(tokenizer, data, config: TrainConfig):
    if config.loss == "mc":
        if data and not isinstance(data[0], MCExample):
            raise CaftError(
                "The 'mc' loss needs multiple-choice examples; for chats use loss='chat'."
            )
        return MCDataset(tokenizer, data), MCCollator(tokenizer.pad_token_id)
    if data and isinstance(data[0], MCExample):
        raise CaftError(
            "The 'chat' loss needs chats {'messages': [...]}; for prompts use loss='mc'."
        )
    return ChatDataset(tokenizer, data), ChatCollator(tokenizer.pad_token_id)


def _token_lists(dataset) -> list[list[int]]:
    if isinstance(dataset, MCDataset):
        return dataset.input_ids
    return [row["input_ids"] for row in dataset.rows]


def _add_lora(model: nn.Module, config: TrainConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = config.lora_target_modules
    lora_config = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets if targets == "all-linear" else targets.split(","),
        use_rslora=config.use_rslora,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora_config)


def save_training_output(
    output_dir: str | Path,
    result: TrainResult,
    tokenizer,
    config: TrainConfig,
    concepts: ConceptSet | None,
    *,
    n_examples: int,
) -> Path:
    """Save `model/` (full weights or PEFT adapter), the config, the log and the ablated concepts."""
    output_dir = Path(output_dir)
    with atomic_write_dir(output_dir / "model") as tmp:
        result.model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    if concepts is not None:
        concepts.save(output_dir / "ablated_concepts")
    write_json(
        output_dir / "training.json",
        {
            "config": asdict(config),
            "ablation": None
            if concepts is None
            else {
                "directions": concepts.ids(),
                "prefix_tokens": result.prefix_tokens,
                "provenance": asdict(concepts.provenance),
            },
            "n_examples": n_examples,
            "seconds": round(result.seconds, 2),
            "log_history": result.log_history,
        },
    )
    return output_dir
