"""Derive a model's permutation spec from its computation graph (torch.fx).

The graph is walked once in topological order. Every tensor carries a *label*: the group acting on
its feature axis (channels of an NCHW tensor, the last axis otherwise) and the block size (``H*W``
after a flatten), or None when no group reaches it (the input, shapes). Layers with weights
consume the label of their input (their input axis) and create a new group (their output axis);
shape-preserving operations pass labels through; additions and other elementwise combinations
merge the groups of their operands (union-find), which is how a residual stream ends up with one
group. Whatever reaches the model's output is the classifier's axis and is never permuted.
Shapes come from running the traced graph on an example input (``ShapeProp``).
"""

from __future__ import annotations

import builtins
import operator
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .spec import AxisRef, PermutationSpec


class UnsupportedModuleError(ValueError):
    """The model uses a module or function whose effect on unit order is not known."""


@dataclass(frozen=True)
class _Label:
    """The group on a tensor's feature axis; ``block`` entries per unit (``H*W`` after flatten)."""

    group: int
    block: int = 1


@dataclass(frozen=True)
class _LSTMOutput:
    """``lstm(x)``: the tuple ``(out, (h, c))``; every tensor in it carries ``hidden``."""

    hidden: _Label


@dataclass(frozen=True)
class _LSTMState:
    """The ``(h, c)`` pair of an LSTM."""

    hidden: _Label


# Operations that act on every unit alike (elementwise, pooling over space, normalising along an
# axis): permuting their input permutes their output the same way.
_PASS_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.Mish,
    nn.Hardswish,
    nn.Hardtanh,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Softmax,
    nn.LogSoftmax,
)
_PASS_FUNCTIONS = {
    torch.relu,
    F.relu,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.gelu,
    F.silu,
    torch.tanh,
    F.tanh,
    torch.sigmoid,
    F.sigmoid,
    F.softplus,
    F.mish,
    F.hardswish,
    F.hardtanh,
    F.dropout,
    F.dropout2d,
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
    torch.max_pool2d,
    F.softmax,
    F.log_softmax,
    torch.softmax,
    torch.log_softmax,
    operator.neg,
}
_PASS_METHODS = {
    "relu",
    "relu_",
    "tanh",
    "sigmoid",
    "contiguous",
    "clone",
    "detach",
    "float",
    "double",
    "to",
    "softmax",
    "log_softmax",
    "neg",
}
_ELEMENTWISE = {
    operator.add,
    operator.iadd,
    operator.sub,
    operator.isub,
    operator.mul,
    operator.imul,
    operator.truediv,
    operator.itruediv,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
}
_ELEMENTWISE_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze"}
_NON_TENSOR_ATTRIBUTES = {"shape", "dtype", "device", "ndim"}
_NON_TENSOR_METHODS = {"size", "dim"}


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> int:
        """Merge two groups; the older one (smaller id) names the result."""
        ra, rb = self.find(a), self.find(b)
        self.parent[max(ra, rb)] = min(ra, rb)
        return min(ra, rb)


def _flat_args(args) -> list:
    """Every leaf of nested argument tuples/lists/dicts."""
    if isinstance(args, (tuple, list)):
        return [leaf for a in args for leaf in _flat_args(a)]
    if isinstance(args, dict):
        return _flat_args(list(args.values()))
    return [args]


