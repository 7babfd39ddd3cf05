"""The conformance goldens on any device and dtype, eager and through the fast path, as a table of max errors.

    python scripts/conformance_check.py --device cuda --dtype float32 [--json out.json] [--markdown out.md]

Runs, with the tiny conformance weights of ``tests/data/conformance`` (or ``../shared/conformance``):

* ``dit stream batch`` — the free-running stream-batch golden (prepare + 12 calls) through the runner: eager,
  and compiled (with CUDA graphs on CUDA);
* ``vae stream`` — streaming encode and decode (fast path; compiled too on request);
* ``noise controller`` — the motion-aware controller's traces;
* ``t2v <backbone>`` — the Self-Forcing and LongLive goldens (``tests/data/conformance/backbones``) free-running
  through the engine: every call's flow and x0, the final latents and the decoded video.

Each row has the largest abs difference against the golden and passes at ``--tol`` (default 1e-4 in float32, where
TF32 is switched off; 0.1 in bfloat16, where the golden is only a sanity bound). The exit status is 1 if a row fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from kit import BACKBONE_GOLDENS, backbone_golden_errors, kit_dir, load_kit, stream_batch_golden_errors  # noqa: E402

from wanstream.core.config import CacheConfig  # noqa: E402
from wanstream.engine.latent_stream import LatentStream  # noqa: E402
from wanstream.engine.noise_controller import NoiseController  # noqa: E402
from wanstream.models.checkpoints import (  # noqa: E402
    build_transformer,
    build_vae,
    causal_state_dict,
    diffusers_dit_config,
    read_torch_file,
)
from wanstream.models.dit import CausalWanDiT  # noqa: E402
from wanstream.models.sampling import FlowMatchSampler  # noqa: E402
from wanstream.models.vae import StreamingVAE  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def kit_dit(device, dtype) -> CausalWanDiT:
    cfg = json.loads((kit_dir() / "tiny_config.json").read_text())["dit"]
    path = kit_dir() / "model.pt"
    dit = CausalWanDiT(build_transformer(diffusers_dit_config(cfg), causal_state_dict(path), str(path)))
    return dit.to(device, dtype)


def dit_rows(device, dtype) -> list[dict]:
    dit = kit_dit(device, dtype)
    prompt = dit.embed_prompt(load_kit("text_context.pt")["context"].to(device))
    rows = []
    for compile in (False, True):
        made = []

        def make(noise, compile=compile):
            made.append(LatentStream(dit, FlowMatchSampler(), prompt, noise, tokens_per_frame=15, steps=2,
                                     cache=CacheConfig(sink_threshold=-1), compile=compile))
            return made[-1]

        t = time.perf_counter()
        errors = stream_batch_golden_errors(make, device, dtype)
        paths = made[0].runner.path_calls
        name = "dit stream batch, " + ("eager" if not compile else
                                       "compiled + CUDA graphs" if made[0].runner.cuda_graphs else "compiled")
        rows.append(dict(check=name, max_abs=max(errors.values()), worst=max(errors, key=errors.get),
                         seconds=time.perf_counter() - t, paths=dict(paths)))
    return rows


def vae_rows(device, dtype, compile: bool) -> list[dict]:
    vae = build_vae(read_torch_file(kit_dir() / "Wan2.1_VAE_tiny.pth"), "tiny vae").to(device, dtype)
    d = load_kit("d_vae_stream.pt")
    rows = []
    for comp in (False, True) if compile else (False,):
        svae = StreamingVAE(vae, compile=comp)
        t = time.perf_counter()
        err = 0.0
        state = svae.new_state()
        video = d["video"].transpose(1, 2).to(device, dtype)
        for rec in d["stream_encode"]:
            a, b = rec["frames"]
            mu = svae.encode(state, video[:, a:b])
            err = max(err, (mu.float().cpu() - rec["mu"].transpose(1, 2)).abs().max().item())
        state = svae.new_state()
        for rec in d["stream_decode_pure_fp32"]:
            a, b = rec["latents"]
            pixels = svae.decode(state, d["decode_latents"][:, a:b].to(device, dtype))
            err = max(err, (pixels.float().cpu() - rec["pixels"]).abs().max().item())
        rows.append(dict(check="vae stream" + (", compiled" if comp else ""), max_abs=err, worst="encode/decode",
                         seconds=time.perf_counter() - t))
    return rows


def controller_rows(device, dtype) -> list[dict]:
    b = load_kit("b_noise_controller.pt")
    key = "motion_video_fp32" if dtype == torch.float32 else "motion_video_bf16"
    frames = b["motion_video"].to(device, dtype).transpose(1, 2)
    nc = NoiseController(b["s_init"])
    err, t_bad = 0.0, 0
    for rec in b[key]:
        e = rec["end_idx"]
        s, t = nc(frames[:, e - 5], frames[:, e - 4:e])
        err = max(err, abs(float(s) - rec["s"]))
        t_bad += int(t) != rec["t"]
    exact = dtype == torch.float32      # float32 traces must give the same integer timesteps; bfloat16 is reported
    return [dict(check="noise controller", max_abs=err, worst=f"{t_bad} timesteps differ", seconds=0.0,
                 failed_exact=t_bad if exact else 0)]


def backbone_rows(device, dtype) -> list[dict]:
    import tempfile
    rows = []
    for name in BACKBONE_GOLDENS:
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as root:
            errors = backbone_golden_errors(name, Path(root), device, dtype)
        rows.append(dict(check=f"t2v {name}", max_abs=max(errors.values()), worst=max(errors, key=errors.get),
                         seconds=time.perf_counter() - t))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--tol", type=float, default=None, help="pass bound (default 1e-4 float32, 0.1 bfloat16)")
    p.add_argument("--vae-compile", action="store_true", help="also check the compiled VAE path")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None)
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    tol = args.tol if args.tol is not None else (1e-4 if dtype == torch.float32 else 0.1)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False      # float32 means float32 (cuDNN convs default to TF32)
        torch.backends.cudnn.allow_tf32 = False
    with torch.inference_mode():
        rows = dit_rows(device, dtype) + vae_rows(device, dtype, args.vae_compile) + controller_rows(device, dtype)
        rows += backbone_rows(device, dtype)
    for r in rows:
        r.update(device=str(device), dtype=args.dtype, tol=tol,
                 passed=r["max_abs"] <= tol and not r.get("failed_exact", 0))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = ["| check | device | dtype | max abs error | bound | pass | seconds |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['check']} | {name} | {r['dtype']} | {r['max_abs']:.2e} ({r['worst']}) | {tol:g} | "
              f"{'yes' if r['passed'] else 'NO'} | {r['seconds']:.1f} |" for r in rows]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.markdown:
        args.markdown.write_text("\n".join(lines) + "\n")
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
