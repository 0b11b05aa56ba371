"""Derive a model's permutation spec from its computation graph (torch.fx).

The graph is walked once in topological order. Every tensor carries a *label*: the group acting on
one of its axes, that axis counted from the end (so that broadcasting lines labels up: the channels
of an NCHW tensor are axis -3, the features of a sequence -1) and the block size (``H*W`` after a
flatten); or None when no group reaches it (the input, shapes, masks). Layers with weights consume
the label of their input (their input axis) and create a new group (their output axis);
shape-preserving operations pass labels through, reshapes and transposes move them; additions and
other elementwise combinations merge the groups of their operands (union-find), which is how a
residual stream ends up with one group: token and positional embeddings, every norm, every block's
input and output maps. A learned parameter read outside its module (``get_attr``: a positional
embedding, a class token) starts a group on its last axis, merged with whatever it is added to.
Whatever reaches the model's output is the classifier's axis and is never permuted. Shapes come
from running the traced graph on an example input (``ShapeProp``).

Attention: a view that splits a group's axis into ``(heads, d_head)`` gives a *heads* label;
``F.scaled_dot_product_attention`` merges the query's and the key's groups (a query/key dimension
must move in both) and records the attention: its query/key group, its value group (the output
projection's columns) and its head count. torch's ``nn.MultiheadAttention`` (packed
``in_proj_weight`` or separate query/key/value weights), ``nn.TransformerEncoderLayer`` (pre- and
post-norm give the same spec) and ``nn.TransformerEncoder`` are leaves for fx and have rules that
follow their structure. At the end, ``heads`` says how each attention's symmetry is expressed:
``"both"`` (heads move as wholes and dimensions move inside each head: a ``HeadSet`` that moves),
``"inner"`` (only the dimensions inside each head: a ``HeadSet`` that stays) or ``"blocks"`` (heads
as units of ``d_head`` entries: one ordinary group per attention).
"""

from __future__ import annotations

import builtins
import math
import operator
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .spec import AxisRef, HeadSet, PermutationSpec, Site

HEADS = ("both", "inner", "blocks")
"""How ``permutation_spec`` expresses an attention's symmetry (see the module docstring)."""


class UnsupportedModuleError(ValueError):
    """The model uses a module or function whose effect on unit order is not known."""


@dataclass(frozen=True)
class _Label:
    """The group on axis ``axis`` (negative: from the end) of a tensor; ``block`` entries per unit
    (``H*W`` after a flatten)."""

    group: int
    block: int = 1
    axis: int = -1


@dataclass(frozen=True)
class _Heads:
    """A group's units split into ``heads`` heads (axis ``head_axis``) of consecutive dimensions
    (axis ``dim_axis``), both negative."""

    group: int
    heads: int
    head_axis: int
    dim_axis: int


@dataclass(frozen=True)
class _Tuple:
    """A module's tuple output (an LSTM's ``(out, (h, c))``, an attention's ``(out, weights)``):
    the label of each item."""

    items: tuple


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
    torch.rsqrt,
    torch.sqrt,
    torch.exp,
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
    "type_as",
    "softmax",
    "log_softmax",
    "neg",
    "rsqrt",
    "sqrt",
    "exp",
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
_RESHAPE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "unflatten"}
_EXPAND_METHODS = {"expand", "expand_as", "broadcast_to"}
_NON_TENSOR_ATTRIBUTES = {"shape", "dtype", "device", "ndim"}
_NON_TENSOR_METHODS = {"size", "dim"}
_NORMS = (nn.LayerNorm, nn.RMSNorm)


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


def _leaves(label) -> list:
    """The tensor labels inside a (possibly tuple) label."""
    if isinstance(label, _Tuple):
        return [leaf for item in label.items for leaf in _leaves(item)]
    return [] if label is None else [label]


