"""Remote-code families written for transformers 4.x (Baichuan, Baichuan2, ChatGLM2/3, InternLM2) under the installed
transformers: fixture folders reproducing their published API patterns (tests/fixtures), loaded with
--trust_remote_code through fora.models.compat, trained, predicted, merged and prompted as users do."""

import json
import sys
from pathlib import Path

import pytest
import torch
from fixtures import families, shape
from sentencepiece import SentencePieceProcessor

from fora.data.encode import encode, tokenize_conversation
from fora.data.templates import Segment, get_template
from fora.errors import UserError
from fora.infer import generate
from fora.models.inference import load_inference_model
from fora.models.load import load_model
from fora.models.tokenizer import load_tokenizer
from fora.run import RunRecord
from fora.tuners.attach import attach_adapter, load_adapter
from support import REPO, run_script, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

# The linear layers of each family's blocks (its published LoRA targets); never the output layer.
BAICHUAN = ["W_pack", "down_proj", "gate_proj", "o_proj", "up_proj"]
CHATGLM = ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"]
PROJECTIONS = {
    "baichuan-7b": BAICHUAN, "baichuan-13b-chat": BAICHUAN, "baichuan2-7b-chat": BAICHUAN, "baichuan2-13b-chat": BAICHUAN,
    "chatglm2": CHATGLM, "chatglm3": CHATGLM, "internlm2": ["w1", "w2", "w3", "wo", "wqkv"],
}
HEADS = {"chatglm2": "output_layer", "chatglm3": "output_layer", "internlm2": "output"}  # the others: lm_head
# The prompt template `--template auto` picks for a family, where it is not the family's own name (a base model
# has no chat format).
TEMPLATES = {"baichuan-7b": "default", "baichuan-13b-chat": "baichuan", "baichuan2-7b-chat": "baichuan2",
             "baichuan2-13b-chat": "baichuan2"}
QUESTION, ANSWER = "泵的故障导致什么？", "主管道压力降低。"
RECORDS = [
    {"instruction": QUESTION, "output": ANSWER},
    {"instruction": "Extract the triples from: the pump fails.", "output": "(pump, state, fails)"},
    {"instruction": "你好", "output": "今天天气晴朗。"},
    {"instruction": "Numbers like 12 and 345?", "output": "They appear in reports."},
]


@pytest.fixture(scope="session")
def family_folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: families.build_family(name, root / name) for name in families.FAMILIES}


@pytest.fixture(scope="session")
def train_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("family-data") / "train.jsonl", RECORDS)


def documented_prompt(family: str, folder: Path, question: str) -> list[int]:
    """The first-turn prompt ids as each family's own code builds them, from its SentencePiece model.

    ChatGLM2: tokenizer(build_prompt(query)) = [gMASK] sop + "[Round 1]\\n\\n问：{query}\\n\\n答：".
    ChatGLM3: build_chat_input(query) = [gMASK] sop <|user|> + encode("\\n") + encode(query) + <|assistant|>.
    Baichuan2-7B/13B-Chat: build_chat_input = user_token_id + encode(query) + assistant_token_id (no BOS).
    Baichuan-13B-Chat: generation_utils.build_chat_input, the same: <reserved_102> + encode(query) + <reserved_103>,
    no BOS (its tokenizer_config.json sets add_bos_token false, and encode adds nothing else).
    Baichuan-7B: a base model with no chat format; `default`'s "Human: {query}\\n\\nAssistant: ", no BOS (add_bos_token false).
    InternLM2: build_inputs(query, meta_instruction="") = BOS + "<|im_start|>user\\n{query}<|im_end|>\\n<|im_start|>assistant\\n",
    its chat tokens being the SentencePiece pieces [UNUSED_TOKEN_146] (<|im_start|>) and [UNUSED_TOKEN_145] (<|im_end|>).
    ChatGLM's special ids follow the pieces: [MASK] [gMASK] [sMASK] sop eop <|system|> <|user|> <|assistant|>.
    """
    sp = SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    n = sp.vocab_size()
    if family == "internlm2":
        start, end = sp.piece_to_id("[UNUSED_TOKEN_146]"), sp.piece_to_id("[UNUSED_TOKEN_145]")
        return [sp.bos_id(), start] + sp.encode(f"user\n{question}") + [end] + sp.encode("\n") + [start] + sp.encode("assistant\n")
    if family == "baichuan-7b":
        return sp.encode(f"Human: {question}\n\nAssistant: ")
    if family == "chatglm2":
        return [n + 1, n + 3] + sp.encode(f"[Round 1]\n\n问：{question}\n\n答：")
    if family == "chatglm3":
        return [n + 1, n + 3, n + 6] + sp.encode("\n") + sp.encode(question) + [n + 7]
    generation = json.loads((folder / "generation_config.json").read_text())
    return [generation["user_token_id"]] + sp.encode(question) + [generation["assistant_token_id"]]


