"""The CPU fast paths (duplus.models.fastpaths): the same functions as ``nn.InstanceNorm3d`` and ``nn.Conv3d`` where
they are swapped in (eager CPU inference), and PyTorch's own kernels in training and in traced graphs."""

import copy

import torch
from torch import nn

from duplus.models.fastpaths import GroupwiseInstanceNorm3d, OneDNNConv3d, pytorch_kernels, use_cpu_fast_paths


def _ops(fn) -> set[str]:
    with torch.profiler.profile() as prof:
        fn()
    return {e.name for e in prof.events()}


def test_equal_in_inference_and_pytorchs_kernels_in_training_and_in_graphs():
    torch.manual_seed(0)
    # a first conv whose input PyTorch's heuristic sends to its native kernel (N*C*D*H = 1*2*9*8 <= 20480)
    ref = nn.Sequential(nn.Conv3d(2, 6, 3, padding=1), nn.InstanceNorm3d(6, affine=True), nn.InstanceNorm3d(6),
                        nn.Conv3d(6, 4, 3, stride=2, padding=1), nn.InstanceNorm3d(4, track_running_stats=True))
    with torch.no_grad():
        ref[1].weight.uniform_(0.5, 1.5)
        ref[1].bias.uniform_(-0.5, 0.5)
    fast = copy.deepcopy(ref)
    assert use_cpu_fast_paths(fast) == {"instance_norm": 2, "conv3d": 2}  # the running-statistics norm is kept
    assert [type(m) for m in fast] == [OneDNNConv3d, GroupwiseInstanceNorm3d, GroupwiseInstanceNorm3d, OneDNNConv3d,
                                       nn.InstanceNorm3d]
    assert fast.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(1, 2, 9, 8, 7)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)
        assert "aten::slow_conv3d_forward" in _ops(lambda: ref[0](x))
        ops = _ops(lambda: fast[:2](x))
    assert {"aten::group_norm", "aten::mkldnn_convolution"} <= ops and "aten::slow_conv3d_forward" not in ops
    with torch.no_grad(), pytorch_kernels():        # the benchmark's stock path: PyTorch's kernels, bit for bit
        ops = _ops(lambda: fast[:2](x))
        assert torch.equal(fast(x), ref(x))
    assert "aten::group_norm" not in ops and "aten::slow_conv3d_forward" in ops
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):   # bf16 autocast: PyTorch's kernels too
        assert "aten::group_norm" not in _ops(lambda: fast[:2](x))
    x.requires_grad_()
    ops = _ops(lambda: fast(x))                     # with gradients: PyTorch's kernels, bit for bit
    assert "aten::group_norm" not in ops and "aten::slow_conv3d_forward" in ops
    assert torch.equal(fast(x), ref(x))
    graph = str(torch.jit.trace(fast[:4], x.detach()).inlined_graph)
    assert "aten::instance_norm" in graph and "aten::_convolution" in graph
    assert "aten::group_norm" not in graph and "mkldnn" not in graph


def test_one_window_per_pass_on_cpu_by_default():
    from duplus.models.fastpaths import windows_per_pass

    assert [windows_per_pass(d, 4) for d in ("cpu", "cuda", "gpu")] == [1, 4, 4]
