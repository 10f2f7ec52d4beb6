"""fxrewrite inside an export pipeline: torch.export (.pt2), ONNX + onnxruntime, torch's PassManager, and an
ExportedProgram as input. Run: .venv/bin/python examples/export_pipeline.py
"""

import tempfile
from pathlib import Path

import torch
import torchvision
from torch.fx.passes.infra.pass_manager import PassManager as TorchPassManager

import fxrewrite
from fxrewrite.passes import Grouped

torch.manual_seed(0)
model = torchvision.models.mobilenet_v2().eval()
x = torch.randn(1, 3, 64, 64)
workdir = tempfile.TemporaryDirectory(prefix="fxrewrite-export-")  # removed when the script ends, even on an error
out = Path(workdir.name)

# 1. Rewrite, then save through torch.export and ONNX; each save reloads the artifact and compares it.
result = fxrewrite.rewrite(model, (x,), passes="grouped{groups=4}", select=["features.1[0-9].conv.2"])
print(f"rewritten sites: {sum(r.status == 'rewritten' for r in result.report.records)}")
for name in ("model.pt2", "model.onnx", "model.safetensors"):
    saved = fxrewrite.save(result, out / name, (x,))
    diff = f"max |saved - eager| = {saved.max_abs_diff:.1e}" if saved.max_abs_diff is not None else "weights + plan"
    print(f"{name}: {[p.name for p in saved.paths]} ({diff})")

# 2. The .pt2 loads without fxrewrite and gives the rewritten module's outputs.
loaded = torch.export.load(out / "model.pt2").module()
torch.testing.assert_close(loaded(x), result.module(x))

# 3. The safetensors weights load into a freshly built model once the plan is replayed (weights_only loading).
fresh = fxrewrite.load_rewritten(torchvision.models.mobilenet_v2().eval(), out / "model.safetensors")
torch.testing.assert_close(fresh(x), result.module(x))
print("safetensors + plan.json replayed on a fresh model: outputs equal")

# 4. An fxrewrite pass as one step of torch's own PassManager.
gm = fxrewrite.trace(torchvision.models.resnet18().eval())
torch_pm = TorchPassManager(passes=[Grouped(groups=2)])
pm_result = torch_pm(gm)
print(f"torch PassManager ran fxrewrite's grouped pass: modified={pm_result.modified}")

# 5. A pipeline already on torch.export: rewrite the ExportedProgram itself; the result is an ExportedProgram.
ep = torch.export.export(model, (x,))
ep_result = fxrewrite.rewrite(ep, (x,), passes="depthwise-separable{rank=exact}")
assert isinstance(ep_result.module, torch.export.ExportedProgram)
torch.testing.assert_close(ep_result.module.module()(x), model(x), atol=1e-4, rtol=1e-4)
print("ExportedProgram in, ExportedProgram out: outputs equal to the original (rank=exact)")
