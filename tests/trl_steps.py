"""One step of a real TRL 1.16 trainer on CPU, profiled inside `trainer.train()`, for ground truth.

The alignment stages are planned from TRL's code (planner/stage_steps.py traces their losses on
the meta device); this runs the trainers themselves, the HF Trainer's loop included: DPOTrainer
with its collator and reference forward, KTOTrainer with its KL batch, GRPOTrainer and
RLOOTrainer generating with `generate` before the step that trains on the completions,
RewardTrainer on a sequence-classification head. A callback starts PyTorch's memory profiler at
a step's beginning and stops it at its end (after the optimizer step and zero_grad), so the
reading is one whole step as the trainer runs it, after a warm-up step that creates the
optimizer state.

Lengths are made exact so the plan's `seq_len` means the run's: a word-level tokenizer (trained
vocabulary of numbered words, one token each) and texts longer than `max_length`, which the
trainers truncate; GRPO's prompts are exactly `seq_len` words and `min_new_tokens` keeps every
completion `max_new_tokens` long, the plan's longest case.

On CPU, TRL's fused LM head runs its torch fallback instead of the Triton kernels, whose whole-tile
fp32 temporaries (a few tokens x vocabulary each) CUDA does not allocate: the vocabulary here is
small (128) so they stay under 1% of the step.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from tests.realstack import StepPeak, step_bytes_and_phase, timeline_peak

VOCAB = 128
SPECIAL = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}


@dataclass(frozen=True)
class TrlStep:
    """What one measured trainer step ran."""

    stage: str
    method: str = "lora"
    gradient_checkpointing: bool = True
    batch_size: int = 2
    seq_len: int = 128
    hidden_size: int = 512
    layers: int = 2
    precompute_ref_log_probs: bool = False
    beta: float | None = None
    max_new_tokens: int = 32
    num_generations: int = 2
    steps_per_generation: int | None = None

    def config(self) -> dict:
        return dict(model_type="llama", hidden_size=self.hidden_size, intermediate_size=self.hidden_size * 11 // 4, num_hidden_layers=self.layers,
                    num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=4096, tie_word_embeddings=False,
                    pad_token_id=3, bos_token_id=1, eos_token_id=2)

    def plan_options(self) -> dict:
        """The plan's options for the same run (TRL's trainer, bf16 weights under bf16 autocast, AdamW fused)."""
        options = dict(method=self.method, stage=self.stage, trainer="trl", weights_dtype="bf16", precision="bf16",
                       gradient_checkpointing=self.gradient_checkpointing, batch_size=self.batch_size, seq_len=self.seq_len,
                       lora_r=16, lora_dropout=0.0, gpu_memory_gib=80, optimizer="adamw", precompute_ref_log_probs=self.precompute_ref_log_probs)
        if self.beta is not None:
            options["beta"] = self.beta
        if self.stage in ("grpo", "rloo"):
            options.update(max_new_tokens=self.max_new_tokens, num_generations=self.num_generations, steps_per_generation=self.steps_per_generation)
        return options


def _words(count: int, seed: int) -> str:
    return " ".join(f"w{(seed * 7 + j) % (VOCAB - len(SPECIAL))}" for j in range(count))


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {**SPECIAL, **{f"w{i}": i + len(SPECIAL) for i in range(VOCAB - len(SPECIAL))}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def _rows(run: TrlStep, count: int = 64) -> list[dict]:
    long = run.seq_len  # a completion alone fills max_length: every row is truncated to exactly seq_len tokens
    if run.stage == "reward":  # RewardTrainer drops a pair longer than max_length: prompt + completion is exactly seq_len
        half = run.seq_len // 2
        return [{"prompt": _words(half, i), "chosen": _words(run.seq_len - half, i + 1), "rejected": _words(run.seq_len - half, i + 2)}
                for i in range(count)]
    if run.stage == "sft":
        return [{"text": _words(run.seq_len + 8, i)} for i in range(count)]
    if run.stage in ("dpo", "orpo", "simpo"):
        return [{"prompt": _words(run.seq_len // 2, i), "chosen": _words(long, i + 1), "rejected": _words(long, i + 2)} for i in range(count)]
    if run.stage == "kto":
        return [{"prompt": _words(run.seq_len // 2, i), "completion": _words(long, i + 1), "label": i % 2 == 0} for i in range(count)]
    return [{"prompt": _words(run.seq_len, i)} for i in range(count)]  # grpo, rloo: prompts of exactly seq_len tokens


def _reward(completions, **_):
    return [float(len(c)) for c in completions]


def _trainer(run: TrlStep, out: Path, model_path: str, tokenizer, max_steps: int):
    from datasets import Dataset
    from peft import LoraConfig

    common = dict(output_dir=str(out / "out"), per_device_train_batch_size=run.batch_size, bf16=True, use_cpu=True, report_to=[],
                  gradient_checkpointing=run.gradient_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False},
                  logging_steps=1000, save_strategy="no", max_steps=max_steps, dataloader_num_workers=0, disable_dropout=True,
                  model_init_kwargs={"dtype": "bfloat16"})
    if run.beta is not None:
        common["beta"] = run.beta
    peft = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0,
                      task_type="SEQ_CLS" if run.stage == "reward" else "CAUSAL_LM") if run.method == "lora" else None
    data = Dataset.from_list(_rows(run))
    if run.stage == "sft":
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(max_length=run.seq_len, **{k: v for k, v in common.items() if k != "disable_dropout"})
        return SFTTrainer(model=model_path, args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft)
    if run.stage == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(max_length=run.seq_len, precompute_ref_log_probs=run.precompute_ref_log_probs, **common)
        return DPOTrainer(model=model_path, args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft)
    if run.stage in ("orpo", "simpo"):  # trl.experimental's trainers, on the concatenated pairs
        if run.stage == "orpo":
            from trl.experimental.orpo import ORPOConfig as Config
            from trl.experimental.orpo import ORPOTrainer as Trainer
        else:
            from trl.experimental.cpo import CPOConfig as Config
            from trl.experimental.cpo import CPOTrainer as Trainer

            common.update(loss_type="simpo", cpo_alpha=0.0)
        experimental = {k: v for k, v in common.items() if k not in ("disable_dropout", "model_init_kwargs")}
        args = Config(max_length=run.seq_len, max_completion_length=run.seq_len - run.seq_len // 2, **experimental)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
        return Trainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft)
    if run.stage == "kto":
        from trl import KTOConfig, KTOTrainer

        args = KTOConfig(max_length=run.seq_len, precompute_ref_log_probs=run.precompute_ref_log_probs, **common)
        return KTOTrainer(model=model_path, args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft)
    if run.stage == "reward":
        from trl import RewardConfig, RewardTrainer

        args = RewardConfig(max_length=run.seq_len, **common)
        return RewardTrainer(model=model_path, args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft)
    generating = dict(num_generations=run.num_generations, max_completion_length=run.max_new_tokens,
                      generation_kwargs={"min_new_tokens": run.max_new_tokens}, steps_per_generation=run.steps_per_generation, **common)
    if run.stage == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        return GRPOTrainer(model=model_path, reward_funcs=_reward, args=GRPOConfig(**generating), train_dataset=data,
                           processing_class=tokenizer, peft_config=peft)
    from trl import RLOOConfig, RLOOTrainer

    return RLOOTrainer(model=model_path, reward_funcs=_reward, args=RLOOConfig(**generating), train_dataset=data,
                       processing_class=tokenizer, peft_config=peft)


def measure_trl_step(run: TrlStep) -> StepPeak:
    """The peak of the second step as this CPU runs it (for a generating stage, of the next step
    that generates), and, only if a check asks for it, of the same step in a second run with
    oneDNN off (tests/realstack.StepPeak): profiling a step costs seconds, a generation a minute."""
    return StepPeak(_profiled_step(run, onednn=True), lambda: _profiled_step(run, onednn=False))


def _profiled_step(run: TrlStep, onednn: bool) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

    out = Path(tempfile.mkdtemp(prefix="vramplan-trl-"))
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    config = {k: v for k, v in run.config().items() if k != "model_type"}
    model = LlamaForCausalLM(LlamaConfig(**config, architectures=["LlamaForCausalLM"])).to(torch.bfloat16)
    model.save_pretrained(out / "model")  # loaded by path, as a user's run names its model
    tokenizer.save_pretrained(out / "model")
    del model
    peaks: list[int] = []
    # a generating stage generates on every steps_per_generation-th step: the first step after
    # the first is read, so that optimizer state exists as in every later step
    profiled = (run.steps_per_generation or 1) if run.stage in ("grpo", "rloo") else 1

    class ProfileStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == profiled:
                from torch.profiler import ProfilerActivity, profile

                self.onednn = torch.backends.mkldnn.flags(enabled=onednn)
                self.onednn.__enter__()
                self.profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True)
                self.profiler.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if getattr(self, "profiler", None) is not None:
                self.profiler.__exit__(None, None, None)
                self.onednn.__exit__(None, None, None)
                peaks.append(timeline_peak(self.profiler))
                self.profiler = None

    trainer = _trainer(run, out, str(out / "model"), tokenizer, max_steps=profiled + 1)
    trainer.add_callback(ProfileStep())
    trainer.train()
    (peak,) = peaks
    return peak


def planned_trl_step(run: TrlStep) -> tuple[int, str]:
    """The plan's peak for the same step without the CUDA-only runtime components, and its phase."""
    from planner.introspect import spec_from_config
    from planner.options import TrainingOptions
    from planner.plan import build_plan

    return step_bytes_and_phase(build_plan(spec_from_config(run.config(), "tiny-llama"), TrainingOptions(**run.plan_options())))


def traced_trl_step(run: TrlStep) -> int:
    """The simulated plan's traced step (planner/step_trace.py) less its cuBLAS workspace, which
    only CUDA allocates; SimulationUnsupported where the stage is not traced."""
    from planner.options import TrainingOptions
    from planner.step_trace import CUBLAS_WORKSPACE_BYTES, simulate_step

    return simulate_step(run.config(), TrainingOptions(**run.plan_options())).peaks.peak_allocated - CUBLAS_WORKSPACE_BYTES
