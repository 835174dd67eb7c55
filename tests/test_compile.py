"""torch.compile(fullgraph=True) traces the whole model, inference and training, with no graph break."""

import pytest
import torch
from conftest import randomize_

import swinv2

SMALL = dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2), img_size=32, window_size=4, num_classes=5)


@pytest.mark.slow
@pytest.mark.parametrize("cpu_kernels", [False, True], ids=["plain", "cpu-kernels"])
@pytest.mark.parametrize("name", ["swinv2_tiny_window8_256", "swin_tiny_patch4_window7_224"])
def test_compile_fullgraph_inference_and_training(name, cpu_kernels):
    torch._dynamo.reset()
    model = randomize_(swinv2.create_model(name, drop_path_rate=0.0, cpu_kernels=cpu_kernels, **SMALL))
    x, target = torch.randn(2, 3, 32, 32), torch.tensor([1, 4])
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fullgraph: any graph break raises

    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)

    model.train()
    torch.nn.functional.cross_entropy(compiled(x), target).backward()
    compiled_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), target).backward()
    for n, p in model.named_parameters():
        # compiled: autograd through the plain ops; eager with cpu_kernels: the hand-written attention backward.
        # Both float32, each ~1e-5 of the largest gradient away from float64 with these deliberately rough weights.
        torch.testing.assert_close(compiled_grads[n], p.grad, rtol=1e-4, atol=5e-5 * float(p.grad.abs().max()), msg=n)


@pytest.mark.slow
def test_compile_inductor_inference():
    torch._dynamo.reset()
    model = randomize_(swinv2.create_model("swinv2_tiny_window8_256", **SMALL)).eval()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
