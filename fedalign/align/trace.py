"""Derive a model's permutation spec from its computation graph (torch.fx).

The graph is walked once in topological order. Every tensor carries a *label*: the group acting on
its feature axis (channels of an NCHW tensor, the last axis otherwise) and the block size (``H*W``
after a flatten). Layers with weights consume the label of their input (their input axis) and
create a new group (their output axis); shape-preserving operations pass labels through;
additions merge the groups of their operands, which is how a residual stream ends up with one
group. Whatever reaches the model's output is the classifier's axis and is never permuted.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from .spec import AxisRef, PermutationSpec


class UnsupportedModuleError(ValueError):
    """The model uses a module or function whose effect on unit order is not known."""


@dataclass(frozen=True)
class _Label:
    group: int
    block: int = 1


_PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softplus,
    nn.Mish, nn.Hardswish, nn.Dropout, nn.Dropout2d, nn.Identity, nn.MaxPool2d, nn.AvgPool2d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)
_PASS_FUNCTIONS = {
    torch.relu, F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, torch.tanh, F.tanh,
    torch.sigmoid, F.sigmoid, F.softplus, F.mish, F.hardswish, F.dropout, F.max_pool2d,
    F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.max_pool2d,
    F.dropout2d,
}
_PASS_METHODS = {"relu", "tanh", "sigmoid", "contiguous", "clone", "detach", "float", "to"}
_ADD = {operator.add, operator.iadd, torch.add}


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
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)
        return min(ra, rb)


def _feature_axis(shape: tuple[int, ...] | None) -> int:
    return 1 if shape is not None and len(shape) == 4 else -1


class _Walker:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.uf = _UnionFind()
        self.labels: dict[fx.Node, object] = {}
        self.refs: dict[int, list[AxisRef]] = defaultdict(list)
        self.sizes: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.buffers: set[str] = set()
        self.consumed_at: dict[int, str] = {}

    # ---- helpers --------------------------------------------------------------------------

    def new_group(self, name: str, size: int) -> int:
        g = self.uf.new()
        self.sizes[g], self.names[g] = size, name
        return g

    def act(self, label: _Label | None, key: str, axis: int, repeat: int = 1) -> None:
        if label is not None:
            self.refs[label.group].append(AxisRef(key, axis, label.block, repeat))

    def consume(self, node: fx.Node, label: _Label | None) -> None:
        """Remember which node's output is the group's activation (the first consumer's input)."""
        if label is not None:
            self.consumed_at.setdefault(label.group, node.args[0].name)

    @staticmethod
    def shape(node) -> tuple[int, ...] | None:
        """The traced output shape of ``node`` (None for non-tensors)."""
        tm = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None

    def label_of(self, arg) -> object:
        return self.labels.get(arg) if isinstance(arg, fx.Node) else None

    # ---- node rules -------------------------------------------------------------------------

    def run(self) -> PermutationSpec:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.labels[node] = None
            elif node.op == "get_attr":
                raise UnsupportedModuleError(f"get_attr node {node.target!r}: parameters used "
                                             "outside their module are not supported")
            elif node.op == "call_module":
                self.labels[node] = self.module(node, self.modules[node.target])
            elif node.op == "call_function":
                self.labels[node] = self.function(node)
            elif node.op == "call_method":
                self.labels[node] = self.method(node)
            elif node.op == "output":
                return self.finish(node)
        raise AssertionError("graph without output")

    def module(self, node: fx.Node, m: nn.Module):
        name = node.target
        x = self.label_of(node.args[0])
        if isinstance(m, nn.Linear):
            self.act(x, f"{name}.weight", 1)
            self.consume(node, x)
            return self.producer(name, m.out_features, ["weight", "bias"], m)
        if isinstance(m, nn.Conv2d):
            if m.groups != 1:
                raise UnsupportedModuleError(f"{name}: grouped/depthwise Conv2d (groups={m.groups})")
            if x is not None and x.block != 1:
                raise UnsupportedModuleError(f"{name}: Conv2d after a flatten")
            self.act(x, f"{name}.weight", 1)
            self.consume(node, x)
            return self.producer(name, m.out_channels, ["weight", "bias"], m)
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            for p in ("weight", "bias", "running_mean", "running_var"):
                if getattr(m, p, None) is not None:
                    self.act(x, f"{name}.{p}", 0)
            self.buffers.update({f"{name}.running_mean", f"{name}.running_var"})
            return x
        if isinstance(m, nn.GroupNorm):
            if m.num_groups != 1:
                raise UnsupportedModuleError(f"{name}: GroupNorm with {m.num_groups} groups (only 1)")
            for p in ("weight", "bias"):
                if getattr(m, p, None) is not None:
                    self.act(x, f"{name}.{p}", 0)
            return x
        if isinstance(m, nn.LayerNorm):
            if len(m.normalized_shape) != 1:
                raise UnsupportedModuleError(f"{name}: LayerNorm over several dimensions")
            for p in ("weight", "bias"):
                if getattr(m, p, None) is not None:
                    self.act(x, f"{name}.{p}", 0)
            return x
        if isinstance(m, nn.Embedding):
            return self.producer(name, m.embedding_dim, [], m, axis=1)
        if isinstance(m, nn.LSTM):
            return self.lstm(node, name, m, x)
        if isinstance(m, nn.Flatten):
            return self.flatten(node.args[0], m.start_dim)
        if isinstance(m, _PASS_MODULES):
            return x
        raise UnsupportedModuleError(f"module {name!r} ({type(m).__name__}) is not supported by "
                                     "permutation_spec; write its spec by hand")

    def producer(self, name: str, size: int, params: list[str], m: nn.Module, axis: int = 0) -> _Label:
        g = self.new_group(name, size)
        label = _Label(g)
        if isinstance(m, nn.Embedding):
            self.act(label, f"{name}.weight", axis)
        for p in params:
            if getattr(m, p, None) is not None:
                self.act(label, f"{name}.{p}", 0)
        return label

    def lstm(self, node: fx.Node, name: str, m: nn.LSTM, x) -> tuple:
        if m.num_layers != 1 or m.bidirectional or m.proj_size:
            raise UnsupportedModuleError(f"{name}: only single-layer, unidirectional LSTMs without "
                                         "projection are supported")
        self.consume(node, x)
        self.act(x, f"{name}.weight_ih_l0", 1)
        g = self.new_group(name, m.hidden_size)
        h = _Label(g)
        for p in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
            if getattr(m, p, None) is not None:
                self.act(h, f"{name}.{p}", 0, repeat=4)
        self.act(h, f"{name}.weight_hh_l0", 1)
        return ("lstm", h)

    def flatten(self, arg, start_dim: int):
        x = self.label_of(arg)
        shape = self.shape(arg)
        if x is None or shape is None or len(shape) == 2:
            return x
        if start_dim != 1 or len(shape) != 4:
            raise UnsupportedModuleError(f"flatten of {arg.name} from dim {start_dim}: only "
                                         "NCHW -> (N, C*H*W) is supported")
        return _Label(x.group, x.block * shape[2] * shape[3])

    def function(self, node: fx.Node):
        f = node.target
        args = node.args
        if f in _PASS_FUNCTIONS:
            return self.label_of(args[0])
        if f in _ADD:
            a, b = (self.label_of(v) for v in args[:2])
            if isinstance(a, _Label) and isinstance(b, _Label):
                if a.block != b.block:
                    raise UnsupportedModuleError(f"{node.name}: adding tensors of different layouts")
                return _Label(self.uf.union(a.group, b.group), a.block)
            return a if isinstance(a, _Label) else b
        if f is torch.flatten:
            return self.flatten(args[0], args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0))
        if f is torch.mean:
            dims = args[1] if len(args) > 1 else node.kwargs.get("dim")
            dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
            shape = self.shape(args[0])
            if shape is None or not dims or any(d % len(shape) in (0, _feature_axis(shape) % len(shape)) for d in dims):
                raise UnsupportedModuleError(f"{node.name}: mean over the batch or feature axis")
            return self.label_of(args[0])
        if f is operator.getitem:
            return self.getitem(node)
        raise UnsupportedModuleError(f"function {getattr(f, '__name__', f)!r} (node {node.name}) is "
                                     "not supported by permutation_spec; write its spec by hand")

    def getitem(self, node: fx.Node):
        src, index = node.args
        label = self.label_of(src)
        if isinstance(label, tuple) and label[0] == "lstm":
            return label[1] if index == 0 else ("lstm-state", label[1])
        if isinstance(label, tuple) and label[0] == "lstm-state":
            return label[1]
        shape = self.shape(src)
        idx = index if isinstance(index, tuple) else (index,)
        if shape is not None and Ellipsis not in idx and len(idx) < len(shape):
            return label  # the feature axis (last) is untouched
        if shape is not None and len(idx) == len(shape) and idx[-1] == slice(None):
            return label
        raise UnsupportedModuleError(f"indexing {node.name}: only indexing that keeps the last axis "
                                     "whole is supported")

    def method(self, node: fx.Node):
        if node.target in _PASS_METHODS:
            return self.label_of(node.args[0])
        if node.target in ("view", "reshape", "flatten"):
            shape_in, shape_out = self.shape(node.args[0]), self.shape(node)
            if node.target == "flatten" or (shape_in is not None and shape_out is not None
                                            and len(shape_out) == 2 and len(shape_in) == 4):
                return self.flatten(node.args[0], 1)
        if node.target == "mean":
            return self.function(fx.Node(node.graph, node.name, "call_function", torch.mean,
                                         node.args, node.kwargs))
        raise UnsupportedModuleError(f"tensor method {node.target!r} (node {node.name}) is not "
                                     "supported by permutation_spec")

    def finish(self, output: fx.Node) -> PermutationSpec:
        out = self.label_of(output.args[0])
        fixed = {self.uf.find(out.group)} if isinstance(out, _Label) else set()
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
            at = [self.consumed_at[g] for g in self.consumed_at if self.uf.find(g) == root]
            if at:
                activations[name] = at[0]
        keys = {ref.key for refs in groups.values() for ref in refs}
        return PermutationSpec(groups, sizes, frozenset(self.buffers & keys), activations)


