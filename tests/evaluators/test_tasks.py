"""Task registry, loading/validation, prompts, extraction and scoring; a slow end-to-end check with the real SmolLM2."""
import json
import os
import re

import pytest

from evaluators.errors import UserError
from evaluators.protocol import ChoiceRequest, ChoiceResponse, GenerateRequest, GenerateResponse, from_json, to_json
from evaluators.tasks import (CHOICE_LOGPROB, GENERATE, GenerationConfig, TaskResult, default_data_dir, get_task,
                              list_tasks)
from evaluators.tasks import extraction as ex

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data", "tasks")
FMT = lambda msg: f"<user>{msg}<assistant>"  # noqa: E731  a stand-in chat template

# The table of evaluators/data/README.md: name -> (kind, dev, test)
README_TABLE = {
    "gsm8k": ("exact_match", 200, 1000), "mmlu": ("multiple_choice", 200, 1000),
    "hellaswag": ("multiple_choice", 200, 1000), "truthfulqa": ("multiple_choice", 200, 617),
    "medmcqa": ("multiple_choice", 200, 1000), "nlgraph": ("exact_match", 200, 1000),
    "arc_c": ("multiple_choice", 200, 1000), "drop": ("free_answer", 200, 996),
    "arc_e": ("multiple_choice", 200, 1000), "piqa": ("multiple_choice", 200, 1000),
    "openbookqa": ("multiple_choice", 200, 500), "boolq": ("multiple_choice", 200, 1000),
    "commonsense_qa": ("multiple_choice", 200, 1000), "winogrande": ("multiple_choice", 200, 1000),
}
DROP_REMOVED = (73, 164, 799, 933)
# docs/TASKS.md "loglik: defaults" (dev-measured)
LOGLIK_DEFAULT = {"truthfulqa", "hellaswag", "arc_e", "piqa", "openbookqa", "commonsense_qa", "boolq", "winogrande"}  # test items of ../shared/data's drop.json that duplicate dev items


# ---------------------------------------------------------------------------------------------------- registry
def test_registry_names():
    assert set(README_TABLE) <= set(list_tasks())


@pytest.mark.parametrize("name", sorted(README_TABLE))
def test_every_shipped_task_loads_with_readme_counts(name):
    kind, n_dev, n_test = README_TABLE[name]
    task = get_task(name)
    assert task.kind == kind
    assert len(task.load("dev")) == n_dev and len(task.load("test")) == n_test
    default = "loglik" if name in LOGLIK_DEFAULT else CHOICE_LOGPROB if kind == "multiple_choice" else GENERATE
    assert task.mode == default
    items = task.load("test", n=5)
    assert [it["_index"] for it in items] == list(range(5)) and {it["_split"] for it in items} == {"test"}


def test_readme_table_matches_shipped_readme():
    text = open(os.path.join(default_data_dir(), "README.md")).read()
    for name, (_, n_dev, n_test) in README_TABLE.items():
        assert re.search(rf"\| {name}\.json \|[^|]+\| {n_dev} \| {n_test} \|", text), name


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/data not present")
def test_shipped_copies_are_identical_to_shared_data():
    for name in README_TABLE:
        if name == "drop":  # test split deduplicated against dev: see the next test
            continue
        with open(os.path.join(SHARED, f"{name}.json"), "rb") as a, \
                open(os.path.join(default_data_dir(), f"{name}.json"), "rb") as b:
            assert a.read() == b.read(), name


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/data not present")
def test_shipped_drop_is_shared_drop_without_its_dev_duplicates():
    """The shipped drop.json = ../shared/data's with 4 test items removed, and no test item left shares passage and
    question (case and whitespace normalised) with a dev item."""
    with open(os.path.join(SHARED, "drop.json")) as f:
        shared = json.load(f)
    with open(os.path.join(default_data_dir(), "drop.json")) as f:
        shipped = json.load(f)

    def key(it):
        return " ".join(it["passage"].lower().split()), " ".join(it["question"].lower().split())

    dev = {key(it) for it in shared["dev"]}
    assert [i for i, it in enumerate(shared["test"]) if key(it) in dev] == list(DROP_REMOVED)
    assert shipped["dev"] == shared["dev"]
    assert shipped["test"] == [it for i, it in enumerate(shared["test"]) if i not in DROP_REMOVED]


