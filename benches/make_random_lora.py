#!/usr/bin/env python3
"""Writes a random kohya-format LoRA shaped like LCM-LoRA for SD1.5 (rank 64 on every attention,
projection, feed-forward and resnet layer of the UNet, fp16, ~130 MB) for a model folder, to time
`--fast`-style runs on the random full-size model (benches/make_random_sd15.py). Not committed.

    python benches/make_random_lora.py MODEL_DIR OUT.safetensors
"""
import re
import sys

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

TARGETS = re.compile(r".*(to_q|to_k|to_v|to_out\.0|proj_in|proj_out|ff\.net\.0\.proj|ff\.net\.2|conv1|conv2|"
                     r"time_emb_proj|conv_shortcut)\.weight$")


def main():
    model, out = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(0)
    tensors = {}
    with safe_open(f"{model}/unet/diffusion_pytorch_model.safetensors", "np") as f:
        for name in f.keys():
            if not TARGETS.match(name):
                continue
            shape = f.get_slice(name).get_shape()
            key = "lora_unet_" + name[: -len(".weight")].replace(".", "_")
            down = (64, *shape[1:]) if len(shape) == 4 else (64, shape[1])
            up = (shape[0], 64, 1, 1) if len(shape) == 4 else (shape[0], 64)
            tensors[key + ".lora_down.weight"] = (rng.standard_normal(down) * 0.01).astype(np.float16)
            tensors[key + ".lora_up.weight"] = (rng.standard_normal(up) * 0.01).astype(np.float16)
            tensors[key + ".alpha"] = np.array(8.0, dtype=np.float16)
    save_file(tensors, out)
    print(f"{len(tensors) // 3} modules, {sum(t.nbytes for t in tensors.values()) / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
