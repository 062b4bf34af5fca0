#!/usr/bin/env python3
"""Side by side, in one run on one machine: our CPU UNet step and VAE decode/encode (full-size SD1.5
architecture, random weights, 512x512, CFG batch 2 for the UNet, f32) against diffusers' on the
same shapes, same thread count; median of N after one warm-up, each measurement in its own process
so its peak resident memory is its own. Prints a Markdown table with the ratio ours / PyTorch.

    . VENV/bin/activate      # ../shared/tools/install-reference-env.sh VENV
    python benches/compare_torch.py [--runs 3] [--only unet,vae-decode,vae-encode] [--bf16]

Ours is `cargo run --release --example speed_probe` (weights f32, or f16 storage with --f16).
"""
import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time

UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
VAE = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512)


def torch_one(what, runs, bf16):
    """Runs in a child process: prints {"median": s, "times": [...], "peak_gb": x}."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    torch.manual_seed(0)
    dtype = torch.bfloat16 if bf16 else torch.float32
    with torch.inference_mode():
        if what == "unet":
            model = UNet2DConditionModel(**UNET).to(dtype).eval()
            x = torch.randn(2, 4, 64, 64, dtype=dtype)
            ctx = torch.randn(2, 77, 768, dtype=dtype)
            t = torch.tensor(500)
            fn = lambda: model(x, t, encoder_hidden_states=ctx).sample
        else:
            model = AutoencoderKL(**VAE).to(dtype).eval()
            if what == "vae-decode":
                z = torch.randn(1, 4, 64, 64, dtype=dtype)
                fn = lambda: model.decode(z).sample
            else:
                img = torch.randn(1, 3, 512, 512, dtype=dtype) * 0.5
                fn = lambda: model.encode(img).latent_dist.mean
        fn()
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB → GB
    print(json.dumps({"median": statistics.median(times), "times": times, "peak_gb": peak}))


def ours(what, runs, f16):
    cmd = ["cargo", "run", "--quiet", "--release", "--example", "speed_probe", "--", what, str(runs)]
    if f16:
        cmd.append("f16")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    m = re.search(r"median ([0-9.]+) s .* peak RSS ([0-9.]+) GB", out)
    return float(m.group(1)), float(m.group(2))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", default="unet,vae-decode,vae-encode")
    ap.add_argument("--bf16", action="store_true", help="also time PyTorch in bf16")
    ap.add_argument("--f16", action="store_true", help="ours with f16 weight storage")
    ap.add_argument("--torch-one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.torch_one:
        return torch_one(a.torch_one, a.runs, a.bf16)
    threads = os.environ.get("RAYON_NUM_THREADS") or str(os.cpu_count())
    env = dict(os.environ, RAYON_NUM_THREADS=threads, OMP_NUM_THREADS=threads)
    subprocess.run(["cargo", "build", "--quiet", "--release", "--example", "speed_probe"], check=True)
    print(f"threads {threads}, median of {a.runs} after a warm-up, 512x512, f32\n")
    print("| | ours | PyTorch f32 | ours / PyTorch | peak RSS ours | peak RSS PyTorch |" + (" PyTorch bf16 |" if a.bf16 else ""))
    print("|---|---|---|---|---|---|" + ("---|" if a.bf16 else ""))
    for what in a.only.split(","):
        ours_s, ours_gb = ours(what, a.runs, a.f16)
        def run_torch(bf16):
            cmd = [sys.executable, __file__, "--torch-one", what, "--runs", str(a.runs)] + (["--bf16"] if bf16 else [])
            return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.strip().splitlines()[-1])
        t = run_torch(False)
        row = f"| {what} | {ours_s:.2f} s | {t['median']:.2f} s | {ours_s / t['median']:.2f} | {ours_gb:.2f} GB | {t['peak_gb']:.2f} GB |"
        if a.bf16:
            row += f" {run_torch(True)['median']:.2f} s |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
