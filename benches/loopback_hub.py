#!/usr/bin/env python3
"""A loopback Hugging Face hub for timing downloads: serves the folders under ROOT as repos
(ROOT/<owner>/<name>/...) the way huggingface.co answers, with all bodies together throttled to one
bandwidth (a link, not a per-connection cap, so parallel downloads do not multiply it).

    python3 benches/loopback_hub.py ROOT --port 8765 --rate 40   # MB/s (10^6 bytes), all connections

What it speaks (what ghiblify's hub client reads, see tests/hub.rs for the hostile variants):
- GET /api/models/<owner>/<name>/tree/<rev>?recursive=true: the file listing.
- HEAD/GET /<owner>/<name>/resolve/<rev>/<file>: `X-Repo-Commit`, a git-sha1 `ETag` for small files;
  for LFS files (.safetensors, .ckpt, .bin, .pt) a 302 to /cdn/... with `X-Linked-Etag` (sha256)
  and `X-Linked-Size`. Any revision is answered with itself as the commit when it is 40 hex digits,
  else with a fixed commit.
- GET /cdn/<owner>/<name>/--/<file> with `Range: bytes=N-`.

Standard library only. sha256 of large files is computed once at start (a few seconds a GB).
"""
import argparse
import hashlib
import http.server
import json
import os
import re
import socketserver
import threading
import time

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS = (".safetensors", ".ckpt", ".bin", ".pt", ".pth")


def git_sha1(path):
    data = open(path, "rb").read()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


class Repos:
    def __init__(self, root):
        self.root = os.path.realpath(root)
        self.files = {}  # repo -> {path: (abs, size, etag)}
        for owner in sorted(os.listdir(self.root)):
            for name in sorted(os.listdir(os.path.join(self.root, owner))):
                base = os.path.join(self.root, owner, name)
                repo = {}
                for d, _, fs in os.walk(base):
                    for f in fs:
                        p = os.path.join(d, f)
                        rel = os.path.relpath(p, base).replace(os.sep, "/")
                        lfs = rel.endswith(LFS)
                        repo[rel] = (p, os.path.getsize(p), sha256(p) if lfs else git_sha1(p), lfs)
                self.files[f"{owner}/{name}"] = repo
                print(f"serving {owner}/{name}: {len(repo)} files, "
                      f"{sum(v[1] for v in repo.values()) / 1e9:.2f} GB", flush=True)


class Link:
    """One shared link: each chunk takes the next free slot of len/rate seconds."""

    def __init__(self, rate):
        self.rate = rate
        self.free_at = 0.0
        self.lock = threading.Lock()

    def wait(self, n):
        with self.lock:
            now = time.monotonic()
            start = max(now, self.free_at)
            self.free_at = start + n / self.rate
            done = self.free_at
        time.sleep(max(0.0, done - time.monotonic()))


def handler(repos, rate):
    link = Link(rate) if rate else None

    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):
            pass

        def send(self, status, headers=(), body=b""):
            self.send_response(status)
            self.send_header("Connection", "close")
            for k, v in headers:
                self.send_header(k, v)
            if not any(k == "Content-Length" for k, _ in headers):
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            self.close_connection = True

        def do_HEAD(self):
            self.do_GET()

        def do_GET(self):
            path = self.path.split("?")[0]
            if path.startswith("/cdn/"):
                repo, _, file = path[len("/cdn/"):].partition("/--/")
                entry = repos.files.get(repo, {}).get(file)
                if entry is None:
                    return self.send(404)
                return self.body(entry)
            if path.startswith("/api/models/"):
                segs = path[len("/api/models/"):].split("/")
                repo = "/".join(segs[:2])
                if repo not in repos.files:
                    return self.send(404, [("X-Error-Code", "RepoNotFound")])
                listing = [{"type": "file", "path": p, "size": v[1], "oid": v[2]} for p, v in repos.files[repo].items()]
                return self.send(200, [("Content-Type", "application/json")], json.dumps(listing).encode())
            segs = path.lstrip("/").split("/", 4)
            if len(segs) < 5 or segs[2] != "resolve":
                return self.send(404)
            repo, rev, file = "/".join(segs[:2]), segs[3], segs[4]
            if repo not in repos.files:
                return self.send(404, [("X-Error-Code", "RepoNotFound")])
            entry = repos.files[repo].get(file)
            if entry is None:
                return self.send(404, [("X-Error-Code", "EntryNotFound")])
            commit = rev if re.fullmatch(r"[0-9a-f]{40}", rev) else COMMIT
            _, size, etag, lfs = entry
            if lfs:
                port = self.server.server_address[1]
                return self.send(302, [("X-Repo-Commit", commit), ("X-Linked-Etag", f'"{etag}"'),
                                       ("X-Linked-Size", str(size)), ("ETag", '"pointer"'),
                                       ("Location", f"http://127.0.0.1:{port}/cdn/{repo}/--/{file}")])
            self.send_response(200)
            self.send_header("Connection", "close")
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{etag}"')
            self.send_header("Content-Length", str(size))
            self.end_headers()
            if self.command != "HEAD":
                self.stream(entry[0], 0, size)
            self.close_connection = True

        def body(self, entry):
            p, size, _, _ = entry
            m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            start = int(m.group(1)) if m else 0
            if start >= size and start > 0:
                return self.send(416)
            self.send_response(206 if m else 200)
            self.send_header("Connection", "close")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(size - start))
            if m:
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
            self.end_headers()
            if self.command != "HEAD":
                self.stream(p, start, size)
            self.close_connection = True

        def stream(self, path, start, end):
            chunk = 1 << 18
            sent = 0
            with open(path, "rb") as f:
                f.seek(start)
                while start + sent < end:
                    data = f.read(min(chunk, end - start - sent))
                    if not data:
                        break
                    if rate:
                        link.wait(len(data))
                    try:
                        self.wfile.write(data)
                    except (BrokenPipeError, ConnectionResetError):
                        return
                    sent += len(data)

    return H


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--rate", type=float, default=40.0, help="MB/s over all connections (0: unthrottled)")
    a = ap.parse_args()
    repos = Repos(a.root)
    srv = Server(("127.0.0.1", a.port), handler(repos, a.rate * 1e6))
    print(f"listening on http://127.0.0.1:{a.port} at {a.rate} MB/s", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
