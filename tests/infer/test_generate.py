"""fora/infer/generate.py: batched generation equal to one prompt at a time, the prefill cache, prompts cut as training cuts them."""

import pytest

from fora.data.formats import load_conversations
from fora.models.inference import load_inference_model
from support import REPO, SHARED_DATA

pytestmark = pytest.mark.usefixtures("one_thread")


TEST_DATA = REPO / "data" / "test.json"


def alone(model, tokenizer, prompt: list[int], stop: list[int], budget: int, num_beams: int = 1) -> list[int]:
    """One prompt through `model.generate` by itself (no padding, no shared cache): the reference."""
    import torch

    from fora.infer import generate

    config = generate.generation_config(tokenizer, stop, num_beams=num_beams)
    config.max_new_tokens = budget
    new = model.generate(input_ids=torch.tensor([prompt]), generation_config=config)[0, len(prompt):].tolist()
    return new[: next((k for k, token in enumerate(new) if token in stop), len(new))]


@pytest.mark.slow
def test_batched_greedy_equals_one_at_a_time(monkeypatch):
    """Batches (shared prefix encoded once, the rest in length-sorted chunks, one cache per batch)
    give the same greedy tokens as each prompt alone, in input order, with per-record budgets, and
    each row is cut before its first stop token.

    On the embedded SmolLM2-135M-Instruct: the tiny random models repeat one token per row, which
    would make this comparison nearly vacuous; a trained model's varied tokens and realistic logit
    gaps are where padding-induced rounding could flip a token.
    """
    from fora.data.templates import get_template
    from fora.infer import generate

    model, tokenizer, _ = load_inference_model(None, None)
    template = get_template(tokenizer, None)
    conversations, _ = load_conversations(str(TEST_DATA), require_response=False)
    # Six prompts of six different lengths, so every batch is padded, and budgets of 4 to 8 tokens.
    prompts = [generate.build_prompt(tokenizer, template, c, 30 + 9 * i, 512)[0] for i, c in enumerate(conversations[:6])]
    assert len({len(p) for p in prompts}) == 6
    assert generate.takes_reserved_cache(model) and len(generate.SharedPrefix.encode(model, prompts, "cpu").ids) > 20
    budgets = [4 + (i * 3) % 5 for i in range(6)]
    stop = template.stop_token_ids(tokenizer)

    single = [alone(model, tokenizer, p, stop, b) for p, b in zip(prompts, budgets)]
    assert [len(s) for s in single] == budgets  # no EOS this early: every row spends its own budget
    assert len({t for s in single for t in s}) > 12  # varied tokens, not one repeated
    monkeypatch.setattr(generate, "PREFILL_TOKENS", 100)  # chunks of one to three rows
    for batch_size in (1, 4, 6):
        assert generate.generate_ids(model, tokenizer, prompts, stop, budgets, batch_size, progress=False) == single

    # Stop at a token some row produces mid-answer: every row ends just before its first occurrence.
    row, k = next((r, k) for r, s in enumerate(single) for k in range(1, len(s)) if s[k] not in s[:k])
    expected = [s[: s.index(single[row][k])] if single[row][k] in s else s for s in single]
    assert expected[row] == single[row][:k]
    assert generate.generate_ids(model, tokenizer, prompts, [single[row][k]], budgets, 6, progress=False) == expected


@pytest.mark.parametrize("common", [[5, 6, 7, 8], []], ids=["shared-prefix", "no-shared-prefix"])
def test_prefill_cache_holds_what_each_prompt_computes_alone(tiny_model, monkeypatch, common):
    """Each row's columns of the batch cache ([prefix | gap | rest], every column but the last)
    hold the keys and values its prompt gives in a plain forward pass by itself."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.cache_utils import DynamicCache

    from fora.infer import generate

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    generator = torch.Generator().manual_seed(0)
    prompts = [[100 + n, *common, *torch.randint(10, 500, (n,), generator=generator).tolist()] for n in (8, 6, 6, 2, 1)]
    if common:  # the prompts then share the common part and not the first token: put that first
        prompts = [p[1:] for p in prompts]
    monkeypatch.setattr(generate, "PREFILL_TOKENS", 16)  # chunks of 1, 2 and 2 rows
    with torch.inference_mode():
        shared = generate.SharedPrefix.encode(model, prompts, "cpu")
        assert shared.ids == common
        input_ids, attention_mask, cache = shared.prefill(model, prompts, pad_id=0, new_tokens=4)
        width = input_ids.shape[1]
        assert width == max(map(len, prompts)) and cache.get_seq_length() == width - 1
        for row, prompt in enumerate(prompts):
            assert input_ids[row][attention_mask[row].bool()].tolist() == prompt
            reference = DynamicCache()
            model(input_ids=torch.tensor([prompt]), cache=reference, use_cache=True)
            own = attention_mask[row, : width - 1].nonzero().squeeze(-1)
            gap = (attention_mask[row, : width - 1] == 0).nonzero().squeeze(-1)
            for layer, expected in zip(cache.layers, reference.layers):
                torch.testing.assert_close(layer.keys[row][:, own], expected.keys[0, :, : len(prompt) - 1], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(layer.values[row][:, own], expected.values[0, :, : len(prompt) - 1], atol=1e-5, rtol=1e-5)
                # The gap is masked; it must still be finite (a masked NaN would poison attention).
                assert layer.keys[row][:, gap].isfinite().all() and layer.values[row][:, gap].isfinite().all()


def test_beam_search_takes_the_plain_batches(tiny_model):
    """generate() cannot widen a given cache for beams: beam search runs left-padded batches and
    still equals each prompt searched alone (equal budgets)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fora.infer import generate

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, 500, (n,), generator=generator).tolist() for n in (5, 9, 3)]
    config = generate.generation_config(tokenizer, [0], num_beams=2)
    expected = [alone(model, tokenizer, p, [0], 6, num_beams=2) for p in prompts]
    assert generate.generate_ids(model, tokenizer, prompts, [0], 6, 3, config, progress=False) == expected