def _shape(node) -> tuple[int, ...] | None:
    """The traced output shape of ``node`` (None for non-tensors and constants)."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _feature_axis(shape: tuple[int, ...]) -> int:
    return 1 if len(shape) == 4 else len(shape) - 1


class _Walker:
    def __init__(self, gm: fx.GraphModule, shapes: dict[str, tuple[int, ...]]) -> None:
        self.modules = dict(gm.named_modules())
        self.called: set[str] = set()
        self.graph = gm.graph
        self.shapes = shapes
        self.uf = _UnionFind()
        self.labels: dict[fx.Node, object] = {}
        self.refs: dict[int, list[AxisRef]] = defaultdict(list)
        self.sizes: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.buffers: set[str] = set()
        self.consumed_at: dict[int, str] = {}

    # ---- helpers ------------------------------------------------------------------------------

    def new_group(self, name: str, size: int) -> _Label:
        g = self.uf.new()
        self.sizes[g], self.names[g] = size, name
        return _Label(g)

    def act(self, label: _Label | None, key: str, axis: int, repeat: int = 1) -> None:
        if label is not None and key in self.shapes:
            self.refs[label.group].append(AxisRef(key, axis, label.block, repeat))

    def act_on_params(
        self, label: _Label | None, name: str, params: tuple[str, ...], axis: int = 0
    ) -> None:
        for p in params:
            self.act(label, f"{name}.{p}", axis)

    def consume(self, node: fx.Node, label: _Label | None) -> None:
        """Remember which node's output is the group's activation (the first consumer's input)."""
        if label is not None:
            self.consumed_at.setdefault(label.group, node.args[0].name)

    def label_of(self, arg) -> object:
        return self.labels.get(arg) if isinstance(arg, fx.Node) else None

    def labelled(self, args) -> list:
        return [
            self.labels[a]
            for a in _flat_args(args)
            if isinstance(a, fx.Node) and self.labels.get(a) is not None
        ]

    # ---- the walk -----------------------------------------------------------------------------

    def run(self) -> PermutationSpec:
        for node in self.graph.nodes:
            if node.op == "placeholder":
                self.labels[node] = None
            elif node.op == "get_attr":
                raise UnsupportedModuleError(
                    f"parameter {node.target!r} is used outside its module "
                    "(get_attr); permutation_spec cannot follow it"
                )
            elif node.op == "call_module":
                module = self.modules[node.target]
                if node.target in self.called and any(
                    True for _ in module.parameters(recurse=False)
                ):
                    raise UnsupportedModuleError(
                        f"module {node.target!r} ({type(module).__name__}) is called more than "
                        "once: shared weights cannot be permuted for each use"
                    )
                self.called.add(node.target)
                self.labels[node] = self.module(node, module)
            elif node.op in ("call_function", "call_method"):
                if not self.labelled((node.args, node.kwargs)):
                    self.labels[node] = None  # no group reaches it: input preprocessing, shapes
                elif node.op == "call_function":
                    self.labels[node] = self.function(node)
                else:
                    self.labels[node] = self.method(node)
            elif node.op == "output":
                return self.finish(node)
        raise AssertionError("graph without output")

    def module(self, node: fx.Node, m: nn.Module):
        name = node.target
        where = f"module {name!r} ({type(m).__name__})"
        x = self.label_of(node.args[0])
        shape = _shape(node.args[0])
        if isinstance(m, nn.Linear):
            if x is not None and shape is not None and _feature_axis(shape) != len(shape) - 1:
                raise UnsupportedModuleError(
                    f"{where}: Linear on an NCHW tensor acts on its last axis, not on "
                    "the channels that carry the units (flatten or pool first)"
                )
            self.act(x, f"{name}.weight", 1)
            self.consume(node, x)
            y = self.new_group(name, m.out_features)
            self.act_on_params(y, name, ("weight", "bias"))
            return y
        if isinstance(m, nn.Conv2d):
            if m.groups != 1:
                raise UnsupportedModuleError(
                    f"{where}: grouped/depthwise Conv2d (groups={m.groups})"
                )
            if x is not None and x.block != 1:
                raise UnsupportedModuleError(f"{where}: Conv2d after a flatten")
            self.act(x, f"{name}.weight", 1)
            self.consume(node, x)
            y = self.new_group(name, m.out_channels)
            self.act_on_params(y, name, ("weight", "bias"))
            return y
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if shape is not None and len(shape) == 3:
                raise UnsupportedModuleError(f"{where}: BatchNorm1d over (N, C, L) inputs")
            self.act_on_params(x, name, ("weight", "bias", "running_mean", "running_var"))
            self.buffers.update(
                k for k in (f"{name}.running_mean", f"{name}.running_var") if k in self.shapes
            )
            return x
        if isinstance(m, nn.GroupNorm):
            if m.num_groups != 1:
                raise UnsupportedModuleError(
                    f"{where}: GroupNorm with {m.num_groups} groups (only 1 keeps "
                    "every channel permutation)"
                )
            self.act_on_params(x, name, ("weight", "bias"))
            return x
        if isinstance(m, nn.LayerNorm):
            if len(m.normalized_shape) != 1 or (shape is not None and len(shape) == 4):
                raise UnsupportedModuleError(
                    f"{where}: LayerNorm over anything but the last, feature axis"
                )
            self.act_on_params(x, name, ("weight", "bias"))
            return x
        if isinstance(m, nn.Embedding):
            y = self.new_group(name, m.embedding_dim)
            self.act(y, f"{name}.weight", 1)
            return y
        if isinstance(m, nn.LSTM):
            return self.lstm(node, name, m, x)
        if isinstance(m, _PASS_MODULES) or (isinstance(m, nn.Flatten) and x is None):
            return x
        if isinstance(m, nn.Flatten):
            return self.reshape(node, node.args[0])
        raise UnsupportedModuleError(
            f"{where} is not supported by permutation_spec; write its spec by hand"
        )

    def lstm(self, node: fx.Node, name: str, m: nn.LSTM, x) -> _LSTMOutput:
        """One layer: the hidden group acts on the rows of each of the 4 gate blocks of both
        weight matrices and biases, on the columns of ``weight_hh``; the input group on the
        columns of ``weight_ih``."""
        where = f"module {name!r} (LSTM)"
        if m.num_layers != 1 or m.bidirectional or m.proj_size:
            raise UnsupportedModuleError(
                f"{where}: only single-layer, unidirectional LSTMs without projection are supported"
            )
        if len(node.args) > 1 or node.kwargs:
            raise UnsupportedModuleError(f"{where}: LSTM called with an initial state")
        self.consume(node, x)
        self.act(x, f"{name}.weight_ih_l0", 1)
        h = self.new_group(name, m.hidden_size)
        for p in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
            self.act(h, f"{name}.{p}", 0, repeat=4)
        self.act(h, f"{name}.weight_hh_l0", 1)
        return _LSTMOutput(h)

    def reshape(self, node: fx.Node, src: fx.Node):
        """Flatten ``(N, C, H, W) -> (N, C*H*W)`` (channel runs of ``H*W``), or any reshape that
        keeps the feature axis (last axis) whole."""
        x = self.label_of(src)
        shape_in, shape_out = _shape(src), _shape(node)
        if shape_in is None or shape_out is None:
            raise UnsupportedModuleError(f"{node.name}: reshape of a tensor of unknown shape")
        if len(shape_in) == 4 and shape_out == (
            shape_in[0],
            shape_in[1] * shape_in[2] * shape_in[3],
        ):
            return _Label(x.group, x.block * shape_in[2] * shape_in[3])
        if len(shape_in) != 4 and len(shape_out) != 4 and shape_out[-1] == shape_in[-1]:
            return x
        raise UnsupportedModuleError(
            f"{node.name}: reshape {shape_in} -> {shape_out}; only NCHW -> "
            "(N, C*H*W) or reshapes keeping the last axis are supported"
        )

    def elementwise(self, node: fx.Node):
        """Operands combined elementwise must share one permutation: merge their groups."""
        operands = list(node.args[:2])
        labels = [self.label_of(a) for a in operands]
        for a, label in zip(operands, labels):
            if label is None and isinstance(a, fx.Node) and _shape(a):
                raise UnsupportedModuleError(
                    f"{node.name}: combines a permuted tensor with a tensor no group acts on"
                )
        present = [label for label in labels if label is not None]
        if not all(isinstance(label, _Label) for label in present):
            raise UnsupportedModuleError(f"{node.name}: arithmetic on an LSTM's output tuple")
        first = present[0]
        for other in present[1:]:
            if other.block != first.block:
                raise UnsupportedModuleError(f"{node.name}: combines tensors of different layouts")
            first = _Label(self.uf.union(first.group, other.group), first.block)
        return first

    def transpose(self, node: fx.Node):
        """``transpose``/``permute`` of a non-image tensor that keeps the feature (last) axis last,
        e.g. ``(N, T, E) -> (T, N, E)`` before a sequence-first LSTM."""
        src, *dims = node.args
        shape = _shape(src)
        if shape is not None and len(shape) != 4:
            last = len(shape) - 1
            if node.target == "permute":
                order = (
                    tuple(dims[0])
                    if len(dims) == 1 and isinstance(dims[0], (tuple, list))
                    else tuple(dims)
                )
                keeps = len(order) == len(shape) and order[-1] % len(shape) == last
            else:
                keeps = len(dims) == 2 and all(d % len(shape) != last for d in dims)
            if keeps:
                return self.label_of(src)
        raise UnsupportedModuleError(
            f"{node.name}: {node.target if isinstance(node.target, str) else 'transpose'} "
            "that moves the feature axis"
        )

    def spatial_mean(self, node: fx.Node):
        """``x.mean((2, 3))`` over an NCHW tensor (global average pooling) keeps the channel
        axis."""
        src = node.args[0]
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
        shape = _shape(src)
        if (
            shape is None
            or not dims
            or any(d % len(shape) in (0, _feature_axis(shape)) for d in dims)
        ):
            raise UnsupportedModuleError(f"{node.name}: mean over the batch or feature axis")
        out = _shape(node)
        if out is None or len(out) not in (2, 4):
            # (N, C, H) would put the channels where a 3-d tensor's feature axis is not
            raise UnsupportedModuleError(
                f"{node.name}: a mean that leaves {out} (pool both spatial axes or keep "
                "the dimensions)"
            )
        return self.label_of(src)

    def function(self, node: fx.Node):
        f = node.target
        if f in _PASS_FUNCTIONS:
            return self.label_of(node.args[0])
        if f in _ELEMENTWISE:
            return self.elementwise(node)
        if f is torch.flatten:
            return self.reshape(node, node.args[0])
        if f is torch.mean:
            return self.spatial_mean(node)
        if f is torch.transpose:
            return self.transpose(node)
        if f is operator.getitem:
            return self.getitem(node)
        if f is builtins.getattr and node.args[1] in _NON_TENSOR_ATTRIBUTES:
            return None
        raise UnsupportedModuleError(
            f"function {getattr(f, '__name__', f)!r} (node {node.name}) is "
            "not supported by permutation_spec; write its spec by hand"
        )

    def getitem(self, node: fx.Node):
        src, index = node.args
        label = self.label_of(src)
        if isinstance(label, _LSTMOutput):
            return label.hidden if index == 0 else _LSTMState(label.hidden)
        if isinstance(label, _LSTMState):
            return label.hidden
        shape = _shape(src)
        idx = index if isinstance(index, tuple) else (index,)
        keeps_last_axis = (
            shape is not None
            and Ellipsis not in idx
            and (len(idx) < len(shape) or (len(idx) == len(shape) and idx[-1] == slice(None)))
        )
        if keeps_last_axis and len(shape) != 4:
            return label
        raise UnsupportedModuleError(
            f"indexing {node.name}: only indexing that keeps the feature axis "
            "(the last of a non-image tensor) whole is supported"
        )

    def method(self, node: fx.Node):
        target = node.target
        if target in _PASS_METHODS:
            return self.label_of(node.args[0])
        if target in _NON_TENSOR_METHODS:
            return None
        if target in _ELEMENTWISE_METHODS:
            return self.elementwise(node)
        if target in _RESHAPE_METHODS:
            return self.reshape(node, node.args[0])
        if target == "mean":
            return self.spatial_mean(node)
        if target in ("transpose", "permute"):
            return self.transpose(node)
        raise UnsupportedModuleError(
            f"tensor method {target!r} (node {node.name}) is not "
            "supported by permutation_spec; write its spec by hand"
        )

    def finish(self, output: fx.Node) -> PermutationSpec:
        fixed = set()
        for label in self.labelled(output.args):
            fixed.add(
                self.uf.find(label.group if isinstance(label, _Label) else label.hidden.group)
            )
        merged: dict[int, list[AxisRef]] = defaultdict(list)
        for g, refs in self.refs.items():
            merged[self.uf.find(g)].extend(refs)
        groups, sizes, activations = {}, {}, {}
        for root, refs in sorted(merged.items()):
            if root in fixed:
                continue
            name = self.names[root]
            groups[name] = tuple(dict.fromkeys(refs))
            sizes[name] = self.sizes[root]
            sites = [node for g, node in self.consumed_at.items() if self.uf.find(g) == root]
            if sites:
                activations[name] = sites[0]
        keys = {ref.key for refs in groups.values() for ref in refs}
        return PermutationSpec(
            groups, sizes, self.shapes, frozenset(self.buffers & keys), activations
        )


def default_example_input(model: nn.Module) -> torch.Tensor:
    """A batch of 2 shaped for the model's first layer: token ids for an Embedding, features for a
    Linear, square images of side ``model.image_size`` (default 28) for a Conv2d."""
    first = next(
        (m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding))), None
    )
    if isinstance(first, nn.Embedding):
        return torch.zeros(2, 5, dtype=torch.long)
    if isinstance(first, nn.Linear):
        return torch.zeros(2, first.in_features)
    if isinstance(first, nn.Conv2d):
        side = getattr(model, "image_size", 28)
        return torch.zeros(2, first.in_channels, side, side)
    raise UnsupportedModuleError(
        f"cannot guess an example input for {type(model).__name__}; pass example_input"
    )


def trace_model(model: nn.Module, example_input: torch.Tensor | None = None) -> fx.GraphModule:
    """The fx graph of ``model`` with output shapes recorded (run in eval mode on
    ``example_input``; every submodule's training flag is restored afterwards)."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # fx raises several types for untraceable Python (control flow etc.)
        raise UnsupportedModuleError(f"torch.fx cannot trace {type(model).__name__}: {e}") from e
    if example_input is None:
        example_input = default_example_input(model)
    modes = {m: m.training for m in gm.modules()}
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
    finally:
        for m, training in modes.items():
            m.train(training)
    return gm


def permutation_spec(
    model: nn.Module, example_input: torch.Tensor | None = None
) -> PermutationSpec:
    """Derive the permutation spec of ``model`` by tracing it on ``example_input`` (a batch;
    default from the first layer, see ``default_example_input``).

    Conv -> flatten -> Linear gives blocks of ``H*W`` columns; residual additions share one group
    per stream; LSTM hidden units act on the four gate blocks; the output axis is never permuted.
    Raises ``UnsupportedModuleError`` naming the first module or function it cannot handle.
    """
    gm = trace_model(model, example_input)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return _Walker(gm, shapes).run()
