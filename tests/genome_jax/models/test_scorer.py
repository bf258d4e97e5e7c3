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


@pytest.fixture(scope="module")
def tiny_scorer(tmp_path_factory, make_tiny_llama, model_path, smollm2_tokenizer):
    """A JaxScorer on a tiny random Llama that uses SmolLM2's tokenizer (vocabulary sized to match): real tasks,
    real tokenisation, a forward pass of milliseconds."""
    import shutil

    path = tmp_path_factory.mktemp("tiny_tok_llama")
    make_tiny_llama(path, vocab_size=len(smollm2_tokenizer))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_path / name, path / name)
    return scorer.JaxScorer(path, response_cls=ChoiceResponse, batch_size=4, bucket=128, pop_chunk=2)  # few shapes


def _tiny_population(js, n_pop: int, seed: int = 0):
    from genome_jax.models import llama
    from genome_jax.population import Population, PopulationMeta

    key, factors = jax.random.key(seed), {}
    for layer in range(js.config.num_layers):
        for name in ("q_proj", "v_proj"):
            key, ka, kb = jax.random.split(key, 3)
            d_out, d_in = js.config.module_shape(name)
            factors[llama.module_path(layer, name)] = {"A": 0.5 * jax.random.normal(ka, (n_pop, 4, d_in)),
                                                       "B": 0.5 * jax.random.normal(kb, (n_pop, d_out, 4))}
    meta = PopulationMeta(base_model=js.model_path, target_modules=("q_proj", "v_proj"), rank=4,
                          names=tuple(f"ind{i}" for i in range(n_pop)))
    return Population(factors=jax.tree.map(np.asarray, factors), meta=meta)


def test_jax_backend_behind_the_evaluator(tiny_scorer, tmp_path):
    """The JAX scorer as an evaluator backend: in-memory children, an exported PEFT folder of the same child and the
    base model give the answers of the scorer's own population pass; equal children are scored once; a second call
    is served from the result cache; generate tasks and other routes are refused."""
    from evaluators.backends.base import Evaluator
    from evaluators.tasks import LOGLIK, get_task
    from genome_jax.population import export_adapter

    js = tiny_scorer
    pop = _tiny_population(js, 4)
    handles = [scorer.InMemoryAdapter(key=f"k{i}", factors=jax.tree.map(lambda x: x[i:i + 1], pop.factors))
               for i in range(3)]
    twin = scorer.InMemoryAdapter(key="k1", factors=handles[1].factors)  # an elite listed twice
    folder = str(export_adapter(pop, 3, tmp_path / "ind3"))
    task = get_task("arc_e", mode=LOGLIK)
    ev = Evaluator(js, model=js.model_path, max_lora_rank=None)
    assert ev.numerics() == "jax:float32" and js.start() == {"mode": "jax", "dtype": "float32"}
    got = ev.evaluate([None, *handles, twin, folder], [task], "dev", 3)
    assert ev.backend_calls == 1 and ev.last_timing["jobs"] == 5  # base, 3 children, the folder (twin: same key)
    assert ev.last_timing["groups"] == 2  # the base model, and every child in one stacked pass
    items = task.load("dev", 3)
    reqs = task.build_requests(items)
    want = js.score(pop.factors, reqs)  # the scorer's own population pass (same shapes: no new compile)
    for lp, res in zip([js.score(None, reqs)[0], *want[:3], want[1], want[3]], got):
        ref = task.score(items, scorer.to_responses(lp[None], reqs, ChoiceResponse)[0])
        r = res.tasks[task.name]
        assert r.predictions == ref.predictions
        np.testing.assert_allclose(np.asarray(r.option_probs, float), np.asarray(ref.option_probs, float), atol=1e-5)
    assert got[1].tasks != got[2].tasks and got[0].tasks != got[1].tasks  # so the comparison above can fail
    tasks = [task]
    again = ev.evaluate([handles[0], folder], tasks, "dev", 3)
    assert ev.backend_calls == 1 and all(r.cached for r in again)
    with pytest.raises(UserError, match="choice requests only"):
        ev.evaluate([None], [get_task("gsm8k", formatter=lambda m: m)], "dev", 1)
    with pytest.raises(UserError, match="one route"):
        ev.evaluate([handles[0]], tasks, "test", 1, mode="swap")
    from evaluators.errors import UserError as EvalUserError

    with pytest.raises(EvalUserError, match="neither a PEFT folder"):
        ev.evaluate([object()], tasks, "dev", 1)


@pytest.mark.slow
def test_loglik_requests_match_transformers_peft(model_path, smollm2_tokenizer, smollm2_fp32, make_peft_adapter,
                                                 tmp_path):
    """`loglik` requests (option texts, WinoGrande's one-option requests, a long BoolQ context) through the evaluator
    with the JAX backend, the adapter given as a PEFT folder: log-probs equal the transformers (+ peft) fp32
    reference, and the TaskResults (acc, acc_norm, predictions) equal those the task computes from the reference's
    answers."""
    from peft import PeftModel

    from evaluators.backends.base import Evaluator
    from evaluators.reference import answer_with_transformers
    from evaluators.tasks import LOGLIK, get_task
    from genome_jax.population import load_population

    make_peft_adapter(tmp_path / "a", rank=4, alpha=8, seed=7, scale=4.0)
    pop = load_population(tmp_path)
    tasks = [get_task(name, mode=LOGLIK, formatter=str(model_path)) for name in ("arc_e", "winogrande", "boolq")]
    js = scorer.JaxScorer(model_path, response_cls=ChoiceResponse, batch_size=4)
    results = [r.tasks for r in Evaluator(js, model=str(model_path), max_lora_rank=None).evaluate(
        [str(tmp_path / "a")], tasks, "dev", 2)]
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