def default_example_input(model: nn.Module) -> torch.Tensor:
    """A batch of 2 shaped for the model's first layer (zoo conventions: square images)."""
    first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding))), None)
    if isinstance(first, nn.Embedding):
        return torch.zeros(2, 5, dtype=torch.long)
    if isinstance(first, nn.Linear):
        return torch.zeros(2, first.in_features)
    if isinstance(first, nn.Conv2d):
        side = getattr(model, "image_size", 28)
        return torch.zeros(2, first.in_channels, side, side)
    raise UnsupportedModuleError("cannot guess an example input; pass example_input")


def trace_model(model: nn.Module, example_input: torch.Tensor | None = None) -> fx.GraphModule:
    gm = fx.symbolic_trace(model)
    was_training = model.training
    gm.eval()
    with torch.no_grad():
        ShapeProp(gm).propagate(example_input if example_input is not None else default_example_input(model))
    gm.train(was_training)
    return gm


def permutation_spec(model: nn.Module, example_input: torch.Tensor | None = None) -> PermutationSpec:
    """Derive the permutation spec of ``model`` by tracing it with ``example_input``.

    Conv -> flatten -> Linear gives blocks of ``H*W`` columns (hence the example input, for the
    shapes); residual additions share one group per stream; LSTM hidden units act on the four
    gate blocks; the output axis is never permuted. Raises ``UnsupportedModuleError`` naming the
    first module or function it cannot handle.
    """
    return _Walker(trace_model(model, example_input)).run()
