#!/usr/bin/env python3
"""Whole img2img runs side by side, in one run on one machine: ghiblify's binary against diffusers
(PyTorch) and against OpenVINO, each run in its own process so its peak resident memory is its own.
The per-call timings of `compare_torch.py` leave out what a user also waits for — the load, the text
encoder, the VAE, the sampler, writing the picture; this times all of it.

    . VENV/bin/activate      # tests/fixtures/install-env.sh VENV (+ pip install openvino for ov)
    python benches/compare_whole.py --bin target/release/ghiblify --model DIR [--runs 1]
        [--only default,fast] [--ours f32,bf16,q8] [--theirs f32,bf16,autocast,ov-f32,ov]

Two runs, on examples/chelsea.png resized to the working size (512×336) so every side starts from
the same pixels:

- `default`: what `ghiblify photo.jpg -o out.png` runs — ddim, 30 steps × strength 0.55 = 16 UNet
  calls with guidance 7 (batch 2), the model's KL VAE;
- `fast`: what `--fast` runs — an LCM-LoRA merged into the UNet, the lcm sampler, 8 steps × 0.55 =
  4 UNet calls without guidance (batch 1), TAESD. The LoRA is random and LCM-LoRA-shaped
  (benches/make_random_lora.py) and TAESD random (diffusers' AutoencoderTiny), both written into a
  temporary folder, since the hub is out of reach; compute does not depend on weight values.

DIR: a full-size diffusers SD1.x folder in f32 (benches/make_random_sd15.py). Sides:

- ours in each `--ours` dtype (`--dtype`; the `-v` timings give the load);
- diffusers `StableDiffusionImg2ImgPipeline` in f32, bf16 (bf16 weights) and f32 under
  `torch.autocast("cpu", torch.bfloat16)`, LoRA loaded and fused (`fuse_lora`), same threads;
- OpenVINO: the same diffusers pipeline with its UNet and VAE (encode and decode) replaced by
  OpenVINO models converted from them (`openvino.convert_model`) and compiled with the f32 precision
  hint (`ov-f32`) or its default precision (`ov`: bf16 on a CPU with AVX512_BF16 or AMX, what
  FastSD CPU runs), latency hint; the text encoder stays PyTorch f32 (a few percent of a call).
  Its "load" is the conversion and compilation, which a real OpenVINO user does once and caches,
  so it is printed apart and left out of its whole time.

Per cell: the whole time (ours: the process's wall time; Python: load + pipeline call + PNG saved,
the interpreter's imports left out), then the time without the load, then peak RSS. Median of
--runs after the page cache is warmed by reading every file once.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "ghibli style, a cat on a wall"
NEGATIVE = "photo, blurry"
RUNS = {
    # steps, strength, guidance, sampler
    "default": (30, 0.55, 7.0, "ddim"),
    "fast": (8, 0.55, 1.0, "lcm"),
}


def ours(a, what, dtype, out):
    steps, strength, guidance, sampler = RUNS[what]
    cmd = [a.bin, a.photo, "-o", out, "--overwrite", "-v", "--model-dir", a.model, "--device", "cpu",
           "--dtype", dtype, "--threads", str(a.threads), "--seed", "1", "--prompt", PROMPT,
           "--negative-prompt", NEGATIVE, "--steps", str(steps), "--strength", str(strength),
           "--guidance", str(guidance), "--sampler", sampler]
    if what == "fast":
        cmd += ["--lora", a.lora, "--vae", a.taesd]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"ghiblify {what} {dtype} failed: {log.strip()}")
    m = re.search(r"loaded model .* in ([0-9.]+) s", log)
    load = float(m.group(1)) if m else float("nan")
    return {"whole": wall, "run": wall - load, "load": load, "peak_gb": usage.ru_maxrss / 1e6}


def theirs_one(a, what, mode):
    """In a child process: one whole run on diffusers (f32, bf16, autocast) or OpenVINO (ov-f32,
    ov); prints {"load", "run", "whole", "peak_gb"} (OpenVINO: "load" is conversion + compilation,
    not part of "whole")."""
    import contextlib
    import resource

    import torch
    from diffusers import AutoencoderTiny, DDIMScheduler, LCMScheduler, StableDiffusionImg2ImgPipeline
    from PIL import Image
    torch.set_num_threads(a.threads)
    steps, strength, guidance, _ = RUNS[what]
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    t0 = time.perf_counter()
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(a.model, torch_dtype=dtype, safety_checker=None,
                                                          feature_extractor=None, requires_safety_checker=False)
    if what == "fast":
        pipe.load_lora_weights(a.lora)
        pipe.fuse_lora()
        pipe.unload_lora_weights()  # the fused weights stay; the LoRA layers go
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
        pipe.vae = AutoencoderTiny.from_pretrained(a.taesd, torch_dtype=dtype)
    else:
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    image = Image.open(a.photo).convert("RGB")
    if mode.startswith("ov"):
        ov_swap(a, pipe, image, guidance, mode)
    load = time.perf_counter() - t0
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast" else contextlib.nullcontext()
    t1 = time.perf_counter()
    with torch.inference_mode(), amp:
        picture = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, image=image, strength=strength,
                       num_inference_steps=steps, guidance_scale=guidance,
                       generator=torch.Generator().manual_seed(1)).images[0]
    picture.save(os.path.join(a.tmp, f"{what}-{mode}.png"))
    run = time.perf_counter() - t1
    whole = run if mode.startswith("ov") else load + run
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB → GB
    print(json.dumps({"load": load, "run": run, "whole": whole, "peak_gb": peak}))


def ov_swap(a, pipe, image, guidance, mode):
    """Replaces the pipeline's UNet call and VAE encode/decode by OpenVINO models converted from them
    at this run's shapes; the pipeline's own code (scheduler, guidance, pre- and post-processing)
    runs around them unchanged."""
    import numpy as np
    import openvino as ov
    import torch
    from diffusers import AutoencoderTiny
    from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution

    config = {"INFERENCE_NUM_THREADS": a.threads, "PERFORMANCE_HINT": "LATENCY"}
    if mode == "ov-f32":
        config["INFERENCE_PRECISION_HINT"] = "f32"
    core = ov.Core()

    class Fn(torch.nn.Module):
        def __init__(self, model, fn):
            super().__init__()
            self.model, self.fn = model.requires_grad_(False), fn

        def forward(self, *args):
            return self.fn(*args)

    def compile_fn(model, fn, example):
        with torch.no_grad():
            converted = ov.convert_model(Fn(model, fn), example_input=example)
        request = core.compile_model(converted, "CPU", config).create_infer_request()
        return lambda *args: torch.from_numpy(np.array(request.infer([t.numpy() for t in args])[0]))

    unet, vae = pipe.unet, pipe.vae
    w, h = image.size
    batch = 2 if guidance > 1 else 1
    latents = torch.randn(batch, 4, h // 8, w // 8)
    context = torch.randn(batch, 77, pipe.text_encoder.config.hidden_size)
    unet_call = compile_fn(unet, lambda x, t, c: unet(x, t, encoder_hidden_states=c).sample,
                           (latents, torch.tensor(500), context))
    unet.forward = lambda sample, timestep, encoder_hidden_states=None, return_dict=True, **kw: (
        unet_call(sample, torch.as_tensor(timestep, dtype=torch.int64), encoder_hidden_states),)

    pixels = torch.randn(1, 3, h, w)
    if isinstance(vae, AutoencoderTiny):
        from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTinyOutput
        encode = compile_fn(vae, lambda x: vae.encode(x).latents, (pixels,))
        vae.encode = lambda x, return_dict=True: AutoencoderTinyOutput(latents=encode(x))
    else:
        from diffusers.models.modeling_outputs import AutoencoderKLOutput
        encode = compile_fn(vae, lambda x: vae.encode(x).latent_dist.parameters, (pixels,))
        vae.encode = lambda x, return_dict=True: AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution(encode(x)))
    decode = compile_fn(vae, lambda z: vae.decode(z).sample, (latents[:1],))
    vae.decode = lambda z, return_dict=True, generator=None: (
        (decode(z),) if not return_dict else DecoderOutput(sample=decode(z)))


def warm(paths):
    """Reads every file under paths once, so the first side timed does not pay the disk."""
    for p in paths:
        for root, _, files in os.walk(p) if os.path.isdir(p) else [(os.path.dirname(p), [], [os.path.basename(p)])]:
            for f in files:
                with open(os.path.join(root, f), "rb") as fh:
                    while fh.read(1 << 24):
                        pass


def prepare(a, tmp):
    """The photo at the working size, a random LCM-LoRA-shaped LoRA and a random TAESD folder (made
    in child processes: this one stays small, since a child's peak RSS counts what it was forked
    from)."""
    from PIL import Image
    im = Image.open(a.source).convert("RGB")
    f = 512 / max(im.size)
    size = (int(im.size[0] * f) // 8 * 8, int(im.size[1] * f) // 8 * 8)
    a.photo = os.path.join(tmp, "photo.png")
    im.resize(size, Image.LANCZOS).save(a.photo)
    if "fast" in a.only.split(","):
        a.lora = os.path.join(tmp, "lcm-lora.safetensors")
        subprocess.run([sys.executable, os.path.join(ROOT, "benches", "make_random_lora.py"), a.model, a.lora],
                       check=True, capture_output=True)
        a.taesd = os.path.join(tmp, "taesd")
        subprocess.run([sys.executable, "-c", "import sys, torch; from diffusers import AutoencoderTiny; "
                        "torch.manual_seed(0); AutoencoderTiny().save_pretrained(sys.argv[1])", a.taesd],
                       check=True, capture_output=True)
    warm([a.model] + [p for p in (a.lora, a.taesd) if p])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "ghiblify"))
    ap.add_argument("--model", required=True, help="a full-size diffusers SD1.x folder (benches/make_random_sd15.py)")
    ap.add_argument("--photo", dest="source", default=os.path.join(ROOT, "examples", "chelsea.png"))
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--only", default="default,fast")
    ap.add_argument("--ours", default="f32,bf16,q8", help="our --dtype values to run")
    ap.add_argument("--theirs", default="f32,autocast,ov-f32,ov",
                    help="diffusers: f32, bf16 (bf16 weights), autocast; OpenVINO: ov-f32, ov (default precision)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("RAYON_NUM_THREADS") or os.cpu_count()))
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    ap.add_argument("--lora", help=argparse.SUPPRESS)
    ap.add_argument("--taesd", help=argparse.SUPPRESS)
    ap.add_argument("--photo-ready", dest="photo", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        return theirs_one(a, *a.one)
    if not os.path.exists(a.bin):
        ap.error(f"--bin {a.bin}: no such file (cargo build --release)")
    whats = a.only.split(",")
    if any(w not in RUNS for w in whats):
        ap.error(f"--only {a.only}: the runs are {', '.join(RUNS)}")
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), RAYON_NUM_THREADS=str(a.threads))
    names = {"ov-f32": "OpenVINO f32", "ov": "OpenVINO default", "autocast": "diffusers autocast"}
    cols = [f"ours {d}" for d in a.ours.split(",")] + [names.get(m, f"diffusers {m}") for m in a.theirs.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        prepare(a, tmp)
        print(f"{a.threads} threads, median of {a.runs}, 512x336 photo; whole / without the load (peak RSS); "
              "OpenVINO's conversion + compile apart\n")
        print("| | " + " | ".join(cols) + " |")
        print("|---|" + "---|" * len(cols))
        for what in whats:
            cells = []
            for d in a.ours.split(","):
                r = [ours(a, what, d, os.path.join(tmp, f"{what}-ours-{d}.png")) for _ in range(a.runs)]
                cells.append(cell(r))
            for m in a.theirs.split(","):
                cmd = [sys.executable, __file__, "--one", what, m, "--model", a.model, "--tmp", tmp,
                       "--photo-ready", a.photo, "--threads", str(a.threads)]
                if what == "fast":
                    cmd += ["--lora", a.lora, "--taesd", a.taesd]
                r = []
                for _ in range(a.runs):
                    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
                    if p.returncode != 0:
                        raise SystemExit(f"{what} {m} failed: {p.stderr.strip()[-2000:]}")
                    r.append(json.loads(p.stdout.strip().splitlines()[-1]))
                cells.append(cell(r, convert=m.startswith("ov")))
            print(f"| {what} | " + " | ".join(cells) + " |", flush=True)


def cell(results, convert=False):
    med = lambda k: statistics.median(r[k] for r in results)
    text = f"{med('whole'):.1f} / {med('run'):.1f} s ({max(r['peak_gb'] for r in results):.2f} GB)"
    return text + (f", convert {med('load'):.0f} s" if convert else "")


if __name__ == "__main__":
    main()
