"""The run configuration's schema: every key, its default, comment, choices and bounds.

A run is described by one YAML file (plus ``--set key=value`` overrides). Every key is declared
once, below, as a dataclass field ``name: type = key(default, "comment", choices=..., bounds)``:
the loader (``fedalign.config.load``) checks its type, choices and bounds from that declaration,
and
``fedalign.config.reference`` renders the commented default YAML, the README's reference and a
JSON Schema from it. A config is loaded into those frozen dataclasses, so a typo or an impossible
value stops the run before Ray starts, with one message that names the key (``ConfigError``),
instead of a traceback twenty seconds into a simulation.

One ``seed`` derives the separate seeds of partitioning, model init, client sampling and data
shuffling; the resolved config written to the run folder records them all, so any run can be
repeated from its folder alone.

Every choice (dataset, model, optimizer, client objective, strategy, aligner, solver, fuse and
repair rule, and their options) is checked against the registries that own it, with the owner's
own ``supports`` checks: the config restates no list of names, no default of an algorithm. The
config turns into the pipeline's ``Plan`` (``to_plan``), never the reverse.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedalign.algorithms.align import ALIGNERS, SOLVERS
from fedalign.algorithms.fusion import FUSE_RULES
from fedalign.algorithms.lora import LORA_RULES
from fedalign.algorithms.pipeline import Plan
from fedalign.algorithms.repair import REPAIR_RULES
from fedalign.algorithms.server_opt import SERVER_OPTIMIZERS
from fedalign.client.training import OBJECTIVES, OPTIMIZERS
from fedalign.core.registry import STRATEGIES
from fedalign.data import DATASETS, partition_schemes
from fedalign.data.hub import HF_NAME_PATTERN
from fedalign.models import MODELS

# --------------------------------------------------------------------------------------------------
# The schema: every key declared once, with its default, its one-line comment and its checks


@dataclass(frozen=True)
class Choices:
    """Names a key accepts that no registry owns (a registry, having ``kind`` and iterating its
    names, serves as a key's choices directly)."""

    kind: str
    names: Callable[[], Iterable[str]]
    pattern: str | None = None  # a regex for names beyond ``names`` (hf:<org>/<name>)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __contains__(self, value: object) -> bool:
        if (
            self.pattern is not None
            and isinstance(value, str)
            and re.fullmatch(self.pattern, value)
        ):
            return True
        return value in self.names()


def key(
    default: Any,
    doc: str,
    *,
    choices: Iterable[str] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A config key: its default (``REQUIRED``: none; a dataclass: a section), its one-line
    comment (``fedalign config --defaults``, the README's reference and the JSON Schema print it),
    the names it accepts (a registry or :class:`Choices`) and its bounds, which the loader checks
    for every config. Adding a key is one line: a field whose default is ``key(...)``."""
    meta = {"doc": doc, "choices": choices, "bounds": {"ge": ge, "gt": gt, "le": le, "lt": lt}}
    if dataclasses.is_dataclass(default):
        return field(default_factory=default, metadata=meta)
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


REQUIRED: Any = dataclasses.MISSING
"""The default of a key that must be given (in a list item such as a fault)."""
SIMULATION_BACKENDS = ("ray", "inprocess")
ADAPTER_KINDS = ("none", "lora")
FAULT_KINDS = ("raise", "nan", "wrong-shape", "missing-key", "scale", "crash", "slow")


@dataclass(frozen=True)
class DataConfig:
    """The dataset and how it is split across the clients."""

    dataset: str = key(
        "fashion-mnist",
        "the dataset, or hf:<org>/<name>",
        choices=Choices("dataset", lambda: tuple(DATASETS), pattern=HF_NAME_PATTERN),
    )
    data_dir: str | None = key(None, "its folder; null: FEDALIGN_DATA_DIR or the defaults")
    options: dict[str, Any] = key({}, "the dataset loader's options (fortunes: seq_len; hf:...)")
    num_clients: int = key(10, "clients in the federation", ge=1)
    partition: str = key("dirichlet", "label split", choices=Choices("scheme", partition_schemes))
    alpha: float = key(0.5, "Dirichlet concentration: smaller is more skewed", gt=0)
    classes_per_client: int = key(2, "labels per client (shards, pathological)", ge=1)
    min_partition_size: int = key(10, "resample a partition until every client has this many", ge=0)
    val_fraction: float = key(0.1, "each client's local validation split", ge=0, lt=1)


@dataclass(frozen=True)
class ModelConfig:
    """The model; every key of the section but ``name`` is one of its options."""

    name: str = key("mlp", "the model", choices=MODELS)
    options: dict[str, Any] = key(
        {}, "its options (keyword arguments), also writable in the section"
    )
    init: str | None = key(
        None, "start from these weights: a safetensors file or a run folder (its final model)"
    )


@dataclass(frozen=True)
class AdaptersConfig:
    """Parameter-efficient fine-tuning: the model's weights stay frozen and the clients train
    low-rank adapters (LoRA through ``peft``, the ``hf`` extra), which alone travel; ``rule``
    names how the server combines them (``fedalign.algorithms.lora.LORA_RULES``) and the rule's
    options may be written directly in the section. Runs with ``strategy: {name: lora}``."""

    kind: str = key(
        "none", "what the clients train", choices=Choices("adapter kind", lambda: ADAPTER_KINDS)
    )
    rank: int = key(8, "the adapters' rank r", ge=1)
    client_ranks: tuple[int, ...] = key(
        (), "heterogeneous ranks: client i trains rank client_ranks[i % len] (flora, flexlora)"
    )
    alpha: float = key(16.0, "LoRA's alpha: the change is (alpha / r) B A", gt=0)
    dropout: float = key(0.0, "dropout on the adapters' input", ge=0, lt=1)
    targets: tuple[str, ...] = key(
        ("all-linear",), "modules adapted (peft's target_modules; all-linear: every Linear)"
    )
    rule: str = key("fedit", "how the server combines the clients' adapters", choices=LORA_RULES)
    options: dict[str, Any] = key({}, "the rule's options, also writable in the section")


@dataclass(frozen=True)
class TrainConfig:
    """The clients' local training."""

    local_epochs: int = key(1, "epochs over the local data per round", ge=1)
    batch_size: int = key(32, "local minibatch size", ge=1)
    optimizer: str = key("sgd", "local optimizer", choices=OPTIMIZERS)
    lr: float = key(0.05, "local learning rate", gt=0)
    momentum: float = key(0.0, "SGD momentum", ge=0, lt=1)
    weight_decay: float = key(0.0, "L2 weight decay", ge=0)
    objective: str | None = key(None, "local objective; null: the strategy's", choices=OBJECTIVES)
    proximal_mu: float = key(0.0, "FedProx's mu (objective proximal)", ge=0)


@dataclass(frozen=True)
class StrategyConfig:
    """The server's strategy, its options and the rounds the engine runs it for.

    ``name`` names a registered strategy; ``options`` holds its options (its constructor's
    keyword-only parameters, e.g. pfnm's ``sigma`` or fedma's ``protocol``), which may also be
    written directly in the section; the resolved config records every option it takes, with its
    value. The other keys are the round engine's, the same for every strategy.
    """

    name: str = key("fedavg", "the strategy", choices=STRATEGIES)
    options: dict[str, Any] = key({}, "its options (below), also writable in the section")
    rounds: int = key(10, "federated rounds", ge=1)
    fraction_train: float = key(
        1.0, "clients sampled per round (seeded), at least min_train_clients", gt=0, le=1
    )
    min_train_clients: int = key(2, "fewest valid replies a round needs", ge=1)
    fraction_evaluate: float = key(
        0.0, "> 0: federated evaluation on the clients' validation splits", ge=0, le=1
    )
    eval_every: int = key(1, "test-set evaluation every k rounds (and the last)", ge=1)
    overlap_evaluation: bool = key(
        True, "round r's test-set pass runs while round r+1 trains (same rows); false: after it"
    )
    timeout: float = key(3600.0, "seconds a round waits for its clients", gt=0)
    round_retries: int = key(1, "resamples of a round with too few valid replies", ge=0)
    max_update_norm: float | None = key(
        None, "reject updates whose norm exceeds this; null: no bound", gt=0
    )
    max_update_ratio: float | None = key(
        100.0,
        "drop an update whose norm exceeds this x the other clients' median; null: no check",
        gt=1,
    )
    max_client_examples: int | None = key(
        None, "clip self-reported example counts to this; null: no bound", ge=1
    )
    max_stat_ratio: float | None = key(
        1e4, "drop a client whose Gram/Fisher scale exceeds this x the median", ge=1
    )
    max_fused_ratio: float | None = key(
        10.0,
        "fall back to the mean (robust rules: median) if the fused norm exceeds this x the inputs'",
        ge=1,
    )


@dataclass(frozen=True)
class AggregationConfig:
    """The server's align -> fuse -> repair pipeline (strategies that take it: fedavg, fedprox).

    ``align``, ``fuse`` and ``repair`` name registered steps; ``options`` holds their options,
    which may also be written directly in the section; the resolved config records every option
    the chosen steps take, with its value. Steps that need data get it from the clients as
    statistics (see ``fedalign.algorithms.pipeline``).
    """

    align: str = key(Plan.align, "matching", choices=ALIGNERS)
    solver: str = key(Plan.solver, "assignment solver", choices=SOLVERS)
    fuse: str = key(Plan.fuse, "fusion rule", choices=FUSE_RULES)
    repair: str = key(Plan.repair, "fused-model fix", choices=REPAIR_RULES)
    options: dict[str, Any] = key({}, "the steps' options (below), also writable in the section")
    stats_samples: int = key(2000, "examples per client for the statistics (0: all)", ge=0)
    own_init: bool = key(False, "round 1 from each client's own init (one-shot fusion studies)")
    workers: int = key(Plan.workers, "processes aligning clients in parallel", ge=1)


@dataclass(frozen=True)
class ServerOptimizerConfig:
    """The server's step from the global model towards the fused one
    (``fedalign.algorithms.server_opt``): ``sgd`` with ``lr: 1`` (the default) takes the fused
    model; ``momentum``, ``adam``, ``yogi`` and ``adagrad`` make FedAvgM, FedAdam, FedYogi and
    FedAdagrad of any strategy. Its options (``lr``, ``momentum``, ``betas``, ``tau``,
    ``bias_correction``) may be written directly in the section; the resolved config records those
    the chosen optimizer takes, with their values."""

    name: str = key("sgd", "the server optimizer", choices=SERVER_OPTIMIZERS)
    options: dict[str, Any] = key({}, "its options (below), also writable in the section")


@dataclass(frozen=True)
class SimulationConfig:
    """Where the clients run: Flower's simulation engine on Ray, or this process."""

    backend: str = key(
        "ray",
        "ray: Flower's simulation engine; inprocess: every client called in this process, no Ray",
        choices=Choices("simulation backend", lambda: SIMULATION_BACKENDS),
    )
    client_cpus: float = key(1.0, "Ray CPUs per client; 0.5 runs two clients per core", gt=0)
    client_gpus: float = key(0.0, "Ray GPUs per client; fractions share a GPU", ge=0)
    ray_address: str | None = key(None, "attach to an existing Ray cluster (or set RAY_ADDRESS)")
    server_device: str = key(
        "cpu",
        "the server's evaluation and alignment",
        choices=Choices("device", lambda: ("cpu", "cuda", "auto")),
    )
    max_restarts: int = key(
        2,
        "restarts from the last checkpoint on a fresh actor pool after a client worker dies",
        ge=0,
    )
    fast_dispatch: bool = key(
        True, "message dispatch in O(messages), no info query (fedalign/fl/dispatch.py)"
    )
    shared_data: bool = key(
        True,
        "clients map one copy of the data written in the run folder (fedalign/data/shared.py)",
    )
    ray_dashboard: bool = key(
        False, "Ray's dashboard for this run (needs fedalign[dashboard], i.e. ray[default])"
    )


@dataclass(frozen=True)
class OutputConfig:
    """What a run writes into its folder."""

    dir: str = key("runs", "parent folder of the run folders")
    save_model: bool = key(True, "write the final model.safetensors")
    plot: bool = key(True, "draw accuracy.png")
    checkpoint_every: int = key(1, "checkpoint every k rounds (0: none)", ge=0)
    keep_checkpoints: int = key(2, "newest checkpoints kept", ge=1)
    trackers: tuple[str, ...] = key(
        (), "copies of metrics.jsonl for tensorboard | mlflow (optional extras)"
    )


@dataclass(frozen=True)
class FaultConfig:
    """An injected client fault, for testing a federation's robustness."""

    round: int = key(REQUIRED, "the round it happens in", ge=1)
    client: int = key(REQUIRED, "the client (index) that misbehaves", ge=0)
    kind: str = key(REQUIRED, "the fault", choices=Choices("fault", lambda: FAULT_KINDS))
    factor: float = key(1e6, "scale: the factor its update is multiplied by")
    seconds: float = key(0.0, "slow: how late its (honest) reply comes", ge=0)


@dataclass(frozen=True)
class Seeds:
    """Seeds derived from the run seed; each may be pinned in the config."""

    partition: int = key(REQUIRED, "the partition of the data", ge=0)
    init: int = key(REQUIRED, "the global model's initialisation", ge=0)
    sampling: int = key(REQUIRED, "the clients sampled per round", ge=0)
    shuffle: int = key(REQUIRED, "the clients' data shuffling", ge=0)


@dataclass(frozen=True)
class RunConfig:
    """A run: every section below."""

    name: str = key("run", "the run folder's prefix")
    seed: int = key(0, "derives the partition, init, sampling and shuffling seeds", ge=0)
    data: DataConfig = key(DataConfig, "the dataset and its partition")
    model: ModelConfig = key(ModelConfig, "the model; other keys are its options")
    adapters: AdaptersConfig = key(AdaptersConfig, "LoRA fine-tuning: only adapters train, travel")
    train: TrainConfig = key(TrainConfig, "the clients' local training")
    strategy: StrategyConfig = key(StrategyConfig, "the server's strategy")
    aggregation: AggregationConfig = key(
        AggregationConfig, "fedavg / fedprox: the server's align -> fuse -> repair pipeline"
    )
    server_optimizer: ServerOptimizerConfig = key(
        ServerOptimizerConfig, "the server's step towards the fused model (FedAvgM, FedAdam, ...)"
    )
    simulation: SimulationConfig = key(SimulationConfig, "where clients run (Ray or in-process)")
    output: OutputConfig = key(OutputConfig, "what the run folder gets")
    faults: tuple[FaultConfig, ...] = key((), "injected client faults, to test robustness")
    seeds: Seeds | None = key(None, "pin derived seeds; the run folder's config records all four")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_plan(self, device: str = "cpu") -> Plan:
        """The server pipeline this config describes (``device``: where alignment runs)."""
        a = self.aggregation
        return Plan(
            align=a.align,
            solver=a.solver,
            fuse=a.fuse,
            repair=a.repair,
            options=dict(a.options),
            workers=a.workers,
            device=device,
        )

    @property
    def objective(self) -> str:
        """The client objective: the one named in ``train.objective``, else the strategy's."""
        return self.train.objective or STRATEGIES.get(self.strategy.name).meta.get(
            "objective", "plain"
        )

    @property
    def resolved_seeds(self) -> Seeds:
        assert self.seeds is not None, "load configs through load_config/from_dict"
        return self.seeds


def derive_seeds(seed: int) -> Seeds:
    """Four independent 31-bit seeds from one, so that changing e.g. the sampling seed does not
    change the partition."""
    words = np.random.SeedSequence(seed).generate_state(4, dtype=np.uint32)
    return Seeds(*(int(w) & 0x7FFFFFFF for w in words))


def clients_per_round(cfg: RunConfig) -> int:
    s = cfg.strategy
    return max(round(s.fraction_train * cfg.data.num_clients), s.min_train_clients)