def test_data_dir_override(tmp_path):
    (tmp_path / "mmlu.json").write_text(json.dumps({"dev": [{"question": "q?", "choices": {"A": "x", "B": "y"},
                                                             "answer": "B"}], "test": []}))
    task = get_task("mmlu", data_dir=str(tmp_path))
    assert [it["answer"] for it in task.load("dev")] == ["B"]
    with pytest.raises(UserError, match=r"task 'gsm8k': file not found: .*gsm8k\.json \(data_dir "):
        get_task("gsm8k", data_dir=str(tmp_path))


def test_unknown_task_name():
    with pytest.raises(UserError, match=r"unknown task 'mmluu' \(known: arc_c, arc_e, boolq, commonsense_qa, drop"):
        get_task("mmluu")


def test_unknown_mode_and_missing_formatter():
    with pytest.raises(UserError, match="task 'gsm8k' has no scoring mode 'choice_logprob'"):
        get_task("gsm8k", mode="choice_logprob")
    task = get_task("gsm8k")
    with pytest.raises(UserError, match="needs a prompt formatter"):
        task.build_requests(task.load("dev", 1))


def test_formatter_from_a_folder_without_tokenizer(tmp_path):
    with pytest.raises(UserError, match="cannot load a tokenizer from"):
        get_task("gsm8k", formatter=str(tmp_path))


# ----------------------------------------------------------------------------------------------------- prompts
def test_multiple_choice_logprob_request():
    task = get_task("mmlu")
    it = task.load("dev", 2)[1]
    (req,) = task.build_requests([it])
    assert isinstance(req, ChoiceRequest) and req.options == (" A", " B", " C", " D")
    assert req.prompt == ("Question: Over the adult years, genetics seems to play a bigger role than environment in\n"
                          "A. The development of wisdom\nB. Longevity\nC. Loss of hair\nD. Marital satisfaction\nAnswer:")
    # items with more options get more labels (truthfulqa has up to 13)
    tq = get_task("truthfulqa", mode="choice_logprob")
    big = max(tq.load("dev"), key=lambda it: len(it["choices"]))
    assert tq.build_requests([big])[0].options == tuple(f" {lab}" for lab in big["choices"])


def test_choice_logprob_chat_variant():
    task = get_task("mmlu", formatter=FMT, logprob_chat=True)
    (req,) = task.build_requests(task.load("dev", 1))
    assert req.prompt.startswith("<user>Question: According to Waltz")
    assert req.prompt.endswith("Answer with the letter of the correct option.<assistant>Answer:")
    assert req.options == (" A", " B", " C", " D")


def test_generate_requests_use_formatter_and_generation_config():
    task = get_task("arc_c", formatter=FMT, mode="generate", generation=GenerationConfig(temperature=0.7, seed=5))
    reqs = task.build_requests(task.load("dev", 3))
    assert all(isinstance(r, GenerateRequest) for r in reqs)
    assert reqs[0].prompt.startswith("<user>Question: Electric circuits") and reqs[0].prompt.endswith(
        "D. a parallel circuit\nAnswer with the letter of the correct option.<assistant>")
    assert [r.seed for r in reqs] == [5, 6, 7] and reqs[0].temperature == 0.7
    greedy = get_task("gsm8k", formatter=FMT).build_requests(get_task("gsm8k").load("dev", 1))[0]
    assert greedy.temperature == 0.0 and greedy.seed is None and greedy.max_tokens == 256
    drop = get_task("drop", formatter=FMT).build_requests(get_task("drop").load("dev", 1))[0]
    assert drop.prompt.startswith("<user>Passage: Hoping to rebound") and "\nQuestion: Which team kicked" in drop.prompt


