#!/usr/bin/env python3
"""How far bf16 arithmetic (and int8 weights) move a run, ours against diffusers' own bf16: on one
model folder, one photo and one set of Gaussian draws, these img2img runs —

  ours f32 (writes the draws and its per-step latents: --trace), ours in each --ours mode (the same
  draws: --noise-from): bf16 (--dtype bf16), q8 (--dtype q8), q8-f32 (--dtype q8 with
  GHIBLIFY_BF16_ARITHMETIC=0: int8 weights, f32 products, what CPUs without AVX512_BF16 run);
  diffusers f32 and diffusers under torch.autocast("cpu", torch.bfloat16) (f32 weights, the same
  draws injected) —

and, with --simulate, diffusers f32 with int8 simulated in PyTorch (rounded and scaled back, so the
arithmetic stays f32 and only the rounding shows): w8 = our q8's weights (per output channel,
max|w|/127, the layers ours quantises), w8a8 = w8 plus each such layer's input rounded to 8 bits as
an integer (VNNI) product would need it (asymmetric u8, dynamic: per token for a linear layer, per
image for a convolution — a convolution's patches mix pixels, so one scale must cover an image),
w8a8-linear / w8a8-conv = w8 with the inputs of the linear layers / convolutions alone rounded; then
per denoising step the relative difference of the latents (max|a-b| / max|b|) of each of ours
vs ours f32, of diffusers bf16 and each simulated run vs diffusers f32, and the final picture's
PSNR (8-bit) for each pair. Ours f32 vs diffusers f32 is printed too (parity, for scale). Prints a Markdown table.

    . VENV/bin/activate      # tests/fixtures/install-env.sh VENV
    python benches/bf16_accuracy.py --bin target/release/ghiblify --model DIR [--photo P] [--steps 10]
        [--strength 0.5] [--size 512] [--threads 2] [--ours bf16,q8,q8-f32] [--simulate w8,w8a8,...]

DIR: a diffusers SD1.x folder in f32 (benches/make_random_sd15.py writes a full-size one with random
weights; the tiny fixtures in tests/fixtures work too). Needs a CPU with AVX512_BF16 or AMX for our
bf16 arithmetic (without it ours widens bf16 weights to f32 and only the weight rounding shows).
"""
import argparse
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from safetensors.numpy import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from gpu_check import Replay, draw_names, image8, rel_err  # noqa: E402