def documented_reply_end(family: str, folder: Path) -> int:
    """The token that ends a reply: EOS, but <|im_end|> for InternLM2 (its chat() stops on either)."""
    sp = SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    return sp.piece_to_id("[UNUSED_TOKEN_145]") if family == "internlm2" else sp.eos_id()


@pytest.mark.parametrize("family", families.FAMILIES)
def test_template_auto_gives_the_documented_prompt_and_masks_it(family, family_folders):
    folder = family_folders[family]
    tokenizer = load_tokenizer(str(folder), trust_remote_code=families.OWN_CODE)
    template = get_template(tokenizer, "auto")
    assert template.name == TEMPLATES.get(family, family)
    [(prompt, response, _)] = template.encode(tokenizer, None, [(QUESTION, ANSWER)])
    assert prompt == documented_prompt(family, folder, QUESTION)
    sp = SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    assert response == sp.encode(ANSWER) + [documented_reply_end(family, folder)]
    ids, labels, _ = encode([Segment(prompt, response)], 512, 512)
    assert ids == prompt + response and labels == [-100] * len(prompt) + response


@pytest.mark.parametrize("family", families.FAMILIES)
def test_fixture_carries_the_published_shape(family, family_folders):
    """The fixture has every class of the published files, with their bases and every method's signature,
    and the published JSON files' keys and auto_map (recorded from the published repository in published.json)."""
    published = json.loads((families.fixture_dir(family) / "published.json").read_text(encoding="utf-8"))
    built = shape.folder_shape(family_folders[family])
    assert sorted(built["python"]) == sorted(published["python"]), "the fixture's Python files are the published ones"
    for name, expected in published["python"].items():
        classes = built["python"][name]["classes"]
        assert sorted(classes) == sorted(expected["classes"]), name
        for cls, published_class in expected["classes"].items():
            assert classes[cls] == published_class, f"{name}: {cls}"
    for name, expected in published["json"].items():
        assert built["json"].get(name) == expected, name


