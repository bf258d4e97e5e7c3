"""The expert trainer: packing, the answer-only loss against separate forwards, determinism, PEFT export that
peft loads (tiny random checkpoints, fast), and the real task examples and CLI on SmolLM2 (slow)."""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from genome_jax.errors import UserError
from genome_jax.models import llama, trainer


def _examples(vocab: int, n: int, seed: int = 0) -> list[trainer.Example]:
    """A learnable toy task: the answer is token 5 or 6 by the parity of the last prompt token (prompts of 3..20
    random tokens). One-token answers are multiple choice over tokens (5, 6, 7) (the "choice" loss); two-token
    answers are scored over the whole vocabulary."""
    rs = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        prompt = list(rs.randint(1, vocab, rs.randint(3, 21)))
        k = int(rs.randint(1, 3))  # 1 or 2 answer tokens
        out.append(trainer.Example(tokens=tuple(int(t) for t in prompt + [5 + prompt[-1] % 2] * k), n_target=k,
                                   options=(5, 6, 7) if k == 1 else ()))
    return out


SMALL = trainer.TrainConfig(rank=4, alpha=8.0, steps=12, lr=2e-2, warmup_steps=2, batch_rows=2, seq_len=48,
                            max_targets=8)


def test_config_and_spec_validation():
    with pytest.raises(UserError, match="unknown target modules"):
        trainer.TrainConfig(targets=("qkv",))
    with pytest.raises(UserError, match="loss must be"):
        trainer.TrainConfig(loss="mse")
    with pytest.raises(UserError, match="warmup_steps"):
        trainer.TrainConfig(steps=3, warmup_steps=3)
    with pytest.raises(UserError, match="max_options must be >= 2, got 1"):
        trainer.TrainConfig(loss="options", max_options=1)
    with pytest.raises(UserError, match="ce_weight must be >= 0"):
        trainer.TrainConfig(loss="options", ce_weight=float("nan"))
    with pytest.raises(UserError, match="option_score must be"):
        trainer.TrainConfig(loss="options", option_score="max")
    assert trainer.ExpertSpec.parse("m=mmlu") == trainer.ExpertSpec("m", "mmlu", "test")
    assert trainer.ExpertSpec.parse("m=/x/a:b.json:dev") == trainer.ExpertSpec("m", "/x/a:b.json", "dev")
    with pytest.raises(UserError, match="expected NAME=TASKFILE"):
        trainer.ExpertSpec.parse("mmlu")
    with pytest.raises(UserError, match="invalid expert name"):
        trainer.ExpertSpec.parse("../x=mmlu")
    # slices: the rest of the split is held out; a whole split holds out the other one
    s = trainer.ExpertSpec.parse("b=/x/b.json:test[200:]")
    assert s == trainer.ExpertSpec("b", "/x/b.json", "test", 200, None) and s.held_out() == ("test", 0, 200)
    assert trainer.ExpertSpec.parse("b=boolq:dev[:50]").held_out() == ("dev", 50, None)
    assert trainer.ExpertSpec.parse("b=boolq:test").held_out() == ("dev", 0, None)
    assert trainer.ExpertSpec.parse("b=boolq:test[200:]").label == "boolq:test[200:]"
    with pytest.raises(UserError, match="empty slice"):
        trainer.ExpertSpec.parse("b=boolq:test[5:5]")


def test_continuation_examples_put_the_loss_on_the_continuation_tokens(smollm2_tokenizer):
    """Tokenised as the scorer tokenises a choice request: the example is the scorer's sequence for that option."""
    from genome_jax.models.scorer import encode_requests

    class Req:
        prompt, options = "Question: Where do you keep leftover cake?\nAnswer:", (" refrigerator", " oven")

    ex, = trainer.continuation_examples([(Req.prompt, Req.options[0])], smollm2_tokenizer)
    enc = encode_requests([Req], smollm2_tokenizer)
    target = [t for t in enc.targets for t in t if t[2] == 0]  # option 0's scored tokens
    seq = next(s for s, tg in zip(enc.seqs, enc.targets) if any(t[2] == 0 for t in tg))
    assert ex.n_target == len(target) and list(ex.tokens[-ex.n_target:]) == [t[1] for t in target]
    assert list(ex.tokens[:-1]) == seq[: len(ex.tokens) - 1]
    assert smollm2_tokenizer.decode(ex.tokens[-ex.n_target:]) == " refrigerator"
    assert trainer.continuation_examples([(Req.prompt, Req.options[0])], smollm2_tokenizer, max_len=5) == []