def psnr(a, b):
    mse = float(np.mean((image8(a) - image8(b)).astype(np.float64) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def ours(a, out, mode, trace, noise_from=None):
    dtype = mode.split("-")[0]
    env = dict(os.environ, GHIBLIFY_BF16_ARITHMETIC="0") if mode.endswith("-f32") else None
    cmd = [a.bin, a.work_photo, "-o", os.path.join(out, f"ours-{mode}.png"), "-q", "--overwrite", "--model-dir", a.model, "--size", str(a.size),
           "--device", "cpu", "--dtype", dtype, "--trace", trace, "--prompt", a.prompt, "--negative-prompt", "photo",
           "--strength", str(a.strength), "--steps", str(a.steps), "--guidance", "7.5", "--sampler", "euler-a",
           "--seed", "7", "--threads", str(a.threads), "--no-watermark"]
    if noise_from:
        cmd += ["--noise-from", noise_from]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"ghiblify {mode} failed ({p.returncode}): {p.stderr.strip()}")
    print(f"ours {mode}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return load_file(trace)


# Our q8's rule (src/models/nn.rs): layers with at least 16 inputs per output and 16 outputs.
Q8_MIN = 16
SIMULATED = ("w8", "w8a8", "w8a8-linear", "w8a8-conv")


def q8_layers(pipe):
    import torch
    for model in (pipe.unet, pipe.text_encoder):
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                w = m.weight
                if w.shape[0] >= Q8_MIN and w[0].numel() >= Q8_MIN:
                    yield m


def round_weights(m):
    """Our quantiser's codes (kernels::quantize_row): q = round(w·127/max|w|) per output channel,
    ties to even (torch.round, as the 1.5·2^23 trick), clamped to ±127; w ≈ q·max/127."""
    import torch
    w = m.weight.data
    mx = w.abs().reshape(w.shape[0], -1).amax(1).reshape(-1, *([1] * (w.dim() - 1)))
    inv = torch.where(mx > 0, 127.0 / mx, torch.zeros_like(mx))
    m.weight.data = torch.round(w * inv).clamp(-127, 127) * (mx / 127.0)


def round_input(m, args):
    """The layer's input as an asymmetric 8-bit integer product reads it: u8 codes with a zero point,
    scale (max-min)/255 — per token (last axis) for a linear layer, per image for a convolution."""
    import torch
    x = args[0]
    if isinstance(m, torch.nn.Linear):
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    else:
        flat = x.reshape(x.shape[0], -1)
        lo, hi = (v.reshape(-1, 1, 1, 1) for v in (flat.amin(1), flat.amax(1)))
    lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
    scale = torch.where(hi > lo, (hi - lo) / 255.0, torch.ones_like(hi))
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(x / scale) + zero, 0, 255)
    return ((q - zero) * scale,) + tuple(args[1:])


def theirs(a, draws_trace, bf16, simulate=None):
    import torch
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionImg2ImgPipeline
    from PIL import Image
    torch.set_num_threads(a.threads)
    t_load = time.perf_counter()
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(a.model, safety_checker=None, feature_extractor=None,
                                                          requires_safety_checker=False)
    t_load = time.perf_counter() - t_load
    if simulate:
        for m in q8_layers(pipe):
            round_weights(m)
            kind = "linear" if isinstance(m, torch.nn.Linear) else "conv"
            if simulate in ("w8a8", f"w8a8-{kind}"):
                m.register_forward_pre_hook(round_input)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    ref = load_file(draws_trace)
    image = Image.open(a.work_photo).convert("RGB")
    steps = []

    def on_step_end(p, i, t, kw):
        steps.append(kw["latents"].detach().float().numpy())
        return kw

    t0 = time.perf_counter()
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
    with Replay([ref[k] for k in draw_names(ref.keys())]), torch.no_grad(), ctx:
        out = pipe(prompt=a.prompt, negative_prompt="photo", image=image, strength=a.strength,
                   num_inference_steps=a.steps, guidance_scale=7.5, output_type="latent",
                   callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"])
        lat = out.images
        dec = pipe.vae.decode(lat / pipe.vae.config.scaling_factor, return_dict=False)[0]
        img = (dec.float() / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    print(f"diffusers {simulate or ('bf16 autocast' if bf16 else 'f32')}: {time.perf_counter() - t0:.1f} s (load {t_load:.1f} s)",
          file=sys.stderr)
    t = {f"step{i:02d}_latents": s for i, s in enumerate(steps)}
    t["output_float"] = img
    return t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--photo", default=os.path.join(ROOT, "examples", "chelsea.png"))
    ap.add_argument("--prompt", default="ghibli style, a cat on a wall")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--strength", type=float, default=0.5)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--ours", default="bf16", help="our modes besides f32: bf16, q8, q8-f32")
    ap.add_argument("--simulate", default="", help="diffusers f32 with int8 rounding simulated: " + ", ".join(SIMULATED))
    a = ap.parse_args()
    modes = a.ours.split(",")
    sims = [s for s in a.simulate.split(",") if s]
    if any(s not in SIMULATED for s in sims):
        raise SystemExit(f"--simulate {a.simulate}: the modes are {', '.join(SIMULATED)}")
    with tempfile.TemporaryDirectory() as out:
        # The photo at the working size (long side --size, multiples of 8) so both sides start from
        # the same pixels.
        from PIL import Image
        im = Image.open(a.photo).convert("RGB")
        f = a.size / max(im.size)
        w, h = (int(im.size[0] * f) // 8 * 8, int(im.size[1] * f) // 8 * 8)
        a.work_photo = os.path.join(out, "photo.png")
        im.resize((w, h), Image.LANCZOS).save(a.work_photo)
        t32 = os.path.join(out, "f32.safetensors")
        o32 = ours(a, out, "f32", t32)
        mine = {m: ours(a, out, m, os.path.join(out, f"{m}.safetensors"), noise_from=t32) for m in modes}
        d32 = theirs(a, t32, bf16=False)
        d16 = theirs(a, t32, bf16=True)
        dsim = {s: theirs(a, t32, bf16=False, simulate=s) for s in sims}
    keys = sorted(k for k in d32 if k.startswith("step") and k in o32)
    heads = [f"ours {m} vs ours f32" for m in modes]
    heads += [f"diffusers {s} (simulated) vs diffusers f32" for s in sims]
    print("| step | " + " | ".join(heads) + " | diffusers bf16 autocast vs diffusers f32 | ours f32 vs diffusers f32 |")
    print("|---|" + "---|" * (len(modes) + len(sims) + 2))
    for k in keys:
        cells = [f"{rel_err(mine[m][k], o32[k]):.2e}" for m in modes]
        cells += [f"{rel_err(dsim[s][k], d32[k]):.2e}" for s in sims]
        print(f"| {k[4:6]} | " + " | ".join(cells) + f" | {rel_err(d16[k], d32[k]):.2e} | {rel_err(o32[k], d32[k]):.2e} |")
    cells = [f"{psnr(mine[m]['output_float'], o32['output_float']):.1f} dB" for m in modes]
    cells += [f"{psnr(dsim[s]['output_float'], d32['output_float']):.1f} dB" for s in sims]
    print("| picture PSNR | " + " | ".join(cells) + f" | {psnr(d16['output_float'], d32['output_float']):.1f} dB | "
          f"{psnr(o32['output_float'], d32['output_float']):.1f} dB |")


if __name__ == "__main__":
    main()
