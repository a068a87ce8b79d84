"""What the memory estimate needs to know about a model's shape, read from its config, and the built-in table
of the architectures the model scripts name (scripts/models/), from their published config.json values, so a
run can be estimated offline by name.

    Architecture.of(config)   the shape of any config (a folder's config.json, or a built-in entry)
    BUILT_IN[name]            published config values; `built_in_config(name)` looks a name up

The block's linear layers carry the names each family's own code gives them (W_pack, query_key_value, wqkv, ...),
so --lora_target and the --lora_config files name them as for the real model.
"""

from dataclasses import dataclass

from fora.errors import UserError

# Published config.json values (the fields the shape reads), by the name the model scripts use.
BUILT_IN: dict[str, dict] = {
    "smollm2-135m-instruct": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                  num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "baichuan-7b": dict(model_type="baichuan", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, vocab_size=64000),
    "baichuan-13b-chat": dict(model_type="baichuan", hidden_size=5120, intermediate_size=13696, num_hidden_layers=40,
                              num_attention_heads=40, vocab_size=64000),
    "baichuan2-7b-chat": dict(model_type="baichuan", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                              num_attention_heads=32, vocab_size=125696),
    "baichuan2-13b-chat": dict(model_type="baichuan", hidden_size=5120, intermediate_size=13696, num_hidden_layers=40,
                               num_attention_heads=40, vocab_size=125696),
    "chatglm2-6b": dict(model_type="chatglm", hidden_size=4096, ffn_hidden_size=13696, num_layers=28, num_attention_heads=32,
                        multi_query_group_num=2, kv_channels=128, padded_vocab_size=65024, add_qkv_bias=True,
                        pre_seq_len=None, prefix_projection=False),
    "chatglm3-6b": dict(model_type="chatglm", hidden_size=4096, ffn_hidden_size=13696, num_layers=28, num_attention_heads=32,
                        multi_query_group_num=2, kv_channels=128, padded_vocab_size=65024, add_qkv_bias=True,
                        pre_seq_len=None, prefix_projection=False),
    "llama-2-7b-chat": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "llama-2-13b-chat": dict(model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                             num_attention_heads=40, num_key_value_heads=40, vocab_size=32000),
    "llama-2-70b-chat": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                             num_attention_heads=64, num_key_value_heads=8, vocab_size=32000),
    "llama-3-8b-instruct": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "qwen2.5-7b-instruct": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                num_attention_heads=28, num_key_value_heads=4, vocab_size=152064),
    "qwen2.5-14b-instruct": dict(model_type="qwen2", hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
                                 num_attention_heads=40, num_key_value_heads=8, vocab_size=152064),
    "internlm2-chat-7b": dict(model_type="internlm2", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=8, vocab_size=92544),
    "internlm2-chat-20b": dict(model_type="internlm2", hidden_size=6144, intermediate_size=16384, num_hidden_layers=48,
                               num_attention_heads=48, num_key_value_heads=8, vocab_size=92544),
    "pythia-1.4b": dict(model_type="gpt_neox", hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                        num_attention_heads=16, vocab_size=50304),
    "pythia-12b": dict(model_type="gpt_neox", hidden_size=5120, intermediate_size=20480, num_hidden_layers=36,
                       num_attention_heads=40, vocab_size=50688),
    "bloom-7b1": dict(model_type="bloom", hidden_size=4096, n_layer=30, n_head=32, vocab_size=250880, tie_word_embeddings=True),
    "falcon-7b-instruct": dict(model_type="falcon", hidden_size=4544, num_hidden_layers=32, num_attention_heads=71,
                               multi_query=True, vocab_size=65024, tie_word_embeddings=True),
}
# Published names (and hub ids' last parts) that name the same shapes.
ALIASES = {"smollm2-135m": "smollm2-135m-instruct", "baichuan-13b-base": "baichuan-13b-chat", "baichuan2-7b-base": "baichuan2-7b-chat",
           "baichuan2-13b-base": "baichuan2-13b-chat", "chatglm3-6b-base": "chatglm3-6b", "llama-2-7b": "llama-2-7b-chat",
           "llama-2-7b-hf": "llama-2-7b-chat", "llama-2-7b-chat-hf": "llama-2-7b-chat", "llama-2-13b": "llama-2-13b-chat",
           "llama-2-13b-hf": "llama-2-13b-chat", "llama-2-13b-chat-hf": "llama-2-13b-chat", "llama-2-70b": "llama-2-70b-chat",
           "llama-2-70b-hf": "llama-2-70b-chat", "llama-2-70b-chat-hf": "llama-2-70b-chat", "meta-llama-3-8b": "llama-3-8b-instruct",
           "meta-llama-3-8b-instruct": "llama-3-8b-instruct", "llama-3-8b": "llama-3-8b-instruct", "qwen2.5-7b": "qwen2.5-7b-instruct",
           "qwen2.5-14b": "qwen2.5-14b-instruct", "internlm2-7b": "internlm2-chat-7b", "internlm2-20b": "internlm2-chat-20b",
           "falcon-7b": "falcon-7b-instruct"}
