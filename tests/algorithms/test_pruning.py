import copy
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgeslim.algorithms.pruning import (BNScaleImportance, GradualSchedule, L1Importance, L2Importance,
                                         PruneRecord, TaylorImportance, accumulate_gradients, magnitude_prune,
                                         prune_channels, read_sparse, remove_masks, replay, sparse_size_bytes,
                                         write_sparse)
from edgeslim.api import export_fp32_onnx
from edgeslim.errors import EdgeslimError
from edgeslim.eval.profile import profile
from edgeslim.graph.capture import capture
from edgeslim.graph.dependency import find_groups
from edgeslim.models.mobilenet_v2 import mobilenet_v2
from edgeslim.models.resnet import resnet18
from edgeslim.models.resnet_cifar import resnet20

SHAPE = (3, 32, 32)


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
            m.weight.data.uniform_(0.2, 1.5, generator=g)
            m.bias.data.uniform_(-0.3, 0.3, generator=g)
    return model.eval()


class CatNet(nn.Module):
    """Two conv branches concatenated, then conv -> 2x2 pool -> flatten -> two linears."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.a, self.bna = nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.b, self.bnb = nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)
        self.c, self.bnc = nn.Conv2d(10, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1, self.fc2 = nn.Linear(32, 16), nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = torch.cat([F.relu(self.bna(self.a(x))), F.relu(self.bnb(self.b(x)))], 1)
        x = F.relu(self.bnc(self.c(x)))
        return self.fc2(F.relu(self.fc1(torch.flatten(self.pool(x), 1))))


def _model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    build = {"resnet20": resnet20, "resnet18": lambda: resnet18(num_classes=10),
             "mobilenet_v2": lambda: mobilenet_v2(num_classes=10), "catnet": CatNet}[name]
    return _randomize_bn(build(), seed)


def _masked(model: nn.Module, record: PruneRecord, x: torch.Tensor) -> torch.Tensor:
    """The oracle: the original model with the removed channels zeroed after every producer / BN."""
    groups = {g.name: g for g in find_groups(capture(model, record.input_shape))}
    hooks = []
    for r in record.groups:
        for m in groups[r["name"]].members:
            if m.role in ("out", "bn", "dw"):
                idx = torch.tensor(m.of(r["removed"]))
                hooks.append(model.get_submodule(m.module).register_forward_hook(
                    lambda mod, inp, out, idx=idx: out.index_fill(1, idx, 0.0)))
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for h in hooks:
            h.remove()


def _channel_cost(gm, groups) -> int:
    """The most MACs one channel of any prunable group costs in the unpruned model."""
    macs = {r.name: r.macs for r in profile(gm)}
    best = 0
    for g in groups:
        if g.prunable:
            cost = 0
            for m in g.members:
                if m.role != "bn":
                    width = gm.get_submodule(m.module).weight.shape[1 if m.role == "in" else 0]
                    cost += macs[m.module] * m.count // width
            best = max(best, cost)
    return best


def test_groups_resnet20_option_a_streams_are_unprunable():
    groups = find_groups(capture(_model("resnet20"), SHAPE))
    prunable = [g for g in groups if g.prunable]
    assert len(groups) == 14 and len(prunable) == 9
    for g in prunable:  # conv1 out / bn1 / conv2 in of each block
        block = g.name.rsplit(".", 1)[0]
        assert [(m.module, m.role) for m in g.members] == [
            (f"{block}.conv1", "out"), (f"{block}.bn1", "bn"), (f"{block}.conv2", "in")]
        assert g.size == {"layer1": 16, "layer2": 32, "layer3": 64}[block.split(".")[0]]
    streams = [g for g in groups if not g.prunable and any(m.role == "bn" for m in g.members)]
    assert len(streams) == 3 and all("pads the channel axis" in g.reason for g in streams)
    assert sum(g.size for g in streams) == 64  # every channel of the final residual stream
    out = [g for g in groups if g.reason == "model output"]
    assert len(out) == 1 and out[0].members[0].module == "linear"


def test_groups_resnet18_stage_streams_are_prunable():
    groups = find_groups(capture(_model("resnet18"), SHAPE))
    assert len(groups) == 14 and sum(g.prunable for g in groups) == 12
    streams = [g for g in groups if g.prunable and sum(m.role == "out" for m in g.members) > 1]
    assert [g.size for g in streams] == [64, 128, 256, 512]
    for g, stage in zip(streams[1:], (2, 3, 4)):
        assert (f"layer{stage}.0.downsample.0", "out") in [(m.module, m.role) for m in g.members]
    assert ("fc", "in") in [(m.module, m.role) for m in streams[-1].members]


def test_groups_mobilenet_v2_depthwise_passes_through():
    groups = find_groups(capture(_model("mobilenet_v2"), SHAPE))
    assert len(groups) == 27 and sum(g.prunable for g in groups) == 25
    g = next(g for g in groups if g.name == "features.2.conv.0.0")
    assert [(m.module, m.role) for m in g.members] == [
        ("features.2.conv.0.0", "out"), ("features.2.conv.0.1", "bn"), ("features.2.conv.1.0", "dw"),
        ("features.2.conv.1.1", "bn"), ("features.2.conv.2", "in")]
    stream = next(g for g in groups if g.name == "features.4.conv.2")  # 32-channel stage: 3 blocks, 2 adds
    assert sum(m.role == "out" for m in stream.members) == 3


def test_groups_cat_offsets_and_flatten():
    groups = {g.name: g for g in find_groups(capture(_model("catnet"), (3, 8, 8)))}
    assert [n for n, g in groups.items() if g.prunable] == ["stem", "a", "b", "c", "fc1"]
    c_in = lambda g: next(m for m in g.members if m.module == "c" and m.role == "in")  # noqa: E731
    assert c_in(groups["a"]).indices == tuple(range(6)) and c_in(groups["b"]).indices == (6, 7, 8, 9)
    fc1_in = next(m for m in groups["c"].members if m.module == "fc1")
    assert fc1_in.count == 4 and fc1_in.of([1]) == [4, 5, 6, 7]  # channel c -> features 4c .. 4c+3


class OddNet(nn.Module):
    """A grouped conv (unprunable), a squeeze-excite product (couples the SE conv) and view(n, -1)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bna, self.g = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, groups=2)
        self.b, self.se, self.fc = nn.Conv2d(8, 6, 1), nn.Conv2d(6, 6, 1), nn.Linear(24, 3)

    def forward(self, x):
        x = F.relu(self.b(self.g(F.relu(self.bna(self.a(x))))))
        x = x * torch.sigmoid(self.se(F.adaptive_avg_pool2d(x, 1)))
        x = F.adaptive_avg_pool2d(x, 2)
        return self.fc(x.view(x.size(0), -1))


class SliceNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.b(self.a(x)[:, :4])


def test_groups_grouped_conv_squeeze_excite_view_and_slice():
    torch.manual_seed(0)
    model = OddNet().eval()
    groups = {g.name: g for g in find_groups(capture(model, (3, 8, 8)))}
    assert not groups["a"].prunable and "grouped conv g" in groups["a"].reason
    b = groups["b"]
    assert b.prunable and [(m.module, m.role, m.count) for m in b.members] == [
        ("b", "out", 1), ("se", "out", 1), ("se", "in", 1), ("fc", "in", 4)]
    pruned, record = prune_channels(model, (3, 8, 8), ratio=0.5)
    assert [r["name"] for r in record.groups] == ["b"] and pruned.se.out_channels == 3 and pruned.fc.in_features == 12
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), _masked(model, record, x), rtol=1e-5, atol=1e-5)
    sliced = next(g for g in find_groups(capture(SliceNet(), (3, 4, 4))) if g.name == "a")
    assert not sliced.prunable and "slices the channel axis" in sliced.reason


CASES = [("resnet20", SHAPE, {"target_macs": 0.7}), ("resnet20", SHAPE, {"ratio": 0.5, "importance": BNScaleImportance()}),
         ("resnet18", SHAPE, {"ratio": 0.3, "round_to": 8}), ("mobilenet_v2", SHAPE, {"target_macs": 0.6}),
         ("catnet", (3, 8, 8), {"ratio": 0.5, "importance": L2Importance()})]


