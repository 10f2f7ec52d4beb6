"""The rewritten module owns every tensor: ``rewrite`` shares the weights of the convs a pass replaces with the
user's model only while the pass reads them (``graph.ownership``), and nothing of the returned module is the user's:
training it, or the repair on calibration data, can never reach the input model, nor can changes to the input model
reach it. On the CPU the copies are copy-on-write: memory is shared until either side writes."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import fxrewrite
from fxrewrite.graph.ownership import SharedTensors

pytestmark = pytest.mark.usefixtures("one_thread")

PIPELINES = ("depthwise-separable{rank=1}", "depthwise-separable{rank=exact}", "grouped{groups=2}",
             "grouped{groups=4, permute=true}", "grouped{groups=2},channel-shuffle{rule=all}",
             "grouped-separable{groups=2, rank=2}")


def _storages(module: nn.Module) -> dict[int, str]:
    """Storage objects by identity (``data_ptr()`` would materialise a copy-on-write tensor before looking)."""
    tensors = (*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False))
    return {t.untyped_storage()._cdata: name for name, t in tensors if t.numel()}


def _address(t: torch.Tensor) -> int:
    return t.const_data_ptr()  # read-only: leaves a lazy copy lazy


class Tied(nn.Module):
    """Two convs with one weight (no pass unties them), a conv a pass rewrites, a 1x1 conv a separable pass leaves,
    and two linear layers with one weight."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.b.weight = self.a.weight
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.point = nn.Conv2d(8, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)
        self.fc2.weight = self.fc1.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.point(self.c(self.b(torch.relu(self.a(x))))))
        return self.fc2(self.fc1(y.mean((2, 3))))


@pytest.mark.parametrize("passes", PIPELINES)
def test_rewritten_resnet_shares_no_storage_with_the_input(passes: str) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, 32, 32)
    result = fxrewrite.rewrite(model, (x,), passes=passes)
    assert result.ok, result.verification
    assert any(r.status == "rewritten" for r in result.report.records)
    shared = set(_storages(result.module)) & set(_storages(model))
    assert not shared, [_storages(result.module)[p] for p in shared]
    with torch.no_grad():  # changing every tensor of the result leaves the input as it was
        for t in (*result.module.parameters(), *result.module.buffers()):
            t.add_(1)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    kept = {k: v.clone() for k, v in result.module.state_dict().items()}
    with torch.no_grad():  # and changing the input afterwards leaves the result as it was
        for t in (*model.parameters(), *model.buffers()):
            t.sub_(1)
    assert all(torch.equal(v, kept[k]) for k, v in result.module.state_dict().items())


needs_lazy_clone = pytest.mark.skipif(not hasattr(torch, "_lazy_clone"), reason="torch without copy-on-write tensors")


@needs_lazy_clone
def test_kept_cpu_weights_are_copied_on_write() -> None:
    """The weights no pass replaced read the input's memory until one side writes; then the writer gets its own
    copy and the other keeps the values it had."""
    torch.manual_seed(0)
    model = Tied().eval()
    result = fxrewrite.rewrite(model, (torch.randn(2, 8, 6, 6),), passes="depthwise-separable{rank=exact}")
    new = result.module
    kept = [(new.point.weight, model.point.weight), (new.bn.running_var, model.bn.running_var),
            (new.fc1.weight, model.fc1.weight), (new.a.weight, model.a.weight)]
    for copied, original in kept:
        assert copied is not original and torch._C._is_cow_tensor(copied)
        assert _address(copied) == _address(original)
    before = model.point.weight.detach().clone()
    with torch.no_grad():
        new.point.weight.mul_(2)  # the writer (the result) gets its own memory
    assert _address(new.point.weight) != _address(model.point.weight)
    torch.testing.assert_close(model.point.weight, before, rtol=0, atol=0)
    torch.testing.assert_close(new.point.weight, before * 2, rtol=0, atol=0)
    with torch.no_grad():
        model.bn.running_var.fill_(3.0)  # the writer (the input) gets its own memory
    assert not torch.equal(new.bn.running_var, model.bn.running_var) and bool((new.bn.running_var == 1).all())
    assert new.a.weight is new.b.weight  # ties hold on the lazy copies


def test_storages_torch_cannot_lazily_copy_are_copied_at_once(tmp_path: Path) -> None:
    """Memory torch's allocator did not make is copied eagerly, as deepcopy would: numpy's (written behind torch's
    back afterwards, it reaches the input only), shared memory, and a program loaded with torch.export.load (whose
    lazy copy torch 2.14 cannot materialise: writing to it crashed the process)."""
    import numpy as np

    holder = nn.Module()
    array = np.arange(6, dtype=np.float32)
    holder.weight = nn.Parameter(torch.from_numpy(array))
    holder.register_buffer("shm", torch.ones(3).share_memory_())
    shared = SharedTensors(holder)
    twin = copy.deepcopy(holder, shared.memo())
    assert shared.own(twin) == 2
    assert twin.weight is not holder.weight and _address(twin.weight) != _address(holder.weight)
    assert _address(twin.shm) != _address(holder.shm)
    assert isinstance(twin.weight, nn.Parameter) and twin.weight.requires_grad
    array[0] = 100.0
    assert float(holder.weight.detach()[0]) == 100.0 and float(twin.weight.detach()[0]) == 0.0

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)).eval()
    x = torch.randn(1, 3, 8, 8)
    torch.export.save(torch.export.export(model, (x,)), str(tmp_path / "m.pt2"))
    loaded = torch.export.load(str(tmp_path / "m.pt2")).module()
    result = fxrewrite.rewrite(loaded, (x,), passes="depthwise-separable{rank=exact}")
    assert result.ok, result.verification
    with torch.no_grad():
        for t in (*result.module.parameters(), *result.module.buffers()):
            t.add_(1)  # a write to a lazy copy of loaded memory would crash here
    torch.testing.assert_close(loaded(x), model(x))