def test_packing_places_every_example_and_its_targets():
    exs = _examples(50, 30)
    it = trainer.packed_batches(exs, SMALL, seed=1)
    seen = []
    for _ in range(6):
        b = next(it)
        assert b.tokens.shape == (2, 48) and b.tgt_row.shape == (2 * 8,)
        for row in range(2):
            for seg in range(1, b.segments[row].max() + 1):
                idx = np.flatnonzero(b.segments[row] == seg)
                assert (np.diff(idx) == 1).all() and (b.positions[row, idx] == np.arange(len(idx))).all()
                seen.append(tuple(b.tokens[row, idx]))
        w = b.tgt_w > 0
        # every loss entry predicts the next token of its own row
        np.testing.assert_array_equal(b.tokens[b.tgt_row[w], b.tgt_pos[w] + 1], b.tgt_tok[w])
        assert (b.segments[b.tgt_row[w], b.tgt_pos[w]] == b.segments[b.tgt_row[w], b.tgt_pos[w] + 1]).all()
    assert set(seen[:30]) == {e.tokens for e in exs}  # the first epoch covers every example once
    again = trainer.packed_batches(exs, SMALL, seed=1)
    np.testing.assert_array_equal(next(again).tokens, next(trainer.packed_batches(exs, SMALL, seed=1)).tokens)


def test_packed_loss_equals_mean_of_separate_examples(tiny):
    """The loss of a packed batch = mean over answer tokens of per-example cross-entropies from separate forwards."""
    _, _, cfg, params = tiny
    exs = _examples(cfg.vocab_size, 7, seed=2)
    b = next(trainer.packed_batches(exs, SMALL, seed=0))
    lora = trainer.init_lora(jax.random.key(0), cfg, SMALL)
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), lora)  # B != 0
    loss = float(trainer.answer_loss(lora, params, trainer._device_batch(b), config=cfg, cfg=SMALL))
    stacked = trainer.scaled(lora, SMALL.scale)
    fwd = jax.jit(llama.forward, static_argnames="config")
    nll = []
    for row in range(b.tokens.shape[0]):
        for seg in range(1, b.segments[row].max() + 1):
            toks = b.tokens[row, b.segments[row] == seg]
            ex = next(e for e in exs if e.tokens == tuple(toks))
            padded = np.zeros((1, 24), np.int32)  # right padding: exact for the real positions, one compile
            padded[0, : len(toks)] = toks
            logits = np.asarray(fwd(params, jnp.asarray(padded), config=cfg, lora=stacked))[0, 0]
            logits = np.asarray(logits, np.float64)
            n = len(toks)
            for j in range(ex.n_target):
                row_logits = logits[n - ex.n_target - 1 + j]
                support = row_logits[list(ex.options)] if ex.options else row_logits  # choice loss vs full vocab
                lse = np.log(np.exp(support - support.max()).sum()) + support.max()
                nll.append(lse - row_logits[toks[n - ex.n_target + j]])
    assert len(nll) == int(b.tgt_w.sum())
    assert (b.tgt_opts[:, 0] >= 0).any() and ((b.tgt_opts[:, 0] < 0) & (b.tgt_w > 0)).any()  # both kinds present
    np.testing.assert_allclose(loss, np.mean(nll), rtol=1e-5)


