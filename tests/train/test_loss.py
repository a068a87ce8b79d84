"""fora/train/loss.py: the supervised-position loss equals the full-logits loss and each architecture's own."""

import logging
import tempfile

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from fora.args import TrainArguments
from fora.data.collator import PaddingCollator
from fora.train import loss as loss_module
from fora.train.loss import LOSS_CHUNK, SUPERVISED_LOSS_MODELS, HeadCrossEntropy, OutputLogits, plain_logits
from fora.train.trainer import SupervisedTrainer
from support import adapted_model, random_batch, trainer_loss_and_grads

pytestmark = pytest.mark.usefixtures("one_thread")


TOLERANCE = 1e-5  # relative, float32


VOCAB = 320


PAD = 0


TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    pad_token_id=PAD,
    bos_token_id=1,
    eos_token_id=2,
)


SMALL_HEADS = dict(head_dim=16)  # for configs whose head size is not hidden / heads by default


# What each architecture needs beyond TINY. Logit scales and softcaps are set far from identity for these
# tiny random logits (tanh(x / 30) is nearly x / 30 when |x| is small), so a loss that skipped one fails.
ARCHITECTURES = {
    "llama": SMALL_HEADS,
    "mistral": SMALL_HEADS,
    "ministral": SMALL_HEADS,
    "qwen2": {},
    "qwen3": SMALL_HEADS,
    "gemma": SMALL_HEADS,
    "gemma2": {**SMALL_HEADS, "final_logit_softcapping": 0.2},
    "gemma3_text": {**SMALL_HEADS, "final_logit_softcapping": 0.2},
    "cohere": {"logit_scale": 8.0},
    "cohere2": {"logit_scale": 8.0},
    "granite": {"logits_scaling": 0.125},
    "phi": {},
    "phi3": {},
    "olmo": {},
    "olmo2": {},
    "olmo3": {},
    "smollm3": {},
    "glm4": SMALL_HEADS,
    "starcoder2": {},
    "stablelm": {},
    "gpt_neox": {},
    "gpt2": {"n_inner": 128},
    "gpt_bigcode": {"n_inner": 128},
    "bloom": {},  # ALiBi
    "falcon": {},  # rotary
    "opt": {"ffn_dim": 128, "word_embed_proj_dim": 64},  # learned absolute positions
}


CASES = [pytest.param(t, o, id=t) for t, o in ARCHITECTURES.items()] + [
    pytest.param("falcon", {"alibi": True}, id="falcon-alibi"),
    pytest.param("falcon", {"new_decoder_architecture": True}, id="falcon-new-decoder"),
]


REQUIRED = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "cohere", "granite", "phi3",
            "olmo2", "gpt_neox", "gpt2", "bloom", "falcon", "opt"}


def tiny_of_type(model_type: str, overrides: dict):
    config = AutoConfig.for_model(model_type, **TINY, **overrides)
    torch.manual_seed(0)
    # eval(): no dropout, so both losses see the same network; gradients are still taken.
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def padded_batch() -> dict[str, torch.Tensor]:
    """Three rows of different lengths, right-padded by PaddingCollator; prompts masked, answers trained."""
    generator = torch.Generator().manual_seed(0)
    features = []
    for length, prompt in ((23, 15), (9, 4), (17, 6)):
        ids = torch.randint(3, VOCAB, (length,), generator=generator).tolist()
        features.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return PaddingCollator(PAD)(features)


def own_loss_and_grads(model, compute) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def parity_errors(model_type: str, overrides: dict, tmp_path) -> tuple[SupervisedTrainer, float, dict[str, float]]:
    """The trainer, the relative error of its loss, and of each parameter's gradient, against the model's own.

    A gradient is compared relative to its own norm, or to 1e-3 of the whole gradient's norm if smaller:
    some are zero in exact arithmetic (a key projection's bias: softmax ignores a shift shared by all keys),
    and there both sides hold rounding noise only.
    """
    model = tiny_of_type(model_type, overrides)
    batch = padded_batch()
    trainer = SupervisedTrainer(model=model, args=TrainArguments(output_dir=str(tmp_path), report_to="none"))
    expected, expected_grads = own_loss_and_grads(model, lambda: model(**batch).loss)
    loss, grads = own_loss_and_grads(model, lambda: trainer.compute_loss(model, batch))
    assert grads.keys() == expected_grads.keys()
    floor = 1e-3 * torch.cat([g.flatten() for g in expected_grads.values()]).norm()
    grad_errors = {
        name: ((grads[name] - want).norm() / torch.maximum(want.norm(), floor)).item()
        for name, want in expected_grads.items()
    }
    return trainer, abs(loss - expected) / abs(expected), grad_errors


