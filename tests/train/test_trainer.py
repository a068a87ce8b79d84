"""fora/train/trainer.py: the loss over accumulated batches, full logits when asked, and the token counts."""

import tempfile

import pytest
import torch

from fora.args import TrainArguments
from fora.train.trainer import SupervisedTrainer
from support import adapted_model, random_batch, trainer_loss_and_grads


@pytest.fixture
def adapted(tiny_model):
    return adapted_model(tiny_model)


def test_accumulated_batches_divide_by_the_tokens_of_all_of_them(adapted, tokenizer):
    """With gradient accumulation the Trainer passes the trained-token count of the whole step."""
    batch = random_batch(adapted.config.vocab_size, tokenizer.pad_token_id)
    trained = int(batch["labels"][:, 1:].ne(-100).sum())
    with tempfile.TemporaryDirectory() as scratch:
        trainer = SupervisedTrainer(model=adapted, args=TrainArguments(output_dir=scratch, report_to="none"))
    mean, _ = trainer_loss_and_grads(trainer, adapted, batch)
    share, _ = trainer_loss_and_grads(trainer, adapted, batch, num_items=torch.tensor(3 * trained))
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
