"""The JAX choice scorer: host-side layout (fast, with a stub tokenizer) and agreement with the transformers + peft
reference (evaluators.reference, the vLLM backend's correctness anchor) on real requests (slow)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evaluators.protocol import ChoiceRequest, ChoiceResponse
from genome_jax.errors import UserError
from genome_jax.models import scorer


class CharTokenizer:
    """One token per character (ord % 50 + 1), no special tokens: enough to check the layout."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) % 50 + 1 for c in text]}


def test_encode_single_token_options_share_one_sequence():
    reqs = [ChoiceRequest("Q1?", (" A", " B")), ChoiceRequest("Q22?", ("x", "y", "z"))]
    enc = scorer.encode_requests(reqs, CharTokenizer())
    # request 0 has 2-token options -> one sequence each; request 1 has 1-token options -> one shared sequence
    assert len(enc.seqs) == 3
    assert enc.n_options == (2, 3) and enc.n_options_max == 3
    tok = CharTokenizer()
    assert enc.seqs[0] == tok("Q1?")["input_ids"] + tok(" A")["input_ids"]
    # option " A" of request 0: tokens at positions 3, 4 predicted from positions 2, 3, both into slot 0
    assert enc.targets[0] == [(2, tok(" ")["input_ids"][0], 0), (3, tok("A")["input_ids"][0], 0)]
    assert enc.seqs[2] == tok("Q22?")["input_ids"]
    assert [t[2] for t in enc.targets[2]] == [3, 4, 5] and {t[0] for t in enc.targets[2]} == {3}


def test_batches_pad_and_cover_every_target():
    rs = np.random.RandomState(0)
    reqs = [ChoiceRequest("q" * int(rs.randint(3, 40)), ("a", "bb")) for _ in range(11)]
    enc = scorer.encode_requests(reqs, CharTokenizer())
    batches = scorer.make_batches(enc, batch_size=4, bucket=16)
    assert all(b.tokens.shape[0] == 4 and b.tokens.shape[1] % 16 == 0 for b in batches)
    slots = np.concatenate([b.slot[b.slot >= 0] for b in batches])
    n_targets = sum(len(t) for t in enc.targets)
    assert len(slots) == n_targets and set(slots) == set(range(22))
    for b in batches:
        assert (len(b.slot) & (len(b.slot) - 1)) == 0  # power of two
        assert (b.gather_t < b.tokens.shape[1]).all()


def test_errors_and_to_responses():
    with pytest.raises(UserError, match="no requests"):
        scorer.encode_requests([], CharTokenizer())
    with pytest.raises(UserError, match="option '' encodes to no tokens"):
        scorer.encode_requests([ChoiceRequest("Q", ("a", ""))], CharTokenizer())
    lp = np.array([[[-1.0, -2.0, np.nan], [-0.5, -0.1, -3.0]]])
    reqs = [ChoiceRequest("a", ("x", "y")), ChoiceRequest("b", ("x", "y", "z"))]
    out = scorer.to_responses(lp, reqs, ChoiceResponse)
    assert out == [[ChoiceResponse((-1.0, -2.0)), ChoiceResponse((-0.5, -0.1, -3.0))]]