def test_the_proven_list_is_what_this_file_proves():
    assert REQUIRED <= set(SUPERVISED_LOSS_MODELS)
    assert set(SUPERVISED_LOSS_MODELS) == set(ARCHITECTURES)


@pytest.mark.parametrize("model_type, overrides", CASES)
def test_loss_and_gradients_equal_the_models_own(model_type, overrides, tmp_path):
    trainer, loss_error, grad_errors = parity_errors(model_type, overrides, tmp_path)
    assert trainer.head_on_selected and trainer.drop_padding_mask  # the shortcut is what is checked
    assert loss_error <= TOLERANCE
    worst = max(grad_errors, key=grad_errors.get)
    assert grad_errors[worst] <= TOLERANCE, f"{worst}: {grad_errors[worst]:.2e}"

    # --supervised_logits False: full logits, still without the padding mask.
    model, batch = trainer.model, padded_batch()
    full = SupervisedTrainer(
        model=model, args=TrainArguments(output_dir=str(tmp_path), report_to="none", supervised_logits=False)
    )
    assert full.drop_padding_mask and not full.head_on_selected
    with torch.no_grad():
        assert full.compute_loss(model, batch).item() == pytest.approx(model(**batch).loss.item(), rel=TOLERANCE)


@pytest.mark.parametrize(
    "model_type", [t for t, output in SUPERVISED_LOSS_MODELS.items() if output is not plain_logits]
)
def test_the_parity_check_fails_without_the_post_processing(model_type, tmp_path, monkeypatch):
    """The tiny configs' scales and softcaps matter: the raw output layer's loss is far from the model's."""
    monkeypatch.setitem(SUPERVISED_LOSS_MODELS, model_type, plain_logits)
    _, loss_error, grad_errors = parity_errors(model_type, ARCHITECTURES[model_type], tmp_path)
    assert loss_error > 100 * TOLERANCE and max(grad_errors.values()) > 100 * TOLERANCE


def test_an_architecture_not_on_the_list_gets_full_logits_and_says_so_once(tmp_path, monkeypatch, caplog):
    monkeypatch.delitem(SUPERVISED_LOSS_MODELS, "gemma2")
    with caplog.at_level(logging.WARNING, logger="fora.train.trainer"):
        trainer, loss_error, grad_errors = parity_errors("gemma2", ARCHITECTURES["gemma2"], tmp_path)
        trainer.compute_loss(trainer.model, padded_batch())
        SupervisedTrainer(
            model=trainer.model,
            args=TrainArguments(output_dir=str(tmp_path), report_to="none", supervised_logits=False),
        )
    assert not trainer.head_on_selected and not trainer.drop_padding_mask
    assert loss_error <= TOLERANCE and max(grad_errors.values()) <= TOLERANCE
    lines = [r.getMessage() for r in caplog.records if "model_type 'gemma2'" in r.getMessage()]
    assert len(lines) == 1 and "--supervised_logits" in lines[0]


def full_logits_loss(model, batch) -> torch.Tensor:
    """The textbook definition, written out: logits everywhere, shift, mean over trained tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100
    )


def full_loss_and_grads(model, batch):
    """The reference: full_logits_loss and autograd's gradients of it."""
    model.zero_grad(set_to_none=True)
    expected = full_logits_loss(model, batch)
    expected.backward()
    return expected.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("chunk, mixed_precision", [(LOSS_CHUNK, False), (5, False), (LOSS_CHUNK, True)])