def test_requests_roundtrip_protocol_json():
    task = get_task("nlgraph", formatter=FMT)
    for r in task.build_requests(task.load("dev", 2)) + get_task("mmlu").build_requests(get_task("mmlu").load("dev", 2)):
        assert from_json(json.loads(json.dumps(to_json(r)))) == r


# -------------------------------------------------------------------------------------------------- extraction
@pytest.mark.parametrize("text,expected", [
    ("The answer is C.", "C"),
    ("Answer: (B) Through the accumulation of territory", "B"),
    ("B. Through the accumulation of territory and other material resources", "B"),
    ("**D**", "D"),
    ("C", "C"),
    ("I think the correct option is A because power can be gained by balancing.", "A"),
    ("A dog is not relevant here; the correct choice is (C).", "C"),
    ("Loss of hair is mostly genetic.", "C"),  # option text
    ("I am not sure about this one.", ""),
    ("The answer is E", ""),  # not a label of this item
    ("Option B is correct", "B"),
    ("Genetics matters most for (D) marital satisfaction", "D"),
    # real SmolLM2-135M-Instruct replies (greedy, mmlu dev items 1-2 in generate mode)
    ("C. Loss of hair", "C"),
    ("C. difference between the initial budget proposals made by the president and Congress\n\n"
     "The correct answer is: C. difference", "C"),
])
def test_extract_choice(text, expected):
    options = ["The development of wisdom", "Longevity", "Loss of hair", "Marital satisfaction"]
    assert ex.extract_choice(text, ["A", "B", "C", "D"], options) == expected


@pytest.mark.parametrize("text,expected", [
    ("10 dimes are 100 pennies and 10 nickels are 50 pennies. 100 + 50 = 150.\nThe answer is 150.", "150"),
    ("Morning rides: 14 * 6 = 84. Afternoon: 14 * 2 = 28. Total 84 + 28 = 112 dollars.", "112"),
    ("So the total is $1,200.00.\nThe answer is $1,200", "1200"),
    ("Let's compute.\n#### 72", "72"),
    ("The final result is \\boxed{18}.", "18"),
    ("The answer is -3.", "-3"),
    ("The answer is 2.50", "2.5"),
    ("The answer is: 36,000 dollars", "36000"),
    ("I don't know.", ""),
])
def test_extract_number(text, expected):
    assert ex.extract_number(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("Yes, there is a path between node 11 and node 6.", "Yes"),
    ("No.", "No"),
    ("There is no path between node 3 and node 9.", "No"),
    ("Nothing connects them", ""),
])
def test_extract_yes_no(text, expected):
    assert ex.extract_yes_no(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("11", "11"),
    ("11.", "11"),
    ("The shortest path from node 16 to node 19 is 16,3,19 with a total weight of 11.", "11"),
    ("The length of the shortest path is 7.", "7"),
    ("16 -> 3 -> 19, length 11", "11"),
    ("11 (via node 3)", "11"),
    ("16-3-19", "19"),
    ("The shortest path between node 16 and node 19 is 18.", "18"),  # real SmolLM2 reply (nlgraph dev item 0)
    ("no idea", ""),
])
def test_extract_path_length(text, expected):
    assert ex.extract_path_length(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("Houston", "Houston"),
    ("Answer: Houston.", "Houston"),
    ("The answer is 16 years.", "16 years"),
    ("\n\n**Bangkok Metropolitan Region**\n", "Bangkok Metropolitan Region"),
    ("Based on the passage, the answer is 2.\nExplanation: ...", "2"),
    ("", ""),
    # real SmolLM2-135M-Instruct replies (greedy, drop dev items 0-2)
    ("The Texans kicked the shorter field goal in the first quarter.",
     "The Texans kicked the shorter field goal in the first quarter"),
    ("The answer is: 1917", "1917"),
    ("The passage is not a specific answer to the question. It is a continuation of the previous answer",
     "The passage is not a specific answer to the question. It is a continuation of the previous answer"),
])
def test_extract_free_answer(text, expected):
    assert ex.extract_free_answer(text) == expected


