"""The in-process backend (``fedalign.runs.inprocess``) on a toy ClientApp, without Ray, and the
config side of ``simulation.backend``. The run against Ray's metrics is
tests/integration/test_inprocess.py."""

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedalign.config.load import load_config
from fedalign.core.errors import ConfigError
from fedalign.runs.inprocess import run_in_process
from fedalign.runs.runner import check_in_process, run
from tests.helpers import DIGITS, ROOT, shipped_overrides


def counting_client() -> ClientApp:
    """A ClientApp that counts the messages its node got (in ``Context.state``), answers with its
    partition and count, sets 3 torch threads as a client with ``client_cpus: 3`` would, and fails
    on a message that asks it to."""
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        torch.set_num_threads(3)
        if msg.content["config"]["fail"]:
            raise ValueError("asked to fail")
        seen = context.state.config_records.get("seen", ConfigRecord({"n": 0}))
        context.state["seen"] = ConfigRecord({"n": int(seen["n"]) + 1})
        metrics = {"partition": context.node_config["partition-id"], "seen": seen["n"] + 1}
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


def exchange(grid: Grid, nodes: list[int], fail: int | None = None) -> dict[int, Message]:
    messages = [
        Message(
            RecordDict({"config": ConfigRecord({"fail": node == fail})}),
            dst_node_id=node,
            message_type="query",
        )
        for node in nodes
    ]
    return {r.metadata.src_node_id: r for r in grid.send_and_receive(messages, timeout=10)}


def test_nodes_answer_in_this_process_and_keep_their_state():
    threads = torch.get_num_threads()
    seen: dict[str, object] = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        nodes = sorted(grid.get_node_ids())
        first = exchange(grid, nodes)
        seen["partitions"] = sorted(int(r.content["metrics"]["partition"]) for r in first.values())
        seen["threads"] = torch.get_num_threads()  # the server's, between exchanges
        again = exchange(grid, nodes[:2], fail=nodes[1])
        seen["counts"] = [int(again[nodes[0]].content["metrics"]["seen"])]
        seen["error"] = again[nodes[1]].error.reason
        seen["replies_to"] = {
            r.metadata.reply_to_message_id for r in again.values()
        }  # each reply names its message
        third = exchange(grid, nodes[1:2])
        seen["counts"].append(int(third[nodes[1]].content["metrics"]["seen"]))

    run_in_process(server, counting_client(), num_supernodes=3)
    assert seen["partitions"] == [0, 1, 2]
    assert seen["threads"] == threads and torch.get_num_threads() == threads
    # node 0 saw two messages; node 1's failed second message left its state as it was
    assert seen["counts"] == [2, 2]
    assert "ClientAppException" in seen["error"] and "asked to fail" in seen["error"]
    assert len(seen["replies_to"]) == 2 and "" not in seen["replies_to"]


def test_every_shipped_config_loads_for_the_in_process_backend():
    """The run configs (a suite's runs are its base run config with overrides; loading every
    suite, as tests/test_config.py does, takes tens of seconds)."""
    configs = [
        p for p in sorted((ROOT / "configs").glob("*.yaml")) if not p.name.startswith("bench_")
    ]
    assert len(configs) >= 10
    for path in configs:
        cfg = load_config(path, ["simulation.backend=inprocess", *shipped_overrides(path)])
        assert cfg.simulation.backend == "inprocess", path
        check_in_process(cfg)  # no Ray-only key it cannot honour


@pytest.mark.parametrize("key", ["ray_address=127.0.0.1:6379", "ray_dashboard=true"])
def test_ray_only_keys_are_refused_in_process(key, tmp_path):
    cfg = load_config(DIGITS, ["simulation.backend=inprocess", f"simulation.{key}"])
    with pytest.raises(ConfigError, match=f"simulation.{key.split('=')[0]}=.*backend: ray"):
        run(cfg, output_dir=tmp_path, progress=False)
    assert not any(tmp_path.iterdir())  # refused before any run folder
