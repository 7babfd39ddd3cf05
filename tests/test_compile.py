"""The per-chunk hot path compiles as whole graphs: no `.item()`, `.tolist()` or Python branching on tensor
values inside the DiT forward, the noise controller or the sampler (a host read would be a graph break)."""

from __future__ import annotations

import torch

from wanstream.core.config import CacheConfig
from wanstream.engine.noise_controller import NoiseController
from wanstream.models.kv_cache import CachePolicy, CacheStep
from wanstream.models.sampling import FlowMatchSampler


def test_dit_forward_has_no_graph_breaks(kit_dit, kit_context):
    torch._dynamo.reset()
    prompt = kit_dit.embed_prompt(kit_context)
    policy = CachePolicy(CacheConfig(sink_threshold=0.2))
    cache = kit_dit.new_cache(2, 6, 15)
    forward = torch.compile(kit_dit.forward, fullgraph=True, backend="eager")
    x, t = torch.randn(2, 1, 16, 6, 10), torch.tensor([700, 500])
    with torch.no_grad():
        for frame in (2, 4, 8):   # filling with a mask, sink refresh eligible, steady state without mask
            step = CacheStep.build(policy, [frame, frame - 1], [frame, frame - 1], 1, 15, "cpu")
            out = forward(x, t, prompt, cache, step)
            assert out.shape == x.shape


def test_controller_and_sampler_have_no_graph_breaks():
    torch._dynamo.reset()
    controller = NoiseController(0.8)
    sampler = FlowMatchSampler()

    def chunk_step(prev, chunk, z, eps, flow):
        s, t = controller(prev, chunk)
        noisy = eps * s + z * (1 - s)
        x0 = sampler.to_x0(noisy, flow, t.reshape(1))
        return sampler.add_noise(x0, eps, torch.tensor([500]))

    compiled = torch.compile(chunk_step, fullgraph=True, backend="eager")
    args = (torch.rand(1, 3, 8, 8), torch.rand(1, 4, 3, 8, 8), torch.randn(1, 1, 4, 2, 2),
            torch.randn(1, 1, 4, 2, 2), torch.randn(1, 1, 4, 2, 2))
    assert compiled(*args).shape == (1, 1, 4, 2, 2)
