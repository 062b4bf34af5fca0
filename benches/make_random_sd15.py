#!/usr/bin/env python3
"""Writes a full-size SD1.5-architecture model folder (diffusers layout) with random weights, for
timing runs and benches (compute does not depend on weight values). Not committed: ~4 GB.

    . VENV/bin/activate   # ../shared/tools/install-reference-env.sh VENV
    python benches/make_random_sd15.py OUT_DIR --tokenizer tests/fixtures/tiny-sd1/tokenizer [--fp16]

With --fp16 the weights are stored in half precision (~2 GB, what GPU runs load). With
--ckpt NAME the same weights are also written at the root as one original-layout (LDM) checkpoint in
float16, as torch.save writes it (`{"state_dict": ...}`, ~2.1 GB): the shape of Ghibli-Diffusion's
`ghibli-diffusion-v1.ckpt`, for timing a first download both ways (benches/first_download.sh).

The configs are SD1.5's (runwayml/stable-diffusion-v1-5): UNet (320, 640, 1280, 1280), 8 heads,
cross-attention 768; VAE (128, 256, 512, 512); CLIP ViT-L/14 text encoder, 12 layers, 768 wide.
"""
import argparse
import json
import os
import shutil
import sys

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--tokenizer", required=True, help="a CLIP tokenizer folder (vocab.json + merges.txt)")
    ap.add_argument("--fp16", action="store_true", help="store the weights in float16")
    ap.add_argument("--ckpt", metavar="NAME", help="also write the weights as one LDM-layout float16 checkpoint")
    a = ap.parse_args()
    dt = torch.float16 if a.fp16 else torch.float32
    torch.manual_seed(0)
    os.makedirs(a.out, exist_ok=True)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).to(dt)
    unet.save_pretrained(os.path.join(a.out, "unet"), safe_serialization=True)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        sample_size=512).to(dt)
    vae.save_pretrained(os.path.join(a.out, "vae"), safe_serialization=True)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                      num_hidden_layers=12, projection_dim=768, hidden_act="quick_gelu")).to(dt)
    te.save_pretrained(os.path.join(a.out, "text_encoder"), safe_serialization=True)
    if a.ckpt:
        # diffusers' mapping run backwards, shared with the single-file fixtures.
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures"))
        import generate_single_file as sf
        ldm = sf.unet_to_ldm(unet.state_dict(), 4, 2, [True, True, True, False])
        ldm.update(sf.vae_to_ldm(vae.state_dict(), 4))
        ldm.update(sf.clip_to_ldm(te.state_dict()))
        ldm = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in ldm.items()}
        torch.save({"state_dict": ldm}, os.path.join(a.out, a.ckpt))
    shutil.copytree(a.tokenizer, os.path.join(a.out, "tokenizer"), dirs_exist_ok=True)
    os.makedirs(os.path.join(a.out, "scheduler"), exist_ok=True)
    with open(os.path.join(a.out, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump({"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                   "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
                   "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False}, f, indent=2)
    # What diffusers' from_pretrained reads to assemble the pipeline (ours reads the folders).
    index = {"_class_name": "StableDiffusionImg2ImgPipeline", "feature_extractor": [None, None],
             "requires_safety_checker": False, "safety_checker": [None, None],
             "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    with open(os.path.join(a.out, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)


if __name__ == "__main__":
    main()
