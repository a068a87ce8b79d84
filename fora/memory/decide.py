"""What an estimate decides: whether the run fits, the largest batch that does, the cheapest change that makes it
fit, gradient checkpointing under --gradient_checkpointing auto, and the one line an out-of-memory error becomes."""

import contextlib
from dataclasses import dataclass

from fora.errors import UserError
from fora.memory.device import available_memory, gib, resident_memory
from fora.memory.estimate import Setting, estimate, with_changes

LARGEST_BATCH = 4096  # the batch search stops here


def fits(s: Setting, memory: int) -> bool:
    return estimate(s).total <= memory


def largest_batch(s: Setting, memory: int) -> int:
    """The largest per-device batch (at the longest batch's length) whose estimate fits `memory`; 0 if none."""
    if not fits(with_changes(s, batch=1), memory):
        return 0
    low, high = 1, 2
    while high <= LARGEST_BATCH and fits(with_changes(s, batch=high), memory):
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(with_changes(s, batch=middle), memory) else (low, middle)
    return low


@dataclass(frozen=True)
class Change:
    """A change of the run's flags that makes it fit, and its estimate."""

    flags: str
    why: str
    total: int


def cheapest_change(s: Setting, memory: int, quantizable: bool) -> Change | None:
    """The first change, cheapest first, that makes the run fit `memory`; then the same changes combined. Cheapest:
    gradient checkpointing (the same results, a forward pass more per step), a smaller batch with more accumulation
    (the same global batch), a 4-bit base (`quantizable`: the method trains on one; the base is rounded), a shorter
    cutoff (longer records lose their ends)."""
    steps = []
    if not s.checkpointing and s.method != "prefix":
        steps.append(("--gradient_checkpointing true", "recomputes activations in backward", dict(checkpointing=True)))
    if s.batch > 1:
        factor = s.batch  # batch 1 with accumulation scaled to keep the global batch
        steps.append((f"--per_device_train_batch_size 1 --gradient_accumulation_steps {s.accumulation * factor}",
                      "the same global batch in smaller pieces", dict(batch=1, accumulation=s.accumulation * factor)))
    if quantizable and not s.quantization_bit:
        steps.append(("--quantization_bit 4", "the frozen base in 4-bit NF4 (QLoRA)", dict(quantization_bit=4)))
    for cutoff in (s.length // 2, s.length // 4):
        if cutoff >= 64:
            half = cutoff // 2
            steps.append((f"--max_source_length {half} --max_target_length {cutoff - half}",
                          f"records cut to {cutoff} tokens", dict(length=cutoff)))
    for flags, why, changes in steps:
        total = estimate(with_changes(s, **changes)).total
        if total <= memory:
            return Change(flags, why, total)
    combined, flags = s, []
    for flag, _, changes in steps:
        combined = with_changes(combined, **changes)
        flags.append(flag)
        total = estimate(combined).total
        if total <= memory:
            return Change(" ".join(flags), "all of these together", total)
    return None


def device_memory(cuda: bool) -> tuple[int, str]:
    """Memory the run may use on this machine's device: what is free, plus what this process already holds there
    (on a CPU its resident memory, which the estimate counts as framework overhead)."""
    free, source = available_memory(cuda)
    return free + (0 if cuda else resident_memory()), source


def gradient_checkpointing(s: Setting, log) -> bool:
    """--gradient_checkpointing auto: on when the run's estimate without it exceeds the memory its device has,
    off otherwise (and for prefix tuning, which cannot checkpoint); said in one line."""
    memory, source = device_memory(s.cuda)
    without = estimate(with_changes(s, checkpointing=False)).total
    if without <= memory:
        log(f"Gradient checkpointing: off (auto): the run's estimate, {gib(without)} GiB, fits the {gib(memory)} GiB "
            f"of {source}")
        return False
    if s.method == "prefix":
        log(f"Gradient checkpointing: off (auto): prefix tuning cannot checkpoint, though the run's estimate, "
            f"{gib(without)} GiB, exceeds the {gib(memory)} GiB of {source}")
        return False
    with_ = estimate(with_changes(s, checkpointing=True)).total
    log(f"Gradient checkpointing: on (auto): the run's estimate without it, {gib(without)} GiB, exceeds the {gib(memory)} "
        f"GiB of {source} (with it: {gib(with_)} GiB)")
    return True


def out_of_memory_line(s: Setting | None, what: str, quantizable: bool) -> str:
    """The one line an out-of-memory error becomes: the estimate, what the device had, the cheapest change."""
    if s is None:
        return f"out of memory {what}; estimate the run with estimate_memory.py (the same flags) to see what fits"
    memory, source = device_memory(s.cuda)
    total = estimate(s).total
    # An estimate within the memory was short (or others took some): then the change that needs less than the estimate.
    change = cheapest_change(s, min(memory, total - 1), quantizable)
    advice = f"try {change.flags} ({change.why}: {gib(change.total)} GiB)" if change else "no single change fits it here"
    return (f"out of memory {what}: the run's estimate is {gib(total)} GiB and {source} was {gib(memory)} GiB; "
            f"{advice} (estimate_memory.py with the same flags shows every line)")


class RunMemory:
    """The memory estimate of the run a training recipe is about to start (its flags and tokenized data; without data,
    the flags' lengths), built when first needed: it decides --gradient_checkpointing auto and words an out-of-memory
    error."""

    def __init__(self, model_args, data_args, finetuning_args, training_args, dataset=None):
        self.arguments = (model_args, data_args, finetuning_args, training_args)
        self.dataset = dataset
        self._setting: Setting | None = None

    def setting(self) -> Setting:
        """The run's Setting; a UserError when the model's shape cannot be read from its config."""
        import torch

        from fora.memory.plan import setting, trained_positions

        if self._setting is None:
            model_args, data_args, finetuning_args, training_args = self.arguments
            self._setting = setting(model_args, data_args, finetuning_args, training_args, training_args.world_size,
                                    torch.cuda.is_available(),
                                    None if self.dataset is None else trained_positions(self.dataset))
        return self._setting

    def gradient_checkpointing(self, log) -> bool:
        """--gradient_checkpointing auto, decided by every process alike (on where any one of them needs it)."""
        import torch

        try:
            on = gradient_checkpointing(self.setting(), log)
        except UserError as error:
            log(f"Gradient checkpointing: off (auto): the run has no memory estimate ({error})")
            on = False
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor(int(on), device="cuda" if torch.cuda.is_available() else "cpu")
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            on = bool(flag.item())
        return on

    @contextlib.contextmanager
    def out_of_memory_in_one_line(self, what: str):
        """Turn an out-of-memory error inside the block into one UserError line (the estimate, the memory there was,
        the cheapest change that fits); other errors pass."""
        from fora.infer.generate import out_of_memory, release_device_memory
        from fora.tuners.methods import METHODS

        try:
            yield
        except (RuntimeError, MemoryError) as error:
            if not out_of_memory(error):
                raise
            del error
            release_device_memory()
            try:
                run = with_changes(self.setting(), checkpointing=self.arguments[3].gradient_checkpointing is True)
            except UserError:
                run = None
            quantizable = METHODS[self.arguments[2].finetuning_type].quantized
            raise UserError(out_of_memory_line(run, what, quantizable)) from None


def generation_out_of_memory_line(model, batch: int, prompt_length: int, new_tokens: int) -> str:
    """The one line an out-of-memory error in prediction becomes: the estimate of generating a batch (the loaded
    weights, the KV cache of prompt and new tokens, the last positions' logits), what the device had, and the largest
    --batch_size that fits, else a 4-bit base or fewer new tokens."""
    import torch

    from fora.memory.architectures import Architecture

    cuda = next(model.parameters()).device.type == "cuda"
    memory, source = device_memory(cuda)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    overhead = 0 if cuda else resident_memory() - weights
    try:
        arch = Architecture.of(model.config.get_text_config(decoder=True))
    except UserError:
        return (f"out of memory while generating at --batch_size {batch}; {source} was {gib(memory)} GiB: try a smaller "
                "--batch_size or --max_new_tokens, or --quantization_bit 4")
    a = torch.finfo(getattr(model, "dtype", torch.float32)).bits // 8
    per_row = (prompt_length + new_tokens) * arch.layers * 2 * arch.kv_width * a + arch.vocab * 4
    working = min(batch * prompt_length, 4096) * (arch.hidden * 4 + arch.intermediate * 3) * a
    total = weights + overhead + working + batch * per_row
    room = memory - weights - overhead - working
    if room >= per_row and batch > 1:
        fitting = min(batch - 1, room // per_row)
        advice = f"--batch_size {fitting} ({gib(weights + overhead + working + fitting * per_row)} GiB)"
    elif not getattr(model, "is_quantized", False):
        advice = "--quantization_bit 4 (the base in 4-bit NF4), or fewer --max_new_tokens"
    else:
        advice = "fewer --max_new_tokens or a shorter --max_source_length"
    return (f"out of memory while generating at --batch_size {batch} (prompts up to {prompt_length} tokens, {new_tokens} new): "
            f"the estimate is {gib(total)} GiB and {source} was {gib(memory)} GiB; try {advice}")
