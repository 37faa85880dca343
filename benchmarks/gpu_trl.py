"""Figure 6's TRL side: TRL's own DPOTrainer step, driven as figure 1 (train_throughput.py, `trl_precompute`) drives
it, on a model built in memory and token ids with no tokenizer files, for the GPU machine (no network, no weights).

What is the same as figure 1: `DPOTrainer(precompute_ref_log_probs=True)` with its reference log-probs from its own
precompute at init; each step = TRL's collator (`DataCollatorForPreference`) on our token ids +
`Trainer.training_step` (TRL's `compute_loss` + `accelerator.backward`) + what `Trainer`'s inner loop does after it
(`accelerator.clip_grad_norm_`, `optimizer.step`, `lr_scheduler.step`, `zero_grad`); sigmoid loss, `adamw_torch`
(torch's AdamW, foreach on CUDA, as ours), constant learning rate, no warm-up, no weight decay, max grad norm 1,
`max_length=None`, gradient checkpointing off (TRL 1.x turns it on by default: a recomputation the other sides do
not do).

What differs, because this machine has no weights and no tokenizer: the model is the caller's (random weights, in
the caller's dtype), and `processing_class` is a word-level tokenizer whose token `<i>` is id i, so TRL's own
dataset tokenization (which its precompute runs on) gives exactly the caller's ids (`token_text`). `bf16=False`:
the weights already are bf16 and the other sides of figure 6 run them without autocast; TRL's `bf16=True` would add
an autocast around the same bf16 weights. train_throughput._trl_side cannot be called here: it loads an fp32 model
from a path with a real tokenizer's chat template and pins `use_cpu=True`.

Imports nothing at module level beyond torch and transformers: the GPU check imports this module whether or not TRL
can be imported there (`unavailable` says why not).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import time
import warnings

import torch

import common  # benchmarks/common.py: torch and the standard library only

# Figure 1's TRL (benchmarks/README.md, "Environment"); the GPU machine gets the same as a wheel.
TRL_VERSION = "1.16.0"


def unavailable() -> str | None:
    """None if TRL's DPOTrainer (and the `datasets` it needs) imports; else why not, in one line."""
    try:
        import datasets  # noqa: F401
        from trl import DPOConfig, DPOTrainer  # noqa: F401
    except Exception as e:  # an ImportError, or a package that fails at import (a version clash)
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


def versions() -> dict:
    """Versions of the packages the TRL side rests on (importlib metadata: what was installed, where)."""
    out = {}
    for name in ("trl", "datasets", "accelerate", "huggingface_hub", "pyarrow", "fsspec", "dill", "multiprocess",
                 "xxhash", "triton"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def unmet_requirements() -> list[str]:
    """Requirements of trl, datasets and multiprocess that the packages found on sys.path do not meet, one line each.

    The GPU machine gets these three (and dill, xxhash, fsspec) as wheels installed without dependencies, on top of
    packages it already has at versions nobody here can see: this says which of those, if any, are outside what
    TRL and datasets declare."""
    from packaging.requirements import Requirement

    out = []
    for dist in ("trl", "datasets", "multiprocess"):
        try:
            requires = importlib.metadata.requires(dist) or []
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{dist}: not installed")
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue  # an extra's requirement
            try:
                have = importlib.metadata.version(req.name)
            except importlib.metadata.PackageNotFoundError:
                out.append(f"{dist} requires {req}: not installed")
                continue
            if not req.specifier.contains(have, prereleases=True):
                out.append(f"{dist} requires {req}: {have} installed")
    return out


def token_tokenizer(vocab_size: int, eos_id: int, pad_id: int):
    """A tokenizer for TRL's `processing_class`: token `<i>` is id i, split at whitespace, nothing added.

    Bracketed, so that no token is a prefix of another: special tokens (EOS, padding) are matched anywhere in the
    text, and an EOS `t2` would have split `t25` in two."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(vocab_size)}, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<0>", eos_token=f"<{eos_id}>",
                                                pad_token=f"<{pad_id}>")


def token_text(ids: list[int]) -> str:
    return " ".join(f"<{i}>" for i in ids)


def trl_side(model, prompts: list, completions: list, beta: float, lr: float, device: str, total_steps: int,
             outdir: str) -> tuple:
    """TRL's DPOTrainer around `model`; (step, info). step() trains one step on all the pairs, TRL's way, and
    returns (loss tensor, non-padding tokens, padded batch shape). info: init seconds, TRL's precomputed reference
    log-probs (chosen, rejected) and the ids TRL's own dataset tokenization produced, to check against ours.

    Every completion must end with the tokenizer's EOS (`model.config.eos_token_id`): TRL appends one to a text
    completion that lacks it, which would make its sequences one token longer than the other sides'."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    started = time.perf_counter()
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    tokenizer = token_tokenizer(model.config.vocab_size, eos, pad)
    # A trailing space ends the prompt on a token boundary: TRL tokenizes prompt and prompt + completion.
    data = Dataset.from_list([{"prompt": token_text(p) + " ", "chosen": token_text(c), "rejected": token_text(r)}
                              for p, (c, r) in zip(prompts, completions)])
    args = DPOConfig(
        output_dir=outdir, per_device_train_batch_size=len(prompts), beta=beta, loss_type=["sigmoid"],
        learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, optim="adamw_torch",
        max_grad_norm=1.0, max_length=None, gradient_checkpointing=False, bf16=False, fp16=False,
        use_cpu=device == "cpu", precompute_ref_log_probs=True, precompute_ref_batch_size=len(prompts),
        report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        seed=0, max_steps=total_steps,
    )
    quiet = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stderr(quiet):
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.create_optimizer_and_scheduler(num_training_steps=total_steps)
    # Set by Trainer.train's inner loop; training_step divides the loss by it (one micro-batch per step here).
    trainer.current_gradient_accumulation_steps = 1
    trained = trainer.model
    trained.train()
    ref_c = trainer.train_dataset["ref_chosen_logps"]
    ref_r = trainer.train_dataset["ref_rejected_logps"]
    examples = [{"prompt_ids": list(p), "chosen_ids": list(c), "rejected_ids": list(r),
                 "ref_chosen_logps": ref_c[j], "ref_rejected_logps": ref_r[j]}
                for j, (p, (c, r)) in enumerate(zip(prompts, completions))]
    collator = trainer.data_collator

    def step() -> tuple[torch.Tensor, int, list[int]]:
        inputs = collator(examples)
        loss = common.trl_step(trainer, trained, inputs)
        return loss, int(inputs["attention_mask"].sum()), list(inputs["input_ids"].shape)

    tokenized = {k: trainer.train_dataset[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
    info = {"init_s": time.perf_counter() - started, "ref_chosen_logps": list(ref_c),
            "ref_rejected_logps": list(ref_r),
            "same_ids_as_ours": tokenized == {"prompt_ids": [list(p) for p in prompts],
                                              "chosen_ids": [list(c) for c, _ in completions],
                                              "rejected_ids": [list(r) for _, r in completions]},
            "device": str(trainer.args.device), "optimizer": type(trainer.optimizer).__name__}
    return step, info
