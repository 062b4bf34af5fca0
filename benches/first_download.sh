#!/usr/bin/env bash
# Times the default preset's first run both ways — the diffusers folders (4.3 GB of f32) and the
# repo's single fp16 checkpoint (2.1 GB) — on a loopback hub throttled to a realistic bandwidth:
# download, load and peak memory, each from an empty cache, then once more from the warm cache.
# Full-size SD1.5 architecture with random weights (what real weights cost to move and load).
#
#   benches/first_download.sh WORK_DIR [RATE_MB_S=40] [PORT=8765]
#
# Needs the reference environment for the one-time model build (~6.5 GB under WORK_DIR/hub):
#   . VENV/bin/activate    # tests/fixtures/install-env.sh VENV
# and about 6.5 GB more for the two caches. Prints one table; the README's "Models" section
# quotes it.
set -euo pipefail
work=${1:?usage: benches/first_download.sh WORK_DIR [RATE_MB_S] [PORT]}
rate=${2:-40}
port=${3:-8765}
here=$(cd "$(dirname "$0")/.." && pwd)
repo=nitrosocke/Ghibli-Diffusion
ckpt=ghibli-diffusion-v1.ckpt
mkdir -p "$work"
work=$(cd "$work" && pwd)
src=$work/hub/$repo

if [ ! -f "$src/$ckpt" ]; then
    echo "building a full-size random SD1.5 repo in $src (once)" >&2
    python3 "$here/benches/make_random_sd15.py" "$src" --tokenizer "$here/tests/fixtures/tiny-sd1/tokenizer" --ckpt "$ckpt"
    echo "# random weights in Ghibli-Diffusion's layout (benches/first_download.sh)" >"$src/README.md"
fi

(cd "$here" && cargo build --release -q)
bin=$here/target/release/ghiblify

python3 "$here/benches/loopback_hub.py" "$work/hub" --port "$port" --rate "$rate" >"$work/hub.log" 2>&1 &
hub=$!
trap 'kill $hub 2>/dev/null || true' EXIT
for _ in $(seq 600); do
    grep -q listening "$work/hub.log" 2>/dev/null && break
    sleep 1
done

# One run: wall seconds, peak RSS (MB), the model load time ghiblify reports.
measure() {
    local name=$1 home=$2
    shift 2
    local log=$work/$name.log
    HF_HOME=$home HF_ENDPOINT=http://127.0.0.1:$port XDG_CONFIG_HOME=$work/xdg \
        /usr/bin/time -f 'wall=%e rss_kb=%M' "$bin" "$here/examples/chelsea.png" -o "$work/$name.png" --overwrite \
        --steps 2 --strength 1 --seed 1 --no-watermark --c2pa off -v "$@" >"$log" 2>&1 || { cat "$log"; exit 1; }
    local wall rss load
    wall=$(sed -n 's/^wall=\([0-9.]*\) .*/\1/p' "$log")
    rss=$(sed -n 's/.*rss_kb=\([0-9]*\).*/\1/p' "$log")
    load=$(sed -n "s/.*loaded model '.*' in \([0-9.]*\) s.*/\1/p" "$log")
    printf '%-28s %8.1f %10.1f %10d\n' "$name" "$wall" "${load:-0}" "$((rss / 1024))"
}

printf '%-28s %8s %10s %10s\n' run "wall s" "load s" "peak MB"
rm -rf "$work/cache-folders" "$work/cache-ckpt"
# The repo id reads the preset's folders; the preset's name, its checkpoint (both at the pin).
measure folders-first "$work/cache-folders" --model "$repo"
measure folders-warm "$work/cache-folders" --model "$repo"
measure ckpt-first "$work/cache-ckpt" --model ghibli-diffusion
measure ckpt-warm "$work/cache-ckpt" --model ghibli-diffusion
du -sm "$work/cache-folders" "$work/cache-ckpt"
echo "link: $rate MB/s; the denoising is the same 2-step run both ways (f32 compute)"