def test_training_learns_and_is_reproducible(tiny):
    import dataclasses

    _, _, cfg, params = tiny
    exs = _examples(cfg.vocab_size, 64)
    f1, l1, stats = trainer.train_expert(jax.random.key(0), params, cfg, exs, SMALL)
    f2, l2, _ = trainer.train_expert(jax.random.key(0), params, cfg, exs, SMALL)
    _, l3, _ = trainer.train_expert(jax.random.key(1), params, cfg, exs, SMALL)
    assert l1 == l2 and l1 != l3
    for path in f1:
        np.testing.assert_array_equal(f1[path]["A"], f2[path]["A"])
        np.testing.assert_array_equal(f1[path]["B"], f2[path]["B"])
    assert set(f1) == {llama.module_path(i, n) for i in range(cfg.num_layers) for n in SMALL.targets}
    assert f1[llama.module_path(0, "q_proj")]["A"].shape == (1, 4, cfg.hidden_size)
    assert stats["tokens"] > 0 and stats["answer_tokens"] > 0
    # it learns: the loss on fixed batches drops from the base model's (the exported factors carry the scale,
    # so they are evaluated with scale 1)
    unit = dataclasses.replace(SMALL, alpha=float(SMALL.rank))
    fixed = [trainer._device_batch(b) for b, _ in zip(trainer.packed_batches(exs, SMALL, seed=7), range(3))]
    zero = jax.tree.map(jnp.zeros_like, llama.stack_lora(f1, cfg))
    before = np.mean([float(trainer.answer_loss(zero, params, b, config=cfg, cfg=unit)) for b in fixed])
    after = np.mean([float(trainer.answer_loss(llama.stack_lora(f1, cfg), params, b, config=cfg, cfg=unit))
                     for b in fixed])
    assert after < 0.9 * before, (before, after)


def test_exported_expert_loads_in_peft_with_the_same_logits(tmp_path, make_tiny_llama):
    from peft import PeftModel

    from genome_jax.population import Population, PopulationMeta, export_adapter

    model = make_tiny_llama(tmp_path / "base", tied=True)
    cfg, params = llama.load_params(tmp_path / "base")
    factors, _, _ = trainer.train_expert(jax.random.key(0), params, cfg, _examples(cfg.vocab_size, 32), SMALL)
    pop = Population(factors=factors, meta=PopulationMeta(base_model="tiny", target_modules=tuple(sorted(SMALL.targets)),
                                                          rank=SMALL.rank, names=("e",)))
    export_adapter(pop, 0, tmp_path / "e")
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 9))
    pm = PeftModel.from_pretrained(model, tmp_path / "e").eval()
    with torch.no_grad():
        ref = pm(torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(llama.forward(params, jnp.asarray(tokens), config=cfg, lora=llama.stack_lora(factors, cfg)))[0]
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=0)
    plain = np.asarray(llama.forward(params, jnp.asarray(tokens), config=cfg))
    assert np.abs(ours - plain).max() > 1e-3  # training moved the model


# ------------------------------------------------------------------------------------------- real tasks (slow)
@pytest.mark.slow
def test_task_examples_use_the_scorers_prompts(model_path, smollm2_tokenizer):
    from evaluators.tasks import get_task
    from genome_jax.models.scorer import encode_requests

    tok = smollm2_tokenizer
    mmlu = get_task("mmlu", formatter=str(model_path))
    items = mmlu.load("dev", 5)
    exs = trainer.task_examples(mmlu, "dev", tok)[:5]
    enc = encode_requests(mmlu.build_requests(items, "choice_logprob"), tok)
    for it, ex, seq, tg in zip(items, exs, enc.seqs, enc.targets):
        gold = list(it["choices"]).index(it["answer"])
        assert ex.n_target == 1
        assert list(ex.tokens[:-1]) == seq  # the scorer's sequence for this request
        assert ex.tokens[-1] == tg[gold][1]  # ... followed by the gold option's token
        assert ex.options == tuple(t[1] for t in tg)  # the choice loss normalises over the scored options
    gsm = get_task("gsm8k", formatter=str(model_path))
    ex = trainer.task_examples(gsm, "dev", tok)[0]
    item = gsm.load("dev", 1)[0]
    assert ex.tokens[-1] == tok.eos_token_id and ex.options == ()
    assert tok.decode(ex.tokens[-ex.n_target:-1]) == f"The answer is {item['answer']}."
    assert len(trainer.task_examples(gsm, "dev", tok, max_len=100)) < len(gsm.load("dev"))