# ----------------------------------------------------------------------------------------------------- scoring
def test_choice_logprob_scoring_hand_computed():
    task = get_task("mmlu")
    items = task.load("dev", 3)  # gold A, C, D
    lps = [(-1.0, -2.0, -3.0, -4.0), (-2.0, -2.0, -1.0, -5.0), (-0.1, -0.2, -0.3, -0.4)]
    res = task.score(items, [ChoiceResponse(lp) for lp in lps])
    assert res.predictions == ("A", "C", "A") and res.per_sample == (1.0, 1.0, 0.0)
    assert res.score == pytest.approx(2 / 3) and res.split == "dev" and res.ids == ("1542", "8961", "7985")
    import math
    z = sum(math.exp(x) for x in lps[0])
    assert res.option_probs[0] == pytest.approx(tuple(math.exp(x) / z for x in lps[0]))
    assert TaskResult.from_json(json.loads(json.dumps(res.to_json()))) == res


def test_generate_scoring_each_format():
    mc = get_task("mmlu", mode="generate")
    r = mc.score(mc.load("dev", 2), [GenerateResponse("The answer is A."), GenerateResponse("Longevity")])
    assert r.predictions == ("A", "B") and r.per_sample == (1.0, 0.0) and r.option_probs is None
    gsm = get_task("gsm8k")
    items = gsm.load("dev", 2)  # gold 150, 2
    r = gsm.score(items, [GenerateResponse("... The answer is 150."), GenerateResponse("The answer is 3")])
    assert r.per_sample == (1.0, 0.0) and r.predictions == ("150", "3") and r.raw[1] == "The answer is 3"
    nlg = get_task("nlgraph")
    items = nlg.load("dev", 2)  # shortest_path (gold from file), connectivity (gold Yes)
    r = nlg.score(items, [GenerateResponse(f"The length of the shortest path is {items[0]['answer']}."),
                          GenerateResponse("No, there is no path.")])
    assert r.per_sample == (1.0, 0.0) and r.predictions[1] == "no"
    drop = get_task("drop")
    items = drop.load("dev", 3)  # ["Houston", "Browns"], ["2"], ["16", "22"]
    r = drop.score(items, [GenerateResponse("Answer: Houston."), GenerateResponse("two"),
                           GenerateResponse("16 years")])
    assert r.per_sample == pytest.approx((1.0, 0.0, 2 / 3))
    assert r.metrics == pytest.approx({"f1": (1 + 0 + 2 / 3) / 3, "em": 1 / 3}) and r.score == r.metrics["f1"]
    assert r.predictions == ("houston", "two", "16 years")


def test_score_rejects_misaligned_responses():
    task = get_task("mmlu")
    items = task.load("dev", 2)
    with pytest.raises(ValueError):
        task.score(items, [ChoiceResponse((0.0, 0.0, 0.0, 0.0))])
    with pytest.raises(TypeError):
        task.score(items, [GenerateResponse("A")] * 2, "choice_logprob")


# ------------------------------------------------------------------------------------------ custom files by path
def _write(tmp_path, obj, name="custom.json"):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(p)