def test_ties_survive_and_unreplaced_convs_are_copied() -> None:
    torch.manual_seed(0)
    model = Tied().eval()
    result = fxrewrite.rewrite(model, (torch.randn(2, 8, 6, 6),), passes="depthwise-separable{rank=exact}")
    assert [r.site for r in result.report.records if r.status == "rewritten"] == ["c"]
    new = result.module
    # tied tensors are one new tensor each: the linear weights (copied at once) and the conv weights (kept shared
    # while the passes ran, since convs are what passes replace, and copied after)
    assert new.fc1.weight is new.fc2.weight and new.fc1.weight is not model.fc1.weight
    assert new.a.weight is new.b.weight and new.a.weight is not model.a.weight
    assert torch.equal(new.a.weight, model.a.weight)
    assert new.point.weight is not model.point.weight and torch.equal(new.point.weight, model.point.weight)
    assert not set(_storages(new)) & set(_storages(model))
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(new(x), model(x), rtol=1e-4, atol=1e-5)


def test_training_the_rewrite_leaves_the_input_alone() -> None:
    torch.manual_seed(0)
    model = Tied().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = fxrewrite.rewrite(model, (torch.randn(4, 8, 6, 6),), passes="grouped{groups=2}", verify=False)
    optimiser = torch.optim.SGD(result.module.parameters(), lr=0.1)
    for _ in range(3):
        optimiser.zero_grad()
        result.module(torch.randn(4, 8, 6, 6)).square().mean().backward()
        optimiser.step()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_shared_tensors_copies_each_tensor_once_and_keeps_what_it_is_told() -> None:
    model = Tied()
    shared = SharedTensors(model)
    twin = copy.deepcopy(model, shared.memo())
    assert twin.a is not model.a and twin.a.weight is model.a.weight
    # a and b hold one weight: keeping "a" still copies it for "b"; the second call gives "a" that same copy
    first = shared.own(twin, keep={"a"})
    assert twin.a.weight is model.a.weight and twin.b.weight is not model.a.weight
    assert shared.own(twin) == 1 and twin.a.weight is twin.b.weight
    assert first == len({id(t) for t in (*model.parameters(), *model.buffers())}) - 1
    assert isinstance(twin.fc1.weight, nn.Parameter) and twin.fc1.weight.requires_grad


def test_own_copies_buffers_as_deepcopy_does() -> None:
    """Buffers are cloned directly where that equals deepcopy; views of one storage, a tensor with Python attributes
    and one with a grad take deepcopy's own path, so they keep what it keeps."""
    holder = nn.Module()
    base = torch.arange(12.0)
    holder.register_buffer("plain", torch.randn(3, 4))
    holder.register_buffer("left", base[:6])  # two views of one storage: shared in the copy too
    holder.register_buffer("right", base[6:])
    whole = torch.arange(6.0)
    holder.register_buffer("flat", whole)  # two tensors that each cover one whole storage
    holder.register_buffer("grid", whole.view(2, 3))
    tagged = torch.ones(2)
    tagged.note = "kept"  # type: ignore[attr-defined]
    holder.register_buffer("tagged", tagged)
    holder.weight = nn.Parameter(torch.randn(2, 2))
    holder.weight.grad = torch.ones(2, 2)
    reference = copy.deepcopy(holder)
    shared = SharedTensors(holder)
    twin = copy.deepcopy(holder, shared.memo())
    assert shared.own(twin) == 7
    for name, t in (*twin.named_buffers(), *twin.named_parameters()):
        ref, orig = dict((*reference.named_buffers(), *reference.named_parameters()))[name], getattr(holder, name)
        assert t.untyped_storage()._cdata != orig.untyped_storage()._cdata
        assert (type(t), t.shape, t.stride(), t.storage_offset(), t.requires_grad) == (
            type(ref), ref.shape, ref.stride(), ref.storage_offset(), ref.requires_grad)
        torch.testing.assert_close(t, orig, rtol=0, atol=0)
    assert twin.left.untyped_storage()._cdata == twin.right.untyped_storage()._cdata
    assert twin.flat.untyped_storage()._cdata == twin.grid.untyped_storage()._cdata
    assert twin.tagged.note == "kept" and twin.tagged.__dict__ == reference.tagged.__dict__
    assert twin.weight.grad is None and reference.weight.grad is None  # Parameter's deepcopy leaves the grad