def test_build_prompt_keeps_the_question_when_history_is_long(tokenizer):
    """Training's cut (fora.data.encode) drops turns that no longer fit; for prediction the turn being
    asked must stay, so the oldest turns go instead."""
    from fora.data.formats import Conversation
    from fora.data.templates import NAMED_TEMPLATES
    from fora.infer.generate import build_prompt

    template = NAMED_TEMPLATES["default"]
    history = [("old question " * 20, "old answer " * 20)] * 3
    conversation = Conversation("x", None, [*history, ("the real question?", "reference")])
    ids, cut = build_prompt(tokenizer, template, conversation, 64, 32)
    text = tokenizer.decode(ids)
    assert cut and text.endswith("Human: the real question?\n\nAssistant: ")
    assert "reference" not in text
    short, cut = build_prompt(tokenizer, template, Conversation("x", None, [("hi", None)]), 64, 32)
    assert not cut and tokenizer.decode(short) == "Human: hi\n\nAssistant: "


def prompts_as_trained_and_as_predicted(tokenizer, template, conversations, max_src_len: int):
    """Per record: the masked part of its training input, and its prediction prompt (and whether it was cut)."""
    from fora.data.encode import IGNORE_INDEX, tokenize_conversation
    from fora.infer.generate import build_prompt

    for c in conversations:
        row = tokenize_conversation({"where": c.where, "system": c.system, "turns": c.turns}, tokenizer, template,
                                    max_src_len, 512)
        trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label == IGNORE_INDEX]
        yield trained, *build_prompt(tokenizer, template, c, max_src_len, 512)


def test_long_record_is_predicted_from_a_prompt_that_ends_with_the_header(tokenizer):
    """The prompt is cut as training cut it: the end of the user's text goes, the assistant header stays."""
    from fora.data.formats import Conversation
    from fora.data.templates import get_template

    question = "Extract the triples. Text: " + "the pump leaks oil and the fan is slow; " * 40
    conversation = Conversation("x", None, [(question, "reference")])
    template = get_template(tokenizer, None)
    ((trained, ids, cut),) = prompts_as_trained_and_as_predicted(tokenizer, template, [conversation], 64)
    text = tokenizer.decode(ids)
    assert cut and len(ids) <= 64 and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "Extract the triples. Text: the pump leaks oil" in text and "reference" not in text
    assert ids == trained


@pytest.mark.skipif(not (SHARED_DATA / "spo_1.json").is_file(), reason="needs the authors' data in ../shared/data")
@pytest.mark.parametrize("template_name", ["chat_template", "alpaca", "chatml", "baichuan2", "chatglm2"])
def test_every_spo_1_prompt_ends_with_the_assistant_header(tokenizer, tiny_model_plain, template_name):
    """The seed's test set at the seed's --max_src_len 512: about half the prompts are longer."""
    from fora.data.formats import load_conversations
    from fora.data.templates import NAMED_TEMPLATES, get_template
    from fora.models.tokenizer import load_tokenizer

    if template_name != "chat_template":
        tokenizer = load_tokenizer(str(tiny_model_plain))
    template = get_template(tokenizer, template_name)
    header = {
        "chat_template": "<|im_end|>\n<|im_start|>assistant\n",
        **{name: t.user.split("{content}")[1] for name, t in NAMED_TEMPLATES.items()},
    }[template_name]
    conversations, _ = load_conversations(str(SHARED_DATA / "spo_1.json"), require_response=False)
    built = list(prompts_as_trained_and_as_predicted(tokenizer, template, conversations, 512))
    assert len(built) == 50 and any(cut for _, _, cut in built)
    for conversation, (trained, ids, cut) in zip(conversations, built):
        user = conversation.turns[0][0]
        uncut = template.encode(tokenizer, None, [(user, None)])[0][0]
        assert cut == (len(uncut) > 512) and len(ids) <= 512 and ids == trained
        text = tokenizer.decode(ids, skip_special_tokens=False)
        assert text.endswith(header), conversation.where
        assert cut == (user not in text)  # only a cut record lost part of its text: its start stays
        assert user[:100] in text
        if template_name == "chat_template" and not cut:  # a prompt that fits is what the chat template renders
            messages = [{"role": "user", "content": user}]
            assert ids == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