# Families whose code ships with the checkpoint (--trust_remote_code); their attention as that code computes it.
REMOTE_CODE = ("baichuan", "chatglm", "internlm2")


def built_in_config(name: str) -> dict | None:
    """The published config values of a built-in name (case-insensitive; a hub id's last part counts), or None."""
    key = name.rstrip("/").rsplit("/", 1)[-1].lower()
    key = ALIASES.get(key, key)
    return dict(BUILT_IN[key]) if key in BUILT_IN else None


@dataclass(frozen=True)
class Linear:
    """A linear layer of a Transformer block: its name in the family's code, input and output width, bias."""

    name: str
    inputs: int
    outputs: int
    bias: bool = False


@dataclass(frozen=True)
class Architecture:
    """A decoder-only Transformer's shape, as far as memory goes."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int  # the MLP's inner width
    vocab: int  # rows of the output layer (a padded vocabulary included)
    tied: bool  # the output layer shares the input embedding
    gated: bool  # MLP act(gate(x)) * up(x) (SwiGLU); else act(fc(x))
    rms_norm: bool  # RMSNorm (computed in float32); else LayerNorm with a bias
    parallel: bool  # attention and MLP read the same layer input (GPT-NeoX, Falcon), not one after the other
    eager_attention: bool  # the family's attention builds the (heads x length x length) scores; else a fused kernel
    alibi: bool  # ALiBi position biases instead of rotary embeddings
    custom_code: bool  # the model's own code (--trust_remote_code)
    attention: tuple[Linear, ...]
    mlp: tuple[Linear, ...]
    attention_module: str  # the block's child holding the attention linears
    mlp_module: str
    norms: tuple[str, ...]  # the block's norm children
    layers_module: str  # where the blocks are: "model.layers", "transformer.h", ...

    @property
    def linears(self) -> tuple[Linear, ...]:
        return self.attention + self.mlp

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @classmethod
    def of(cls, config) -> "Architecture":
        """The shape a config (an HF config object or a dict of config.json values) describes."""
        values = config if isinstance(config, dict) else {**config.to_dict(), "model_type": config.model_type}
        get = lambda *names, default=None: next((values[n] for n in names if values.get(n) is not None), default)  # noqa: E731
        model_type = get("model_type", default="")
        hidden = get("hidden_size", "n_embd", "d_model")
        heads = get("num_attention_heads", "n_head")
        layers = get("num_hidden_layers", "num_layers", "n_layer")
        if not (hidden and heads and layers):
            raise UserError(f"model_type {model_type!r}: its config names no hidden_size, num_attention_heads and "
                            "num_hidden_layers; the memory estimate cannot read its shape")
        head_dim = get("head_dim", "kv_channels", default=hidden // heads)
        vocab = get("padded_vocab_size", "vocab_size")
        base = dict(model_type=model_type, hidden=hidden, layers=layers, heads=heads, head_dim=head_dim, vocab=vocab,
                    custom_code=model_type in REMOTE_CODE)
        if model_type == "chatglm":
            groups = get("multi_query_group_num", default=heads) if get("multi_query_attention", default=True) else heads
            inner = get("ffn_hidden_size")
            qkv = heads * head_dim + 2 * groups * head_dim
            return cls(**base, kv_heads=groups, intermediate=inner, tied=False, gated=True, rms_norm=get("rmsnorm", default=True),
                       parallel=False, eager_attention=False, alibi=False,
                       attention=(Linear("query_key_value", hidden, qkv, get("add_qkv_bias", default=True)),
                                  Linear("dense", heads * head_dim, hidden)),
                       mlp=(Linear("dense_h_to_4h", hidden, 2 * inner), Linear("dense_4h_to_h", inner, hidden)),
                       attention_module="self_attention", mlp_module="mlp", norms=("input_layernorm", "post_attention_layernorm"),
                       layers_module="transformer.encoder.layers")
        if model_type in ("gpt_neox", "bloom", "falcon"):
            kv = 1 if model_type == "falcon" and get("multi_query", default=True) and not get("new_decoder_architecture") else (
                get("num_kv_heads", "num_key_value_heads", default=heads))
            inner = get("intermediate_size", "ffn_hidden_size", default=4 * hidden)
            bias = model_type != "falcon" or bool(get("bias"))
            qkv = heads * head_dim + 2 * kv * head_dim
            module = "attention" if model_type == "gpt_neox" else "self_attention"
            norms = ("input_layernorm",) if model_type == "falcon" else ("input_layernorm", "post_attention_layernorm")
            where = {"gpt_neox": "gpt_neox.layers", "bloom": "transformer.h", "falcon": "transformer.h"}[model_type]
            return cls(**base, kv_heads=kv, intermediate=inner, tied=get("tie_word_embeddings", default=model_type != "gpt_neox"),
                       gated=False, rms_norm=False, parallel=model_type != "bloom", eager_attention=model_type == "bloom",
                       alibi=model_type == "bloom" or bool(get("alibi")),
                       attention=(Linear("query_key_value", hidden, qkv, bias), Linear("dense", heads * head_dim, hidden, bias)),
                       mlp=(Linear("dense_h_to_4h", hidden, inner, bias), Linear("dense_4h_to_h", inner, hidden, bias)),
                       attention_module=module, mlp_module="mlp", norms=norms, layers_module=where)
        # The Llama family and everything shaped like it (Mistral, Qwen2, InternLM2, Baichuan, ...).
        kv = get("num_key_value_heads", default=heads)
        inner = get("intermediate_size")
        q, k = heads * head_dim, kv * head_dim
        if model_type == "baichuan":
            # q, k and v in one W_pack. The 13B sizes use ALiBi, and their code and Baichuan-7B's (the 64000-token
            # vocabulary) compute attention eagerly; Baichuan2-7B's calls scaled_dot_product_attention.
            alibi = hidden == 5120
            attention = (Linear("W_pack", hidden, 3 * hidden), Linear("o_proj", hidden, hidden))
            return cls(**base, kv_heads=heads, intermediate=inner, tied=False, gated=True, rms_norm=True, parallel=False,
                       eager_attention=alibi or vocab == 64000, alibi=alibi, attention=attention,
                       mlp=(Linear("gate_proj", hidden, inner), Linear("up_proj", hidden, inner), Linear("down_proj", inner, hidden)),
                       attention_module="self_attn", mlp_module="mlp", norms=("input_layernorm", "post_attention_layernorm"),
                       layers_module="model.layers")
        if model_type == "internlm2":
            return cls(**base, kv_heads=kv, intermediate=inner, tied=bool(get("tie_word_embeddings", default=False)), gated=True,
                       rms_norm=True, parallel=False, eager_attention=get("attn_implementation", default="eager") == "eager",
                       alibi=False, attention=(Linear("wqkv", hidden, q + 2 * k), Linear("wo", q, hidden)),
                       mlp=(Linear("w1", hidden, inner), Linear("w3", hidden, inner), Linear("w2", inner, hidden)),
                       attention_module="attention", mlp_module="feed_forward", norms=("attention_norm", "ffn_norm"),
                       layers_module="model.layers")
        qkv_bias = bool(get("attention_bias", default=model_type == "qwen2"))
        return cls(**base, kv_heads=kv, intermediate=inner, tied=bool(get("tie_word_embeddings", default=False)), gated=True,
                   rms_norm=True, parallel=False, eager_attention=False, alibi=False,
                   attention=(Linear("q_proj", hidden, q, qkv_bias), Linear("k_proj", hidden, k, qkv_bias),
                              Linear("v_proj", hidden, k, qkv_bias), Linear("o_proj", q, hidden)),
                   mlp=(Linear("gate_proj", hidden, inner), Linear("up_proj", hidden, inner), Linear("down_proj", inner, hidden)),
                   attention_module="self_attn", mlp_module="mlp", norms=("input_layernorm", "post_attention_layernorm"),
                   layers_module="model.layers")
