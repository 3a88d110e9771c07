"""A tiny random Qwen3-MoE checkpoint and tokenizer, written locally (no downloads).

2 layers, hidden 256, 8 experts, top-2, vocab 512; seed-0 fp32 weights in one
safetensors file under Hugging Face's names, and a word-level ``tokenizers`` tokenizer
over the words ``t0 .. t511``. Only torch, safetensors and tokenizers are needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 512, 256, 2, 4, 2, 64
EXPERTS, TOP_K, MOE_INTERMEDIATE = 8, 2, 128
BOS, EOS = 1, VOCAB - 1

CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "intermediate_size": 512,  # dense MLP size; unused, every layer is sparse
    "moe_intermediate_size": MOE_INTERMEDIATE,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "head_dim": HEAD_DIM,
    "num_experts": EXPERTS,
    "num_experts_per_tok": TOP_K,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    "sliding_window": None,
    "use_sliding_window": False,
    "tie_word_embeddings": False,
    "bos_token_id": BOS,
    "eos_token_id": EOS,
    "torch_dtype": "float32",
    "dtype": "float32",
    "use_cache": True,
}


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights. The experts and the LM head get a larger scale than the
    rest so that the MoE output moves the logits clearly (a wrong dispatch or combine
    shows) and greedy choices are not near-ties."""
    g = torch.Generator().manual_seed(seed)

    def normal(*shape, std=0.02):
        return (torch.randn(*shape, generator=g, dtype=torch.float32) * std).contiguous()

    w = {"model.embed_tokens.weight": normal(VOCAB, HIDDEN, std=1.0)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = torch.ones(HIDDEN)
        w[p + "post_attention_layernorm.weight"] = torch.ones(HIDDEN)
        w[p + "self_attn.q_proj.weight"] = normal(HEADS * HEAD_DIM, HIDDEN, std=0.05)
        w[p + "self_attn.k_proj.weight"] = normal(KV_HEADS * HEAD_DIM, HIDDEN, std=0.05)
        w[p + "self_attn.v_proj.weight"] = normal(KV_HEADS * HEAD_DIM, HIDDEN, std=0.05)
        w[p + "self_attn.o_proj.weight"] = normal(HIDDEN, HEADS * HEAD_DIM, std=0.05)
        w[p + "self_attn.q_norm.weight"] = torch.ones(HEAD_DIM)
        w[p + "self_attn.k_norm.weight"] = torch.ones(HEAD_DIM)
        w[p + "mlp.gate.weight"] = normal(EXPERTS, HIDDEN, std=0.1)
        for e in range(EXPERTS):
            q = f"{p}mlp.experts.{e}."
            w[q + "gate_proj.weight"] = normal(MOE_INTERMEDIATE, HIDDEN, std=0.1)
            w[q + "up_proj.weight"] = normal(MOE_INTERMEDIATE, HIDDEN, std=0.1)
            w[q + "down_proj.weight"] = normal(HIDDEN, MOE_INTERMEDIATE, std=0.1)
    w["model.norm.weight"] = torch.ones(HIDDEN)
    w["lm_head.weight"] = normal(VOCAB, HIDDEN, std=0.2)
    return w


def write(path: Path, seed: int = 0) -> Path:
    """Writes config, weights and tokenizer to ``path`` (created); returns it."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(CONFIG, indent=1))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": BOS, "eos_token_id": EOS}))
    save_file(weights(seed), str(path / "model.safetensors"), metadata={"format": "pt"})

    tokenizer = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "t0", "bos_token": f"t{BOS}",
        "eos_token": f"t{EOS}", "model_max_length": 256}))
    return path