@pytest.mark.slow
def test_cli_trains_experts_that_peft_loads(model_path, tmp_path, cli, smollm2_fp32, smollm2_tokenizer):
    """`genome train-experts` on the real model (2 tiny steps), a task given by path: PEFT folders + train_log.json,
    and the adapter applied by peft changes the logits exactly as our forward does."""
    from peft import PeftModel

    from evaluators.tasks import get_task
    from genome_jax.population import load_population

    items = get_task("arc_c").load_data("test")[:12]
    (tmp_path / "mini.json").write_text(json.dumps({"dev": items[:4], "test": items[4:]}))
    out = tmp_path / "experts"
    res = cli("train-experts", "--model_path", str(model_path), "--out", str(out), "--experts",
              f"mini={tmp_path / 'mini.json'}", "m2=medmcqa:dev", "--steps", "2", "--warmup_steps", "1",
              "--batch_rows", "1", "--seq_len", "128", "--rank", "2", "--targets", "q_proj", "v_proj",
              "--no_progress", timeout=600)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert [e["name"] for e in summary["experts"]] == ["mini", "m2"]
    log = json.loads((out / "train_log.json").read_text())
    assert len(log["experts"][0]["losses"]) == 2 and log["config"]["rank"] == 2
    from evaluators import provenance as pv  # each folder says what its expert was trained on

    mini, m2 = (pv.read_provenance(out / n) for n in ("mini", "m2"))
    assert [(e["task"], e["split"], e["file"], e["indices"]) for e in mini["entries"]] == [
        ("mini", "test", str(tmp_path / "mini.json"), list(range(8)))]
    assert mini["entries"][0]["item_sha256"] == [pv.item_sha256(it) for it in items[4:]]
    assert [(e["task"], e["split"], len(e["indices"])) for e in m2["entries"]] == [("medmcqa", "dev", 200)]
    pop = load_population([out / "mini", out / "m2"])
    assert pop.meta.rank == 2 and pop.meta.target_modules == ("q_proj", "v_proj")
    ids = torch.tensor([smollm2_tokenizer("Question: 2+2?\nA. 4\nB. 5\nAnswer:")["input_ids"]])
    pm = PeftModel.from_pretrained(smollm2_fp32, out / "mini").eval()
    try:
        with torch.no_grad():
            ref = pm(ids).logits.numpy()
    finally:
        pm.unload()
    cfg, params = llama.load_params(model_path)
    one = jax.tree.map(lambda x: x[:1], pop.factors)
    ours = np.asarray(llama.forward(params, jnp.asarray(ids.numpy()), config=cfg, lora=llama.stack_lora(one, cfg)))[0]
    np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=0)

    bad = cli("train-experts", "--model_path", str(model_path), "--out", str(out), "--experts", "x=nosuchtask")
    assert bad.returncode == 1 and "unknown task 'nosuchtask'" in bad.stderr


