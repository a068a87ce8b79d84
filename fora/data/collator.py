"""The training batch: records right-padded to the longest, padding masked out of attention and loss.

Written here rather than taken from transformers' DataCollatorForSeq2Seq, which pads through the tokenizer:
remote-code tokenizers (ChatGLM's `_pad`) pad on the left only, and training pads on the right.
"""

import torch

from fora.data.encode import IGNORE_INDEX


class PaddingCollator:
    """Right-pads a batch; padding gets attention_mask 0 and label -100, so an EOS label equal to pad survives."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    @classmethod
    def for_this_machine(cls, pad_token_id: int) -> "PaddingCollator":
        """Lengths padded to a multiple of 8 on CUDA, where tensor cores want it; as they come on the CPU."""
        return cls(pad_token_id, 8 if torch.cuda.is_available() else None)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            pad = longest - len(f["input_ids"])
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            batch["attention_mask"].append([1] * len(f["input_ids"]) + [0] * pad)
            batch["labels"].append(list(f["labels"]) + [IGNORE_INDEX] * pad)
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}
