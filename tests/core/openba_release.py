"""A tiny OpenBA checkpoint laid out exactly as the public release is, and the public model's forward pass.

Layout facts (github.com/OpenNLG/OpenBA, `convert_megatron_to_hf_ckp.py` and `OpenBA/`): config.json from the
public `OpenBAConfig` (Megatron's `ffn_hidden_size`, `initializer_factor`, `auto_map` to the remote code,
`tokenizer_class` "OpenBATokenizer", saved by transformers 4.31), fp16 tensors saved with `torch.save` in shards
`pytorch_model-0000i-of-0000n.bin` with `pytorch_model.bin.index.json`, names `shared_embedding.weight`,
`{encoder,decoder}.block.N.{input_layernorm,self_attn.qkv,self_attn.o,post_attn_layernorm,inter_attn.q,
inter_attn.kv,inter_attn.o,post_inter_attn_layernorm,mlp.fc_in,mlp.fc_out}`, `{encoder,decoder}.final_layernorm`,
`lm_head.weight` (a copy of the embedding at conversion), `lm_head.bias`; and the slow tokenizer's files.

`public_forward` computes logits from those raw tensors following the public model code's documented behaviour
(written here from those facts, independently of the project's model): SwiGLU width int(2/3 w) rounded up to 256,
fused qkv viewed per head as [q; k; v], cross kv per head as [k; v], rotary embedding from a sin/cos table of
base 10000 in rotate-half form, positions from 0 in both stacks, fp32 attention scores / sqrt(d) with masked
positions filled with -10000, pre-LN blocks with LayerNorm(eps 1e-5) and a final LayerNorm, untied LM head + bias.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

TINY_RELEASE = {
    "vocab_size": 1024,  # 800 pieces + 100 extra ids, padded to 128 as Megatron does
    "hidden_size": 64,
    "kv_channels": 16,
    "ffn_hidden_size": 192,  # Megatron's width: the public code builds int(128) -> 256 SwiGLU channels
    "num_layers": 2,
    "num_decoder_layers": 6,
    "num_heads": 5,  # attention width 80 != hidden 64, as 5120 != 4096 at 15B
    "max_seq_length": 128,
    "decoder_max_seq_length": 64,
}
PIECES = 800


def swiglu_width(ffn_hidden_size: int) -> int:
    width = int(2 * ffn_hidden_size / 3)
    return 256 * math.ceil(width / 256)


def release_config(shape: dict) -> dict:
    """config.json as the public converter saves it (transformers 4.31, `to_json_string(use_diff=True)`)."""
    return {
        "add_ffn_bias": False,
        "add_lm_head_bias": True,
        "add_qkv_bias": True,
        "architectures": ["OpenBAForConditionalGeneration"],
        "attention_dropout": 0.1,
        "auto_map": {
            "AutoConfig": "configuration_openba.OpenBAConfig",
            "AutoModel": "modeling_openba.OpenBAForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_openba.OpenBAForConditionalGeneration",
            "AutoModelForSeq2SeqLM": "modeling_openba.OpenBAForConditionalGeneration",
        },
        "decoder_max_seq_length": shape["decoder_max_seq_length"],
        "decoder_start_token_id": 0,
        "eos_token_id": 1,
        "ffn_hidden_size": shape["ffn_hidden_size"],
        "hidden_dropout": 0.1,
        "hidden_size": shape["hidden_size"],
        "initializer_factor": 1.0,
        "is_encoder_decoder": True,
        "kv_channels": shape["kv_channels"],
        "max_seq_length": shape["max_seq_length"],
        "model_type": "openba",
        "num_decoder_layers": shape["num_decoder_layers"],
        "num_heads": shape["num_heads"],
        "num_layers": shape["num_layers"],
        "pad_token_id": 0,
        "tie_word_embeddings": False,
        "tokenizer_class": "OpenBATokenizer",
        "transformers_version": "4.31.0",
        "use_cache": True,
        "vocab_size": shape["vocab_size"],
    }


def release_state_dict(shape: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random fp16 tensors under the public names, in the order the public converter inserts them."""
    g = torch.Generator().manual_seed(seed)
    h, d, heads = shape["hidden_size"], shape["kv_channels"], shape["num_heads"]
    width, ffn = heads * d, swiglu_width(shape["ffn_hidden_size"])

    def rand(*size, scale=0.08):
        return (torch.randn(*size, generator=g) * scale).half()

    def norm(prefix):
        return {f"{prefix}.weight": (1 + rand(h, scale=0.1).float()).half(), f"{prefix}.bias": rand(h, scale=0.02)}

    embedding = rand(shape["vocab_size"], h, scale=0.5)
    state = {"shared_embedding.weight": embedding}
    for stack, depth in (("encoder", shape["num_layers"]), ("decoder", shape["num_decoder_layers"])):
        for i in range(depth):
            p = f"{stack}.block.{i}"
            state.update(norm(f"{p}.input_layernorm"))
            state[f"{p}.self_attn.qkv.weight"], state[f"{p}.self_attn.qkv.bias"] = rand(3 * width, h), rand(3 * width)
            state[f"{p}.self_attn.o.weight"], state[f"{p}.self_attn.o.bias"] = rand(h, width), rand(h)
            state.update(norm(f"{p}.post_attn_layernorm"))
            if stack == "decoder":
                state[f"{p}.inter_attn.q.weight"], state[f"{p}.inter_attn.q.bias"] = rand(width, h), rand(width)
                state[f"{p}.inter_attn.kv.weight"], state[f"{p}.inter_attn.kv.bias"] = rand(2 * width, h), rand(2 * width)
                state[f"{p}.inter_attn.o.weight"], state[f"{p}.inter_attn.o.bias"] = rand(h, width), rand(h)
                state.update(norm(f"{p}.post_inter_attn_layernorm"))
            state[f"{p}.mlp.fc_in.weight"] = rand(2 * ffn, h)
            state[f"{p}.mlp.fc_out.weight"] = rand(h, ffn)
        state.update(norm(f"{stack}.final_layernorm"))
    state["lm_head.weight"] = embedding.clone()
    state["lm_head.bias"] = rand(shape["vocab_size"], scale=0.1)
    return state