@pytest.mark.parametrize("family", families.FAMILIES)
def test_every_class_auto_map_names_loads(family, family_folders, tmp_path):
    """Through the Auto class it is named under: the config, each tokenizer (slow and fast where named), and
    every model class, loaded from the fixture's weights and run forward."""
    import transformers
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from fora.models import compat

    folder = family_folders[family]
    compat.prepare_remote_code(str(folder), trust_remote_code=families.OWN_CODE)
    entries = compat.auto_map(str(folder))
    assert entries, "a remote-code fixture names its classes in auto_map"
    ids = None
    for auto_name, reference in sorted(entries.items()):
        auto = getattr(transformers, auto_name)
        if auto_name == "AutoConfig":
            loaded = [auto.from_pretrained(folder, trust_remote_code=families.OWN_CODE)]
        elif auto_name == "AutoTokenizer":
            # transformers 5 ignores use_fast: AutoTokenizer gives the fast class where one is named, so the slow
            # one is loaded through its own class too.
            references = reference if isinstance(reference, list) else [reference, None]
            loaded = [get_class_from_dynamic_module(name, str(folder)).from_pretrained(folder) for name in references if name]
            chosen = auto.from_pretrained(folder, trust_remote_code=families.OWN_CODE)
            assert type(chosen) is type(loaded[-1])
            texts = [QUESTION, *(r["instruction"] for r in RECORDS), "  two  spaces,\ta tab\nand 12 new lines\n\n"]
            saved = []
            if references[1]:  # saved by transformers 5, the fast tokenizer comes back from its tokenizer.json
                chosen.save_pretrained(tmp_path / "saved")
                assert (tmp_path / "saved" / "tokenizer.json").is_file()
                compat.prepare_remote_code(str(tmp_path / "saved"), trust_remote_code=families.OWN_CODE)
                saved.append(auto.from_pretrained(tmp_path / "saved", trust_remote_code=families.OWN_CODE))
            encodings = {tuple(tuple(compat.adapt_tokenizer(t).encode(text, add_special_tokens=False)) for text in texts)
                         for t in [*loaded, chosen, *saved]}
            assert len(encodings) == 1, "the slow and the fast tokenizer encode alike (the fast one also once saved)"
            ids = list(encodings.pop()[0])
        else:
            loaded = [auto.from_pretrained(folder, trust_remote_code=families.OWN_CODE, dtype=torch.float32).eval()]
        names = [reference] if isinstance(reference, str) else [name for name in reference if name]
        assert [type(instance).__name__ for instance in loaded] == [name.rsplit(".", 1)[-1] for name in names]
        if auto_name.startswith("AutoModel"):
            # in the dtype asked for, also what the remote __init__ builds in a dtype of its own (ChatGLM's float16 head)
            assert {p.dtype for p in loaded[0].parameters() if p.is_floating_point()} == {torch.float32}, auto_name
            # Initialised, also a weight the checkpoint lacks (a head), not memory left as it was: on the scale of
            # torch's initialisation, which has spread.
            for name, weight in loaded[0].named_parameters():
                if weight.dim() == 2:
                    assert weight.isfinite().all() and 1e-4 < weight.std() and weight.abs().max() < 1e3, f"{auto_name}: {name}"
            with torch.no_grad():
                output = loaded[0](input_ids=torch.tensor([ids or [5, 6, 7]]))
            assert torch.isfinite(output[0]).all(), auto_name


def greedy_without_cache(model, tokenizer, prompt: list[int], budget: int, stop: list[int]) -> list[int]:
    """Argmax decoding by full forward passes: no cache, no padding, no generation config."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(budget):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            token = int(logits[: len(tokenizer)].argmax())  # never an id the tokenizer has no text for (a padded head)
            if token in stop:
                break
            ids.append(token)
    return ids[len(prompt):]


@pytest.mark.parametrize("family", families.FAMILIES)
def test_cached_batched_greedy_equals_a_plain_argmax_loop(family, family_folders):
    """generate() through compat's legacy-cache plumbing, left-padded batches included (ChatGLM's and
    Baichuan2-7B's positions), gives what full forward passes give; Baichuan2's generation_config.json
    (sampling, repetition_penalty 1.05) is not inherited."""
    model, tokenizer, _ = load_inference_model(None, str(family_folders[family]), trust_remote_code=families.OWN_CODE)
    template = get_template(tokenizer, "auto")
    prompts = [template.encode(tokenizer, None, [(r["instruction"], None)])[0][0] for r in RECORDS]
    assert len({len(p) for p in prompts}) > 1  # the batch is padded
    stop = template.stop_token_ids(tokenizer)
    expected = [greedy_without_cache(model, tokenizer, p, 12, stop) for p in prompts]
    config = generate.generation_config(tokenizer, stop)
    assert generate.generate_ids(model, tokenizer, prompts, stop, 12, 4, config, progress=False) == expected
    assert generate.generate_ids(model, tokenizer, prompts, stop, 12, 1, config, progress=False) == expected
    beams = generate.generation_config(tokenizer, stop, num_beams=2)  # the cache reordered per beam
    beam_rows = generate.generate_ids(model, tokenizer, prompts, stop, 6, 4, beams, progress=False)
    assert beam_rows == generate.generate_ids(model, tokenizer, prompts, stop, 6, 1, beams, progress=False)
    if family.startswith("baichuan2"):
        penalised = generate.generation_config(tokenizer, stop)
        penalised.repetition_penalty = 1.05  # the model's own: it would have shown in the outputs above
        assert generate.generate_ids(model, tokenizer, prompts, stop, 12, 4, penalised, progress=False) != expected
        own = generate.generation_config(tokenizer, stop, model=model)  # --use_model_generation_config
        assert own.repetition_penalty == 1.05 and own.do_sample and own.top_k == 5
        assert config.repetition_penalty == 1.0 and not config.do_sample


def train(folder, train_file, out, finetuning_type):
    """train_lora.py / train_qlora.py's main in this process (train_qlora differs only in its 4-bit default)."""
    from fora.train import recipe as train_lora

    train_lora.main([
        "--train_file", str(train_file), "--model_name_or_path", str(folder), "--trust_remote_code",
        "--template", "auto", "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--learning_rate", "2e-2", "--lora_rank", "4", "--lora_dropout", "0", "--logging_steps", "1",
        "--finetuning_type", "fora" if finetuning_type == "fora" else "lora", "--save_strategy", "no",
        "--report_to", "none",
        "--torch_dtype", "float32",  # the merge is compared with the float32 unmerged model below, on any CPU
    ], default_quantization_bit=4 if finetuning_type == "qlora" else None)