def test_population_chunks_and_single_adapters_agree(tiny):
    """Scoring P=5 at once, in chunks of 2, and one individual at a time gives the same log-probs; a request's
    single-token options equal the log-softmax of the full forward at the prompt's last position."""
    from genome_jax.models import llama

    _, _, cfg, params = tiny
    tok = CharTokenizer()
    reqs = [ChoiceRequest("abc" * k, ("x", "y", "zz")) for k in range(1, 6)] + [ChoiceRequest("hello", ("a", "b"))]
    factors = {}
    key = jax.random.key(0)
    for layer in range(cfg.num_layers):
        for name in ("q_proj", "up_proj"):
            key, ka, kb = jax.random.split(key, 3)
            d_out, d_in = cfg.module_shape(name)
            factors[llama.module_path(layer, name)] = {"A": 0.3 * jax.random.normal(ka, (5, 4, d_in)),
                                                       "B": 0.3 * jax.random.normal(kb, (5, d_out, 4))}
    full = scorer.score_population(params, cfg, factors, reqs, tok, batch_size=4, bucket=16, pop_chunk=None)
    chunked = scorer.score_population(params, cfg, factors, reqs, tok, batch_size=4, bucket=16, pop_chunk=2)
    np.testing.assert_allclose(chunked, full, atol=1e-5, equal_nan=True)
    for p in (0, 4):
        one = jax.tree.map(lambda x: x[p : p + 1], factors)
        np.testing.assert_allclose(scorer.score_population(params, cfg, one, reqs, tok, batch_size=4, bucket=16)[0],
                                   full[p], atol=1e-5,
                                   equal_nan=True)
    ids = jnp.asarray([tok("hello")["input_ids"]])
    logits = llama.forward(params, ids, config=cfg, lora=llama.stack_lora(factors, cfg))[:, 0, -1]
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    np.testing.assert_allclose(full[:, 5, :2], logp[:, [tok("a")["input_ids"][0], tok("b")["input_ids"][0]]],
                               atol=1e-5)
    assert np.isnan(full[:, 5, 2]).all()


def _requests():
    from evaluators.tasks import get_task

    mmlu = get_task("mmlu")
    arc = get_task("arc_c")
    reqs = mmlu.build_requests(mmlu.load("dev", 3), "choice_logprob")
    reqs += arc.build_requests(arc.load("test", 2), "choice_logprob")  # some arc_c items have 5 options
    # multi-token options: each option gets its own sequence
    reqs.append(ChoiceRequest("The capital of France is", (" Paris", " Berlin, Germany", " a city")))
    return reqs


@pytest.mark.slow
def test_population_scores_match_transformers_peft(model_path, smollm2_tokenizer, smollm2_fp32, make_peft_adapter,
                                                   tmp_path):
    from evaluators.reference import option_logprobs
    from peft import PeftModel

    from genome_jax.models import llama
    from genome_jax.population import load_population

    make_peft_adapter(tmp_path / "a", rank=8, alpha=16, target_modules=("q_proj", "v_proj"), seed=3, scale=4.0)
    make_peft_adapter(tmp_path / "b", rank=4, alpha=4, target_modules=("q_proj", "v_proj"), seed=4, scale=4.0)
    pop = load_population(tmp_path)
    reqs = _requests()
    cfg, params = llama.load_params(model_path)
    lp = scorer.score_population(params, cfg, pop.factors, reqs, smollm2_tokenizer, batch_size=4)
    assert lp.shape == (2, len(reqs), max(len(r.options) for r in reqs))
    base = scorer.score_population(params, cfg, None, reqs, smollm2_tokenizer, batch_size=4)
    assert base.shape == (1, *lp.shape[1:])
    for p, name in enumerate(pop.meta.names):
        pm = PeftModel.from_pretrained(smollm2_fp32, tmp_path / name).eval()
        try:
            ref = [option_logprobs(pm, smollm2_tokenizer, r.prompt, r.options) for r in reqs]
        finally:
            pm.unload()
        for n, r in enumerate(reqs):
            k = len(r.options)
            np.testing.assert_allclose(lp[p, n, :k], ref[n], atol=2e-3, rtol=0)
            assert np.isnan(lp[p, n, k:]).all()
            assert int(np.argmax(lp[p, n, :k])) == int(np.argmax(ref[n]))  # same per-sample prediction
    ref_base = [option_logprobs(smollm2_fp32, smollm2_tokenizer, r.prompt, r.options) for r in reqs]
    for n, r in enumerate(reqs):
        np.testing.assert_allclose(base[0, n, : len(r.options)], ref_base[n], atol=2e-3, rtol=0)
    assert np.nanmax(np.abs(lp[0] - base[0])) > 0.05  # the adapters matter
    # a zero adapter scores exactly like the base model path
    zero = jax.tree.map(jnp.zeros_like, jax.tree.map(lambda x: x[:1], pop.factors))
    np.testing.assert_allclose(scorer.score_population(params, cfg, zero, reqs, smollm2_tokenizer, batch_size=4),
                               base, atol=1e-4, equal_nan=True)