def train_spiece(texts: list[str], pieces: int = PIECES, mode_tokens: bool = True) -> bytes:
    """An mT5-style SentencePiece model: unigram, nmt_nfkc, pad 0 / eos 1 / unk 2, no BOS, no byte fallback."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buffer, vocab_size=pieces, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, normalization_rule_name="nmt_nfkc", character_coverage=1.0,
        user_defined_symbols=["<R>", "<S>", "<X>"] if mode_tokens else [], max_sentence_length=1 << 20,
        minloglevel=2,
    )
    return buffer.getvalue()


def write_release(directory: Path, spiece: bytes, shape: dict | None = None, shards: int = 2, seed: int = 0,
                  extra_ids: int = 100) -> dict[str, torch.Tensor]:
    """Write the release into `directory`; returns its state dict."""
    shape = shape or TINY_RELEASE
    directory.mkdir(parents=True, exist_ok=True)
    state = release_state_dict(shape, seed)
    (directory / "config.json").write_text(json.dumps(release_config(shape), indent=2, sort_keys=True) + "\n")
    names = list(state)
    per_shard = math.ceil(len(names) / shards)
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n] for n in names[i * per_shard:(i + 1) * per_shard]}
        torch.save(part, directory / file)
        weight_map.update({n: file for n in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (directory / "spiece.model").write_bytes(spiece)
    sentinels = [f"<extra_id_{i}>" for i in range(extra_ids)]
    tokenizer_config = {
        "additional_special_tokens": sentinels,
        "auto_map": {"AutoTokenizer": ["tokenization_openba.OpenBATokenizer", None]},
        "clean_up_tokenization_spaces": True,
        "eos_token": "</s>",
        "extra_ids": extra_ids,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<pad>",
        "sp_model_kwargs": {},
        "tokenizer_class": "OpenBATokenizer",
        "unk_token": "<unk>",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    special = {"additional_special_tokens": sentinels, "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    for name in ("configuration_openba.py", "modeling_openba.py", "tokenization_openba.py"):
        # the release's remote code; the converter never runs it
        (directory / name).write_text("raise ImportError('stands for the public remote code; never imported')\n")
    return state


def public_forward(state: dict[str, torch.Tensor], config: dict, input_ids: torch.Tensor,
                   decoder_input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (batch, target, vocab) in float32 from the release tensors, as the public model computes them."""
    w = {k: v.float() for k, v in state.items()}
    h, d, heads = config["hidden_size"], config["kv_channels"], config["num_heads"]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)

    def layer_norm(x, prefix):
        return F.layer_norm(x, (h,), w[f"{prefix}.weight"], w[f"{prefix}.bias"], eps=1e-5)

    def linear(x, prefix, bias=True):
        return F.linear(x, w[f"{prefix}.weight"], w.get(f"{prefix}.bias") if bias else None)

    def rotary(x, positions):  # x: (batch, seq, heads, d)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
        angles = positions[:, None].float() * inv_freq[None, :]
        sin, cos = torch.cat([angles.sin()] * 2, -1), torch.cat([angles.cos()] * 2, -1)
        half = torch.cat([-x[..., d // 2:], x[..., : d // 2]], dim=-1)
        return x * cos[None, :, None, :] + half * sin[None, :, None, :]

    def attend(q, k, v, blocked):  # (batch, heads, seq, d); blocked: True where masked
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        scores = scores.masked_fill(blocked, -10000.0)
        return scores.softmax(-1) @ v

    def self_attention(x, prefix, blocked):
        batch, seq, _ = x.shape
        q, k, v = linear(x, f"{prefix}.qkv").view(batch, seq, heads, 3 * d).chunk(3, dim=-1)
        positions = torch.arange(seq)
        q, k = rotary(q, positions), rotary(k, positions)
        out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), blocked)
        return linear(out.transpose(1, 2).reshape(batch, seq, heads * d), f"{prefix}.o")

    def cross_attention(x, memory, prefix, blocked):
        batch, seq, _ = x.shape
        q = linear(x, f"{prefix}.q").view(batch, seq, heads, d).transpose(1, 2)
        k, v = linear(memory, f"{prefix}.kv").view(batch, memory.shape[1], heads, 2 * d).chunk(2, dim=-1)
        out = attend(q, k.transpose(1, 2), v.transpose(1, 2), blocked)
        return linear(out.transpose(1, 2).reshape(batch, seq, heads * d), f"{prefix}.o")

    def mlp(x, prefix):
        gate, up = linear(x, f"{prefix}.fc_in", bias=False).chunk(2, dim=-1)
        return linear(F.silu(gate) * up, f"{prefix}.fc_out", bias=False)

    pad_blocked = (attention_mask == 0)[:, None, None, :]
    x = F.embedding(input_ids, w["shared_embedding.weight"])
    for i in range(config["num_layers"]):
        p = f"encoder.block.{i}"
        x = x + self_attention(layer_norm(x, f"{p}.input_layernorm"), f"{p}.self_attn", pad_blocked)
        x = x + mlp(layer_norm(x, f"{p}.post_attn_layernorm"), f"{p}.mlp")
    memory = layer_norm(x, "encoder.final_layernorm")

    target = decoder_input_ids.shape[1]
    causal_blocked = torch.ones(target, target, dtype=torch.bool).triu(1)[None, None]
    y = F.embedding(decoder_input_ids, w["shared_embedding.weight"])
    for i in range(config["num_decoder_layers"]):
        p = f"decoder.block.{i}"
        y = y + self_attention(layer_norm(y, f"{p}.input_layernorm"), f"{p}.self_attn", causal_blocked)
        y = y + cross_attention(layer_norm(y, f"{p}.post_attn_layernorm"), memory, f"{p}.inter_attn", pad_blocked)
        y = y + mlp(layer_norm(y, f"{p}.post_inter_attn_layernorm"), f"{p}.mlp")
    y = layer_norm(y, "decoder.final_layernorm")
    return F.linear(y, w["lm_head.weight"], w["lm_head.bias"])
