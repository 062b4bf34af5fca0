#!/usr/bin/env python3
"""Where OpenVINO spends a UNet call: per-layer times (`PERF_COUNT`, OpenVINO's `enable_profiling`)
of the full-size SD1.5 UNet (random weights, 512², diffusers' UNet2DConditionModel converted with
`openvino.convert_model`), summed by node and kernel type, and its linear layers summed by UNet
level and layer, to set against ours (`speed_probe linear-shapes`, `conv-shapes`, `attention`).
Needs `pip install openvino` in the reference environment (as `compare_torch.py --torch ov`).

    python benches/ov_profile.py [--batch 1] [--precision f32|default] [--threads 2]

Profiling adds its own overhead: the per-layer sum runs ~8 % above the call's time, printed first.
"""
import argparse
import collections
import re
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1, help="1 (no guidance) or 2 (CFG)")
    ap.add_argument("--precision", default="f32", help="f32 (the f32 hint) or default (bf16 where the CPU has it)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import openvino as ov
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).eval()
    x = torch.randn(a.batch, 4, 64, 64)
    ctx = torch.randn(a.batch, 77, 768)
    t = torch.tensor(500)

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model.requires_grad_(False)

        def forward(self, x, t, ctx):
            return self.model(x, t, encoder_hidden_states=ctx).sample

    with torch.inference_mode():
        ov_model = ov.convert_model(Wrap(), example_input=(x, t, ctx))
    config = {"INFERENCE_NUM_THREADS": a.threads, "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": True}
    if a.precision == "f32":
        config["INFERENCE_PRECISION_HINT"] = "f32"
    request = ov.Core().compile_model(ov_model, "CPU", config).create_infer_request()
    inputs = [x.numpy(), t.numpy(), ctx.numpy()]
    request.infer(inputs)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        request.infer(inputs)
        times.append(time.perf_counter() - t0)
    print("calls: " + ", ".join(f"{s:.3f} s" for s in times))

    by_kind = collections.defaultdict(lambda: [0.0, 0])
    linear = collections.defaultdict(lambda: [0.0, 0])
    for p in request.get_profiling_info():
        ms = p.real_time.total_seconds() * 1e3
        if ms <= 0:
            continue
        k = by_kind[(p.node_type, p.exec_type)]
        k[0] += ms
        k[1] += 1
        if p.node_type == "FullyConnected":
            level = re.search(r"(down_blocks\.\d|up_blocks\.\d|mid_block)", p.node_name)
            layer = re.search(r"(attn\d\.to_\w+|ff\.net\.\d(\.proj)?|proj_in|proj_out|time_emb\w*)", p.node_name)
            k = linear[(level.group(1) if level else "-", layer.group(1) if layer else p.node_name[-40:])]
            k[0] += ms
            k[1] += 1
    print(f"per-layer sum (last call): {sum(v[0] for v in by_kind.values()):.1f} ms")
    print("\n| node | kernel | layers | ms |\n|---|---|---|---|")
    for (node, kernel), (ms, n) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
        if ms >= 1.0:
            print(f"| {node} | {kernel} | {n} | {ms:.1f} |")
    print("\n| level | linear layer | layers | ms each |\n|---|---|---|---|")
    for (level, layer), (ms, n) in sorted(linear.items()):
        print(f"| {level} | {layer} | {n} | {ms / n:.2f} |")


if __name__ == "__main__":
    main()
