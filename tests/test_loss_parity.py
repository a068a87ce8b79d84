"""The training loss equals each architecture's own `model(input_ids, attention_mask, labels).loss`.

Every model type on the proven list (SUPERVISED_LOSS_MODELS) is built tiny from its config and
trained in full (every parameter, the output layer too) through SupervisedTrainer.compute_loss on a
right-padded batch from PaddingCollator, exactly as the Trainer calls it: supervised positions only, no
padding mask. Loss and gradients must equal the model's own loss on the same batch with its mask.
"""

import logging

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from fora.args import TrainArguments
from fora.data.collator import PaddingCollator
from fora.train.loss import SUPERVISED_LOSS_MODELS, plain_logits
from fora.train.trainer import SupervisedTrainer

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


def tiny_model(model_type: str, overrides: dict):
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


def loss_and_grads(model, compute) -> tuple[float, dict[str, torch.Tensor]]:
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
    model = tiny_model(model_type, overrides)
    batch = padded_batch()
    trainer = SupervisedTrainer(model=model, args=TrainArguments(output_dir=str(tmp_path), report_to="none"))
    expected, expected_grads = loss_and_grads(model, lambda: model(**batch).loss)
    loss, grads = loss_and_grads(model, lambda: trainer.compute_loss(model, batch))
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