def test_supervised_positions_give_the_full_loss_and_gradients(tiny_model, tokenizer, monkeypatch, chunk, mixed_precision):
    """chunk 5: several head chunks per batch. mixed_precision (--bf16): a bf16 model whose forward runs under
    autocast and whose outputs accelerate upcasts to float32, as the Trainer wraps it; the head, applied
    outside autocast, takes bf16 hidden states back (it once failed on the float32 ones)."""
    from accelerate.utils import convert_outputs_to_fp32

    monkeypatch.setattr(loss_module, "LOSS_CHUNK", chunk)
    model = adapted_model(tiny_model, torch.bfloat16 if mixed_precision else torch.float32)
    if mixed_precision:
        model.forward = convert_outputs_to_fp32(torch.autocast("cpu", dtype=torch.bfloat16)(model.forward))
    batch = random_batch(model.config.vocab_size, tokenizer.pad_token_id)
    with tempfile.TemporaryDirectory() as scratch:
        trainer = SupervisedTrainer(model=model, args=TrainArguments(output_dir=scratch, report_to="none"))
    assert trainer.head_on_selected

    expected, expected_grads = full_loss_and_grads(model, batch)
    loss, grads = trainer_loss_and_grads(trainer, model, batch)

    assert loss.dtype == torch.float32
    # In bf16 both take bf16 logits, from matmuls of other shapes: equal to bf16's precision only.
    loss_tolerance, grad_tolerance = (
        (dict(rel=1e-2), dict(atol=1e-3, rtol=5e-2)) if mixed_precision else (dict(abs=1e-5), dict(atol=1e-6, rtol=1e-5))
    )
    assert loss.item() == pytest.approx(expected.item(), **loss_tolerance)
    assert grads.keys() == expected_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], **grad_tolerance, msg=name)


@pytest.mark.parametrize("chunk", [LOSS_CHUNK, 3])
@pytest.mark.parametrize(
    "output",
    [OutputLogits(), OutputLogits(scale=3.0), OutputLogits(softcap=0.5),
     OutputLogits(scale=2.0, softcap=1.5)],
    ids=["plain", "scaled", "softcapped", "scaled-softcapped"],
)
def test_head_loss_gives_autograds_gradients_for_hidden_weight_and_bias(monkeypatch, chunk, output):
    """Full fine-tuning trains the output layer too: its weight and bias gradients must match autograd's,
    through the logit scale and tanh softcap of the models that apply them."""
    monkeypatch.setattr(loss_module, "LOSS_CHUNK", chunk)
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(10, 8, generator=generator, requires_grad=True)
    head = torch.nn.Linear(8, 50)
    targets = torch.randint(0, 50, (10,), generator=generator)

    def model_logits(weight, bias):  # as the models' forwards write it
        logits = torch.nn.functional.linear(hidden, weight, bias) * output.scale
        return logits if output.softcap is None else torch.tanh(logits / output.softcap) * output.softcap

    expected = torch.nn.functional.cross_entropy(model_logits(head.weight, head.bias), targets, reduction="sum")
    expected_grads = torch.autograd.grad(3 * expected, (hidden, head.weight, head.bias))
    loss = HeadCrossEntropy.apply(hidden, head.weight, head.bias, targets, output.scale, output.softcap, True)
    grads = torch.autograd.grad(3 * loss, (hidden, head.weight, head.bias))

    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    for grad, want in zip(grads, expected_grads):
        torch.testing.assert_close(grad, want, atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # evaluation: the same loss, no gradient work
        loss = HeadCrossEntropy.apply(hidden, head.weight, None, targets, output.scale, output.softcap, False)
        want = torch.nn.functional.cross_entropy(model_logits(head.weight, None), targets, reduction="sum")
        assert loss.item() == pytest.approx(want.item(), rel=1e-6)


def test_the_loss_takes_the_last_hidden_state_without_asking_for_every_layers(tiny_model, tokenizer):
    """output_hidden_states would return every layer's states, which mixed precision converts to float32 one by
    one (a copy of all activations, what gradient checkpointing avoids): the loss path never asks for them."""
    model = adapted_model(tiny_model)
    asked = []
    model.get_base_model().register_forward_pre_hook(lambda module, args, kwargs: asked.append(kwargs), with_kwargs=True)
    batch = random_batch(model.config.vocab_size, tokenizer.pad_token_id)
    with tempfile.TemporaryDirectory() as scratch:
        trainer = SupervisedTrainer(model=model, args=TrainArguments(output_dir=scratch, report_to="none"))
    loss, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    assert trainer.head_on_selected and len(asked) == 1
    assert not asked[0].get("output_hidden_states") and not model.config.output_hidden_states
    assert getattr(outputs, "hidden_states", None) is None
    assert loss.item() == pytest.approx(full_logits_loss(model, batch).item(), abs=1e-5)
