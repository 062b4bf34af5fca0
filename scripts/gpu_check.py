#!/usr/bin/env python3
"""One-shot verification of the CUDA build on a GPU, against diffusers on the same GPU; writes one
Markdown report. Run by scripts/gpu-check (which prepares everything it needs); see there.

    python3 scripts/gpu_check.py --bin BIN --probe PROBE --report FILE [--device cuda|cpu] [--quick]

(a) parity in f32 on the device against the committed diffusers traces (tests/fixtures/traces), every
    sampler, at the suite's tolerances (each step's latents <= 1e-4 relative, image <= 2/255): the
    binary replays diffusers' recorded noise (--noise-from) and writes its own trace (--trace);
(b) f16 on the device against diffusers f16 on the same device with the same injected noise, with
    the measured differences (and diffusers f16 against diffusers f32, for scale);
(c) full-size SD1.5 architecture with random weights, 512x512: UNet call (CFG batch 2 and batch 1),
    VAE encode and decode (our speed probe and diffusers fp16 with SDPA attention, median of N after
    a warm-up, device synchronised), a whole default img2img run of each (random-weight SD1.5 folder
    made here), and peak device memory of each process (sampled every 20 ms through NVML, above the
    idle baseline), with the ratios ours / diffusers.

`--device cpu --quick` runs (a) and (b) on the CPU with tiny settings, to test this script itself on
a machine without a GPU.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
from safetensors.numpy import load_file
from safetensors import safe_open

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
REL_TOL, IMAGE_TOL = 1e-4, 2


def rel_err(a, b):
    return float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-12))


def image8(x):
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.int32)


class PeakMemory:
    """Device memory in use (NVML, the whole device), sampled every 20 ms while a child runs, above
    the baseline taken when it starts. The parent itself holds no CUDA context."""

    def __init__(self, enabled):
        self.enabled = enabled
        if enabled:
            import pynvml
            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)

    def used(self):
        return self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used

    def run(self, cmd, **kw):
        """Runs cmd; returns (CompletedProcess, peak GiB above the baseline, or None)."""
        if not self.enabled:
            return subprocess.run(cmd, capture_output=True, text=True, **kw), None
        base = self.used()
        peak = [base]
        done = threading.Event()

        def poll():
            while not done.is_set():
                peak[0] = max(peak[0], self.used())
                time.sleep(0.02)

        t = threading.Thread(target=poll)
        t.start()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, **kw)
        finally:
            done.set()
            t.join()
        return p, (peak[0] - base) / 2**30


def meta_of(path):
    with safe_open(path, "np") as f:
        return f.metadata()


def run_ours(a, model, trace_path, dtype, out_dir, extra=()):
    m = meta_of(trace_path)
    ours = os.path.join(out_dir, "ours.safetensors")
    cmd = [a.bin, os.path.join(FIX, m["photo"]), "-o", os.path.join(out_dir, "out.png"), "-q",
           "--model-dir", os.path.join(FIX, model), "--device", a.device, "--dtype", dtype,
           "--noise-from", trace_path, "--trace", ours, "--prompt", m["prompt"],
           "--negative-prompt", m["negative_prompt"], "--strength", m["strength"], "--steps", m["steps"],
           "--guidance", m["guidance"], "--sampler", m["sampler"], *extra]
    if m.get("karras") == "true":
        cmd.append("--karras")
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"ghiblify failed ({p.returncode}): {p.stderr.strip()}")
    return load_file(ours)


def compare(ours, ref):
    """(worst relative error over embeddings and latents, the key, 8-bit image difference)."""
    worst, where = 0.0, ""
    for k, v in ref.items():
        if k.endswith("_latents") or k.endswith("_embeds"):
            if k not in ours:
                return float("inf"), f"{k} missing", 255
            e = rel_err(ours[k], v)
            if e > worst:
                worst, where = e, k
    img = int(np.abs(image8(ours["output_float"]) - image8(ref["output_float"])).max())
    return worst, where, img


def model_for(trace):
    return {"sd1": "tiny-sd1", "sd2": "tiny-sd2", "odd": "tiny-odd"}[trace.split("_")[0]]


def part_a(a, out, lines):
    lines += ["## (a) f32 parity on the device against diffusers (committed traces)", "",
              f"Tolerances: every step's latents <= {REL_TOL:g} relative (max|a-b| / max|b|), image <= {IMAGE_TOL}/255.", "",
              "| trace | worst relative error (where) | image max diff | result |", "|---|---|---|---|"]
    traces = sorted(t for t in os.listdir(os.path.join(FIX, "traces")) if t.split("_")[0] in ("sd1", "sd2", "odd"))
    if a.quick:
        traces = [t for t in traces if t in ("sd1_s060.safetensors", "sd2_s055.safetensors", "sd1_euler-a_s030.safetensors")]
    ok_all = True
    for t in traces:
        path = os.path.join(FIX, "traces", t)
        try:
            ours = run_ours(a, model_for(t), path, "f32", out)
            worst, where, img = compare(ours, load_file(path))
            ok = worst <= REL_TOL and img <= IMAGE_TOL
            lines.append(f"| {t} | {worst:.2e} ({where}) | {img} | {'pass' if ok else 'FAIL'} |")
        except Exception as e:  # noqa: BLE001 - the report says what broke
            ok = False
            lines.append(f"| {t} | error: {str(e)[:200]} | | FAIL |")
        ok_all &= ok
        print(lines[-1], flush=True)
    lines += ["", f"(a) {'passed' if ok_all else 'FAILED'}: {len(traces)} traces.", ""]
    return ok_all


class Replay:
    """diffusers' randn_tensor in every module that imports it, answering with recorded draws in
    order (converted to the device and dtype asked for): the same noise as the trace."""

    MODULES = ["diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img",
               "diffusers.models.autoencoders.vae", "diffusers.schedulers.scheduling_ddim",
               "diffusers.schedulers.scheduling_euler_discrete",
               "diffusers.schedulers.scheduling_euler_ancestral_discrete",
               "diffusers.schedulers.scheduling_dpmsolver_multistep", "diffusers.schedulers.scheduling_lcm"]

    def __init__(self, draws):
        import importlib
        self.draws = list(draws)
        self.mods = [importlib.import_module(m) for m in self.MODULES]
        self.orig = [m.randn_tensor for m in self.mods]

    def __enter__(self):
        import torch

        def replay(shape, generator=None, device=None, dtype=None, layout=None):
            d = self.draws.pop(0)
            assert tuple(d.shape) == tuple(shape), (d.shape, shape)
            return torch.from_numpy(d).to(device=device or "cpu", dtype=dtype or torch.float32)

        for m in self.mods:
            m.randn_tensor = replay
        return self

    def __exit__(self, *exc):
        for m, o in zip(self.mods, self.orig):
            m.randn_tensor = o


def draw_names(keys):
    steps = sorted(k for k in keys if k.startswith("step") and "_noise" in k)
    return [k for k in ("posterior_eps", "noise") if k in keys] + steps


def diffusers_trace(pipe, trace_path, device):
    """diffusers' img2img on `pipe` with the trace's settings and recorded noise: per-step latents."""
    import torch
    from PIL import Image
    sys.path.insert(0, FIX)
    import generate  # the fixture generator's scheduler mapping
    m = meta_of(trace_path)
    ref = load_file(trace_path)
    pipe.scheduler = generate.make_scheduler(m["sampler"], pipe.original_scheduler_config, m.get("karras") == "true")
    steps = []

    def on_step_end(p, i, t, kw):
        steps.append(kw["latents"].detach().float().cpu().numpy())
        return kw

    image = Image.open(os.path.join(FIX, m["photo"])).convert("RGB")
    with Replay([ref[k] for k in draw_names(ref.keys())]), torch.no_grad():
        out = pipe(prompt=m["prompt"], negative_prompt=m["negative_prompt"], image=image,
                   strength=float(m["strength"]), num_inference_steps=int(m["steps"]),
                   guidance_scale=float(m["guidance"]), output_type="latent",
                   callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"])
        lat = out.images
        dec = pipe.vae.decode(lat / pipe.vae.config.scaling_factor, return_dict=False)[0]
        img = (dec / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).float().cpu().numpy()
    t = {f"step{i:02d}_latents": s for i, s in enumerate(steps)}
    t["final_latents"] = lat.float().cpu().numpy()
    t["output_float"] = img
    return t


def part_b(a, out, lines):
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline
    lines += ["## (b) f16 on the device against diffusers f16 on the same device, same injected noise", "",
              "Measured, not a pass/fail bar: half precision rounds differently in every kernel. For scale, the last",
              "column is diffusers f16 against diffusers f32 (the committed trace) on the same inputs.", "",
              "| trace | ours f16 vs diffusers f16: worst step latents (rel) | image max diff | diffusers f16 vs f32: latents | image |",
              "|---|---|---|---|---|"]
    dev = "cuda" if a.device == "cuda" else "cpu"
    dtype = torch.float16
    traces = ["sd1_s060.safetensors", "sd1_dpmpp-2m_s030.safetensors", "sd1_euler-a_s100.safetensors",
              "sd2_s055.safetensors"]
    if a.quick:
        traces = traces[:1]
    pipes = {}
    for t in traces:
        model = model_for(t)
        path = os.path.join(FIX, "traces", t)
        try:
            if model not in pipes:
                p = StableDiffusionImg2ImgPipeline.from_pretrained(
                    os.path.join(FIX, model), safety_checker=None, feature_extractor=None,
                    requires_safety_checker=False, torch_dtype=dtype).to(dev)
                p.set_progress_bar_config(disable=True)
                p.original_scheduler_config = dict(p.scheduler.config)
                pipes[model] = p
            theirs = diffusers_trace(pipes[model], path, dev)
            ours = run_ours(a, model, path, "f16", out)
            ref32 = load_file(path)
            e_ours = max(rel_err(ours[k], v) for k, v in theirs.items() if k.endswith("_latents"))
            i_ours = int(np.abs(image8(ours["output_float"]) - image8(theirs["output_float"])).max())
            e_32 = max(rel_err(v, ref32[k]) for k, v in theirs.items() if k.endswith("_latents"))
            i_32 = int(np.abs(image8(theirs["output_float"]) - image8(ref32["output_float"])).max())
            lines.append(f"| {t} | {e_ours:.2e} | {i_ours} | {e_32:.2e} | {i_32} |")
        except Exception as e:  # noqa: BLE001
            lines.append(f"| {t} | error: {str(e)[:200]} | | | |")
        print(lines[-1], flush=True)
    lines.append("")


TORCH_CHILD = r'''
import json, statistics, sys, time, torch
from diffusers import AutoencoderKL, UNet2DConditionModel
what, runs = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
dt, dev = torch.float16, "cuda"
with torch.inference_mode():
    if what.startswith("unet"):
        b = 2 if what == "unet" else 1
        m = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).to(dev, dt).eval()
        x = torch.randn(b, 4, 64, 64, device=dev, dtype=dt); c = torch.randn(b, 77, 768, device=dev, dtype=dt)
        t = torch.tensor(500, device=dev)
        fn = lambda: m(x, t, encoder_hidden_states=c).sample
    else:
        m = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                          block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                          sample_size=512).to(dev, dt).eval()
        if what == "vae-decode":
            z = torch.randn(1, 4, 64, 64, device=dev, dtype=dt); fn = lambda: m.decode(z).sample
        else:
            img = torch.randn(1, 3, 512, 512, device=dev, dtype=dt) * 0.5; fn = lambda: m.encode(img).latent_dist.mean
    fn(); torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        torch.cuda.synchronize(); t0 = time.perf_counter(); fn(); torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
print(json.dumps({"median": statistics.median(times), "attn": type(next(iter(m.attn_processors.values()))).__name__}))
'''

PIPE_CHILD = r'''
import json, sys, time, torch
from PIL import Image
from diffusers import StableDiffusionImg2ImgPipeline, DDIMScheduler
folder, photo = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
pipe = StableDiffusionImg2ImgPipeline.from_pretrained(folder, torch_dtype=torch.float16, safety_checker=None,
                                                      feature_extractor=None, requires_safety_checker=False).to("cuda")
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
torch.cuda.synchronize(); load = time.perf_counter() - t0
img = Image.open(photo).convert("RGB")
def once():
    return pipe(prompt="ghibli style, a cat", negative_prompt="photo", image=img, strength=0.55,
                num_inference_steps=30, guidance_scale=7.0, generator=torch.Generator().manual_seed(1)).images[0]
once(); torch.cuda.synchronize()
t0 = time.perf_counter(); once(); torch.cuda.synchronize(); run = time.perf_counter() - t0
print(json.dumps({"load": load, "run": run}))
'''


def part_c(a, out, lines, mem):
    lines += ["## (c) Full-size SD1.5 architecture, random weights, 512x512, f16, on the device", ""]
    probe_rows = [("unet", "UNet call, CFG batch 2"), ("unet-b1", "UNet call, batch 1"),
                  ("vae-encode", "VAE encode 512²"), ("vae-decode", "VAE decode 512²")]
    lines += ["| | ours | diffusers fp16 (SDPA) | ours / diffusers | peak memory ours / diffusers (GiB) |",
              "|---|---|---|---|---|"]
    for what, label in probe_rows:
        try:
            p, peak_o = mem.run([a.probe, what, str(a.runs), "f16", "cuda"])
            if p.returncode != 0:
                raise RuntimeError(p.stderr.strip()[-300:])
            ours = float(p.stdout.split("median ")[1].split(" s")[0])
            q, peak_t = mem.run([sys.executable, "-c", TORCH_CHILD, what, str(a.runs)])
            if q.returncode != 0:
                raise RuntimeError(q.stderr.strip()[-300:])
            theirs = json.loads(q.stdout.strip().splitlines()[-1])
            lines.append(f"| {label} | {ours * 1e3:.1f} ms | {theirs['median'] * 1e3:.1f} ms ({theirs['attn']}) | "
                         f"{ours / theirs['median']:.2f} | {peak_o:.2f} / {peak_t:.2f} |")
        except Exception as e:  # noqa: BLE001
            lines.append(f"| {label} | error: {str(e)[:300]} | | | |")
        print(lines[-1], flush=True)
    # A whole default run (30 DDIM steps x strength 0.55 = 16, guidance 7, 512x512) on a random folder.
    folder = os.path.join(out, "random-sd15")
    try:
        subprocess.run([sys.executable, os.path.join(ROOT, "benches", "make_random_sd15.py"), folder,
                        "--tokenizer", os.path.join(FIX, "tiny-sd1", "tokenizer"), "--fp16"], check=True,
                       capture_output=True, text=True)
        # Both get the same 512x512 photo (no resizing in either).
        from PIL import Image
        photo = os.path.join(out, "photo512.png")
        Image.open(os.path.join(ROOT, "examples", "chelsea.png")).convert("RGB").resize((512, 512)).save(photo)
        cmd = [a.bin, photo, "-o", os.path.join(out, "whole.png"), "--model-dir", folder, "--device", "cuda",
               "--dtype", "f16", "--seed", "1", "--size", "512", "-v"]
        subprocess.run(cmd, capture_output=True, text=True)  # warm the page cache and the driver's PTX cache
        t0 = time.perf_counter()
        p, peak_o = mem.run(cmd)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(p.stderr.strip()[-300:])
        timing = next((l for l in p.stderr.splitlines() if l.startswith("timings:")), "")
        q, peak_t = mem.run([sys.executable, "-c", PIPE_CHILD, folder, photo])
        if q.returncode != 0:
            raise RuntimeError(q.stderr.strip()[-300:])
        t = json.loads(q.stdout.strip().splitlines()[-1])
        lines += ["", "| whole default run (16 DDIM steps, CFG, 512²) | ours | diffusers fp16 | ratio |", "|---|---|---|---|",
                  f"| process wall time incl. load (ours) / load + run (diffusers, second run) | {wall:.2f} s | "
                  f"{t['load'] + t['run']:.2f} s | {wall / (t['load'] + t['run']):.2f} |",
                  f"| peak device memory (GiB above idle) | {peak_o:.2f} | {peak_t:.2f} | {peak_o / peak_t:.2f} |",
                  "", f"ours -v: `{timing}`"]
    except Exception as e:  # noqa: BLE001
        lines.append(f"whole run: error: {str(e)[:400]}")
    print("\n".join(lines[-6:]), flush=True)
    lines.append("")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--probe")
    ap.add_argument("--report", required=True)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--parts", default="abc")
    a = ap.parse_args()
    t0 = time.time()
    lines = ["# ghiblify GPU check", ""]
    info = []
    if a.device == "cuda":
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True)
        info.append(f"GPU: {q.stdout.strip()}")
    import torch
    import diffusers
    info.append(f"torch {torch.__version__}, diffusers {diffusers.__version__}")
    v = subprocess.run([a.bin, "--version"], capture_output=True, text=True)
    info.append(f"{v.stdout.strip()} ({a.bin})")
    lines += [", ".join(info), ""]
    ok = True
    with tempfile.TemporaryDirectory() as out:
        if "a" in a.parts:
            ok &= part_a(a, out, lines)
        if "b" in a.parts:
            part_b(a, out, lines)
        if "c" in a.parts and a.device == "cuda":
            # The tiny pipelines of (b) leave; the baseline of each measurement is taken afresh.
            torch.cuda.empty_cache()
            part_c(a, out, lines, PeakMemory(True))
    lines.append(f"Finished in {time.time() - t0:.0f} s.")
    with open(a.report, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"report: {a.report}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
