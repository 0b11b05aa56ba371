"""``fedalign merge``: the pipeline applied offline to saved checkpoints reproduces what
``pipeline.aggregate`` fuses from the same states and statistics; bad input is one line, exit 2."""

import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fedalign.algorithms.align import permutation_spec
from fedalign.algorithms.pipeline import Plan, aggregate
from fedalign.algorithms.stats import StatContext, client_statistics, received_statistics
from fedalign.cli import main
from fedalign.client.training import train_local
from fedalign.core.tensors import weighted_average
from fedalign.data import dataset_arrays
from tests.fl.test_strategies import assert_same_state
from tests.helpers import seeded_model, with_state

HIDDEN = [24]
SAMPLES = 200


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two digits MLPs from their own inits, each trained briefly on its half of the data."""
    folder = tmp_path_factory.mktemp("merge")
    arrays = dataset_arrays("digits", "train", None)
    X, y = torch.as_tensor(arrays.X), torch.as_tensor(arrays.y)
    paths = []
    for j in range(2):
        model = seeded_model("mlp", seed=10 + j, in_features=64, hidden=HIDDEN)
        half = slice(j * len(y) // 2, (j + 1) * len(y) // 2)
        train_local(model, X[half], y[half], epochs=1, lr=0.1, seed=j)
        paths.append(folder / f"client{j}.safetensors")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, paths[-1])
    return paths


def expected_fusion(paths, plan: Plan, seed: int) -> dict:
    """``aggregate`` over the same states, each statistic computed on the sample ``--samples``
    and ``--seed`` draw, the way a client computes it on its data."""
    arrays = dataset_arrays("digits", "train", None)
    index = np.sort(np.random.default_rng(seed).choice(len(arrays.y), SAMPLES, replace=False))
    X, y = torch.as_tensor(arrays.X[index]), torch.as_tensor(arrays.y[index])
    states = [load_file(p) for p in paths]
    model = seeded_model("mlp", in_features=64, hidden=HIDDEN)
    models = [with_state(model, s) for s in states]

    def measure(kinds, j, state, **context):
        sent = client_statistics(
            kinds, with_state(model, state), X, y, StatContext(seed=seed + j, **context)
        )
        return received_statistics(sent, state)

    outcome = aggregate(
        plan,
        permutation_spec(model),
        states,
        [1.0, 1.0],
        [measure(plan.train_statistics(), j, s) for j, s in enumerate(states)],
        lambda ref, others: {
            j: measure(plan.align_statistics(), j, states[j], reference=models[ref]) for j in others
        },
        lambda fused, targets: [
            measure(plan.repair_statistics(), j, fused, targets=targets) for j in range(2)
        ],
        seed=seed,
    )
    return outcome.state


@pytest.mark.parametrize(
    ("align", "fuse", "repair"),
    [("weight", "regmean", "repair"), ("activation", "mean", "none")],
)
def test_merge_reproduces_the_pipelines_fusion(checkpoints, tmp_path, align, fuse, repair):
    out = tmp_path / "merged.safetensors"
    argv = [*map(str, checkpoints), "--model", "mlp", "--model-opt", f"hidden={HIDDEN}"]
    argv += ["--align", align, "--fuse", fuse, "--repair", repair, "--data", "digits"]
    argv += ["--samples", str(SAMPLES), "--seed", "3", "--out", str(out)]
    assert main(["merge", *argv]) == 0
    merged = load_file(out)
    plan = Plan(align=align, fuse=fuse, repair=repair)
    assert_same_state(merged, expected_fusion(checkpoints, plan, seed=3))
    with pytest.raises(AssertionError):  # alignment changed the fusion: not the plain mean
        states = [load_file(p) for p in checkpoints]
        assert_same_state(merged, weighted_average(states, [1.0, 1.0]))


def test_merge_without_statistics_needs_no_data(checkpoints, tmp_path, capsys):
    out = tmp_path / "merged.safetensors"
    assert main(["merge", *map(str, checkpoints), "--model", "mlp", "--out", str(out)]) == 0
    states = [load_file(p) for p in checkpoints]
    assert_same_state(load_file(out), weighted_average(states, [1.0, 1.0]))
    assert "align none, fuse mean" in capsys.readouterr().out


def bad_inputs(checkpoints, tmp_path):
    text = tmp_path / "notes.safetensors"
    text.write_text("not tensors")
    pickled = tmp_path / "model.safetensors"
    pickled.write_bytes(pickle.dumps({"w": [1.0]}))
    other = tmp_path / "wide.safetensors"
    wide = seeded_model("mlp", in_features=64, hidden=[32]).state_dict()
    save_file({k: v.contiguous() for k, v in wide.items()}, other)
    alien = [tmp_path / f"alien{j}.safetensors" for j in range(2)]
    for path in alien:
        save_file({"encoder.weight": torch.zeros(3, 3)}, path)
    a, b = map(str, checkpoints)
    return [
        ([*map(str, alien)], "alien0.safetensors does not fit model mlp"),
        ([a, str(text)], "notes.safetensors: not a readable safetensors file"),
        ([a, str(pickled)], "model.safetensors: not a readable safetensors file"),
        ([a, str(tmp_path / "missing.safetensors")], "missing.safetensors: no such file"),
        ([a, str(other)], "wide.safetensors: differs from"),
        ([a], "at least two checkpoints"),
        ([a, b, "--fuse", "regmean"], "give --data NAME"),
        ([a, b, "--fuse", "no-such-rule"], "aggregation.fuse: unknown fuse rule 'no-such-rule'"),
        ([a, b, "--align", "pfnm"], "merge takes a permutation aligner"),
        ([a, b, "--opt", "rigde=1"], "unknown key 'aggregation.rigde'"),
        ([a, b, "--model-opt", "hidden=[7, 7]"], "but --model-opt {'hidden': [7, 7]} builds"),
        ([a, b, "--model-opt", "hidden=[7]"], "layers.0.weight is (24, 64) but --model-opt"),
        ([a, b, "--align", "activation", "--data", "fashion-mnist"], "does not take its inputs"),
        ([a, b, "--out", a], "is one of the checkpoints being merged"),
        ([a, b, "--out", str(tmp_path)], "is a folder"),
        ([a, b, "--opt", "ridge=-1", "--fuse", "regmean", "--data", "digits"], "ridge"),
    ]


def test_bad_input_is_one_line_and_exit_2(checkpoints, tmp_path, capsys):
    before = [p.read_bytes() for p in checkpoints]
    for args, message in bad_inputs(checkpoints, tmp_path):
        out = tmp_path / "out.safetensors"
        code = main(["merge", "--out", str(out), *args, "--model", "mlp"])
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        assert message in err and err.count("\n") == 1, (args, err)
        assert not out.exists()
    assert [p.read_bytes() for p in checkpoints] == before


def test_merge_eval_scores_each_input_and_the_result(checkpoints, tmp_path, capsys):
    """--eval prints the test accuracy of each checkpoint and of the merge, each the accuracy
    ``evaluate`` gives that state on the test split."""
    from fedalign.client.training import evaluate

    out = tmp_path / "merged.safetensors"
    args = ["merge", *map(str, checkpoints), "--model", "mlp", "--data", "digits", "--eval"]
    assert main([*args, "--out", str(out)]) == 0
    shown = capsys.readouterr().out
    test = dataset_arrays("digits", "test", None)
    for label, path in [*((str(p), p) for p in checkpoints), ("merged", out)]:
        model = with_state(seeded_model("mlp", in_features=64, hidden=HIDDEN), load_file(path))
        accuracy = evaluate(model, test.X, test.y)[1]
        assert f"{accuracy:7.2%}  {label}" in shown
    code = main(["merge", *map(str, checkpoints), "--model", "mlp", "--eval", "--out", str(out)])
    assert code == 2 and "--eval needs --data" in capsys.readouterr().err