def test_pool_cache_trains_each_expert_once_and_bit_identically_in_any_pool(tmp_path, make_tiny_llama, monkeypatch):
    """An expert's key comes from its name, so the same expert is the same bits at any position in any pool; a second
    pool holding it copies it from the cache (training only what is new), and a finished pool is returned as is."""
    from safetensors.numpy import load_file

    make_tiny_llama(tmp_path / "base", tied=True)
    cfg = trainer.TrainConfig(rank=2, alpha=4.0, steps=2, lr=1e-2, warmup_steps=1, batch_rows=1, seq_len=48,
                              max_targets=8)
    specs = {n: trainer.ExpertSpec(n, n, "test", 0) for n in ("x", "y", "z")}
    data = {n: _examples(96, 8, seed=i) for i, n in enumerate(specs)}
    trained: list[str] = []
    real_train_pool = trainer.train_pool

    def counting_train_pool(model_path, experts, examples, out_dir, c, **kw):
        trained.extend(e.name for e in experts)
        return real_train_pool(model_path, experts, examples, out_dir, c, **kw)

    monkeypatch.setattr(trainer, "train_pool", counting_train_pool)

    def pool(names):
        sp = [specs[n] for n in names]
        return trainer.ensure_pool(tmp_path / "base", sp, lambda: [data[n] for n in names], data_digest="+".join(names),
                                   expert_digests=list(names), cfg=cfg, cache_dir=tmp_path / "cache", progress=False)

    first = pool(["x", "y"])
    second = pool(["z", "x"])  # x moved to another position
    assert trained == ["x", "y", "z"] and first != second
    assert pool(["x", "y"]) == first and trained == ["x", "y", "z"]
    a = load_file(str(first / "x" / "adapter_model.safetensors"))
    b = load_file(str(second / "x" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    log = json.loads((second / "train_log.json").read_text())
    assert [e["name"] for e in log["experts"]] == ["z", "x"] and log["experts"][1]["copied_from"] == first.name
    # retrained from scratch in a fresh cache, x is still the same bits (the key does not depend on the position)
    monkeypatch.setattr(trainer, "train_pool", real_train_pool)
    fresh = trainer.ensure_pool(tmp_path / "base", [specs["y"], specs["x"]], lambda: [data["y"], data["x"]],
                                data_digest="other", cfg=cfg, cache_dir=tmp_path / "cache2", progress=False)
    c = load_file(str(fresh / "x" / "adapter_model.safetensors"))
    assert all(np.array_equal(a[k], c[k]) for k in a)


def _choice_items(vocab: int, n: int, seed: int = 0, varied: bool = False) -> list[trainer.ChoiceExample]:
    """A learnable toy multiple-choice task: a prompt of 3..12 random tokens, 2..4 options of 2 tokens each (1..3 if
    varied); the gold option starts with token 5 + the parity of the prompt's last token, the others with any other
    token."""
    rs = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        prompt = [int(t) for t in rs.randint(1, vocab, rs.randint(3, 13))]
        n_opt = int(rs.randint(2, 5))
        gold = int(rs.randint(n_opt))
        opts = []
        for i in range(n_opt):
            right = 5 + prompt[-1] % 2
            first = right if i == gold else int(rs.choice([t for t in range(1, vocab) if t != right]))
            cont = [first] + [int(t) for t in rs.randint(1, vocab, rs.randint(0, 3) if varied else 1)]
            opts.append(trainer.Example(tokens=tuple(prompt + cont), n_target=len(cont)))
        out.append(trainer.ChoiceExample(options=tuple(opts), gold=gold))
    return out


OPTIONS = trainer.TrainConfig(rank=4, alpha=8.0, steps=40, lr=1e-2, warmup_steps=2, batch_rows=2, seq_len=48,
                              max_targets=12, loss="options", max_options=8)


def test_choice_packing_keeps_items_whole():
    items = _choice_items(50, 40)
    seen = []
    it = trainer.packed_choice_batches(items, OPTIONS, seed=3)
    for _ in range(40):
        b = next(it)
        w = b.tgt_w > 0
        np.testing.assert_array_equal(b.tokens[b.tgt_row[w], b.tgt_pos[w] + 1], b.tgt_tok[w])
        real = b.opt_w > 0
        assert real.sum() <= OPTIONS.max_options and set(b.tgt_opt[w]) == set(np.flatnonzero(real))
        for item in np.unique(b.opt_item[real]):  # every item in the batch: all its options, exactly one gold
            slots = np.flatnonzero(real & (b.opt_item == item))
            assert b.opt_gold[slots].sum() == 1
            seqs = []
            for slot in slots:
                rows, pos = b.tgt_row[w & (b.tgt_opt == slot)], b.tgt_pos[w & (b.tgt_opt == slot)]
                assert len(set(rows)) == 1
                seg = b.segments[rows[0], pos[0]]
                seqs.append(tuple(b.tokens[rows[0], b.segments[rows[0]] == seg]))
            match = [c for c in items if tuple(o.tokens for o in c.options) == tuple(seqs)]
            assert match and seqs[int(np.flatnonzero(b.opt_gold[slots])[0])] == match[0].options[match[0].gold].tokens
            seen.append(tuple(seqs))
    assert {tuple(o.tokens for o in c.options) for c in items} <= set(seen)  # 40 batches cover the first epoch
    long = trainer.Example(tokens=tuple(range(1, 10)), n_target=1)  # 9 tokens: no row of 8 holds it
    with pytest.raises(UserError, match="no multiple-choice item fits"):
        next(trainer.packed_choice_batches([trainer.ChoiceExample(options=(long, long), gold=0)],
                                           dataclasses.replace(OPTIONS, seq_len=8), seed=0))


def test_options_loss_against_transformers(tiny):
    """At B = 0 the options loss is the base model's: softmax over each item's summed option log-likelihoods, from
    transformers' own forward of each option sequence (float64 numpy), averaged over items; plus ce_weight x the
    gold tokens' mean cross-entropy."""
    _, model, cfg, params = tiny
    items = _choice_items(cfg.vocab_size, 9, seed=4, varied=True)
    b = next(trainer.packed_choice_batches(items, OPTIONS, seed=0))
    lora = trainer.init_lora(jax.random.key(0), cfg, OPTIONS)
    real = b.opt_w > 0
    in_batch = []
    for item in np.unique(b.opt_item[real]):
        slots = np.flatnonzero(real & (b.opt_item == item))
        w = b.tgt_w > 0
        first = [tuple(b.tokens[b.tgt_row[w & (b.tgt_opt == s)][0],
                                b.segments[b.tgt_row[w & (b.tgt_opt == s)][0]] == b.segments[
                                    b.tgt_row[w & (b.tgt_opt == s)][0], b.tgt_pos[w & (b.tgt_opt == s)][0]]])
                 for s in slots]
        in_batch.append(next(c for c in items if tuple(o.tokens for o in c.options) == tuple(first)))
    assert len(in_batch) >= 2
    item_nll, item_mean, gold_tok = [], [], []
    for c in in_batch:
        scores = []
        for i, ex in enumerate(c.options):
            with torch.no_grad():
                logits = model(torch.tensor([ex.tokens])).logits[0].double().numpy()
            logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
                - logits.max(-1, keepdims=True)
            n = len(ex.tokens)
            tok = [logp[n - ex.n_target - 1 + j, ex.tokens[n - ex.n_target + j]] for j in range(ex.n_target)]
            scores.append(sum(tok))
            if i == c.gold:
                gold_tok += tok
        s = np.array(scores)
        item_nll.append(np.log(np.exp(s - s.max()).sum()) + s.max() - s[c.gold])
        m = s / np.array([ex.n_target for ex in c.options])  # option_score="mean": per token
        item_mean.append(np.log(np.exp(m - m.max()).sum()) + m.max() - m[c.gold])
    for ce in (0.0, 0.5):
        cfg_ce = dataclasses.replace(OPTIONS, ce_weight=ce)
        loss = float(trainer.answer_loss(lora, params, trainer._device_batch(b), config=cfg, cfg=cfg_ce))
        np.testing.assert_allclose(loss, np.mean(item_nll) - ce * np.mean(gold_tok), rtol=2e-4)
    cfg_mean = dataclasses.replace(OPTIONS, option_score="mean")
    loss = float(trainer.answer_loss(lora, params, trainer._device_batch(b), config=cfg, cfg=cfg_mean))
    np.testing.assert_allclose(loss, np.mean(item_mean), rtol=2e-4)


def test_options_loss_learns_the_comparison(tiny):
    """Training with the options loss raises the gold option's share: held-out items' accuracy of the summed
    log-likelihood comparison (what loglik scoring predicts) goes up, and the run is reproducible."""
    _, _, cfg, params = tiny
    train, held = _choice_items(cfg.vocab_size, 96, seed=5), _choice_items(cfg.vocab_size, 64, seed=6)
    f1, l1, _ = trainer.train_expert(jax.random.key(0), params, cfg, train, OPTIONS)
    _, l2, _ = trainer.train_expert(jax.random.key(0), params, cfg, train, OPTIONS)
    assert l1 == l2
    fwd = jax.jit(llama.forward, static_argnames="config")

    def accuracy(lora):
        hits = 0
        for c in held:
            scores = []
            for ex in c.options:
                padded = np.zeros((1, 16), np.int32)
                padded[0, : len(ex.tokens)] = ex.tokens
                logits = np.asarray(fwd(params, jnp.asarray(padded), config=cfg, lora=lora))[0, 0].astype(np.float64)
                lp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
                    - logits.max(-1, keepdims=True)
                n = len(ex.tokens)
                scores.append(sum(lp[n - ex.n_target - 1 + j, ex.tokens[n - ex.n_target + j]]
                                  for j in range(ex.n_target)))
            hits += int(np.argmax(scores) == c.gold)
        return hits / len(held)

    stacked = llama.stack_lora(f1, cfg)
    before, after = accuracy(jax.tree.map(jnp.zeros_like, stacked)), accuracy(stacked)
    assert after >= before + 0.2, (before, after)
    with pytest.raises(UserError, match="needs ChoiceExamples"):
        trainer.train_expert(jax.random.key(0), params, cfg, _examples(cfg.vocab_size, 8), OPTIONS)


def test_options_fields_enter_the_recipe_hash_only_under_the_options_loss(tmp_path):
    spec = [trainer.ExpertSpec("a", "arc_c")]
    plain = trainer.recipe_hash(tmp_path, spec, trainer.TrainConfig())
    assert trainer.recipe_hash(tmp_path, spec, trainer.TrainConfig(max_options=32, ce_weight=1.0)) == plain
    opt = trainer.recipe_hash(tmp_path, spec, trainer.TrainConfig(loss="options"))
    weighted = trainer.TrainConfig(loss="options", ce_weight=1.0)
    assert opt != plain and opt != trainer.recipe_hash(tmp_path, spec, weighted)


def test_options_loss_gradient_is_finite_for_long_options(tiny):
    """Options whose summed log-likelihood is far below -88 nats (long options, e.g. PIQA's) once made exp overflow
    in a discarded branch and the gradient NaN (0 * inf); the NaN scores then read as an empty batch, a loss of 0.
    The loss must equal the softmax over the items' scores and its gradient must be finite."""
    _, model, cfg, params = tiny
    rs = np.random.RandomState(12)
    items = []
    for _ in range(3):
        prompt = [int(t) for t in rs.randint(1, cfg.vocab_size, 4)]
        opts = tuple(trainer.Example(tokens=tuple(prompt + [int(t) for t in rs.randint(1, cfg.vocab_size, 40)]),
                                     n_target=40) for _ in range(2))
        items.append(trainer.ChoiceExample(options=opts, gold=int(rs.randint(2))))
    long_cfg = dataclasses.replace(OPTIONS, seq_len=96, max_targets=80, batch_rows=3)
    b = trainer._device_batch(next(trainer.packed_choice_batches(items, long_cfg, seed=0)))
    lora = trainer.init_lora(jax.random.key(1), cfg, long_cfg)
    lora = jax.tree.map(lambda x: x + 0.05, lora)  # B != 0: a real gradient through the adapter
    loss, grads = jax.value_and_grad(trainer.answer_loss)(lora, params, b, config=cfg, cfg=long_cfg)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))
    assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree_util.tree_leaves(grads))
    logits = llama.forward(params, b["tokens"], config=cfg, lora=trainer.scaled(lora, long_cfg.scale),
                           positions=b["positions"], segment_ids=b["segments"])
    lp = np.asarray(jax.nn.log_softmax(logits[0].astype(jnp.float32)), np.float64)  # (B, T, V): adapter 0
    w = np.asarray(b["tgt_w"]) > 0
    tok = lp[np.asarray(b["tgt_row"]), np.asarray(b["tgt_pos"]), np.asarray(b["tgt_tok"])]
    score = np.bincount(np.asarray(b["tgt_opt"])[w], weights=tok[w], minlength=long_cfg.max_options)
    real = np.asarray(b["opt_w"]) > 0
    assert score[real].max() < -88  # the regime that overflowed
    nll = []
    for it in np.unique(np.asarray(b["opt_item"])[real]):
        s = score[real & (np.asarray(b["opt_item"]) == it)]
        g = score[real & (np.asarray(b["opt_item"]) == it) & (np.asarray(b["opt_gold"]) > 0)][0]
        nll.append(np.log(np.exp(s - s.max()).sum()) + s.max() - g)
    np.testing.assert_allclose(float(loss), np.mean(nll), rtol=1e-4)


def test_a_diverged_expert_is_one_error_line_naming_it(tmp_path, make_tiny_llama, monkeypatch):
    """A non-finite loss (injected) stops the pool with one UserError naming the expert; no adapter is written
    for it."""
    make_tiny_llama(tmp_path / "base", tied=True)
    cfg = trainer.TrainConfig(rank=2, alpha=4.0, steps=2, lr=1e-2, warmup_steps=1, batch_rows=1, seq_len=48,
                              max_targets=8)
    real_step = trainer.train_step

    def nan_step(*a, **kw):
        lora, opt, loss = real_step(*a, **kw)
        return lora, opt, loss * jnp.nan

    monkeypatch.setattr(trainer, "train_step", nan_step)
    spec = trainer.ExpertSpec("piqa_like", "piqa", "test", 200)
    with pytest.raises(UserError, match=r"^expert 'piqa_like' \(piqa:test\[200:\]\): the loss became nan at step 0"):
        trainer.train_pool(tmp_path / "base", [spec], [_examples(96, 8)], tmp_path / "out", cfg, progress=False)
    assert not (tmp_path / "out" / "piqa_like").exists()