@pytest.mark.parametrize("name,shape,kwargs", CASES, ids=[f"{c[0]}-{list(c[2])[0]}" for c in CASES])
def test_pruned_model_equals_masked_original(name, shape, kwargs):
    model = _model(name)
    pruned, record = prune_channels(model, shape, **kwargs)
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), _masked(model, record, x), rtol=1e-5, atol=1e-5)
    assert record.macs_after < record.macs_before and record.params_after < record.params_before
    assert record.macs_after == sum(r.macs for r in profile(capture(pruned, shape)))
    groups = {g.name: g for g in find_groups(capture(model, shape))}
    lost = {}  # (module, weight axis) -> indices removed by all groups together
    for r in record.groups:
        for m in groups[r["name"]].members:
            lost.setdefault((m.module, {"in": 1}.get(m.role, 0)), set()).update(m.of(r["removed"]))
        assert len(r["kept"]) % kwargs.get("round_to", 1) == 0 and len(r["kept"]) >= 1
    for (module, axis), idx in lost.items():  # every layer lost exactly its groups' removed channels
        before = model.get_submodule(module).weight.shape[axis]
        assert pruned.get_submodule(module).weight.shape[axis] == before - len(idx)
    if "ratio" in kwargs:
        assert all(len(r["kept"]) == math.ceil((r["size"] - math.floor(r["size"] * kwargs["ratio"]))
                                               / kwargs.get("round_to", 1)) * kwargs.get("round_to", 1)
                   for r in record.groups)
    assert set(pruned.state_dict()) <= set(model.state_dict())


@pytest.mark.parametrize("target", [0.7, 0.5])
def test_target_macs_met_within_one_channel(target):
    model = _model("resnet20")
    gm = capture(model, SHAPE)
    _, record = prune_channels(model, SHAPE, target_macs=target)
    budget = target * record.macs_before
    assert record.macs_after <= budget < record.macs_after + _channel_cost(gm, find_groups(gm))


def test_resnet20_block_channel_counts():
    model = _model("resnet20")
    pruned, record = prune_channels(model, SHAPE, ratio=0.25)
    for stage, width in (("layer1", 16), ("layer2", 32), ("layer3", 64)):
        for i in range(3):
            kept = width - width // 4
            assert pruned.get_submodule(f"{stage}.{i}.conv1").out_channels == kept
            assert pruned.get_submodule(f"{stage}.{i}.bn1").num_features == kept
            assert pruned.get_submodule(f"{stage}.{i}.conv2").in_channels == kept
            assert pruned.get_submodule(f"{stage}.{i}.conv2").out_channels == width


@pytest.mark.parametrize("name,shape", [("resnet20", SHAPE), ("catnet", (3, 8, 8))])
def test_pruned_model_runs_in_onnxruntime(name, shape, tmp_path):
    import onnxruntime as ort

    pruned, _ = prune_channels(_model(name), shape, target_macs=0.6)
    path = export_fp32_onnx(pruned, shape, tmp_path / "p.onnx")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = pruned(x).numpy()
    np.testing.assert_allclose(sess.run(None, {"input": x.numpy()})[0], ref, rtol=1e-4, atol=1e-4)


def test_record_round_trip_and_replay(tmp_path):
    model = _model("mobilenet_v2")
    fresh = copy.deepcopy(model)
    pruned, record = prune_channels(model, SHAPE, target_macs=0.5, round_to=4)
    loaded = PruneRecord.load(record.save(tmp_path / "prune.json"))
    assert loaded == record
    again = replay(fresh, SHAPE, loaded).state_dict()
    ref = pruned.state_dict()
    assert list(again) == list(ref) and all(torch.equal(again[k], ref[k]) for k in ref)
    with pytest.raises(EdgeslimError, match="does not match"):
        replay(_model("resnet20"), SHAPE, loaded)


def test_protect_leaves_groups_alone():
    _, record = prune_channels(_model("resnet20"), SHAPE, ratio=0.5, protect=("layer1.*",))
    assert [r["name"] for r in record.groups] == [f"layer{s}.{i}.conv1" for s in (2, 3) for i in range(3)]


class TwoConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.conv2 = nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.conv2(F.relu(self.bn1(self.conv1(x))))


def _two_conv() -> TwoConv:
    m = TwoConv().eval()
    with torch.no_grad():  # filter L1 / L2: f0 3 / 1.73, f1 2.5 / 2.5, f2 0.3 / 0.17, f3 1.5 / 0.87
        m.conv1.weight.copy_(torch.tensor([[1, 1, 1], [2.5, 0, 0], [0.1, -0.1, 0.1], [0.5, 0.5, -0.5]]).reshape(4, 3, 1, 1))
        m.bn1.weight.copy_(torch.tensor([0.1, 0.2, 3.0, 0.05]))
    return m


@pytest.mark.parametrize("importance,ratio,kept", [(L1Importance(), 0.5, [0, 1]), (L1Importance(), 0.75, [0]),
                                                   (L2Importance(), 0.75, [1]), (BNScaleImportance(), 0.75, [2])])
def test_importance_ranks_filters(importance, ratio, kept):
    model = _two_conv()
    pruned, record = prune_channels(model, (3, 4, 4), ratio=ratio, importance=importance)
    assert [r["kept"] for r in record.groups] == [kept]
    assert torch.equal(pruned.conv1.weight, model.conv1.weight[kept])


def test_taylor_importance_is_weight_times_gradient():
    model = _two_conv()
    with pytest.raises(EdgeslimError, match="accumulate_gradients"):
        prune_channels(model, (3, 4, 4), ratio=0.5, importance=TaylorImportance())
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 4, 4, generator=g), torch.randn(4, 2, 4, 4, generator=g)) for _ in range(2)]
    accumulate_gradients(model, batches, lambda out, y: (out - y).pow(2).mean())
    gm = capture(model, (3, 4, 4))
    group = next(g for g in find_groups(gm) if g.prunable)
    wg = lambda p: (p * p.grad).abs().detach()  # noqa: E731
    want = (wg(model.conv1.weight).sum((1, 2, 3)) + wg(model.bn1.weight) + wg(model.bn1.bias)
            + wg(model.conv2.weight).sum((0, 2, 3)))
    torch.testing.assert_close(TaylorImportance()(group, gm), want)
    _, record = prune_channels(model, (3, 4, 4), ratio=0.5, importance=TaylorImportance())
    assert record.groups[0]["kept"] == sorted(torch.argsort(want, descending=True)[:2].tolist())


def test_channel_pruning_errors():
    for bad in (0, 1, 1.5, -0.2):
        with pytest.raises(EdgeslimError, match=r"outside \(0, 1\)"):
            prune_channels(_model("resnet20"), SHAPE, ratio=bad)
    with pytest.raises(EdgeslimError, match="would prune everything"):
        prune_channels(_model("resnet20"), SHAPE, target_macs=0.01)
    with pytest.raises(EdgeslimError, match="no prunable channel groups"):
        prune_channels(nn.Sequential(nn.Conv2d(3, 4, 3)), (3, 8, 8), ratio=0.5)
    with pytest.raises(EdgeslimError, match="exactly one"):
        prune_channels(_model("resnet20"), SHAPE)


def _weights(model, skip=("conv1", "linear")):
    return {n: m.weight for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in skip}


def test_magnitude_prune_exact_sparsity_global_and_layer():
    model = _model("resnet20")
    masks = magnitude_prune(model, 0.8)
    ws = _weights(model)
    assert set(masks) == {f"{n}.weight" for n in ws}  # the first conv and the last linear are excluded
    total = sum(w.numel() for w in ws.values())
    assert sum(int((w == 0).sum()) for w in ws.values()) == round(0.8 * total)
    assert int((model.conv1.weight == 0).sum()) == 0
    model = _model("resnet20")
    magnitude_prune(model, 0.5, scope="layer", exclude=())
    for w in _weights(model, skip=()).values():
        assert int((w == 0).sum()) == round(0.5 * w.numel())


