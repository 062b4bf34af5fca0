#!/usr/bin/env python3
"""Side by side, in one run on one machine: our CPU UNet step and VAE decode/encode (full-size SD1.5
architecture, random weights, 512x512, the UNet with CFG batch 2 and batch 1) against diffusers
on the same shapes, same thread count; median of N after one warm-up, each measurement in its own process
so its peak resident memory is its own. Prints one Markdown table: time (peak RSS) per cell.

    . VENV/bin/activate      # ../shared/tools/install-reference-env.sh VENV
    python benches/compare_torch.py [--runs 3] [--only unet,unet-b1,vae-decode,vae-encode]
        [--ours f32,bf16,q8] [--torch f32,bf16,autocast,ov-f32,ov]

OpenVINO (`--torch ov-f32,ov`, after `pip install openvino` in the same environment) runs the same
diffusers models converted with `openvino.convert_model`, with the f32 precision hint and with its
default precision (bf16 on CPUs with AVX512_BF16 or AMX; what FastSD CPU runs), latency hint, same
threads. `--only taesd` times a TAESD encode + decode at 512² (diffusers' AutoencoderTiny).
`--only load --model DIR` times loading a diffusers SD1.x folder (text encoder, UNet, VAE; ours
`speed_probe load`, diffusers `StableDiffusionImg2ImgPipeline.from_pretrained` with the mode's
dtype; warm page cache; not OpenVINO, whose conversion is not a load).

Ours is `cargo run --release --example speed_probe` in each dtype asked (bf16: bf16 weights and, on a
CPU with AVX512_BF16, bf16 products; q8: int8 weights per output channel, `--dtype q8`, the UNet
only — the VAE stays f32 under q8; q8-f32: the same with GHIBLIFY_BF16_ARITHMETIC=0, what CPUs
without AVX512_BF16 run); PyTorch in f32, in bf16 (weights and activations), and under
bf16 autocast (f32 weights).
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


def torch_one(what, runs, mode, model_dir=None):
    """Runs in a child process: prints {"median": s, "times": [...], "peak_gb": x}. mode: f32, bf16
    (weights and activations bf16) or autocast (f32 weights, torch.autocast("cpu", torch.bfloat16));
    ov-f32 / ov: the same f32 model converted to OpenVINO (`pip install openvino`) and compiled with
    the f32 inference precision hint / with its default precision (bf16 on a CPU with AVX512_BF16
    or AMX), latency hint, the same thread count (peak RSS includes the PyTorch model it came from)."""
    import contextlib
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    torch.manual_seed(0)
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast" else contextlib.nullcontext()
    if what == "load":
        from diffusers import StableDiffusionImg2ImgPipeline
        return report(lambda: StableDiffusionImg2ImgPipeline.from_pretrained(
            model_dir, torch_dtype=dtype, safety_checker=None), runs, contextlib.nullcontext())
    with torch.inference_mode(), amp:
        if what in ("unet", "unet-b1"):
            b = 2 if what == "unet" else 1
            model = UNet2DConditionModel(**UNET).to(dtype).eval()
            x = torch.randn(b, 4, 64, 64, dtype=dtype)
            ctx = torch.randn(b, 77, 768, dtype=dtype)
            t = torch.tensor(500)
            module, args = (lambda x, t, ctx: model(x, t, encoder_hidden_states=ctx).sample), (x, t, ctx)
        elif what == "taesd":
            model = AutoencoderTiny().to(dtype).eval()
            img = torch.randn(1, 3, 512, 512, dtype=dtype) * 0.5
            module, args = (lambda img: model.decode(model.encode(img).latents).sample), (img,)
        else:
            model = AutoencoderKL(**VAE).to(dtype).eval()
            if what == "vae-decode":
                z = torch.randn(1, 4, 64, 64, dtype=dtype)
                module, args = (lambda z: model.decode(z).sample), (z,)
            else:
                img = torch.randn(1, 3, 512, 512, dtype=dtype) * 0.5
                module, args = (lambda img: model.encode(img).latent_dist.mean), (img,)
    # The call to time: the model itself, or (OpenVINO) the same function compiled.
    fn = lambda: module(*args)
    if mode.startswith("ov"):
        import openvino as ov

        class Wrap(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model.requires_grad_(False)  # its weights are the wrapper's own

            def forward(self, *a):
                return module(*a)
        ov_model = ov.convert_model(Wrap(), example_input=args)
        config = {"INFERENCE_NUM_THREADS": int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())),
                  "PERFORMANCE_HINT": "LATENCY"}
        if mode == "ov-f32":
            config["INFERENCE_PRECISION_HINT"] = "f32"
        request = ov.Core().compile_model(ov_model, "CPU", config).create_infer_request()
        inputs = [a.numpy() for a in args]
        fn = lambda: request.infer(inputs)
    report(fn, runs, amp)


def report(fn, runs, amp):
    """Times fn() once to warm up, then `runs` times (inside inference mode and `amp`), and prints
    {"median": s, "times": [...], "peak_gb": x} for the parent."""
    import torch
    with torch.inference_mode(), amp:
        fn()
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB → GB
    print(json.dumps({"median": statistics.median(times), "times": times, "peak_gb": peak}))


def ours(what, runs, mode, model_dir=None):
    dtype = mode.split("-")[0]
    env = dict(os.environ, GHIBLIFY_BF16_ARITHMETIC="0") if mode.endswith("-f32") else None
    cmd = ["cargo", "run", "--quiet", "--release", "--example", "speed_probe", "--", what, str(runs), dtype]
    if what == "load":
        cmd.append(model_dir)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    m = re.search(r"median ([0-9.]+) s .* peak RSS ([0-9.]+) GB", out)
    return float(m.group(1)), float(m.group(2))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", default="unet,unet-b1,vae-decode,vae-encode", help="also: taesd (encode + decode)")
    ap.add_argument("--ours", default="f32,bf16", help="our dtypes to time (f32, f16, bf16, q8, q8-f32)")
    ap.add_argument("--torch", default="f32,bf16,autocast",
                    help="PyTorch modes: f32, bf16 (bf16 weights), autocast (f32 weights, bf16 autocast); "
                         "OpenVINO: ov-f32 (f32 hint), ov (its default precision)")
    ap.add_argument("--model", help="a diffusers SD1.x folder, for --only load (benches/make_random_sd15.py)")
    ap.add_argument("--torch-one", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="f32", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.torch_one:
        return torch_one(a.torch_one, a.runs, a.mode, a.model)
    if "load" in a.only.split(",") and not a.model:
        ap.error("--only load needs --model DIR")
    threads = os.environ.get("RAYON_NUM_THREADS") or str(os.cpu_count())
    env = dict(os.environ, RAYON_NUM_THREADS=threads, OMP_NUM_THREADS=threads)
    subprocess.run(["cargo", "build", "--quiet", "--release", "--example", "speed_probe"], check=True)
    ours_dt, torch_modes = a.ours.split(","), a.torch.split(",")
    print(f"threads {threads}, median of {a.runs} after a warm-up, 512x512; time (peak RSS)\n")
    names = {"ov-f32": "OpenVINO f32", "ov": "OpenVINO default"}
    print("| | " + " | ".join([f"ours {d}" for d in ours_dt] + [names.get(m, f"PyTorch {m}") for m in torch_modes]) + " |")
    print("|---|" + "---|" * (len(ours_dt) + len(torch_modes)))
    for what in a.only.split(","):
        cells = []
        for d in ours_dt:
            s_, gb = ours(what, a.runs, d, a.model)
            cells.append(f"{s_:.2f} s ({gb:.2f} GB)")
        for m in torch_modes:
            if what == "load" and (m.startswith("ov") or m == "autocast"):
                cells.append("–")  # OpenVINO converts rather than loads; autocast loads as f32
                continue
            cmd = [sys.executable, __file__, "--torch-one", what, "--runs", str(a.runs), "--mode", m]
            if a.model:
                cmd += ["--model", a.model]
            t = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.strip().splitlines()[-1])
            cells.append(f"{t['median']:.2f} s ({t['peak_gb']:.2f} GB)")
        print(f"| {what} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