def test_custom_task_files_by_path_infer_kind(tmp_path):
    mc = get_task(_write(tmp_path, {"dev": [{"question": "2+2?", "choices": ["3", "4"], "answer": "B"}],
                                    "test": [{"question": "1+1?", "choices": {"A": "2", "B": "3"}, "answer": "A"}]},
                         "quiz.json"))
    assert mc.name == "quiz" and mc.kind == "multiple_choice" and mc.mode == CHOICE_LOGPROB
    assert mc.load("dev")[0]["choices"] == {"A": "3", "B": "4"}
    assert mc.build_requests(mc.load("dev"))[0].options == (" A", " B")
    em = get_task(_write(tmp_path, {"dev": [{"question": "Capital of France?", "answer": "Paris"},
                                            {"question": "6*7?", "answer": 42}], "test": []}, "em.json"),
                  formatter=FMT)
    assert em.kind == "exact_match"
    items = em.load("dev")
    r = em.score(items, [GenerateResponse("Answer: paris."), GenerateResponse("42.0")])
    assert r.per_sample == (1.0, 1.0)
    assert em.build_requests(items)[0].prompt == "<user>Capital of France?\nGive only the final answer.<assistant>"
    fa = get_task(_write(tmp_path, {"dev": [{"question": "Who?", "answers": ["Mike Nugent", "Nugent"]}]}, "fa.json"))
    assert fa.kind == "free_answer"
    assert fa.score(fa.load("dev"), [GenerateResponse("nugent")]).per_sample == (1.0,)


@pytest.mark.parametrize("content,message", [
    ("{ not json", r"bad\.json: invalid JSON at line 1 column 3"),
    ("[1, 2]", r"bad\.json: a task file must be a JSON object"),
    ({"dev": [], "test": []}, r"bad\.json: every split is empty"),
    ({"dev": [{"question": "q", "choices": {"A": "x", "B": "y"}, "answer": "A"},
              {"question": "q", "choices": {"A": "x", "B": "y"}, "answer": "E", "id": "q17"}]},
     r"bad\.json: dev item 1 \(id 'q17'\): answer 'E' is not one of the choices \['A', 'B'\]"),
    ({"dev": [{"question": "q", "choices": {"A": "x", "B": "y"}, "answer": "A"}, {"choices": {"A": "x"}, "answer": "A"}]},
     r"bad\.json: dev item 1: missing field 'question'"),
    ({"dev": [{"question": "q", "choices": {"A": "x", "B": "y"}}]}, r"bad\.json: dev item 0: missing field 'answer'"),
    ({"dev": [{"question": "q", "answer": "1"}, {"question": "q2"}]}, r"bad\.json: dev item 1: missing field 'answer'"),
    ({"dev": [{"question": "q", "answers": []}]}, r"dev item 0: 'answers' must be a non-empty list"),
    ({"dev": [{"question": "", "answer": "1"}]}, r"dev item 0: 'question' must be a non-empty string"),
    ({"dev": [{"question": "q", "choices": {"A": "x"}, "answer": "A"}]}, r"'choices' must map at least two labels"),
    ({"dev": ["just a string"]}, r"dev item 0: an item must be a JSON object"),
])
def test_malformed_task_files_name_file_and_item(tmp_path, content, message):
    path = _write(tmp_path, content, "bad.json")
    with pytest.raises(UserError, match=message):
        get_task(path).load("dev")


def test_empty_or_unknown_split(tmp_path):
    path = _write(tmp_path, {"dev": [{"question": "q", "answer": "1"}], "test": []}, "splits.json")
    task = get_task(path)
    with pytest.raises(UserError, match=r"splits\.json: split 'test' is empty"):
        task.load("test")
    with pytest.raises(UserError, match=r"splits\.json: no split 'train' \(available: dev, test\)"):
        task.load("train")
    with pytest.raises(UserError, match="task file not found"):
        get_task(str(tmp_path / "missing.json"))


