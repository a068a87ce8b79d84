"""The memory one device needs for a training run, line by line, before it runs.

The peak is the largest of three moments of a step (after the first, when the optimizer's states exist):
    forward end     what stays (weights, adapter, optimizer states, gradients carried between accumulation steps)
                    + every activation backward will read + the loss's logits and their gradients
    backward start  the same activations + one layer's backward working space + the output layer's gradient
    optimizer step  what stays + every gradient
What each line counts, and where it comes from in the code that trains: docs/memory.md; measured against runs
there too. Activations are counted per token, per layer, as the families' code saves them (autocast included);
with gradient checkpointing each layer keeps only its input and one layer at a time is recomputed.
"""

import math
from dataclasses import dataclass, field, replace

from fora.memory.architectures import Architecture
from fora.memory.census import Census
from fora.train.loss import LOSS_CHUNK

# On a CUDA device, what the CUDA context, cuBLAS and cuDNN hold outside torch's allocator (an assumption, not
# measured here: docs/memory.md).
CUDA_CONTEXT = 512 * 2**20
# 4-bit NF4 with double quantization: half a byte per weight, a one-byte scale per block of 64, a float32 scale
# per 256 blocks. LLM.int8: a byte per weight and a float32 scale per output row.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
# On a CPU, glibc's malloc keeps freed blocks in its heaps, so the resident peak exceeds the live tensors by a share
# of the activations; with --unmap_freed_memory (a 4/8-bit base) large blocks go back to the system when freed.
# Both shares are fitted on the study in docs/memory.md, whose error column is what is left after them.
CPU_HEAP_RETENTION = 0.45
CPU_UNMAPPED_RETENTION = 0.10
OPTIMIZER_STATE_BYTES = {"8bit": 2, "sgd": 0}  # per trainable element; Adam's two states otherwise (see `optimizer_states`)


@dataclass(frozen=True)
class Setting:
    """A training run as its memory sees it (built from the flags by fora.memory.report.setting)."""

    architecture: Architecture
    census: Census
    method: str  # --finetuning_type
    rank: int
    dropout: float
    fora_mid_ratio: float
    use_dora: bool
    virtual_tokens: int
    quantization_bit: int | None
    dtype_bytes: int  # the base's weights (the compute dtype under a 4/8-bit base)
    mixed: str | None  # "bf16", "fp16", or None
    batch: int  # rows per device
    length: int  # the longest batch's padded length
    supervised: int  # trained positions in that batch
    checkpointing: bool
    accumulation: int
    optimizer: str
    zero_stage: int  # DeepSpeed ZeRO stage; 0 without it
    deepspeed: bool
    offload_optimizer: bool
    devices: int
    cuda: bool
    unmap_freed_memory: bool
    loss_path: str  # "supervised", "logits" or "model" (fora.train.trainer.choose_loss_path)
    overhead: int  # what the framework holds before the model (see docs/memory.md)


@dataclass
class Estimate:
    """Bytes per line, the total (the peak) and the moment it falls in."""

    lines: dict[str, int] = field(default_factory=dict)
    activations_without_checkpointing: int = 0
    activations_with_checkpointing: int = 0
    peak_at: str = ""

    @property
    def total(self) -> int:
        return sum(self.lines.values())


