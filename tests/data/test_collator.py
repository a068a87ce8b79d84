"""fora/data/collator.py: right padding that keeps the EOS label where pad and EOS are one token."""

from fora.data.collator import PaddingCollator
from fora.data.encode import IGNORE_INDEX
from support import ALPACA, tokenize_file, write_jsonl


def test_collator_keeps_eos_label_equal_to_pad(tokenizer, tmp_path):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # SmolLM2: pad == eos == <|im_end|>
    path = write_jsonl(tmp_path / "d.json", [ALPACA, {"instruction": "Hi", "output": "Hello there, how are you today?"}])
    rows = tokenize_file(tokenizer, path)
    batch = PaddingCollator(tokenizer.pad_token_id)(rows)
    eos = tokenizer.eos_token_id
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        assert batch["labels"][i, n - 1].item() == eos  # the EOS reply token is trained
        assert batch["labels"][i, n:].eq(IGNORE_INDEX).all()  # padding is not
        assert batch["attention_mask"][i, :n].eq(1).all() and batch["attention_mask"][i, n:].eq(0).all()
        assert batch["input_ids"][i, n:].eq(tokenizer.pad_token_id).all()
        assert batch["labels"][i, :n].tolist() == row["labels"]
    assert batch["labels"].shape == batch["input_ids"].shape == (2, max(len(r["input_ids"]) for r in rows))
