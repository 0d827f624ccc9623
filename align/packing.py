"""Per-response log-likelihoods with the long context computed once for the preferred and all dis-preferred responses.

A preference batch holds, per row, one prompt (context chunks + question) and 1 + M responses (preferred first):

    input_ids, attention_mask, position_ids   [batch, prompt]      prompt, right-padded; positions may be synthesised
    response_ids, response_mask               [batch, 1 + M, R]    responses, right-padded

Decoder-only (`packed`): one sequence per row, [prompt, y_w, y_l1, ..., y_lM], with a 4D attention mask in which the
prompt is causal, and every response sees the whole prompt and its own earlier tokens only; each response's position
ids continue from the prompt's last position. The first token of every response is scored with the logits of the
last prompt token, the others with the logits of their own previous token. Only those positions reach the LM head
(`logits_to_keep`), so the context never costs a vocabulary-sized matrix. Cost: prompt + sum of responses tokens,
instead of (1 + M) x (prompt + response).

Encoder-decoder: the encoder runs once over the prompt, and the decoder reads all 1 + M responses of a row as one
sequence with a block-diagonal causal mask and positions restarting at 0 per response (as in pretraining), so the
cross-attention keys and values of the context are computed once as well. A decoder without position ids (T5)
gets the encoder output repeated per response instead (the encoder still runs once).

`separate` runs every (prompt, response) pair as its own sequence: the reference the packed path must equal, and
the baseline of `benchmarks/shared_context.py`.

Decoder-only models get an explicit attention mask whenever position ids are passed: transformers 5 otherwise reads
a jump in position ids (exactly what synthesis makes) as the start of a new packed document and cuts attention there.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutput

from align.losses import ResponseLogps
from core.errors import UserError
from pretrain.trainer.engines import unwrap as unwrap_engine

PROMPT_KEYS = ("input_ids", "attention_mask", "position_ids")
RESPONSE_KEYS = ("response_ids", "response_mask")


def unwrap(model):
    """The transformers model under a DeepSpeed engine or a peft wrapper (for its config and methods)."""
    model = unwrap_engine(model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def _forward_accepts(model, name: str) -> bool:
    return name in inspect.signature(unwrap(model).forward).parameters


def _token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position, in float32 (log-softmax over a bf16 vocabulary loses the margins LOGO needs)."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), -1, targets.unsqueeze(-1)).squeeze(-1)


def _sum_per_response(values: torch.Tensor, owner: torch.Tensor, responses: int) -> ResponseLogps:
    """Sum `values` [batch, K] into [batch, responses] by `owner` (-1: padding, dropped)."""
    valid = owner >= 0
    index = owner.clamp(min=0)
    sums = torch.zeros(values.shape[0], responses, dtype=values.dtype, device=values.device)
    sums = sums.scatter_add(1, index, torch.where(valid, values, torch.zeros_like(values)))
    counts = torch.zeros(values.shape[0], responses, dtype=torch.long, device=values.device)
    counts = counts.scatter_add(1, index, valid.long())
    return ResponseLogps(sums, counts)


def check_batch(batch: dict, min_responses: int = 2) -> None:
    missing = [key for key in (*PROMPT_KEYS[:2], *RESPONSE_KEYS) if key not in batch]
    if missing:
        raise UserError(f"a preference batch needs {', '.join(missing)}; build batches with align.batches")
    if batch["response_ids"].dim() != 3 or batch["response_ids"].shape[1] < min_responses:
        raise UserError(f"response_ids must be [batch, 1 + M, length] with M >= {min_responses - 1} dis-preferred "
                        "responses")
    if (batch["response_mask"].sum(-1) == 0).any():
        raise UserError("a response has no tokens; every preferred and dis-preferred response needs at least one")
    if (batch["attention_mask"].sum(-1) == 0).any():
        raise UserError("a prompt has no tokens")


def response_logps(model, batch: dict, shared: bool = True, min_responses: int = 2) -> ResponseLogps:
    """Summed log-probabilities and token counts of every response, [batch, 1 + M] (M >= min_responses - 1)."""
    check_batch(batch, min_responses)
    if getattr(unwrap(model).config, "is_encoder_decoder", False):
        return _seq2seq_logps(model, batch, shared)
    return _packed_logps(model, batch) if shared else _separate_logps(model, batch)


# ---------------------------------------------------------------------------------------------------- decoder-only


def mask_kind(model) -> str:
    implementation = getattr(unwrap(model).config, "_attn_implementation", "eager") or "eager"
    if implementation == "sdpa":
        return "bool"
    if implementation == "eager":
        return "additive"
    raise UserError(f"shared-context packing needs a dense 4D attention mask, which attn_implementation "
                    f"{implementation!r} does not take; use sdpa or eager (or separate sequences)")


def _positions_or_default(batch: dict) -> torch.Tensor:
    if "position_ids" in batch:
        return batch["position_ids"]
    mask = batch["attention_mask"]
    return torch.arange(mask.shape[1], device=mask.device).expand_as(mask)


def _logits_at(model, inputs: dict, keep: torch.Tensor) -> torch.Tensor:
    """Logits at positions `keep` [batch, K] only (`logits_to_keep` where the model has it)."""
    if _forward_accepts(model, "logits_to_keep"):
        return model(**inputs, logits_to_keep=keep, use_cache=False).logits
    logits = model(**inputs, use_cache=False).logits
    return torch.take_along_dim(logits, keep[..., None], dim=1)


def packed_layout(batch: dict) -> dict[str, torch.Tensor]:
    """Packed ids, segment ids (0 prompt, 1 + i response i, -1 pad), positions, and the scoring plan per row."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    positions = _positions_or_default(batch)
    responses, response_mask = batch["response_ids"], batch["response_mask"]
    rows, count = responses.shape[:2]
    prompt_lengths = mask.sum(-1).tolist()
    response_lengths = response_mask.sum(-1).tolist()
    total = max(p + sum(r) for p, r in zip(prompt_lengths, response_lengths))
    scored = max(sum(r) for r in response_lengths)
    device = ids.device
    packed = torch.zeros(rows, total, dtype=ids.dtype, device=device)
    segment = torch.full((rows, total), -1, dtype=torch.long, device=device)
    packed_positions = torch.zeros(rows, total, dtype=torch.long, device=device)
    keep = torch.zeros(rows, scored, dtype=torch.long, device=device)
    targets = torch.zeros(rows, scored, dtype=ids.dtype, device=device)
    owner = torch.full((rows, scored), -1, dtype=torch.long, device=device)
    for row in range(rows):
        p = prompt_lengths[row]
        packed[row, :p] = ids[row, :p]
        segment[row, :p] = 0
        packed_positions[row, :p] = positions[row, :p]
        start_position = positions[row, p - 1] + 1
        at, slot = p, 0
        for i in range(count):
            r = response_lengths[row][i]
            tokens = responses[row, i, :r]
            packed[row, at:at + r] = tokens
            segment[row, at:at + r] = 1 + i
            packed_positions[row, at:at + r] = start_position + torch.arange(r, device=device)
            keep[row, slot] = p - 1  # the last prompt token predicts every response's first token
            keep[row, slot + 1:slot + r] = torch.arange(at, at + r - 1, device=device)
            targets[row, slot:slot + r] = tokens
            owner[row, slot:slot + r] = i
            at, slot = at + r, slot + r
    return {"input_ids": packed, "segment": segment, "position_ids": packed_positions, "keep": keep,
            "targets": targets, "owner": owner}