def _shape(node) -> tuple[int, ...] | None:
    """The traced output shape of ``node`` (None for non-tensors and constants)."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _axes(label) -> tuple[int, ...]:
    """The (negative) axes a label occupies."""
    return (label.head_axis, label.dim_axis) if isinstance(label, _Heads) else (label.axis,)


def _layout(label) -> tuple:
    """Everything but the group: labels combined elementwise must agree on it."""
    if isinstance(label, _Heads):
        return ("heads", label.heads, label.head_axis, label.dim_axis)
    return ("units", label.block, label.axis)


def _relabel(label, group: int):
    if isinstance(label, _Heads):
        return _Heads(group, label.heads, label.head_axis, label.dim_axis)
    return _Label(group, label.block, label.axis)


def _moved(label, where: dict[int, int]):
    """``label`` with its axes moved by ``where`` (old negative axis -> new negative axis)."""
    if isinstance(label, _Heads):
        return _Heads(label.group, label.heads, where[label.head_axis], where[label.dim_axis])
    return _Label(label.group, label.block, where[label.axis])


def _arg(node: fx.Node, index: int, name: str, default=None):
    """Argument ``name`` of a call, given by position ``index`` or by keyword."""
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


class _Walker:
    def __init__(
        self, gm: fx.GraphModule, shapes: dict[str, tuple[int, ...]], params: set[str], heads: str
    ) -> None:
        self.modules = dict(gm.named_modules())
        self.called: set[str] = set()
        self.graph = gm.graph
        self.shapes = shapes
        self.params = params
        self.heads = heads
        self.uf = _UnionFind()
        self.labels: dict[fx.Node, object] = {}
        self.refs: dict[int, list[AxisRef]] = defaultdict(list)
        self.sizes: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.buffers: set[str] = set()
        self.consumed_at: dict[str, int] = {}  # a consumer's input node -> its group, in order
        self.fixed: set[int] = set()
        self.attentions: list[tuple[int, int, int]] = []  # (query/key group, value group, heads)
        self.attention_sites: list[tuple[int, Site]] = []  # a query's or key's group and node

    # ---- helpers ------------------------------------------------------------------------------

    def new_group(self, name: str, size: int) -> _Label:
        g = self.uf.new()
        self.sizes[g], self.names[g] = size, name
        return _Label(g)

    def act(
        self, label: _Label | None, key: str, axis: int, repeat: int = 1, offset: int = 0
    ) -> None:
        if label is not None and key in self.shapes:
            self.refs[label.group].append(AxisRef(key, axis, label.block, repeat, offset))

    def act_on_params(
        self, label: _Label | None, name: str, params: tuple[str, ...], axis: int = 0
    ) -> None:
        for p in params:
            self.act(label, f"{name}.{p}", axis)

    def union(self, a: _Label, b: _Label) -> _Label:
        return _relabel(a, self.uf.union(a.group, b.group))

    def consume(self, node: fx.Node, label: _Label | None) -> None:
        """Remember which node's output is the group's activation (the first consumer's input)."""
        if label is not None:
            self.consumed_at.setdefault(node.args[0].name, label.group)

    def label_of(self, arg) -> object:
        return self.labels.get(arg) if isinstance(arg, fx.Node) else None

    def labelled(self, args) -> list:
        return [
            self.labels[a]
            for a in _flat_args(args)
            if isinstance(a, fx.Node) and self.labels.get(a) is not None
        ]

    def features(self, label, where: str) -> _Label | None:
        """``label``, which must be None or units on the last axis (what a layer's input map
        reads)."""
        if label is not None and (not isinstance(label, _Label) or label.axis != -1):
            raise UnsupportedModuleError(
                f"{where}: its input's units are not on the last axis (split into heads, "
                "a tuple, or another axis)"
            )
        return label

    def unlabelled(self, node: fx.Node, args, where: str) -> None:
        """Masks and other side inputs must carry no group."""
        if self.labelled(args):
            raise UnsupportedModuleError(
                f"{where}: a side input (mask, state) carries a group (node {node.name})"
            )

    # ---- the walk -----------------------------------------------------------------------------

    def run(self) -> PermutationSpec:
        for node in self.graph.nodes:
            if node.op == "placeholder":
                self.labels[node] = None
            elif node.op == "get_attr":
                self.labels[node] = self.parameter(node)
            elif node.op == "call_module":
                module = self.modules[node.target]
                if node.target in self.called and any(True for _ in module.parameters()):
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

    def parameter(self, node: fx.Node) -> _Label | None:
        """A learned parameter read outside its module (a positional embedding, a class token):
        a group on its last axis, merged with what it meets. Buffers and scalars carry none."""
        shape = self.shapes.get(node.target)
        if node.target not in self.params or not shape:
            return None
        label = self.new_group(node.target, shape[-1])
        self.act(label, node.target, len(shape) - 1)
        return label

    def module(self, node: fx.Node, m: nn.Module):
        name = node.target
        where = f"module {name!r} ({type(m).__name__})"
        x = self.label_of(node.args[0]) if node.args else None
        shape = _shape(node.args[0]) if node.args else None
        if isinstance(m, nn.Linear):
            if isinstance(x, _Label) and x.axis != -1 and shape is not None and len(shape) == 4:
                raise UnsupportedModuleError(
                    f"{where}: Linear on an NCHW tensor acts on its last axis, not on "
                    "the channels that carry the units (flatten or pool first)"
                )
            x = self.features(x, where)
            self.consume(node, x)
            return self.linear(name, x, m.out_features)
        if isinstance(m, nn.Conv2d):
            if m.groups != 1:
                raise UnsupportedModuleError(
                    f"{where}: grouped/depthwise Conv2d (groups={m.groups})"
                )
            if x is not None and (not isinstance(x, _Label) or x.block != 1 or x.axis != -3):
                raise UnsupportedModuleError(f"{where}: Conv2d after a flatten")
            self.act(x, f"{name}.weight", 1)
            self.consume(node, x)
            y = self.new_group(name, m.out_channels)
            self.act_on_params(y, name, ("weight", "bias"))
            return _Label(y.group, 1, -3)
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if x is not None and shape is not None and x.axis != 1 - len(shape):
                raise UnsupportedModuleError(
                    f"{where}: BatchNorm over {shape} inputs whose units are not on axis 1"
                )
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
        if isinstance(m, _NORMS):
            self.norm(name, m, x, where)
            return x
        if isinstance(m, nn.Embedding):
            y = self.new_group(name, m.embedding_dim)
            self.act(y, f"{name}.weight", 1)
            return y
        if isinstance(m, nn.LSTM):
            return self.lstm(node, name, m, x)
        if isinstance(m, nn.MultiheadAttention):
            return self.multihead(node, name, m, where)
        if isinstance(m, nn.TransformerEncoderLayer):
            self.unlabelled(node, (node.args[1:], node.kwargs), where)
            return self.encoder_layer(node, name, m, x)
        if isinstance(m, nn.TransformerEncoder):
            self.unlabelled(node, (node.args[1:], node.kwargs), where)
            for i, layer in enumerate(m.layers):
                if not isinstance(layer, nn.TransformerEncoderLayer):
                    raise UnsupportedModuleError(
                        f"{where}: layer {i} is a {type(layer).__name__}, not a "
                        "TransformerEncoderLayer"
                    )
                x = self.encoder_layer(node, f"{name}.layers.{i}", layer, x)
            if m.norm is not None:
                self.norm(f"{name}.norm", m.norm, x, where)
            return x
        if isinstance(m, _PASS_MODULES) or (isinstance(m, nn.Flatten) and x is None):
            return x
        if isinstance(m, nn.Flatten):
            return self.reshape(node, node.args[0])
        raise UnsupportedModuleError(
            f"{where} is not supported by permutation_spec; write its spec by hand"
        )

    def linear(self, name: str, x: _Label | None, out_features: int) -> _Label:
        """A linear map: ``x``'s group on the weight's columns, a new group on its rows and
        bias."""
        self.act(x, f"{name}.weight", 1)
        y = self.new_group(name, out_features)
        self.act_on_params(y, name, ("weight", "bias"))
        return y

    def norm(self, name: str, m: nn.Module, x, where: str) -> None:
        """LayerNorm/RMSNorm over the units' axis: mean and variance do not depend on their
        order, so the weight and bias follow the units."""
        if not isinstance(m, _NORMS):
            raise UnsupportedModuleError(f"{where}: norm {name!r} is a {type(m).__name__}")
        if len(m.normalized_shape) != 1 or (x is not None and _layout(x) != ("units", 1, -1)):
            raise UnsupportedModuleError(
                f"{where}: {type(m).__name__} over anything but the last, feature axis"
            )
        self.act_on_params(x, name, ("weight", "bias"))

    def lstm(self, node: fx.Node, name: str, m: nn.LSTM, x) -> _Tuple:
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
        x = self.features(x, where)
        self.consume(node, x)
        self.act(x, f"{name}.weight_ih_l0", 1)
        h = self.new_group(name, m.hidden_size)
        for p in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
            self.act(h, f"{name}.{p}", 0, repeat=4)
        self.act(h, f"{name}.weight_hh_l0", 1)
        return _Tuple((h, _Tuple((h, h))))

    # ---- attention ----------------------------------------------------------------------------

    def multihead(self, node: fx.Node, name: str, m: nn.MultiheadAttention, where: str) -> _Tuple:
        """``nn.MultiheadAttention(query, key, value, ...)``: its output and (head-averaged,
        hence unpermuted) attention weights."""
        inputs = [_arg(node, i, k) for i, k in enumerate(("query", "key", "value"))]
        rest = (
            node.args[3:],
            {k: v for k, v in node.kwargs.items() if k not in ("query", "key", "value")},
        )
        self.unlabelled(node, rest, where)
        if _arg(node, 6, "average_attn_weights", True) is False:
            raise UnsupportedModuleError(
                f"{where}: per-head attention weights (average_attn_weights=False) would move "
                "with the heads"
            )
        labels = [self.features(self.label_of(a), where) for a in inputs]
        self.consume(node, labels[0])
        return _Tuple((self.attention_module(name, m, labels, where), None))

    def attention_module(
        self, name: str, m: nn.MultiheadAttention, inputs: list, where: str
    ) -> _Label:
        """The groups of ``nn.MultiheadAttention``: its inputs' groups on the columns of the
        query/key/value maps, a query/key group on the rows of the query and key maps (the first
        two thirds of a packed ``in_proj_weight``), a value group on the value rows and the output
        projection's columns, a new group on the output projection's rows. Heads are contiguous
        runs of ``embed_dim // num_heads`` rows in each third."""
        e = m.embed_dim
        qk, vo = self.new_group(f"{name}.qk", e), self.new_group(f"{name}.vo", e)
        if m._qkv_same_embed_dim:
            present = [x for x in inputs if x is not None]
            if present and len(present) != len(inputs):
                raise UnsupportedModuleError(
                    f"{where}: query, key and value share in_proj_weight's columns, but only "
                    "some of them carry a group"
                )
            x = present[0] if present else None
            for other in present[1:]:
                x = self.union(x, other)
            self.act(x, f"{name}.in_proj_weight", 1)
            self.act(qk, f"{name}.in_proj_weight", 0, repeat=2)
            self.act(vo, f"{name}.in_proj_weight", 0, offset=2 * e)
        else:
            for x, part in zip(inputs, "qkv"):
                self.act(x, f"{name}.{part}_proj_weight", 1)
            self.act(qk, f"{name}.q_proj_weight", 0)
            self.act(qk, f"{name}.k_proj_weight", 0)
            self.act(vo, f"{name}.v_proj_weight", 0)
        self.act(qk, f"{name}.in_proj_bias", 0, repeat=2)
        self.act(vo, f"{name}.in_proj_bias", 0, offset=2 * e)
        self.act(qk, f"{name}.bias_k", 2)
        self.act(vo, f"{name}.bias_v", 2)
        self.act(vo, f"{name}.out_proj.weight", 1)
        y = self.new_group(f"{name}.out_proj", e)
        self.act_on_params(y, f"{name}.out_proj", ("weight", "bias"))
        self.attentions.append((qk.group, vo.group, m.num_heads))
        return y

    def encoder_layer(self, node: fx.Node, name: str, m: nn.TransformerEncoderLayer, x) -> _Label:
        """``nn.TransformerEncoderLayer``, pre-norm or post-norm (the same spec: both norms and
        both residual additions sit on the stream): self-attention and a feed-forward map whose
        units are a group of their own; returns the stream's label."""
        where = f"module {name!r} (TransformerEncoderLayer)"
        activation = m.activation
        if not (activation in _PASS_FUNCTIONS or isinstance(activation, _PASS_MODULES)):
            raise UnsupportedModuleError(f"{where}: activation {activation!r}")
        x = self.features(x, where)
        if x is None:  # raw features: the stream keeps their order
            x = self.new_group(name, m.linear1.in_features)
            self.fixed.add(x.group)
        self.consume(node, x)
        self.norm(f"{name}.norm1", m.norm1, x, where)
        self.norm(f"{name}.norm2", m.norm2, x, where)
        x = self.union(x, self.attention_module(f"{name}.self_attn", m.self_attn, [x] * 3, where))
        hidden = self.linear(f"{name}.linear1", x, m.linear1.out_features)
        return self.union(x, self.linear(f"{name}.linear2", hidden, m.linear2.out_features))

    def scaled_dot_product(self, node: fx.Node) -> _Heads:
        """``F.scaled_dot_product_attention(q, k, v, ...)`` on ``(..., heads, length, d_head)``:
        a query/key dimension must move in the query and the key alike (their groups merge), the
        output carries the value's group; masks carry none."""
        names = ("query", "key", "value")
        q, k, v = (self.label_of(_arg(node, i, n)) for i, n in enumerate(names))
        rest = (node.args[3:], {n: a for n, a in node.kwargs.items() if n not in names})
        self.unlabelled(node, rest, f"scaled_dot_product_attention (node {node.name})")
        split = [x for x in (q, k, v) if isinstance(x, _Heads) and _axes(x) == (-3, -1)]
        if len(split) != 3 or len({x.heads for x in split}) != 1:
            raise UnsupportedModuleError(
                f"scaled_dot_product_attention (node {node.name}): query, key and value must all "
                "be split into the same heads as (..., heads, length, d_head)"
            )
        qk = self.uf.union(q.group, k.group)
        self.attentions.append((qk, v.group, q.heads))
        for x, arg in ((q, _arg(node, 0, "query")), (k, _arg(node, 1, "key"))):
            self.attention_sites.append((x.group, Site(arg.name, (x.head_axis, x.dim_axis))))
        return v

    # ---- shape operations -----------------------------------------------------------------

    def reshape(self, node: fx.Node, src: fx.Node):
        """Reshapes that keep the units' axis whole: ``(N, C, H, W) -> (N, C*H*W)`` (channel runs
        of ``H*W``, the block), ``-> (N, C, H*W)``, merging or splitting the axes around it; a
        split of the units into ``(heads, d_head)`` and its inverse."""
        x = self.label_of(src)
        shape_in, shape_out = _shape(src), _shape(node)
        if shape_in is None or shape_out is None:
            raise UnsupportedModuleError(f"{node.name}: reshape of a tensor of unknown shape")
        label = None
        if isinstance(x, (_Label, _Heads)):
            start = (x.head_axis if isinstance(x, _Heads) else x.axis) + len(shape_in)
            k = self._matching_prefix(shape_in, start, shape_out)
            if k is not None:
                label = self._reshaped(x, shape_in, start, shape_out, k)
        if label is None:
            raise UnsupportedModuleError(
                f"{node.name}: reshape {shape_in} -> {shape_out}; only reshapes that keep the "
                "units' axis whole (NCHW -> (N, C*H*W), (N, T, E) -> (N, T, heads, d_head) and "
                "back, ...) are supported"
            )
        return label

    @staticmethod
    def _matching_prefix(shape_in, start: int, shape_out) -> int | None:
        """The output axis where the axes before ``start`` end, if they end on an axis boundary."""
        before, k, acc = math.prod(shape_in[:start]), 0, 1
        while k < len(shape_out) and acc < before:
            acc *= shape_out[k]
            k += 1
        while k < len(shape_out) and shape_out[k] == 1 and shape_in[start] != 1:
            k += 1
        return k if acc == before and k < len(shape_out) else None

    def _reshaped(self, x, shape_in, start: int, shape_out, k: int):
        size, out, rank = shape_in[start], shape_out[k], len(shape_out)
        if isinstance(x, _Heads):
            if x.dim_axis != x.head_axis + 1:
                return None
            d = shape_in[start + 1]
            if out == x.heads * d:
                return _Label(x.group, 1, k - rank)
            if out == x.heads and k + 1 < rank and shape_out[k + 1] == d:
                return _Heads(x.group, x.heads, k - rank, k + 1 - rank)
            return None
        if out >= size and out % size == 0:  # the axes after it merge into its blocks
            merged, t = 1, start + 1
            while merged < out // size and t < len(shape_in):
                merged *= shape_in[t]
                t += 1
            return _Label(x.group, x.block * merged, k - rank) if merged == out // size else None
        units = self.sizes[self.uf.find(x.group)]
        if x.block == 1 and k + 1 < rank and out * shape_out[k + 1] == size:
            return _Heads(x.group, out, k - rank, k + 1 - rank)
        if x.block > 1 and out == units:  # unflatten (N, C*H*W) -> (N, C, H, W)
            spread, t = 1, k + 1
            while spread < x.block and t < rank:
                spread *= shape_out[t]
                t += 1
            return _Label(x.group, 1, k - rank) if spread == x.block else None
        return None

    def transpose(self, node: fx.Node):
        """``transpose``/``permute``: the labelled axes move with them."""
        src = node.args[0]
        shape = _shape(src)
        rank = len(shape)
        dims = [d for d in node.args[1:]] or [node.kwargs.get(k) for k in ("dim0", "dim1", "dims")]
        dims = [d for d in dims if d is not None]
        if node.target == "permute" or node.target is torch.permute:
            order = (
                tuple(dims[0])
                if len(dims) == 1 and isinstance(dims[0], (tuple, list))
                else tuple(dims)
            )
            order = tuple(d % rank for d in order)
        else:
            a, b = (d % rank for d in dims)
            order = list(range(rank))
            order[a], order[b] = order[b], order[a]
        return _moved(
            self.label_of(src), {old - rank: order.index(old) - rank for old in range(rank)}
        )

    def expand(self, node: fx.Node):
        """``expand``/``broadcast_to``: new or widened axes, the labelled ones untouched."""
        x, shape_in, shape_out = self.label_of(node.args[0]), _shape(node.args[0]), _shape(node)
        if any(shape_in[a] != shape_out[a] for a in _axes(x)):
            raise UnsupportedModuleError(f"{node.name}: {node.target} widens the units' axis")
        return x

    def getitem(self, node: fx.Node):
        src, index = node.args
        label = self.label_of(src)
        if isinstance(label, _Tuple):
            return label.items[index]
        shape = _shape(src)
        idx = index if isinstance(index, tuple) else (index,)
        where: dict[int, int] = {}
        if label is None:  # indexed by a tensor a group acts on
            shape = None
        if shape is not None and Ellipsis not in idx:
            rank, out_rank, dim, kept = len(shape), len(_shape(node)), 0, 0
            for entry in idx:
                if entry is None:
                    kept += 1
                    continue
                if isinstance(entry, slice):
                    if dim - rank in _axes(label) and entry != slice(None):
                        break
                    where[dim - rank] = kept - out_rank
                    kept += 1
                elif not isinstance(entry, int) or dim - rank in _axes(label):
                    break
                dim += 1
            else:
                where.update({d - rank: kept + d - dim - out_rank for d in range(dim, rank)})
        if shape is not None and all(a in where for a in _axes(label)):
            return _moved(label, where)
        raise UnsupportedModuleError(
            f"indexing {node.name}: only indexing that keeps the units' axis whole (integers and "
            "slices elsewhere) is supported"
        )

    def mean(self, node: fx.Node):
        """A mean over axes that carry no units keeps the label (``x.mean((2, 3))`` over an NCHW
        tensor: global average pooling; ``x.mean(1)`` over a sequence); over the units' axis it is
        the same for every order of the units, and carries none."""
        src = node.args[0]
        x, shape = self.label_of(src), _shape(src)
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
        keep = bool(_arg(node, 2, "keepdim", False))
        if shape is None or not isinstance(x, _Label):
            raise UnsupportedModuleError(f"{node.name}: mean of a tensor split into heads")
        rank = len(shape)
        reduced = {d % rank - rank for d in dims} if dims else set(range(-rank, 0))
        if x.axis == -3 and rank == 4:  # NCHW: pool over space only, as before
            if not dims or reduced & {-4, -3}:
                raise UnsupportedModuleError(f"{node.name}: mean over the batch or feature axis")
            out = _shape(node)
            if out is None or len(out) not in (2, 4):
                # (N, C, H) would put the channels where a 3-d tensor's feature axis is not
                raise UnsupportedModuleError(
                    f"{node.name}: a mean that leaves {out} (pool both spatial axes or keep "
                    "the dimensions)"
                )
        if x.axis in reduced:
            return None
        shift = 0 if keep else sum(1 for d in reduced if d > x.axis)
        return _Label(x.group, x.block, x.axis + shift)

    # ---- combining tensors --------------------------------------------------------------------

    def elementwise(self, node: fx.Node, operands: list | None = None):
        """Operands combined elementwise must share one permutation: merge their groups. An
        operand that carries no group may broadcast along the units' axis (size 1 there), not
        fill it."""
        operands = list(node.args[:2]) if operands is None else operands
        labels = [self.label_of(a) for a in operands]
        present = [label for label in labels if label is not None]
        if not present:
            raise UnsupportedModuleError(
                f"{node.name}: {getattr(node.target, '__name__', node.target)} with a permuted "
                "tensor as a keyword argument"
            )
        if any(isinstance(label, _Tuple) for label in present):
            raise UnsupportedModuleError(f"{node.name}: arithmetic on a module's output tuple")
        first = present[0]
        for other in present[1:]:
            if _layout(other) != _layout(first):
                raise UnsupportedModuleError(f"{node.name}: combines tensors of different layouts")
            first = _relabel(first, self.uf.union(first.group, other.group))
        for a, label in zip(operands, labels):
            shape = _shape(a)
            if (
                label is None
                and shape
                and any(len(shape) >= -ax and shape[ax] != 1 for ax in _axes(first))
            ):
                raise UnsupportedModuleError(
                    f"{node.name}: combines a permuted tensor with a tensor no group acts on"
                )
        return first

    def cat(self, node: fx.Node):
        """``torch.cat`` along an axis that carries no units: the pieces share one permutation."""
        tensors = list(_arg(node, 0, "tensors"))
        rank = len(_shape(node))
        dim = _arg(node, 1, "dim", 0) % rank - rank
        labels = [self.label_of(t) for t in tensors]
        if any(
            label is None or dim in _axes(label)
            for label in labels
            if not isinstance(label, _Tuple)
        ):
            raise UnsupportedModuleError(
                f"function 'cat' (node {node.name}) along the units' axis, or of tensors only "
                "some of which carry a group, is not supported by permutation_spec"
            )
        return self.elementwise(node, tensors)

    def functional_linear(self, node: fx.Node) -> _Label:
        """``F.linear(x, weight, bias)`` with parameters read by ``get_attr`` (a tied
        unembedding: ``F.linear(h, self.embedding.weight)``): the weight's columns follow ``x``,
        its rows are a new group."""
        weight, bias = _arg(node, 1, "weight"), _arg(node, 2, "bias")
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
            raise UnsupportedModuleError(
                f"function 'linear' (node {node.name}): only with a parameter of the model as "
                "its weight"
            )
        x = self.features(self.label_of(node.args[0]), f"function 'linear' (node {node.name})")
        columns = self.label_of(weight)
        if x is None:
            self.fixed.add(columns.group)
        else:
            self.union(x, columns)
        y = self.new_group(node.name, self.shapes[weight.target][0])
        self.act(y, weight.target, 0)
        if isinstance(bias, fx.Node) and self.label_of(bias) is not None:
            y = self.union(y, self.label_of(bias))
        return y

    def function(self, node: fx.Node):
        f = node.target
        if f in _PASS_FUNCTIONS:
            return self.label_of(node.args[0])
        if f in _ELEMENTWISE:
            return self.elementwise(node)
        if f in (operator.pow, torch.pow) and isinstance(node.args[1], (int, float)):
            return self.label_of(node.args[0])
        if f is torch.flatten:
            return self.reshape(node, node.args[0])
        if f is torch.mean:
            return self.mean(node)
        if f in (torch.transpose, torch.permute):
            return self.transpose(node)
        if f is torch.cat:
            return self.cat(node)
        if f is operator.getitem:
            return self.getitem(node)
        if f is F.scaled_dot_product_attention:
            return self.scaled_dot_product(node)
        if f is F.linear:
            return self.functional_linear(node)
        if f in (F.layer_norm, F.rms_norm):
            return self.functional_norm(node)
        if f is builtins.getattr and node.args[1] in _NON_TENSOR_ATTRIBUTES:
            return None
        raise UnsupportedModuleError(
            f"function {getattr(f, '__name__', f)!r} (node {node.name}) is "
            "not supported by permutation_spec; write its spec by hand"
        )

    def functional_norm(self, node: fx.Node):
        """``F.layer_norm``/``F.rms_norm`` over the last axis: weight and bias follow the units."""
        x = self.label_of(node.args[0])
        shape = _arg(node, 1, "normalized_shape")
        if not isinstance(x, _Label) or x.axis != -1 or x.block != 1 or len(shape) != 1:
            raise UnsupportedModuleError(
                f"function {node.target.__name__!r} (node {node.name}) over anything but the "
                "last, feature axis"
            )
        params = [_arg(node, 2, "weight")] + (
            [_arg(node, 3, "bias")] if node.target is F.layer_norm else []
        )
        return self.elementwise(node, [node.args[0], *(p for p in params if p is not None)])

    def method(self, node: fx.Node):
        target = node.target
        if target in _PASS_METHODS:
            return self.label_of(node.args[0])
        if target in _NON_TENSOR_METHODS:
            return None
        if target in _ELEMENTWISE_METHODS:
            return self.elementwise(node)
        if target == "pow" and isinstance(node.args[1], (int, float)):
            return self.label_of(node.args[0])
        if target in _RESHAPE_METHODS:
            return self.reshape(node, node.args[0])
        if target in _EXPAND_METHODS:
            return self.expand(node)
        if target == "mean":
            return self.mean(node)
        if target in ("transpose", "permute"):
            return self.transpose(node)
        raise UnsupportedModuleError(
            f"tensor method {target!r} (node {node.name}) is not "
            "supported by permutation_spec; write its spec by hand"
        )

    # ---- the spec -----------------------------------------------------------------------------

    def finish(self, output: fx.Node) -> PermutationSpec:
        find = self.uf.find
        fixed = {find(g) for g in self.fixed}
        for label in self.labelled(output.args):
            fixed.update(find(leaf.group) for leaf in _leaves(label))
        merged: dict[int, list[AxisRef]] = defaultdict(list)
        for g, refs in self.refs.items():
            merged[find(g)].extend(refs)
        sets = self.head_sets(fixed)
        in_set = {root for roots, _ in sets for root in roots}
        entries = []  # (forward position, name, refs, size, activation site)
        for root, refs in merged.items():
            if root in fixed or root in in_set:
                continue
            entries.append((root, self.names[root], refs, self.sizes[root], self.sites(root)))
        head_sets = []
        for roots, count in sets:
            names = tuple(self.names[r] for r in roots)
            if self.heads == "blocks":
                refs = [
                    AxisRef(r.key, r.axis, r.block * self.sizes[root] // count, r.repeat, r.offset)
                    for root in roots
                    for r in merged[root]
                ]
                name = _common_prefix(names) + "heads"
                entries.append((roots[0], name, _joined(refs, count), count, ()))
            else:
                entries.extend(
                    (r, self.names[r], merged[r], self.sizes[r], self.sites(r)) for r in roots
                )
                head_sets.append(HeadSet(names, count, move=self.heads == "both"))
        groups, sizes, activations = {}, {}, {}
        for _, name, refs, size, sites in sorted(entries, key=lambda e: e[0]):
            groups[name], sizes[name] = tuple(dict.fromkeys(refs)), size
            if sites:
                activations[name] = sites
        keys = {ref.key for refs in groups.values() for ref in refs}
        return PermutationSpec(
            groups,
            sizes,
            self.shapes,
            frozenset(self.buffers & keys),
            activations,
            tuple(head_sets),
        )

    def sites(self, root: int) -> tuple[Site, ...]:
        """Where the group ``root`` is read for activation matching: the input of its first
        consumer, then the inputs of its other consumers (``Site.later``: a residual stream read
        by every block), and for an attention's query/key group its queries and keys (split into
        heads, as ``scaled_dot_product_attention`` gets them). Heads matched as blocks only have
        none: a head is not one activation."""
        find = self.uf.find
        read = [n for n, g in self.consumed_at.items() if find(g) == root]
        return (
            *(Site(n, later=i > 0) for i, n in enumerate(read)),
            *(site for g, site in self.attention_sites if find(g) == root),
        )

    def head_sets(self, fixed: set[int]) -> list[tuple[tuple[int, ...], int]]:
        """Each attention's query/key and value groups, linked when their heads must move
        together (attentions that share a group share its heads): ``(roots, heads)`` per set,
        roots in forward order. A set with a group that reaches the output is fixed whole."""
        find = self.uf.find
        link = _UnionFind()
        node_of: dict[int, int] = {}
        count: dict[int, int] = {}
        for qk, v, heads in self.attentions:
            for root in (find(qk), find(v)):
                if root not in node_of:
                    node_of[root] = link.new()
                if count.setdefault(root, heads) != heads:
                    raise UnsupportedModuleError(
                        f"group {self.names[root]!r} is split into {count[root]} heads in one "
                        f"attention and {heads} in another"
                    )
            link.union(node_of[find(qk)], node_of[find(v)])
        members: dict[int, list[int]] = defaultdict(list)
        for root, i in node_of.items():
            members[link.find(i)].append(root)
        out = []
        for roots in members.values():
            if fixed & set(roots):
                fixed.update(roots)
            else:
                out.append((tuple(sorted(roots)), count[roots[0]]))
        return out


def _common_prefix(names: tuple[str, ...]) -> str:
    """The dotted module path the names share (``blocks.0.attn.`` for ``blocks.0.attn.query``
    and ``blocks.0.attn.value``), empty if none."""
    parts = [n.split(".") for n in names]
    shared = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        shared.append(level[0])
    shared = shared[: min(len(p) for p in parts) - 1]
    return "".join(f"{s}." for s in shared)


def _joined(refs: list[AxisRef], units: int) -> list[AxisRef]:
    """Refs of one group on one axis that follow each other with the same block become one
    (a packed ``in_proj_weight``: query/key and value thirds -> three copies of the heads)."""
    out: list[AxisRef] = []
    for ref in sorted(dict.fromkeys(refs), key=lambda r: (r.key, r.axis, r.offset)):
        last = out[-1] if out else None
        if (
            last is not None
            and (last.key, last.axis, last.block) == (ref.key, ref.axis, ref.block)
            and ref.offset == last.offset + last.extent(units)
        ):
            out[-1] = AxisRef(ref.key, ref.axis, ref.block, last.repeat + ref.repeat, last.offset)
        else:
            out.append(ref)
    return out


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
    model: nn.Module, example_input: torch.Tensor | None = None, heads: str = "both"
) -> PermutationSpec:
    """Derive the permutation spec of ``model`` by tracing it on ``example_input`` (a batch of
    the model's own input: token ids for a language model; default from the first layer, see
    ``default_example_input``).

    Conv -> flatten -> Linear gives blocks of ``H*W`` columns; residual additions share one group
    per stream; LSTM hidden units act on the four gate blocks; attention gives a query/key and a
    value group per attention, kept in heads as ``heads`` says (``"both"``: heads move and
    dimensions move inside them; ``"inner"``: only inside them; ``"blocks"``: heads move as
    wholes); the output axis is never permuted. Raises ``UnsupportedModuleError`` naming the first
    module or function it cannot handle.
    """
    if heads not in HEADS:
        raise ValueError(f"heads must be one of {', '.join(HEADS)}, got {heads!r}")
    gm = trace_model(model, example_input)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    params = {k for k, _ in model.named_parameters(remove_duplicate=False)}
    return _Walker(gm, shapes, params, heads).run()