@torch.no_grad()
def logits(model, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids])).logits


@pytest.mark.slow
@pytest.mark.parametrize("finetuning_type", ["lora", "fora", "qlora"])
@pytest.mark.parametrize("family", families.FAMILIES)
def test_train_predict_merge(family, finetuning_type, family_folders, train_file, tmp_path, capsys):
    from fora import merge as merge_lora
    from fora.infer import predict as predict_fora

    folder = family_folders[family]
    adapter = tmp_path / "adapter"
    train(folder, train_file, adapter, finetuning_type)
    assert f"Prompt template: {TEMPLATES.get(family, family)}" in capsys.readouterr().out
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == PROJECTIONS[family]
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as weights:
        names = list(weights.keys())
        assert not any(HEADS.get(family, "lm_head") in name for name in names)
        assert any(weights.get_tensor(name).abs().max() > 0 for name in names if "lora_B" in name)

    results = predict_fora.main([
        "--model_dir", str(adapter), "--test_path", str(train_file), "--output_dir", str(tmp_path / "predict"),
        "--trust_remote_code", "--max_new_tokens", "4", "--batch_size", "4",
    ])
    assert results["template"] == TEMPLATES.get(family, family) and results["total"] == len(RECORDS)
    assert results["quantization_bit"] == (4 if finetuning_type == "qlora" else None)
    # The prompt predicted from the adapter folder is the one training saw (no BOS re-added for Baichuan2).
    first = json.loads((tmp_path / "predict" / "generated_predictions.jsonl").read_text().splitlines()[0])
    tokenizer = load_tokenizer(str(folder), trust_remote_code=families.OWN_CODE)
    assert first["prompt"] == tokenizer.decode(documented_prompt(family, folder, QUESTION), skip_special_tokens=False)

    merged = tmp_path / "merged"
    merge_lora.main(["--adapter", str(adapter), "--output_dir", str(merged), "--trust_remote_code"])
    for name in ("tokenizer.model", "tokenizer_config.json", next(folder.glob("tokenization_*.py")).name):
        assert (merged / name).read_bytes() == (folder / name).read_bytes()
    ids = documented_prompt(family, folder, QUESTION)
    bits = 4 if finetuning_type == "qlora" else None
    base = load_model(str(folder), torch.float32, True, bits)
    # A 4-bit base runs in train mode (nothing drops out), as test_merge.py explains.
    unmerged = logits(load_adapter(base, str(adapter)).train(bits is not None), ids)
    merged_logits = logits(load_model(str(merged), torch.float32, True).eval(), ids)
    plain = logits(load_model(str(folder), torch.float32, True).eval(), ids)
    error = ((merged_logits - unmerged).abs().max() / unmerged.abs().max()).item()
    assert error < (2e-3 if bits else 1e-5), error
    assert (merged_logits - plain).abs().max() > 100 * (merged_logits - unmerged).abs().max()  # the adapter shows