def estimate(s: Setting) -> Estimate:
    arch, census = s.architecture, s.census
    a = 2 if s.mixed or s.deepspeed and s.dtype_bytes == 2 else s.dtype_bytes  # activation bytes
    half = s.dtype_bytes == 2 or s.mixed is not None
    # Trainable tensors: PEFT keeps adapters in float32 on a half base; under --fp16 without DeepSpeed the trained base
    # weights are kept in float32 too (fora.precision.keep_trainable_in_float32); DeepSpeed casts all to half.
    adapter = METHOD_IS_ADAPTER.get(s.method, True) and not (s.method == "prefix" and arch.model_type == "chatglm")
    if s.deepspeed and half:
        trained_bytes = 2
    elif adapter or s.mixed == "fp16":
        trained_bytes = 4
    else:
        trained_bytes = s.dtype_bytes
    partitions = s.devices if s.zero_stage >= 1 else 1
    est = Estimate()
    est.lines["weights"] = frozen_weights(s)
    est.lines["trainable parameters"] = census.trainable * trained_bytes // (s.devices if s.zero_stage >= 3 else 1)
    master = census.trainable * 4 // partitions if s.deepspeed and half else 0  # DeepSpeed's float32 copy
    states = optimizer_states(s, trained_bytes if not s.deepspeed else 4) // partitions
    if s.offload_optimizer:
        master = states = 0  # on the host
    est.lines["optimizer states"] = states + master
    gradients = census.trainable * (4 if s.deepspeed and s.zero_stage >= 2 else trained_bytes) // (s.devices if s.zero_stage >= 2 else 1)
    buckets = 2 * min(census.trainable, 5 * 10**8) * a if s.zero_stage >= 1 else 0  # ZeRO's reduce and all-gather buckets

    without, with_ = activations(s, a, checkpointing=False), activations(s, a, checkpointing=True)
    est.activations_without_checkpointing, est.activations_with_checkpointing = without, with_
    saved = with_ if s.checkpointing else without
    tokens = s.batch * (s.length + (s.virtual_tokens if s.method == "prompt" else 0))
    layer_backward = tokens * layer_bytes(s, a) if not s.checkpointing else tokens * layer_bytes(s, a) * 2
    loss = loss_buffers(s, a, tokens, census.output_trains)
    dequantize = max(linear.inputs * linear.outputs for linear in arch.linears) * 2 * a if s.quantization_bit else 0
    head_gradient = arch.vocab * arch.hidden * trained_bytes if census.output_trains else 0
    carried = gradients if s.accumulation > 1 else 0  # earlier micro-batches' gradients, kept for the optimizer step
    moments = {
        "forward end": {"gradients": carried, "activations": saved, "logits and loss": loss, "4-bit dequantization": dequantize},
        "backward start": {"gradients": carried + head_gradient, "activations": saved, "backward working space": layer_backward,
                           "4-bit dequantization": dequantize},
        "optimizer step": {"gradients": gradients},
    }
    est.peak_at = max(moments, key=lambda moment: sum(moments[moment].values()))
    for line in ("gradients", "activations", "logits and loss", "4-bit dequantization", "backward working space"):
        est.lines[line] = moments[est.peak_at].get(line, 0)
    est.lines["ZeRO buckets"] = buckets
    est.lines["framework overhead"] = s.overhead
    if not s.cuda:
        retention = CPU_UNMAPPED_RETENTION if s.quantization_bit and s.unmap_freed_memory else CPU_HEAP_RETENTION
        # What the step's largest moment freed stays resident: the optimizer step's peak carries backward's heap too.
        working = max(sum(moment.values()) - moment.get("gradients", 0) for moment in moments.values())
        est.lines["allocator retention (CPU)"] = int(retention * working)
    return est


METHOD_IS_ADAPTER = {"freeze": False, "full": False}


def frozen_weights(s: Setting) -> int:
    """The frozen base: quantized linear weights at their packed size; the rest in its dtype (float32 where PEFT's
    4-bit preparation upcasts float16 weights, see fora.tuners.attach)."""
    census, arch = s.census, s.architecture
    frozen = census.total - census.trainable
    partitions = s.devices if s.zero_stage >= 3 else 1
    if not s.quantization_bit:
        return frozen * s.dtype_bytes // partitions
    packed = census.quantizable * (NF4_BYTES if s.quantization_bit == 4 else 1 + 4 / arch.hidden)
    other_bytes = 4 if s.dtype_bytes == 2 and s.mixed == "fp16" else s.dtype_bytes
    return int(packed + (frozen - census.quantizable) * other_bytes)


def optimizer_states(s: Setting, state_bytes: int) -> int:
    """The optimizer's states for every trainable tensor: Adam's two moments in the parameter's dtype (float32 under
    DeepSpeed), bitsandbytes' 8-bit ones, none for plain SGD, Adafactor's factored second moment."""
    name = s.optimizer
    if "8bit" in name:
        return s.census.trainable * OPTIMIZER_STATE_BYTES["8bit"]
    if name == "sgd":
        return 0
    if "adafactor" in name:
        return sum(4 * (shape[0] + math.prod(shape[1:]) if len(shape) > 1 else shape[0]) for shape in s.census.trainable_shapes)
    moments = 1 if "lion" in name else 2
    return s.census.trainable * moments * state_bytes


def activations(s: Setting, a: int, checkpointing: bool) -> int:
    """Bytes of the activations backward reads, for the longest batch: every trained layer's (or, checkpointed, every
    layer's input and one layer recomputed), the embedding's and final norm's, and eager attention's scores."""
    arch = s.architecture
    length = s.length + (s.virtual_tokens if s.method == "prompt" else 0)
    tokens = s.batch * length
    layers = s.census.trained_layers if s.method in ("freeze",) else arch.layers
    per_layer = tokens * layer_bytes(s, a)
    scores = 0
    if arch.eager_attention:  # softmax over (heads x length x length): a float32 softmax cast back, or in the dtype
        per_score = (4 + a) if arch.model_type != "baichuan" or not arch.alibi else a
        scores = s.batch * arch.heads * length * length * per_score
    if not checkpointing:
        body = layers * (per_layer + scores)
    else:
        body = layers * tokens * a * arch.hidden + per_layer + scores
    final_norm = tokens * (4 + a) * arch.hidden
    mask = s.batch * length * length if not s.census.proven_loss or s.method in ("prefix", "prompt") else 0  # a padding mask
    return body + final_norm + mask


