#!/bin/sh
# Encode/decode time and peak memory of the full-size SD1.5 VAE (random weights): KL untiled,
# KL tiled (diffusers' 512 px tiles, 25% overlap) and TAESD, at 512 and 2048 px (1024 for the
# tiling threshold), one process per operation. Takes about 45 minutes on 2 cores.
set -u
cargo build --release --example vae_probe >/dev/null 2>&1 || exit 1
for size in 512 1024 2048; do
  for kind in taesd kl-tiled kl; do
    for op in decode encode; do
      [ "$size" = 1024 ] && [ "$op" = encode ] && continue
      ./target/release/examples/vae_probe "$kind" "$op" "$size" 2>&1 | tail -1 || echo "$kind $op $size: failed (out of memory?)"
    done
  done
done