@pytest.mark.parametrize("family", families.FAMILIES)
def test_gradient_checkpointing_trains(family, family_folders, train_file, tmp_path):
    """--gradient_checkpointing reaches the family's own checkpointing code (ChatGLM2's `_set_gradient_checkpointing(module,
    value)`, ChatGLM3's `gradient_checkpointing_enable` override, which takes fewer arguments than transformers 5 passes)."""
    from fora.train import recipe as train_lora

    train_lora.main([
        "--train_file", str(train_file), "--model_name_or_path", str(family_folders[family]), "--trust_remote_code",
        "--output_dir", str(tmp_path), "--max_steps", "1", "--per_device_train_batch_size", "2", "--lora_rank", "2",
        "--save_strategy", "no", "--report_to", "none", "--torch_dtype", "float32", "--gradient_checkpointing",
    ])
    assert (tmp_path / "adapter_model.safetensors").is_file()


def one_line_error(call) -> str:
    with pytest.raises(UserError) as error:
        call()
    assert "\n" not in str(error.value)
    return str(error.value)


@pytest.mark.slow
def test_missing_trust_remote_code_exits_2_with_one_line(family_folders, train_file, tmp_path):
    folder = family_folders["chatglm3"]
    result = run_script(
        sys.executable, str(REPO / "train_lora.py"), "--train_file", str(train_file), "--model_name_or_path",
        str(folder), "--output_dir", str(tmp_path / "out"), "--max_steps", "1", cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        f"error: --model_name_or_path {folder}: the model ships its own Python code (auto_map in config.json); "
        "pass --trust_remote_code if you trust that folder"
    ]


@pytest.mark.parametrize("family", families.FAMILIES)
def test_missing_trust_remote_code_in_every_entry_point(family, family_folders, train_file, tmp_path):
    from fora import merge as merge_lora
    from fora.args import FinetuningArguments
    from fora.infer import predict as predict_fora
    from fora.train import recipe as train_lora

    folder = family_folders[family]
    message = one_line_error(lambda: train_lora.main([
        "--train_file", str(train_file), "--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "a"),
    ]))
    assert message.startswith(f"--model_name_or_path {folder}: ") and "--trust_remote_code" in message
    message = one_line_error(lambda: predict_fora.main([
        "--ori_model_dir", str(folder), "--test_path", str(train_file), "--output_dir", str(tmp_path / "p"),
    ]))
    assert message.startswith(f"--ori_model_dir {folder}: ") and "--trust_remote_code" in message
    # An adapter whose record does not say remote code: merge meets the base folder's own code.
    adapter = tmp_path / "adapter"
    model = attach_adapter(load_model(str(folder), torch.float32, True), FinetuningArguments(lora_rank=2))
    model.save_pretrained(adapter)
    RunRecord(base_model=str(folder), finetuning_type="lora", torch_dtype="float32").save(adapter)
    message = one_line_error(lambda: merge_lora.main(["--adapter", str(adapter), "--output_dir", str(tmp_path / "m")]))
    assert message.startswith(f"--base_model {folder}: ") and "--trust_remote_code" in message