# -------------------------------------------------------------------------------------- docs worked example
def _docs_example() -> str:
    text = open(os.path.join(ROOT, "docs", "TASKS.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    return next(b for b in blocks if "@register_task(" in b)


def test_docs_worked_example_runs():
    ns: dict = {"__name__": "docs_example"}
    exec(compile(_docs_example(), "docs/TASKS.md", "exec"), ns)
    task = get_task("add3", formatter=FMT)
    items = task.load("dev", n=4)
    reqs = task.build_requests(items)
    assert len(reqs) == 4 and reqs[0].prompt.startswith("<user>What is ")
    right = task.score(items, [GenerateResponse(f"It is {it['answer']}.") for it in items])
    wrong = task.score(items, [GenerateResponse("It is 1000.") for _ in items])
    assert right.score == 1.0 and wrong.score == 0.0 and right.split == "dev"
    # re-running the example (same class name, same module) re-registers without complaint
    exec(compile(_docs_example(), "docs/TASKS.md", "exec"), dict(ns))


# --------------------------------------------------------------------------------- slow: real SmolLM2, protocol
@pytest.fixture(scope="module")
def reference():
    """(model_path, (model, tokenizer)) of the real SmolLM2, fp32, loaded once for this module's slow tests."""
    from evaluators.reference import load_reference_model
    from genome_jax.model_store import default_model_path

    path = str(default_model_path())
    return path, load_reference_model(path)


@pytest.mark.slow
def test_mmlu_requests_scored_with_transformers_logits_end_to_end(reference):
    """8 mmlu items: task -> ChoiceRequests -> reference backend -> score, against log-probs computed here directly
    from transformers logits of the full text prompt + option (a different route: one string, no token splicing)."""
    import torch

    from evaluators.reference import answer_with_transformers

    path, (model, tok) = reference
    task = get_task("mmlu", formatter=path)
    items = task.load("dev", 8)
    reqs = task.build_requests(items)
    responses = answer_with_transformers(path, reqs, _loaded=(model, tok))
    result = task.score(items, responses)
    for it, req, resp, pred, probs in zip(items, reqs, responses, result.predictions, result.option_probs):
        # tokenise each full string prompt + option: the option must be exactly one extra token after "Answer:"
        full = [tok(req.prompt + opt)["input_ids"] for opt in req.options]
        n_prompt = len(tok(req.prompt)["input_ids"])
        assert all(len(f) == n_prompt + 1 and f[:-1] == full[0][:-1] for f in full)
        with torch.no_grad():  # one forward over prompt + " A"; position -2 predicts every option's token
            logp = torch.log_softmax(model(input_ids=torch.tensor([full[0]])).logits[0, -2].double(), -1)
        direct = [float(logp[f[-1]]) for f in full]
        assert resp.logprobs == pytest.approx(direct, abs=1e-4)
        assert pred == "ABCD"[max(range(4), key=lambda j: direct[j])]
        assert sum(probs) == pytest.approx(1.0)
    assert result.score == pytest.approx(sum(p == it["answer"] for p, it in zip(result.predictions, items)) / 8)
    # the chat formatter really is the model's template
    prompt = task.format("hi")
    assert prompt.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nhi<|im_end|>" in prompt


@pytest.mark.slow
def test_generate_requests_greedy_with_transformers_end_to_end(reference):
    """2 gsm8k items through the chat template and greedy decoding; decoded text equals a hand-rolled argmax loop."""
    import torch

    from evaluators.reference import answer_with_transformers

    path, (model, tok) = reference
    task = get_task("gsm8k", formatter=path, generation=GenerationConfig(max_tokens=12))
    items = task.load("dev", 2)
    reqs = task.build_requests(items)
    responses = answer_with_transformers(path, reqs, _loaded=(model, tok))
    for req, resp in zip(reqs, responses):
        ids = tok(req.prompt, return_tensors="pt")["input_ids"]
        new, past = [], None
        with torch.no_grad():  # argmax loop with the KV cache: prefill once, then one token per step
            for _ in range(req.max_tokens):
                out = model(input_ids=ids, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, int(out.logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                new.append(nxt)
                ids = torch.tensor([[nxt]])
        assert resp.text == tok.decode(new, skip_special_tokens=True)
    result = task.score(items, responses)
    assert result.n == 2 and result.raw == tuple(r.text for r in responses)
