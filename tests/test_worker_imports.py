"""What a Ray worker imports to answer its first client: the actor's module and the client app,
a model built for the state it received, and its local optimizer's steps leave out Flower's
simulation package (SQLAlchemy, FastAPI: the actor class of ``runs.ray_actor``), ``torch._dynamo``
(``torch.optim``'s classes: ``client.optim``) and SymPy (``empty_like`` of a meta tensor:
``models.build_for_state``). Each had cost every worker 0.35-1.1 s of CPU before its first client
(benchmarks.md, issue 27). One fresh interpreter for all of them: each costs the suite seconds."""

import pytest

pytest.importorskip("ray")

from tests.helpers import fresh_python

HEAVY = ("flwr.simulation", "sqlalchemy", "fastapi", "torch._dynamo", "sympy")


def test_a_workers_first_client_leaves_the_heavy_modules_unimported():
    code = (
        "import sys, torch\n"
        "import fedalign.runs.ray_actor, fedalign.fl.client_app\n"
        "from fedalign.client.training import train_local\n"
        "from fedalign.models import build_for_state, build_model\n"
        "state = build_model('lenet').state_dict()\n"
        "model = build_for_state(lambda: build_model('lenet'), state)\n"
        "for name in ('sgd', 'adam'):\n"
        "    train_local(model, torch.rand(20, 1, 28, 28), torch.randint(0, 10, (20,)),"
        " optimizer=name, momentum=0.9)\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    assert fresh_python(code) == "[]"