def test_masks_survive_sgd_and_remove_masks():
    model = _model("resnet20").train()
    masks = magnitude_prune(model, 0.7)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(4, *SHAPE)), torch.tensor([0, 1, 2, 3])).backward()
        opt.step()
    for name, mask in masks.items():
        w = model.get_submodule(name.rsplit(".", 1)[0]).weight
        assert torch.all(w[~mask] == 0) and torch.count_nonzero(w[mask]) == mask.sum()
    keys = set(resnet20().state_dict())
    remove_masks(model)
    assert set(model.state_dict()) == keys and isinstance(model.layer1[0].conv1.weight, nn.Parameter)
    assert all(int((model.get_submodule(n.rsplit(".", 1)[0]).weight == 0).sum()) == int((~m).sum())
               for n, m in masks.items())


def test_gradual_schedule_follows_zhu_gupta():
    sched = GradualSchedule(0.9, start_step=100, end_step=1100, frequency=100, initial_sparsity=0.1)
    for t in (100, 350, 600, 1100):
        assert sched.sparsity(t) == pytest.approx(0.9 + (0.1 - 0.9) * (1 - (t - 100) / 1000) ** 3)
    assert sched.sparsity(0) == pytest.approx(0.1) and sched.sparsity(5000) == pytest.approx(0.9)
    model = _model("resnet20")
    assert sched.step(model, 50) is None and sched.step(model, 150) is None
    prev = None
    for t in (200, 300, 1100):
        s = sched.step(model, t)
        assert s == pytest.approx(sched.sparsity(t))
        ws = _weights(model)
        zeros = torch.cat([(w == 0).flatten() for w in ws.values()])
        assert int(zeros.sum()) == round(s * zeros.numel())
        assert prev is None or bool(torch.all(zeros[prev]))  # pruned weights stay pruned
        prev = zeros
    with pytest.raises(EdgeslimError):
        GradualSchedule(0.9, start_step=10, end_step=5, frequency=1)


def test_sparse_size_formats_and_file_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(64, 64, generator=g)
    half = torch.randn(64, 64, generator=g) * (torch.rand(64, 64, generator=g) < 0.5)
    sparse = torch.randn(64, 576, generator=g) * (torch.rand(64, 576, generator=g) < 0.05)
    sd = {"dense": dense, "half": half, "sparse": sparse.reshape(64, 64, 3, 3), "bias": torch.randn(16, generator=g),
          "count": torch.tensor(7), "half_f16": half.half()}
    size = sparse_size_bytes(sd)
    rows = {r.name: r for r in size.rows}
    assert [rows[k].format for k in ("dense", "half", "sparse", "bias", "count")] == [
        "dense", "bitmask", "csr", "dense", "dense"]
    nnz = int(torch.count_nonzero(sparse))
    assert rows["half"].bytes == 4096 // 8 + int(torch.count_nonzero(half)) * 4
    assert rows["sparse"].bytes == nnz * (4 + 2) + 65 * 4
    assert rows["half_f16"].bytes == 4096 // 8 + int(torch.count_nonzero(half)) * 2
    assert sparse_size_bytes(sd, value_bits=8).total_bytes < size.total_bytes < size.dense_bytes
    path = write_sparse(sd, tmp_path / "w.npz")
    back = read_sparse(path)
    assert list(back) == list(sd) and all(back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k]) for k in sd)
    n_arrays = sum({"dense": 1, "bitmask": 2, "csr": 3}[r.format] for r in size.rows) + 1
    overhead = os.path.getsize(path) - size.total_bytes
    assert 0 <= overhead <= 400 * n_arrays + 200 * len(sd)  # zip + .npy headers and the format index


def test_magnitude_pruned_model_size_on_disk(tmp_path):
    model = _model("resnet20")
    magnitude_prune(model, 0.9)
    size = sparse_size_bytes(model)  # masked weights count as their zeroed values, under the plain names
    assert [r.name for r in size.rows] == list(resnet20().state_dict())
    assert size.total_bytes < 0.3 * size.dense_bytes
    sd = remove_masks(model).state_dict()
    back = read_sparse(write_sparse(sd, tmp_path / "r20.npz"))
    assert all(torch.equal(back[k], sd[k]) for k in sd)
