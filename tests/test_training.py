"""The supervised-position loss against the plain full-logits loss, and the padding count."""

import tempfile

import pytest
import torch

from fora.args import FinetuningArguments, TrainArguments
from fora.data.collator import PaddingCollator
from fora.models.load import load_model
from fora.train import loss as loss_module
from fora.train.loss import LOSS_CHUNK, HeadCrossEntropy, OutputLogits
from fora.train.trainer import SupervisedTrainer
from fora.tuners.attach import attach_adapter


def random_batch(vocab: int, pad_id: int) -> dict:
    """Three rows of different lengths; prompts masked, answers trained, right padding."""
    generator = torch.Generator().manual_seed(0)
    features = []
    for length, prompt in ((23, 15), (9, 4), (17, 6)):
        ids = torch.randint(3, vocab, (length,), generator=generator).tolist()
        features.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return PaddingCollator(pad_id)(features)


def full_logits_loss(model, batch) -> torch.Tensor:
    """The textbook definition, written out: logits everywhere, shift, mean over trained tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100
    )


def adapted_model(tiny_model, dtype=torch.float32):
    model = load_model(str(tiny_model), dtype)
    torch.manual_seed(0)
    model = attach_adapter(model, FinetuningArguments(finetuning_type="lora", lora_rank=4, lora_dropout=0.0))
    with torch.no_grad():  # B = 0 at init would leave A without gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return model


@pytest.fixture
def adapted(tiny_model):
    return adapted_model(tiny_model)


def full_loss_and_grads(model, batch):
    """The reference: full_logits_loss and autograd's gradients of it."""
    model.zero_grad(set_to_none=True)
    expected = full_logits_loss(model, batch)
    expected.backward()
    return expected.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def loss_and_grads(trainer, model, batch, num_items=None):
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, batch, num_items_in_batch=num_items)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


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
    loss, grads = loss_and_grads(trainer, model, batch)

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


def test_accumulated_batches_divide_by_the_tokens_of_all_of_them(adapted, tokenizer):
    """With gradient accumulation the Trainer passes the trained-token count of the whole step."""
    batch = random_batch(adapted.config.vocab_size, tokenizer.pad_token_id)
    trained = int(batch["labels"][:, 1:].ne(-100).sum())
    with tempfile.TemporaryDirectory() as scratch:
        trainer = SupervisedTrainer(model=adapted, args=TrainArguments(output_dir=scratch, report_to="none"))
    mean, _ = loss_and_grads(trainer, adapted, batch)
    share, _ = loss_and_grads(trainer, adapted, batch, num_items=torch.tensor(3 * trained))
    assert share.item() == pytest.approx(mean.item() / 3, rel=1e-6)


def test_switched_off_it_computes_full_logits_with_the_same_loss(adapted, tokenizer):
    batch = random_batch(adapted.config.vocab_size, tokenizer.pad_token_id)
    with tempfile.TemporaryDirectory() as scratch:
        on = SupervisedTrainer(model=adapted, args=TrainArguments(output_dir=scratch, report_to="none"))
        off = SupervisedTrainer(
            model=adapted, args=TrainArguments(output_dir=scratch, report_to="none", supervised_logits=False)
        )
    assert on.head_on_selected and not off.head_on_selected
    _, outputs = off.compute_loss(adapted, batch, return_outputs=True)
    assert outputs.logits.shape[:2] == batch["input_ids"].shape  # every position, as plain transformers
    assert off.compute_loss(adapted, batch).item() == pytest.approx(on.compute_loss(adapted, batch).item(), abs=1e-5)


def test_real_and_padded_tokens_of_the_training_batches_are_counted(adapted, tokenizer):
    batch = random_batch(adapted.config.vocab_size, tokenizer.pad_token_id)  # 3 x 23 tokens, 49 real
    with tempfile.TemporaryDirectory() as scratch:
        trainer = SupervisedTrainer(model=adapted, args=TrainArguments(output_dir=scratch, report_to="none"))
    adapted.train()
    trainer.compute_loss(adapted, batch)
    trainer.compute_loss(adapted, batch)
    adapted.eval()
    trainer.compute_loss(adapted, batch)  # evaluation batches are not counted
    assert trainer.trained_tokens() == (2 * 49, 2 * 69)

