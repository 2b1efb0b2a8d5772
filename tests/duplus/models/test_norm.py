"""The groupwise instance norm: the same function as ``nn.InstanceNorm3d`` where it is swapped in (eager CPU
inference), and instance norm itself in training and in traced graphs."""

import copy

import torch
from torch import nn

from duplus.models.norm import GroupwiseInstanceNorm3d, use_groupwise_instance_norm


def test_equals_instance_norm_in_inference_and_is_instance_norm_in_training_and_in_graphs():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv3d(2, 6, 3), nn.InstanceNorm3d(6, affine=True), nn.InstanceNorm3d(6),
                        nn.InstanceNorm3d(6, track_running_stats=True))
    with torch.no_grad():
        ref[1].weight.uniform_(0.5, 1.5)
        ref[1].bias.uniform_(-0.5, 0.5)
    fast = copy.deepcopy(ref)
    assert use_groupwise_instance_norm(fast) == 2   # the running-statistics norm keeps its class
    assert [type(m) for m in fast] == [nn.Conv3d, GroupwiseInstanceNorm3d, GroupwiseInstanceNorm3d,
                                       nn.InstanceNorm3d]
    assert fast.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(3, 2, 9, 8, 7)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)
        with torch.profiler.profile() as prof:
            fast[:2](x)
    assert "aten::group_norm" in {e.name for e in prof.events()}
    with torch.profiler.profile() as prof:          # with gradients: F.instance_norm, bit for bit
        out = fast(x.requires_grad_())
    assert "aten::group_norm" not in {e.name for e in prof.events()}
    assert torch.equal(out, ref(x))
    graph = str(torch.jit.trace(fast[:3], x.detach()).inlined_graph)
    assert "aten::instance_norm" in graph and "aten::group_norm" not in graph