@pytest.mark.parametrize("family", families.FAMILIES)
def test_supervised_loss_falls_back_to_the_models_logits(family, family_folders, tmp_path):
    """These families' forward takes no `logits_to_keep`: the Trainer's loss is the cross-entropy of the full logits."""
    from fora.args import FinetuningArguments, TrainArguments
    from fora.data.collator import PaddingCollator
    from fora.train.trainer import SupervisedTrainer

    folder = family_folders[family]
    tokenizer = load_tokenizer(str(folder), trust_remote_code=families.OWN_CODE)
    template = get_template(tokenizer, "auto")
    model = attach_adapter(load_model(str(folder), torch.float32, True), FinetuningArguments(lora_rank=2))
    trainer = SupervisedTrainer(model=model, args=TrainArguments(output_dir=str(tmp_path), report_to="none"))
    assert not trainer.head_on_selected
    features = [
        tokenize_conversation({"where": "record", "system": None, "turns": [(r["instruction"], r["output"])]},
                                   tokenizer, template, 64, 64)
        for r in RECORDS[:2]
    ]
    batch = PaddingCollator(tokenizer.pad_token_id)(features)
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = torch.nn.functional.cross_entropy(full[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(loss, expected)





def test_model_scripts_name_existing_configs_and_templates():
    """Every scripts/models/*.sh names a configs/ file that exists and a template fora knows."""
    import re

    from fora.data.templates import NAMED_TEMPLATES

    scripts = sorted((REPO / "scripts" / "models").glob("*.sh"))
    assert len(scripts) >= 13
    for script in scripts:
        settings = dict(re.findall(r"(\w+)=(\S*)", script.read_text().splitlines()[3]))
        assert settings["NAME"] == script.stem
        assert (REPO / "configs" / settings["LORA_CONFIG"]).is_file(), script
        assert settings["TEMPLATE"] in {"auto", *NAMED_TEMPLATES}, script
        assert json.loads((REPO / "configs" / settings["LORA_CONFIG"]).read_text())["lora_target_modules"]


# Methods whose path differs by family: IA3 (PEFT's own targets or every projection), AdaLoRA (the model's own
# loss), LoHa (a layer adapter other than LoRA), prefix (the family's cache, or ChatGLM's own P-tuning v2),
# prompt (embeddings into the family's forward), freeze (the family's layer names).
FAMILY_METHODS = ["ia3", "adalora", "loha", "prefix", "prompt", "freeze"]
REFUSED = {  # what a family's own code cannot take, and the refusal's words
    ("chatglm2", "prompt"): "reads input_ids in every forward", ("chatglm3", "prompt"): "reads input_ids in every forward",
    # Their published config stores `gradient_checkpointing=(False,)`, a tuple, so the model always checkpoints
    ("baichuan-13b-chat", "prefix"): "checkpoints its gradients", ("baichuan2-13b-chat", "prefix"): "checkpoints its gradients",
}


@pytest.mark.slow
@pytest.mark.parametrize("method", FAMILY_METHODS)
@pytest.mark.parametrize("family", [*families.FAMILIES, "qwen2"])
def test_every_method_trains_predicts_and_merges_on_every_family(family, method, family_folders, train_file, tmp_path):
    """Each method trains 2 steps on each family (and a tiny Qwen2), predicts from the folder it saved, and merges
    or says in one line why not; what a family's code cannot take is refused before training, naming why."""
    from fora import merge as merge_lora
    from fora.infer import predict as predict_fora
    from fora.train import recipe as train_lora
    from fora.tuners.methods import METHODS
    from support import build_tiny_model

    folder = family_folders[family] if family in family_folders else build_tiny_model(tmp_path / family, architecture=family)
    out = tmp_path / "out"
    flags = ["--train_file", str(train_file), "--model_name_or_path", str(folder), "--trust_remote_code", "--template", "auto",
             "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "2", "--learning_rate", "2e-2",
             "--lora_rank", "4", "--num_virtual_tokens", "4", "--finetuning_type", method, "--save_strategy", "no",
             "--report_to", "none", "--torch_dtype", "float32"]
    if (family, method) in REFUSED:
        with pytest.raises(UserError, match=REFUSED[family, method]):
            train_lora.main(flags)
        assert not out.exists()
        return
    train_lora.main(flags)
    if method == "prefix" and family.startswith("chatglm"):  # the model's own P-tuning v2, sized by the flag
        config = json.loads((out / "config.json").read_text())
        assert (config["pre_seq_len"], config["prefix_projection"]) == (4, False)
    results = predict_fora.main(["--model_dir", str(out), "--test_path", str(train_file), "--output_dir", str(tmp_path / "p"),
                                 "--trust_remote_code", "--max_new_tokens", "3", "--batch_size", "4"])
    assert results["total"] == len(RECORDS)
    merge = ["--adapter", str(out), "--output_dir", str(tmp_path / "merged"), "--trust_remote_code"]
    if METHODS[method].merges:
        merge_lora.main(merge)
        assert (tmp_path / "merged" / "config.json").is_file()
    else:
        with pytest.raises(UserError):
            merge_lora.main(merge)
