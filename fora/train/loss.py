"""The supervised-position loss: next-token cross-entropy over the positions whose label is trained, with
the output layer applied at those positions only, on the architectures where a test proves it equal to the
model's own loss (SUPERVISED_LOSS_MODELS)."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from fora.data.encode import IGNORE_INDEX

LOSS_CHUNK = 2048  # supervised positions per output-layer chunk


@dataclass(frozen=True)
class OutputLogits:
    """What a model's forward does to its output layer's result z before the loss:
    logits = softcap·tanh(scale·z / softcap), or scale·z when there is no softcap."""

    scale: float = 1.0
    softcap: float | None = None


def plain_logits(config: PretrainedConfig) -> OutputLogits:
    return OutputLogits()


def softcapped_logits(config: PretrainedConfig) -> OutputLogits:
    return OutputLogits(softcap=config.final_logit_softcapping)  # None: the model leaves its logits as they are

# The proven list: model types whose supervised-position loss tests/train/test_loss.py shows equal to the
# model's own `model(input_ids, attention_mask, labels)` (loss and gradients, right-padded batch), each with
# what its forward applies after the output layer. Any other model gets full logits and its padding mask.
SUPERVISED_LOSS_MODELS: dict[str, Callable[[PretrainedConfig], OutputLogits]] = {
    **dict.fromkeys(
        ("llama", "mistral", "ministral", "qwen2", "qwen3", "gemma", "phi", "phi3", "olmo", "olmo2", "olmo3",
         "smollm3", "glm4", "starcoder2", "stablelm", "gpt_neox", "gpt2", "gpt_bigcode", "bloom", "falcon", "opt"),
        plain_logits,
    ),
    "gemma2": softcapped_logits,
    "gemma3_text": softcapped_logits,
    "cohere": lambda config: OutputLogits(scale=config.logit_scale),
    "cohere2": lambda config: OutputLogits(scale=config.logit_scale),
    "granite": lambda config: OutputLogits(scale=1 / config.logits_scaling),
}


class DecoderOutput:
    """The final hidden states of a model's decoder body (after its final norm: what the output layer reads),
    caught by a forward hook while the model runs. Asking the model for them instead (output_hidden_states)
    returns every layer's states, which mixed precision then converts to float32 one by one: a float32 copy
    of all the activations, which gradient checkpointing exists to avoid."""

    def __init__(self, decoder: nn.Module):
        self.value: torch.Tensor | None = None
        decoder.register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        self.value = output[0]  # last_hidden_state, of a ModelOutput or a tuple

    def take(self) -> torch.Tensor:
        value, self.value = self.value, None
        return value


def supervised_loss_sum(
    states: torch.Tensor, labels: torch.Tensor, head: nn.Linear | None, output: OutputLogits = OutputLogits()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over the positions whose label is trained, and their count.

    `states` are the final hidden states (then `head` is the output layer and `output` what the model
    does to its result) or the logits (`head` is None). Only supervised positions go through the head,
    LOSS_CHUNK rows at a time, so the batch × length × vocabulary logits are never built (see HeadCrossEntropy).
    """
    targets = labels[:, 1:]
    positions = targets.ne(IGNORE_INDEX)
    selected = states[:, :-1][positions]
    selected_targets = targets[positions]
    if head is None:
        total = F.cross_entropy(selected.float(), selected_targets, reduction="sum")
    else:
        # The states come from inside the model's autocast forward (mixed precision); the head runs here,
        # outside that autocast, in its own dtype.
        selected = selected.to(head.weight.dtype)
        total = HeadCrossEntropy.apply(
            selected, head.weight, head.bias, selected_targets, output.scale, output.softcap, torch.is_grad_enabled()
        )
    return total, positions.sum()


class HeadCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(logits, targets)) with logits = OutputLogits(scale, softcap) of F.linear(hidden, weight, bias),
    and its gradients taken in the same pass.

    Per chunk of LOSS_CHUNK rows: logits, log-normaliser, loss, then d loss / d logits = softmax − one-hot,
    times d logits / d z (scale·(1 − tanh²) under a softcap, scale without) for the output layer's result z,
    which is multiplied into the gradients of hidden (and of weight and bias when they train) at once.
    The chunk's logits are freed before the next one, and backward only scales the stored gradients:
    autograd's own backward would keep every chunk's logits until then, or recompute them.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale: float, softcap: float | None, with_grad: bool):
        grads = [with_grad and need for need in ctx.needs_input_grad[:3]]
        grad_hidden = torch.empty_like(hidden) if grads[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if grads[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if grads[2] else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], LOSS_CHUNK):
            rows = slice(start, start + LOSS_CHUNK)
            chunk, chunk_targets = hidden[rows], targets[rows]
            logits = F.linear(chunk, weight, bias).float()
            if scale != 1:
                logits.mul_(scale)
            if softcap is not None:
                logits.div_(softcap).tanh_().mul_(softcap)
            log_norm = logits.logsumexp(dim=-1)
            total += (log_norm - logits.gather(1, chunk_targets[:, None]).squeeze(1)).sum()
            if not any(grads):
                continue
            # d logits / d z; under a softcap the one extra chunk-sized tensor, made before the softmax overwrites the logits
            slope = scale if softcap is None else logits.div(softcap).square_().neg_().add_(1).mul_(scale)
            d_logits = logits.sub_(log_norm[:, None]).exp_()  # softmax, in place of the logits
            d_logits[torch.arange(len(chunk_targets), device=d_logits.device), chunk_targets] -= 1
            if softcap is not None or scale != 1:
                d_logits.mul_(slope)
            if grad_hidden is not None:
                grad_hidden[rows] = d_logits.to(weight.dtype) @ weight
            if grad_weight is not None:
                grad_weight += d_logits.t() @ chunk.float()
            if grad_bias is not None:
                grad_bias += d_logits.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grads = [None if g is None else (g * grad_total).to(dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return (*grads, None, None, None, None)