@pytest.mark.slow
def test_jax_scorer_evaluate_returns_task_results(model_path, make_peft_adapter, tmp_path):
    """JaxScorer.evaluate: per individual, the task's own TaskResult from the scorer's responses."""
    from evaluators.tasks import get_task

    make_peft_adapter(tmp_path / "a", rank=4, alpha=8, seed=5, scale=4.0)
    make_peft_adapter(tmp_path / "b", rank=4, alpha=8, seed=6, scale=4.0)
    js = scorer.JaxScorer(model_path, batch_size=4)
    tasks = [get_task("mmlu"), get_task("arc_c")]
    from genome_jax.population import load_population

    pop = load_population(tmp_path)
    results = js.evaluate(pop.factors, tasks, "dev", 3, ChoiceResponse)
    assert len(results) == 2 and set(results[0]) == {"mmlu", "arc_c"}
    lp = js.score_folders([tmp_path / "a", tmp_path / "b"], tasks[1].build_requests(tasks[1].load("dev", 3)))
    for p in range(2):
        r = results[p]["arc_c"]
        assert r.n == 3 and r.mode == "choice_logprob"
        labels = [list(o) for o in r.options]
        assert list(r.predictions) == [labels[i][int(np.nanargmax(lp[p, i]))] for i in range(3)]
    with pytest.raises(UserError, match="the JAX scorer scores choice requests only"):
        js.evaluate(pop.factors, [get_task("gsm8k")], "dev", 2, ChoiceResponse)


@pytest.mark.slow
def test_loglik_requests_match_transformers_peft(model_path, smollm2_tokenizer, smollm2_fp32, make_peft_adapter,
                                                 tmp_path):
    """`loglik` requests (option texts, WinoGrande's one-option requests, a long BoolQ context) through
    JaxScorer.evaluate: log-probs equal the transformers (+ peft) fp32 reference, and the TaskResults (acc,
    acc_norm, predictions) equal those the task computes from the reference's answers."""
    from peft import PeftModel

    from evaluators.reference import answer_with_transformers
    from evaluators.tasks import LOGLIK, get_task
    from genome_jax.population import load_population

    make_peft_adapter(tmp_path / "a", rank=4, alpha=8, seed=7, scale=4.0)
    pop = load_population(tmp_path)
    tasks = [get_task(name, mode=LOGLIK, formatter=str(model_path)) for name in ("arc_e", "winogrande", "boolq")]
    js = scorer.JaxScorer(model_path, batch_size=4)
    results = js.evaluate(pop.factors, tasks, "dev", 2, ChoiceResponse)
    pm = PeftModel.from_pretrained(smollm2_fp32, tmp_path / "a").eval()
    try:
        for task in tasks:
            items = task.load("dev", 2)
            reqs = task.build_requests(items)
            ref = answer_with_transformers(str(model_path), reqs, _loaded=(pm, smollm2_tokenizer))
            got = js.score(pop.factors, reqs)[0]
            for n, (r, b) in enumerate(zip(reqs, ref)):
                np.testing.assert_allclose(got[n, : len(r.options)], b.logprobs, atol=2e-3, rtol=0)
            want = task.score(items, ref)
            res = results[0][task.name]
            assert res.mode == LOGLIK and set(res.metrics) == {"acc", "acc_norm"}
            assert res.predictions == want.predictions and res.metrics == want.metrics, task.name
    finally:
        pm.unload()
