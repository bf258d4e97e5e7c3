"""Every setting of a `genome run`, declared once.

`SETTINGS` drives the `RunConfig` dataclass (genome_jax.run_config), the `genome run` flags and their grouped
help (scripts/run_cmd.py), the config-file keys and their aliases, the per-value validation, what reaches the
strategy and the loop, and which settings a resumed run may change. Names are the seed's (GENOME's reference
scripts): `--tasks --task_weights --model_path --lora_dir --combine_method --population_size --max_iter`.

Per-value checks (type, choices, range) live here; checks across settings live in `run_config.validate`.
Errors are `ParamError`s naming the setting (the CLI spells it as its flag).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from genome_jax.errors import ParamError

GROUPS = ("search", "operators", "scoring", "placement", "output")
# The library's choice lists, spelled here so that the table (and with it `genome run`'s flags, its config checks
# and the run folder's lock check) never imports JAX; tests/genome_jax/test_settings_choices.py asserts they equal
# the lists in the operators and strategies.
METHODS = ("genome", "genome_plus")  # genome_jax.strategies.STRATEGIES
MERGE_METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "slerp", "blx_alpha",
                 "uniform", "magnitude_prune")  # genome_jax.operators.registry.METHODS
DEFAULT_DENSITY = 0.2  # genome_jax.operators.registry.DEFAULT_DENSITY
PARENT_METHODS = ("roulette", "tournament", "truncation", "rank")  # genome_jax.operators.selection
SURVIVOR_METHODS = PARENT_METHODS
CROSS_WEIGHTS = ("random", "equal", "fitness")  # genome_jax.strategies.common
MUTATIONS = ("gaussian", "svd")  # genome_jax.strategies.common
BACKENDS = ("vllm", "jax")
SCORINGS = ("generate", "choice_logprob", "loglik")
EVAL_MODES = ("auto", "swap", "lora")  # the vLLM evaluator's routes: W+ΔW weight swap, multi-LoRA, or per platform
EVAL_DTYPES = ("auto", "bfloat16", "float16", "float32")  # vLLM engine dtype (auto: the checkpoint's own)
SYNTHETIC = "synthetic"  # the test problem: fitness from the weights themselves, no LLM

# value kinds: how a config-file value is checked and how argparse reads a flag
KINDS = ("str", "int", "float", "bool", "str_list", "float_list", "devices", "device_list")
DESTINATIONS = ("config", "strategy", "loop")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting. `name`: the RunConfig field, the config-file key and (with dashes) the flag.

    kind: one of KINDS; optional: None is a valid value (its meaning in `none`). choices / low, high: the
    per-value check (`low_open`: low itself excluded; a float range is always finite). to: where the value goes
    besides the run config: "strategy" (the strategy's parameter `param`, default the same name; "combine.density"
    is the density of the `combine` merge) or "loop" (the generation loop: max_iter, early_stop_iter).
    resume: a resumed run may change it (it moves or reports the work, not the search).
    switch: a bool's flag, which flips the default (`no-init-merge`). aliases: other accepted spellings of the
    key and the flag (hidden from --help).
    """

    name: str
    kind: str
    default: Any
    group: str
    help: str
    optional: bool = False
    none: str = ""
    choices: tuple[str, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    to: str = "config"
    param: str | None = None
    resume: bool = False
    switch: str | None = None
    aliases: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        return f"--{self.switch or self.name}"

    @property
    def target(self) -> str:
        """The name at the destination (the strategy's parameter); the setting's own name otherwise."""
        return self.param or self.name

    def default_text(self) -> str:
        if self.kind == "bool":
            return "on" if self.default else "off"
        if self.default is None:
            return self.none or "none"
        if isinstance(self.default, tuple):
            return " ".join(map(str, self.default)) or "none"
        if self.kind == "devices":
            return "all" if self.default == -1 else str(self.default)
        return str(self.default)


_s = Setting  # short, for the table


_rate = dict(low=0.0, high=1.0)
_nonneg = dict(low=0.0, high=math.inf)
_decay = dict(low=0.0, high=1.0, low_open=True)
_merge_density = dict(low=0.0, high=1.0, low_open=True)

SETTINGS: tuple[Setting, ...] = (
    # ---- search: what is searched, how big, how long
    _s("tasks", "str_list", None, "search", "fitness tasks: registered names (mmlu gsm8k arc_c ...), task files, "
       "or 'synthetic' (the test problem, no LLM)", none="required"),
    _s("task_weights", "float_list", None, "search", "one weight per task, normalised to sum 1", optional=True,
       none="equal"),
    _s("model_path", "str", None, "search", "base model folder", optional=True, none="the embedded SmolLM2-135M"),
    _s("lora_dir", "str", None, "search", "folder of PEFT LoRA expert folders (the parents)", optional=True,
       none="required unless tasks is synthetic"),
    _s("method", "str", "genome", "search", "search strategy", choices=METHODS),
    _s("population_size", "int", 10, "search", "individuals per generation (genome_plus: the initial population)",
       low=2, to="strategy"),
    _s("max_population_size", "int", None, "search", "genome_plus: the population grows up to this size",
       optional=True, none="2 x population_size", low=2, to="strategy"),
    _s("n_offspring", "int", None, "search", "genome_plus: children per generation", optional=True,
       none="population_size", low=1, to="strategy"),
    _s("max_iter", "int", 50, "search", "generations (a finished run can be extended by resuming with a larger "
       "value)", low=1, to="loop", resume=True, aliases=("iters", "max_generations")),
    _s("early_stop_iter", "int", 0, "search", "stop after this many generations without a better best (0: never)",
       low=0, to="loop", aliases=("patience",)),
    _s("init_merge", "bool", True, "search", "start from the experts themselves instead of random pairwise merges "
       "of them", switch="no-init-merge"),
    _s("seed", "int", 42, "search", "PRNG seed", low=0),
    _s("allow_overlap", "bool", False, "search", "run even if an expert's provenance shows it was trained on "
       "dev/test items of a task of tasks / test_tasks (recorded in result.json)", switch="allow-overlap",
       resume=True),
    # ---- operators: crossover, mutation, selection, succession (their hyperparameters)
    _s("combine_method", "str", "ties", "operators", "merge that builds the initial population from pairs of "
       "experts", choices=MERGE_METHODS, to="strategy", param="combine", aliases=("combine",)),
    _s("combine_density", "float", DEFAULT_DENSITY, "operators", "fraction of weights the initial merges keep "
       "(ties, dare_*, breadcrumbs, magnitude_prune)", **_merge_density, to="strategy", param="combine.density"),
    _s("cross_method", "str", "ties", "operators", "merge used by crossover", choices=MERGE_METHODS, to="strategy",
       param="cross", aliases=("cross",)),
    _s("cross_density", "float", DEFAULT_DENSITY, "operators", "fraction of weights crossover keeps (ties, "
       "dare_*, breadcrumbs, magnitude_prune)", **_merge_density, to="strategy", param="cross.density"),
    _s("cross_rate", "float", 0.8, "operators", "probability that a child is a crossover of parents", **_rate,
       to="strategy"),
    _s("n_parents", "int", 2, "operators", "parents per crossover", low=1, to="strategy"),
    _s("cross_weights", "str", "random", "operators", "parents' merge weights: random (U(0,1), normalised), equal, "
       "or fitness (their roulette weights)", choices=CROSS_WEIGHTS, to="strategy"),
    _s("mutation", "str", "gaussian", "operators", "mutation: masked Gaussian noise, or noise in the individual's "
       "own singular subspace", choices=MUTATIONS, to="strategy"),
    _s("individual_mutation_rate", "float", 0.15, "operators", "probability that a child is mutated", **_rate,
       to="strategy"),
    _s("gene_mutation_rate", "float", 0.01, "operators", "share of a mutated child's weights that get noise",
       **_rate, to="strategy"),
    _s("sigma", "float", 0.01, "operators", "standard deviation of the mutation noise", **_nonneg, to="strategy"),
    _s("sigma_decay", "float", 1.0, "operators", "sigma is multiplied by this every generation", **_decay,
       to="strategy"),
    _s("elite_percent", "float", 0.02, "operators", "share of the population kept unchanged as elites", **_rate,
       to="strategy"),
    _s("selection", "str", "roulette", "operators", "parent selection", choices=PARENT_METHODS, to="strategy"),
    _s("tournament_size", "int", 3, "operators", "contestants per tournament (selection tournament)", low=1,
       to="strategy"),
    _s("truncation_percent", "float", 0.5, "operators", "share of the best that parents are drawn from "
       "(selection truncation)", low=0.0, high=1.0, low_open=True, to="strategy"),
    _s("rank_pressure", "float", 1.5, "operators", "selection pressure of linear ranking (selection rank)",
       low=1.0, high=2.0, to="strategy"),
    _s("survivor_selection", "str", "truncation", "operators", "genome_plus: who survives when the population is "
       "trimmed to max_population_size", choices=SURVIVOR_METHODS, to="strategy"),
    _s("inertia", "float", 0.4, "operators", "genome_plus succession: weight of a particle's previous step",
       **_nonneg, to="strategy"),
    _s("cognitive", "float", 0.3, "operators", "genome_plus succession: pull toward the particle's own best",
       **_nonneg, to="strategy"),
    _s("social", "float", 0.5, "operators", "genome_plus succession: pull toward the population's best", **_nonneg,
       to="strategy"),
    _s("repel", "float", 0.1, "operators", "genome_plus succession: push away from the worst", **_nonneg,
       to="strategy"),
    _s("step_size", "float", 1.0, "operators", "genome_plus succession: step size", **_nonneg, to="strategy"),
    _s("step_size_decay", "float", 0.95, "operators", "step_size is multiplied by this every generation", **_decay,
       to="strategy"),
    # ---- scoring: how fitness is measured
    _s("n_dev", "int", 200, "scoring", "dev samples per task for fitness", optional=True, none="all", low=1),
    _s("scoring", "str", None, "scoring", "scoring mode", optional=True, none="each task's own", choices=SCORINGS),
    _s("backend", "str", "vllm", "scoring", "what scores the individuals", choices=BACKENDS),
    _s("eval_mode", "str", "auto", "scoring", "vLLM route: swap (W+ΔW into the live engine), lora (multi-LoRA), "
       "or auto (per platform)", choices=EVAL_MODES, resume=True),
    _s("eval_dtype", "str", "auto", "scoring", "vLLM engine dtype: auto (the model's, bf16 for SmolLM2; the swap "
       "sums W+ΔW in float32, then casts), float32 (exact ΔW, half the speed on CPU), bfloat16, float16",
       choices=EVAL_DTYPES, resume=True),
    _s("endpoints", "str_list", (), "scoring", "external OpenAI-compatible vLLM servers (http://host:port ...) "
       "instead of the managed evaluator", resume=True),
    # ---- placement: where the work runs, never what it computes (a resumed run may change these)
    _s("devices", "devices", 0, "placement", "shard the population over N local JAX devices, or 'all' "
       "(0: unsharded); population sizes must be multiples of N", resume=True),
    _s("eval_devices", "device_list", None, "placement", "vllm: one managed vLLM worker per listed GPU, e.g. "
       "0,1,2,3", optional=True, resume=True),
    _s("ray_address", "str", None, "placement", "vllm: one engine per Ray actor on a Ray cluster: local, auto or "
       "ray://host:port", optional=True, resume=True),
    _s("ray_actors", "int", None, "placement", "with ray_address: number of Ray actors", optional=True,
       none="one per GPU, or per CPU", low=1, resume=True),
    # ---- output: where results go and what is reported after the search
    _s("output_dir", "str", None, "output", "run folder", optional=True, none="runs/<method>-<tasks>-s<seed>",
       resume=True),
    _s("test_tasks", "str_list", (), "output", "tasks reported on the test split at the end; those not in tasks "
       "are unseen tasks", resume=True),
    _s("n_test", "int", None, "output", "test samples per task for the final report", optional=True, none="all",
       low=1, resume=True),
    _s("ensemble_k", "int", 5, "output", "report ensembles of the top k = 1..K individuals", low=1, resume=True),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
# config-file key (or flag without dashes; "-" read as "_") -> setting name: names, aliases, bool switches
KEYS: dict[str, str] = {**{s.name: s.name for s in SETTINGS}, **{a: s.name for s in SETTINGS for a in s.aliases},
                        **{s.switch.replace("-", "_"): s.name for s in SETTINGS if s.switch}}
assert len(KEYS) == len(SETTINGS) + sum(len(s.aliases) for s in SETTINGS) + sum(
    1 for s in SETTINGS if s.switch and s.switch.replace("-", "_") != s.name), "a key names two settings"
RESUME_MAY_CHANGE: tuple[str, ...] = tuple(s.name for s in SETTINGS if s.resume)
assert all(s.kind in KINDS and s.group in GROUPS and s.to in DESTINATIONS for s in SETTINGS)
assert all(s.high is None for s in SETTINGS if s.kind == "int"), "an int range is a lower bound"
assert all(s.high is not None for s in SETTINGS if s.kind == "float" and s.low is not None)


def check_value(s: Setting, value: Any) -> None:
    """Per-value check of a typed value (choices, range); raises ParamError naming the setting."""
    if value is None:
        if s.optional:
            return
        raise ParamError(f"{{{s.name}}} is required")
    if s.choices is not None and value not in s.choices:
        raise ParamError(f"{{{s.name}}} must be one of {{allowed}}, got {{got!r}}", allowed=", ".join(s.choices),
                         got=value)
    if s.low is None:
        return
    if s.kind == "int":
        if value < s.low:
            raise ParamError(f"{{{s.name}}} must be at least {{low}}, got {{got}}", low=int(s.low), got=value)
        return
    ok = math.isfinite(value) and (value > s.low if s.low_open else value >= s.low) and value <= s.high
    if ok:
        return
    if s.high == math.inf:
        rule = f"finite and {'>' if s.low_open else '>='} {s.low:g}"
    else:
        rule = f"in {'(' if s.low_open else '['}{s.low:g}, {s.high:g}]"
    raise ParamError(f"{{{s.name}}} must be {{rule}}, got {{got}}", rule=rule, got=value)