def layer_bytes(s: Setting, a: int) -> int:
    """Bytes one Transformer block keeps for backward, per token."""
    arch = s.architecture
    h, q, kv, inner = arch.hidden, arch.q_width, arch.kv_width, arch.intermediate
    trains_base = s.method in ("full", "freeze")
    adapted = set(s.census.adapted)
    saves_input = lambda linear: trains_base or linear.name in adapted  # noqa: E731
    norm_input = 4 if arch.rms_norm or s.mixed else a  # RMSNorm and autocast's LayerNorm compute in float32
    total = 0
    attention_in, mlp_in = arch.attention[:-1], arch.mlp[:-1]
    norms = [attention_in] if arch.parallel and len(arch.norms) == 1 else [attention_in, mlp_in]
    if arch.parallel and len(arch.norms) == 1:
        norms = [attention_in + mlp_in]
    for consumers in norms:
        total += norm_input * h
        if any(saves_input(linear) for linear in consumers):
            total += a * h
        if trains_base:
            total += a * h  # the normalized input, for the norm's own weight
    fused = len(arch.attention) == 2  # q, k and v from one linear: v is a view that keeps the whole output alive
    total += a * (q + kv) + a * (arch.attention[0].outputs - q - kv if fused else 0) + a * kv  # rotated q, k; v
    total += a * q + 4 * arch.heads * 1  # attention output (the output projection's input) and its log-sum-exp
    if arch.eager_attention:
        total += a * q  # the context, made contiguous for the output projection
    if arch.gated:
        total += a * 3 * inner + (a * inner if saves_input(arch.mlp[-1]) else 0)  # gate, up, act(gate); their product
    else:
        total += a * inner + (a * inner if saves_input(arch.mlp[-1]) else 0)  # fc output; its activation
    total += sum(adapter_bytes(s, a, linear) for linear in arch.linears if linear.name in adapted)
    return total


def adapter_bytes(s: Setting, a: int, linear) -> int:
    """What an adapter adds to a linear layer's saved activations, per token."""
    extra = linear.inputs * (a + 1) if s.dropout > 0 and s.method in ("lora", "fora", "adalora") else 0  # dropout and its mask
    if s.method in ("lora", "adalora"):
        return extra + a * s.rank + (2 * a * linear.outputs if s.use_dora else 0)
    if s.method == "fora":
        return extra + a * (max(2, math.floor(s.fora_mid_ratio * linear.inputs)) + 3 * s.rank)
    if s.method == "oft":
        return a * linear.inputs
    if s.method == "ia3":
        return a * linear.outputs
    if s.method in ("loha", "lokr"):  # the delta weight, built whole every forward: per layer, not per token
        return math.ceil(a * linear.inputs * linear.outputs / max(1, s.batch * s.length))
    return 0


def loss_buffers(s: Setting, a: int, tokens: int, output_trains: bool) -> int:
    """The loss's largest buffers. Supervised-position loss (fora.train.loss): one chunk of at most LOSS_CHUNK rows of
    float32 logits with logsumexp's temporary of their size, and the float32 gradient of a trained output layer. Full logits:
    every position's, the trained ones copied, in float32 and their log-softmax (the model's own loss: all positions)."""
    vocab = s.architecture.vocab
    if s.loss_path == "supervised":  # a chunk's float32 logits and logsumexp's float32 temporary
        rows = min(s.supervised, LOSS_CHUNK)
        return rows * vocab * 8 + (vocab * s.architecture.hidden * 4 if output_trains else 0)
    if s.loss_path == "model":
        return tokens * vocab * (a + 8)
    copies = 2 if s.architecture.custom_code else 1  # remote code transposes its logits into a new tensor
    return copies * tokens * vocab * a + s.supervised * vocab * (a + 8)


def with_changes(s: Setting, **changes) -> Setting:
    """`s` with some inputs changed (batch, checkpointing, quantization, length): for the search of what fits."""
    if "batch" in changes and "supervised" not in changes:
        changes["supervised"] = max(1, round(s.supervised * changes["batch"] / s.batch))
    if "length" in changes and "supervised" not in changes:
        changes["supervised"] = max(1, round(s.supervised * changes["length"] / s.length))
    return replace(s, **changes)
