"""fora/models/tokenizer.py: the tokenizer from the folder holding the weights, and its files copied byte for byte."""

from transformers import AutoTokenizer

from fora.models.tokenizer import TOKENIZER_FILES, load_tokenizer, save_base_tokenizer


def test_a_tokenizer_without_a_pad_token_pads_with_eos(tiny_model, tmp_path):
    saved = AutoTokenizer.from_pretrained(tiny_model)
    saved.pad_token = None
    saved.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).pad_token is None
    tokenizer = load_tokenizer(str(tmp_path), padding_side="left")
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>" and tokenizer.padding_side == "left"
    assert load_tokenizer(str(tiny_model)).padding_side == "right"  # training pads on the right


def test_adapter_and_merged_folders_get_the_base_tokenizer_files_byte_for_byte(tiny_model, tmp_path):
    save_base_tokenizer(str(tiny_model), tmp_path, trust_remote_code=False)
    copied = sorted(p.name for p in tmp_path.iterdir())
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(copied) <= {p.name for p in tiny_model.iterdir()}
    assert not {"config.json", "model.safetensors", "generation_config.json"} & set(copied)  # the tokenizer's files only
    for name in copied:
        assert (tmp_path / name).read_bytes() == (tiny_model / name).read_bytes(), name
    assert set(TOKENIZER_FILES) & set(copied)
