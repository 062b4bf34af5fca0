#!/bin/sh
# Encode/decode time and peak memory of the full-size SD1.5 VAE (random weights): KL untiled,
# KL tiled (diffusers' 512 px tiles, 25% overlap) and TAESD, at 512, 1024 (decode) and 2048 px,
# one process per operation (examples/vae_probe.rs). About 45 minutes on 2 cores; run it on a
# quiet machine. At 512 px the image is one tile, so tiled = untiled and is not repeated.
set -u
cargo build --release --example vae_probe >/dev/null 2>&1 || exit 1
run() { ./target/release/examples/vae_probe "$@" 2>&1 | grep -E "peak RSS|panicked|error" || echo "$*: failed (killed: out of memory?)"; }
for op in encode decode; do run taesd $op 512; run kl $op 512; done
for kind in taesd kl-tiled kl; do run $kind decode 1024; done
for kind in taesd kl-tiled kl; do run $kind encode 2048; run $kind decode 2048; done
