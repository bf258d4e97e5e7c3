"""The correctness anchor: answer protocol requests with plain transformers (+ peft for an adapter), in fp32.

Slow and simple on purpose (one sequence at a time, no batching tricks): backends are compared against it.
Conventions (the same as evaluators/protocol.py documents for every backend):
- prompts are tokenised with the tokenizer's defaults (`tokenizer(prompt)`, special tokens as the tokenizer adds them,
  like vLLM does); ChoiceRequest options with `add_special_tokens=False`, appended to the prompt tokens;
- ChoiceResponse.logprobs[j] = sum over option j's tokens of log P(token | prompt + previous option tokens);
- GenerateRequest: greedy (temperature 0) or sampled with torch's generator seeded by `seed`; stops at the model's
  EOS or `max_tokens`; text decoded without special tokens, cut before the first `stop` string.
"""
from __future__ import annotations

import os
from typing import Sequence

from evaluators.protocol import ChoiceRequest, ChoiceResponse, GenerateRequest, GenerateResponse, Request, Response


def load_reference_model(model_path: str, adapter: str | None = None):
    """(model, tokenizer): fp32, eval mode, local files only; a PEFT adapter folder is applied with peft (unmerged)."""
    import torch  # heavy (torch, transformers, peft): loaded when the reference runs, not on import
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_path = os.path.expanduser(str(model_path))
    tok = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, local_files_only=True)
    if adapter is not None:
        from peft import PeftModel  # heavy, only with an adapter

        model = PeftModel.from_pretrained(model, os.path.expanduser(str(adapter)), is_trainable=False)
    model.eval()
    return model, tok


def option_logprobs(model, tok, prompt: str, options: Sequence[str]) -> tuple[float, ...]:
    """Sum of log-probs of each option's tokens after the prompt (one forward pass per option)."""
    import torch  # heavy: see load_reference_model

    pids = tok(prompt)["input_ids"]
    all_oids = [tok(opt, add_special_tokens=False)["input_ids"] for opt in options]
    for opt, oids in zip(options, all_oids):
        if not oids:
            raise ValueError(f"option {opt!r} is empty after tokenisation")
    out = []
    with torch.no_grad():
        if all(len(o) == 1 for o in all_oids):  # single-token options: one forward pass gives them all
            logits = model(input_ids=torch.tensor([pids]), logits_to_keep=1).logits[0, -1]
            logp = torch.log_softmax(logits.float(), dim=-1)
            return tuple(float(logp[o[0]]) for o in all_oids)
        for oids in all_oids:
            ids = torch.tensor([pids + oids])
            logits = model(input_ids=ids).logits[0].float()
            logp = torch.log_softmax(logits, dim=-1)
            # token at position t is predicted by the logits at t - 1
            out.append(float(sum(logp[len(pids) - 1 + k, t] for k, t in enumerate(oids))))
    return tuple(out)


def generate_text(model, tok, req: GenerateRequest) -> str:
    import torch  # heavy: see load_reference_model

    enc = tok(req.prompt, return_tensors="pt")
    kwargs = dict(max_new_tokens=int(req.max_tokens), pad_token_id=tok.pad_token_id or tok.eos_token_id)
    if req.temperature > 0:
        if req.seed is not None:
            torch.manual_seed(int(req.seed))
        kwargs.update(do_sample=True, temperature=float(req.temperature), top_p=1.0, top_k=0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    with torch.no_grad():
        out = model.generate(**enc, **kwargs)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    for s in req.stop:
        if s and s in text:
            text = text[: text.index(s)]
    return text


def answer_with_transformers(model_path: str, requests: Sequence[Request], adapter: str | None = None,
                             _loaded=None) -> list[Response]:
    """One Response per Request, in order, computed with transformers (+ peft) in fp32."""
    model, tok = _loaded if _loaded is not None else load_reference_model(model_path, adapter)
    out: list[Response] = []
    for r in requests:
        if isinstance(r, ChoiceRequest):
            out.append(ChoiceResponse(option_logprobs(model, tok, r.prompt, r.options)))
        elif isinstance(r, GenerateRequest):
            out.append(GenerateResponse(generate_text(model, tok, r)))
        else:
            raise TypeError(f"unknown request type {type(r).__name__}")
    return out