def shared_context_mask(segment: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """[batch, 1, L, L]: causal, and a response token sees the prompt (segment 0) and its own segment only."""
    length = segment.shape[1]
    index = torch.arange(length, device=segment.device)
    causal = index[None, :, None] >= index[None, None, :]
    query, key = segment[:, :, None], segment[:, None, :]
    allowed = causal & ((key == 0) | (key == query))
    allowed = allowed[:, None]
    if kind == "bool":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=segment.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _model_dtype(model) -> torch.dtype:
    return next(unwrap(model).parameters()).dtype


def _packed_logps(model, batch: dict) -> ResponseLogps:
    layout = packed_layout(batch)
    mask = shared_context_mask(layout["segment"], mask_kind(model), _model_dtype(model))
    inputs = {"input_ids": layout["input_ids"], "attention_mask": mask, "position_ids": layout["position_ids"]}
    logits = _logits_at(model, inputs, layout["keep"])
    values = _token_logps(logits, layout["targets"])
    return _sum_per_response(values, layout["owner"], batch["response_ids"].shape[1])


def separate_layout(batch: dict) -> dict[str, torch.Tensor]:
    """One right-padded sequence [prompt, response] per (row, response), rows ordered row-major."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    positions = _positions_or_default(batch)
    responses, response_mask = batch["response_ids"], batch["response_mask"]
    rows, count = responses.shape[:2]
    prompt_lengths = mask.sum(-1).tolist()
    response_lengths = response_mask.sum(-1).tolist()
    total = max(p + max(r) for p, r in zip(prompt_lengths, response_lengths))
    scored = max(max(r) for r in response_lengths)
    device = ids.device
    n = rows * count
    seq = torch.zeros(n, total, dtype=ids.dtype, device=device)
    attention = torch.zeros(n, total, dtype=torch.long, device=device)
    seq_positions = torch.zeros(n, total, dtype=torch.long, device=device)
    keep = torch.zeros(n, scored, dtype=torch.long, device=device)
    targets = torch.zeros(n, scored, dtype=ids.dtype, device=device)
    owner = torch.full((n, scored), -1, dtype=torch.long, device=device)
    for row in range(rows):
        p = prompt_lengths[row]
        for i in range(count):
            k, r = row * count + i, response_lengths[row][i]
            tokens = responses[row, i, :r]
            seq[k, :p], seq[k, p:p + r] = ids[row, :p], tokens
            attention[k, :p + r] = 1
            seq_positions[k, :p] = positions[row, :p]
            seq_positions[k, p:p + r] = positions[row, p - 1] + 1 + torch.arange(r, device=device)
            keep[k, :r] = torch.arange(p - 1, p + r - 1, device=device)
            targets[k, :r] = tokens
            owner[k, :r] = 0
    return {"input_ids": seq, "attention_mask": attention, "position_ids": seq_positions, "keep": keep,
            "targets": targets, "owner": owner}


def _separate_logps(model, batch: dict) -> ResponseLogps:
    layout = separate_layout(batch)
    inputs = {key: layout[key] for key in ("input_ids", "attention_mask", "position_ids")}
    logits = _logits_at(model, inputs, layout["keep"])
    values = _token_logps(logits, layout["targets"])
    rows, count = batch["response_ids"].shape[:2]
    flat = _sum_per_response(values, layout["owner"], 1)
    return ResponseLogps(flat.sum_logp.view(rows, count), flat.num_tokens.view(rows, count))


# ---------------------------------------------------------------------------------------------------- encoder-decoder


def _decoder_inputs(model, labels: torch.Tensor) -> torch.Tensor:
    inner = unwrap(model)
    if hasattr(inner, "prepare_decoder_input_ids_from_labels"):
        return inner.prepare_decoder_input_ids_from_labels(labels=labels)
    start = inner.config.decoder_start_token_id
    shifted = labels.new_full(labels.shape, start)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == -100, inner.config.pad_token_id or 0)


def encoder_kwargs(model, batch: dict) -> dict:
    """The encoder's inputs of a batch, with its (synthesised) position ids where the encoder takes them."""
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "position_ids" in batch:
        encoder = unwrap(model).get_encoder()
        if "position_ids" in inspect.signature(encoder.forward).parameters:
            kwargs["position_ids"] = batch["position_ids"]
        elif not _plain_positions(batch["position_ids"], batch["attention_mask"]):
            raise UserError(f"{type(unwrap(model)).__name__} takes no encoder position ids (relative position "
                            "buckets), so positions cannot be synthesised for it; set position.synthesize=false")
    return kwargs


def _plain_positions(position_ids: torch.Tensor, attention_mask: torch.Tensor) -> bool:
    """Positions 0..k-1 on each row's tokens: what an encoder without position ids uses anyway."""
    plain = torch.arange(position_ids.shape[1], device=position_ids.device) * attention_mask
    return torch.equal(position_ids * attention_mask, plain)


def _decoder_packed_layout(model, batch: dict) -> dict[str, torch.Tensor]:
    """All responses of a row in one decoder sequence: each shifted right behind the decoder start token, positions
    from 0 per response, segment ids for a block-diagonal causal mask."""
    responses, response_mask = batch["response_ids"], batch["response_mask"]
    rows, count = responses.shape[:2]
    lengths = response_mask.sum(-1).tolist()
    total = max(sum(r) for r in lengths)
    inner = unwrap(model)
    start = inner.config.decoder_start_token_id
    device = responses.device
    inputs = torch.full((rows, total), inner.config.pad_token_id or 0, dtype=responses.dtype, device=device)
    targets = torch.zeros(rows, total, dtype=responses.dtype, device=device)
    segment = torch.full((rows, total), -1, dtype=torch.long, device=device)
    positions = torch.zeros(rows, total, dtype=torch.long, device=device)
    for row in range(rows):
        at = 0
        for i in range(count):
            r = lengths[row][i]
            tokens = responses[row, i, :r]
            inputs[row, at] = start
            inputs[row, at + 1:at + r] = tokens[:-1]
            targets[row, at:at + r] = tokens
            segment[row, at:at + r] = i
            positions[row, at:at + r] = torch.arange(r, device=device)
            at += r
    return {"decoder_input_ids": inputs, "targets": targets, "segment": segment, "decoder_position_ids": positions}


def block_causal_mask(segment: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """[batch, 1, T, T]: causal inside each segment, nothing across segments (padding sees earlier padding)."""
    length = segment.shape[1]
    index = torch.arange(length, device=segment.device)
    allowed = (index[None, :, None] >= index[None, None, :]) & (segment[:, :, None] == segment[:, None, :])
    allowed = allowed[:, None]
    if kind == "bool":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=segment.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _seq2seq_logps(model, batch: dict, shared: bool) -> ResponseLogps:
    """Shared: one encoder pass and one decoder sequence per row holding every response (block-diagonal mask), so
    the cross-attention keys and values of the context are computed once too. Models whose decoder takes no
    position ids (T5) repeat the encoder output per response instead. Separate: every pair on its own."""
    responses, response_mask = batch["response_ids"], batch["response_mask"]
    rows, count, length = responses.shape
    encoder_inputs = encoder_kwargs(model, batch)
    if shared and _forward_accepts(model, "decoder_position_ids"):
        layout = _decoder_packed_layout(model, batch)
        encoded = unwrap(model).get_encoder()(**encoder_inputs).last_hidden_state
        mask = block_causal_mask(layout["segment"], mask_kind(model), _model_dtype(model))
        outputs = model(encoder_outputs=BaseModelOutput(last_hidden_state=encoded),
                        attention_mask=batch["attention_mask"], decoder_input_ids=layout["decoder_input_ids"],
                        decoder_attention_mask=mask, decoder_position_ids=layout["decoder_position_ids"],
                        use_cache=False)
        values = _token_logps(outputs.logits, layout["targets"])
        owner = layout["segment"]
        return _sum_per_response(values, owner, count)
    labels = responses.reshape(rows * count, length).masked_fill(response_mask.reshape(rows * count, length) == 0, -100)
    decoder_input_ids = _decoder_inputs(model, labels)
    if shared:
        encoded = unwrap(model).get_encoder()(**encoder_inputs).last_hidden_state
        hidden = encoded.repeat_interleave(count, dim=0)
        mask = batch["attention_mask"].repeat_interleave(count, dim=0)
        outputs = model(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), attention_mask=mask,
                        decoder_input_ids=decoder_input_ids, use_cache=False)
    else:
        repeated = {key: value.repeat_interleave(count, dim=0) for key, value in encoder_inputs.items()}
        outputs = model(**repeated, decoder_input_ids=decoder_input_ids, use_cache=False)
    values = _token_logps(outputs.logits, labels.clamp(min=0))
    valid = labels != -100
    sums = torch.where(valid, values, torch.zeros_like(values)).sum(-1).view(rows, count)
    return ResponseLogps(sums, valid.sum(-1).view(rows, count))
