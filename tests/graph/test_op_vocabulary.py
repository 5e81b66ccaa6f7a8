"""One IntGraph op vocabulary (``intgraph.OP_CATEGORIES``) read by the engine, the ONNX exporter, the lowering and
the targets. Every check is built from those modules' own tables, so an op added in one place only fails here."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

from edgeslim import api, intgraph, lower, targets
from edgeslim.config import PTQConfig
from edgeslim.engine import float_ops, tflite_run
from edgeslim.engine import run as engine_run
from edgeslim.export import onnx_qdq
from edgeslim.graph import ops as graph_ops
from edgeslim.intgraph import DATA_MOVEMENT, FLOAT_OPS, OP_CATEGORIES

PACKAGE = Path(intgraph.__file__).resolve().parent


def test_every_op_has_a_known_category():
    assert set(OP_CATEGORIES.values()) == set(intgraph.CATEGORIES)
    assert intgraph.ops_in(*intgraph.CATEGORIES) == tuple(OP_CATEGORIES)
    assert set(intgraph.ACTIVATION_OPS) == set(intgraph.LUT_ACTIVATIONS.values())


def test_the_engine_runs_every_op_of_the_vocabulary_and_no_other():
    on_codes, in_float = set(engine_run.OPS), set(float_ops.OPS)
    assert in_float == set(FLOAT_OPS)  # float islands of mixed precision
    assert on_codes == set(OP_CATEGORIES) - set(FLOAT_OPS)  # integer ops (data movement on codes included)
    assert set(tflite_run.OPS) <= on_codes  # the LiteRT-arithmetic kernels replace integer ones


def test_every_op_the_engine_runs_has_an_onnx_writer_or_a_reason():
    runnable = set(engine_run.OPS) | set(float_ops.OPS)
    writers, refused = set(onnx_qdq.EMITTERS), set(onnx_qdq.NOT_EXPORTABLE)
    assert runnable - writers - refused == set()
    assert writers | refused <= set(OP_CATEGORIES)
    assert not writers & refused
    assert all(reason.strip() for reason in onnx_qdq.NOT_EXPORTABLE.values())


def test_engine_and_exporter_share_one_data_movement_set():
    """One data-movement writer in the exporter, for exactly the ops the engine runs on float tensors as moves."""
    writers = onnx_qdq.EMITTERS
    assert {op for op, fn in writers.items() if fn is writers["Slice"]} == set(DATA_MOVEMENT)
    assert engine_run.DATA_MOVEMENT is intgraph.DATA_MOVEMENT
    copies = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "DATA_MOVEMENT" for t in node.targets):
                copies.append(str(path.relative_to(PACKAGE)))
    assert copies == ["intgraph.py"]


def test_data_movement_lowerings_write_vocabulary_ops():
    tables = (lower.PASS_MODULES, lower.PASS_FUNCTIONS, lower.PASS_METHODS)
    for table in tables:
        assert all(fn in lower.PASS_OPS for fn in table.values())
    for produced in lower.PASS_OPS.values():
        assert set(produced) <= set(DATA_MOVEMENT)
    # every fx target lowered on codes is data movement to graph.ops (``kind`` == "pass")
    assert all(graph_ops.MODULE_KINDS[t] == "pass" for t in lower.PASS_MODULES)
    assert all(graph_ops.FUNCTION_KINDS[t] == "pass" for t in lower.PASS_FUNCTIONS)
    assert all(graph_ops.METHOD_KINDS[t] == "pass" for t in lower.PASS_METHODS)


def test_kind_lowerings_are_keyed_by_graph_ops_kinds():
    kinds = {k for table in (graph_ops.MODULE_KINDS, graph_ops.FUNCTION_KINDS, graph_ops.METHOD_KINDS)
             for k in table.values()}
    assert set(lower.INTEGER_LOWERINGS) | set(lower.FLOAT_LOWERINGS) <= kinds
    assert set(lower.FLOAT_LOWERINGS) == set(lower.INTEGER_LOWERINGS) | {"softmax"}  # softmax: float only
    # every kind a target can keep in float (``Target.plan``) has a float lowering
    assert set(targets.GRAPH_KINDS) | {"lut"} == set(lower.FLOAT_LOWERINGS)


def test_every_op_name_in_the_lowering_is_in_the_vocabulary():
    """Any CamelCase string in lower.py is an IntGraph op it writes: all must be in the vocabulary."""
    tree = ast.parse(Path(lower.__file__).read_text())
    names = {c.value for c in ast.walk(tree) if isinstance(c, ast.Constant) and isinstance(c.value, str)
             and re.fullmatch(r"[A-Z][A-Za-z0-9]*", c.value)}
    assert names and names <= set(OP_CATEGORIES)
    assert set(intgraph.LUT_ACTIVATIONS.values()) <= set(OP_CATEGORIES)


def test_target_kinds_read_the_shared_tables():
    compute = {k for table in (graph_ops.MODULE_KINDS, graph_ops.FUNCTION_KINDS, graph_ops.METHOD_KINDS)
               for k in table.values()} - {"pass", "quant", "meta"}
    assert compute == set(targets.GRAPH_KINDS) | {"lut"}
    assert set(targets.GRAPH_KINDS.values()) <= set(targets.OP_KINDS)
    assert set(graph_ops.LUT_FUNCTIONS.values()) == set(intgraph.LUT_ACTIVATIONS)
    assert set(intgraph.LUT_ACTIVATIONS) <= set(targets.OP_KINDS)


class _Moves(nn.Module):
    """Conv, every data-movement lowering on codes, a SiLU table, an add and a concat."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.act = nn.SiLU()

    def forward(self, x):
        y = self.act(self.conv(x))  # 8 x 8 x 8
        a, b = torch.split(y, 4, dim=1)
        z = torch.cat([b, a], 1).contiguous()  # Slice, Slice, QLinearConcat, Identity
        z = self.up(self.pool(z))  # MaxPool, Resize
        z = F.pad(z[:, :, 1:, 1:], (1, 0, 1, 0))  # Slice, Pad
        z = z.permute(0, 1, 3, 2).transpose(2, 3)  # Transpose, Transpose
        z = z + y
        g = z[:, 0].unsqueeze(1)  # Gather, Reshape
        return torch.flatten(z + g, 1)  # QLinearAdd (broadcast), Flatten


def test_a_lowered_model_is_in_the_vocabulary_and_the_engine_matches_onnxruntime(tmp_path):
    torch.manual_seed(0)
    model = _Moves().eval()
    calib = torch.randn(16, 3, 8, 8)
    q = api.quantize(model, calib, PTQConfig())
    g = q.intgraph
    used = {n.op for n in g.nodes}
    assert used <= set(OP_CATEGORIES)
    assert set(DATA_MOVEMENT) | {"LUT"} <= used
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    ours = engine_run.run(g, x)
    path = onnx_qdq.save_onnx(onnx_qdq.to_onnx(g), tmp_path / "moves.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    theirs = sess.run(g.output_names, {g.input_name: x})
    for name, y in zip(g.output_names, theirs):
        np.testing.assert_array_equal(ours[name], y)
