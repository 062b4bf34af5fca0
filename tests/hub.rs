//! Downloads against a loopback hub that answers like huggingface.co: HEAD on `resolve/` with
//! `X-Repo-Commit`, a git-sha1 `ETag` for small files, and for LFS files (`*.safetensors`) a 302 to
//! a CDN path with `X-Linked-Etag` (sha256) and `X-Linked-Size`; GET with `Range`; 404s with
//! `X-Error-Code`; 401 for private repos; the recursive tree API. Nothing touches the network or
//! the user's cache (each test has its own `HF_HOME`).

use crate::common::{fixtures, Case};
use sha2::Digest;
use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

#[derive(Default)]
struct State {
    /// repo id → (path → content).
    repos: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    /// Files whose next CDN body stops halfway (the connection drops).
    cut_once: HashSet<String>,
    /// Files served with one byte changed (the ETag stays the true sha256).
    corrupt: HashSet<String>,
    /// Repos that need `Authorization: Bearer <token>`.
    private: BTreeMap<String, String>,
    /// "METHOD path range" of every request.
    log: Vec<String>,
    /// Files the hub misbehaves on, and how.
    hostile: BTreeMap<String, Hostile>,
    /// Entries added to every tree listing as they are (path traversal, ...).
    extra_listing: Vec<String>,
    /// Tree listings padded past any sane size.
    huge_listing: bool,
    /// The hub has none of the commits ghiblify pins (a mirror behind, a rewritten history).
    forget_pins: bool,
}

/// The commits the presets and fast mode pin.
const PINS: &[&str] = &[
    "7600fd7538c9030fb60fa7bca17bf048c86466b3",
    "f03de327dd89b501a01da37fc5240cf4fdba85a1",
    "cf2fced511dbe7e26c8d1d397e728fbab875db4b",
];

/// How a hostile hub or mirror answers for one file.
#[derive(Clone)]
enum Hostile {
    /// HEAD names the content with this ETag (X-Linked-Etag for LFS files).
    Etag(String),
    /// HEAD names the commit with this X-Repo-Commit.
    Commit(String),
    /// The body is this many bytes longer than the size HEAD announced.
    LongerBody(usize),
    /// The body never ends (no Content-Length, closes never).
    Endless,
    /// The body comes one byte at a time, this many milliseconds apart.
    Trickle(u64),
    /// This many `429 Too Many Requests` (Retry-After: 1) before each real answer to HEAD.
    Busy(usize),
}

struct TestHub {
    port: u16,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn sha256(b: &[u8]) -> String {
    hex(&sha2::Sha256::digest(b))
}

fn git_sha1(b: &[u8]) -> String {
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", b.len()).as_bytes());
    h.update(b);
    hex(&h.finalize())
}

fn is_lfs(path: &str) -> bool {
    path.ends_with(".safetensors") || path.ends_with(".ckpt")
}

impl TestHub {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if sp.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let st = st.clone();
                std::thread::spawn(move || {
                    let _ = serve(conn, &st, port);
                });
            }
        });
        Self { port, state, stop }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Serves a fixture model folder as `repo`, with a model card carrying its licence.
    fn add_folder(&self, repo: &str, dir: &Path) {
        let mut files = BTreeMap::new();
        for e in walkdir::WalkDir::new(dir).into_iter().map(Result::unwrap).filter(|e| e.file_type().is_file()) {
            let rel = e.path().strip_prefix(dir).unwrap().to_string_lossy().replace('\\', "/");
            files.insert(rel, std::fs::read(e.path()).unwrap());
        }
        files.insert("README.md".into(), b"---\nlicense: creativeml-openrail-m\n---\n# test model\n".to_vec());
        self.state.lock().unwrap().repos.insert(repo.into(), files);
    }

    fn log(&self) -> Vec<String> {
        self.state.lock().unwrap().log.clone()
    }

    /// Stops answering: later connections are refused.
    fn shut_down(self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn respond(
    out: &mut TcpStream,
    status: &str,
    headers: &[(String, String)],
    body: &[u8],
    head_only: bool,
) -> std::io::Result<()> {
    let mut text = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        text.push_str(&format!("{k}: {v}\r\n"));
    }
    if !headers.iter().any(|(k, _)| k == "Content-Length") {
        text.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    text.push_str("\r\n");
    out.write_all(text.as_bytes())?;
    if !head_only {
        out.write_all(body)?;
    }
    out.flush()
}

fn serve(conn: TcpStream, state: &Mutex<State>, port: u16) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let range = headers.get("range").cloned().unwrap_or_default();
    let head = method == "HEAD";
    let mut st = state.lock().unwrap();
    let auth = if headers.contains_key("authorization") { " [auth]" } else { "" };
    st.log.push(format!("{method} {target} {range}").trim().to_string() + auth);
    let err = |code: &str| vec![("X-Error-Code".to_string(), code.to_string())];
    let path = target.split('?').next().unwrap_or("").to_string();

    // The CDN: /cdn/<repo>/<file>, with Range.
    if let Some(rest) = path.strip_prefix("/cdn/") {
        let (repo, file) = rest.split_once("/--/").unwrap();
        let Some(mut body) = st.repos.get(repo).and_then(|r| r.get(file)).cloned() else {
            return respond(&mut out, "404 Not Found", &[], b"", head);
        };
        if st.corrupt.contains(file) {
            let mid = body.len() / 2;
            body[mid] ^= 0xff;
        }
        match st.hostile.get(file).cloned() {
            Some(Hostile::LongerBody(extra)) => {
                drop(st);
                body.extend(std::iter::repeat_n(0u8, extra));
                return respond(&mut out, "200 OK", &[], &body, head);
            }
            Some(Hostile::Endless) => {
                drop(st);
                out.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")?;
                let chunk = vec![7u8; 1 << 16];
                loop {
                    out.write_all(&chunk)?;
                }
            }
            Some(Hostile::Trickle(ms)) => {
                drop(st);
                let text = format!("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: {}\r\n\r\n", body.len());
                out.write_all(text.as_bytes())?;
                for b in &body {
                    out.write_all(&[*b])?;
                    out.flush()?;
                    std::thread::sleep(Duration::from_millis(ms));
                }
                return Ok(());
            }
            _ => {}
        }
        let cut = st.cut_once.remove(file);
        drop(st);
        let total = body.len();
        let start =
            range.strip_prefix("bytes=").and_then(|r| r.trim_end_matches('-').parse::<usize>().ok()).unwrap_or(0);
        if start >= total && start > 0 {
            return respond(&mut out, "416 Range Not Satisfiable", &[], b"", head);
        }
        let (status, mut hs) = if range.is_empty() {
            ("200 OK", vec![])
        } else {
            ("206 Partial Content", vec![("Content-Range".to_string(), format!("bytes {start}-{}/{total}", total - 1))])
        };
        hs.push(("Content-Length".into(), (total - start).to_string()));
        hs.push(("Accept-Ranges".into(), "bytes".into()));
        if cut {
            // Announce the whole body, send half, drop the connection.
            let half = &body[start..start + (total - start) / 2];
            let mut text = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
            for (k, v) in &hs {
                text.push_str(&format!("{k}: {v}\r\n"));
            }
            text.push_str("\r\n");
            out.write_all(text.as_bytes())?;
            out.write_all(half)?;
            out.flush()?;
            return out.shutdown(std::net::Shutdown::Both);
        }
        return respond(&mut out, status, &hs, &body[start..], head);
    }

    // The tree API: /api/models/<owner>/<name>/tree/<rev>
    if let Some(rest) = path.strip_prefix("/api/models/") {
        let segs: Vec<&str> = rest.splitn(5, '/').collect();
        let repo = format!("{}/{}", segs[0], segs.get(1).unwrap_or(&""));
        let Some(files) = st.repos.get(&repo) else {
            return respond(
                &mut out,
                "404 Not Found",
                &err("RepoNotFound"),
                b"{\"error\":\"Repository not found\"}",
                head,
            );
        };
        let mut list: Vec<serde_json::Value> = files
            .iter()
            .map(|(p, b)| serde_json::json!({"type": "file", "path": p, "size": b.len(), "oid": git_sha1(b)}))
            .collect();
        for p in &st.extra_listing {
            list.push(serde_json::json!({"type": "file", "path": p, "size": 2, "oid": git_sha1(b"{}")}));
        }
        if st.huge_listing {
            let pad = "x".repeat(200);
            for i in 0..200_000 {
                list.push(serde_json::json!({"type": "directory", "path": format!("pad/{i}/{pad}")}));
            }
        }
        let body = serde_json::to_vec(&list).unwrap();
        return respond(&mut out, "200 OK", &[("Content-Type".into(), "application/json".into())], &body, head);
    }

    // /<owner>/<name>/resolve/<rev>/<file>
    let segs: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
    if segs.len() < 5 || segs[2] != "resolve" {
        return respond(&mut out, "404 Not Found", &[], b"", head);
    }
    let repo = format!("{}/{}", segs[0], segs[1]);
    let (rev, file) = (segs[3], segs[4]);
    if let Some(token) = st.private.get(&repo) {
        if headers.get("authorization") != Some(&format!("Bearer {token}")) {
            return respond(
                &mut out,
                "401 Unauthorized",
                &err("RepoNotFound"),
                b"{\"error\":\"Invalid username or password.\"}",
                head,
            );
        }
    }
    let Some(files) = st.repos.get(&repo) else {
        return respond(&mut out, "404 Not Found", &err("RepoNotFound"), b"", head);
    };
    // `main`, the test commit, or a commit ghiblify pins (the same content in this hub's history),
    // unless the test took the pins away.
    let pinned = !st.forget_pins && PINS.contains(&rev);
    if rev != "main" && rev != COMMIT && !pinned {
        return respond(&mut out, "404 Not Found", &err("RevisionNotFound"), b"", head);
    }
    let Some(body) = files.get(file) else {
        return respond(&mut out, "404 Not Found", &err("EntryNotFound"), b"", head);
    };
    let hostile = st.hostile.get(file).cloned();
    if let Some(Hostile::Busy(n)) = hostile {
        let seen = st.log.iter().filter(|l| l.starts_with(&format!("HEAD {path}"))).count();
        if seen <= n {
            return respond(&mut out, "429 Too Many Requests", &[("Retry-After".into(), "1".into())], b"", head);
        }
    }
    let commit = match &hostile {
        Some(Hostile::Commit(c)) => c.clone(),
        _ if pinned => rev.to_string(),
        _ => COMMIT.to_string(),
    };
    let etag = |real: String| match &hostile {
        Some(Hostile::Etag(e)) => e.clone(),
        _ => real,
    };
    let mut hs = vec![("X-Repo-Commit".to_string(), commit)];
    if is_lfs(file) {
        hs.push(("X-Linked-Etag".into(), format!("\"{}\"", etag(sha256(body)))));
        hs.push(("X-Linked-Size".into(), body.len().to_string()));
        hs.push(("ETag".into(), format!("\"{}\"", git_sha1(b"pointer"))));
        hs.push(("Location".into(), format!("http://127.0.0.1:{port}/cdn/{repo}/--/{file}")));
        return respond(&mut out, "302 Found", &hs, b"", head);
    }
    hs.push(("ETag".into(), format!("\"{}\"", etag(git_sha1(body)))));
    let body = body.clone();
    drop(st);
    respond(&mut out, "200 OK", &hs, &body, head)
}

trait HubCase {
    fn cmd(&self, endpoint: &str) -> Command;
    fn repo_cache(&self, repo: &str) -> PathBuf;
}

impl HubCase for Case {
    fn cmd(&self, endpoint: &str) -> Command {
        let mut c = crate::common::ghiblify_cmd();
        c.current_dir(self.dir.path())
            .env("HF_ENDPOINT", endpoint)
            .env("HF_HOME", self.path("hf-home"))
            .env_remove("HF_HUB_CACHE")
            .env_remove("HF_TOKEN")
            .env_remove("HF_HUB_OFFLINE");
        c
    }
    fn repo_cache(&self, repo: &str) -> PathBuf {
        self.path("hf-home/hub").join(format!("models--{}", repo.replace('/', "--")))
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

// `--size 64`: the photo's own size, whatever model a test serves.
const RUN: &[&str] = &["photo.png", "-o", "out.png", "--steps", "2", "--strength", "1", "--seed", "1", "--size", "64"];

fn tiny() -> PathBuf {
    fixtures().join("tiny-sd1")
}

/// The default preset's file at the root of its repo (a tiny SD1 checkpoint in its place).
const GHIBLI_CKPT: &str = "ghibli-diffusion-v1.ckpt";

/// nitrosocke/Ghibli-Diffusion as the hub has it: diffusers folders and one checkpoint.
fn add_ghibli(hub: &TestHub) {
    hub.add_folder("nitrosocke/Ghibli-Diffusion", &tiny());
    let ckpt = std::fs::read(fixtures().join("single/sd1.ckpt")).unwrap();
    hub.state.lock().unwrap().repos.get_mut("nitrosocke/Ghibli-Diffusion").unwrap().insert(GHIBLI_CKPT.into(), ckpt);
}

#[test]
fn first_run_downloads_the_default_preset_then_runs_offline_from_the_cache() {
    let hub = TestHub::start();
    add_ghibli(&hub);
    let case = Case::new();
    let o = case.cmd(&hub.endpoint()).args(RUN).output().unwrap();
    let err = stderr(&o);
    // What a first run prints (see with --nocapture).
    eprintln!("--- first run ---\n{err}");
    assert!(o.status.success(), "{err}");
    assert!(case.path("out.png").is_file());
    // The preset reads its one checkpoint file, not the folders.
    assert!(err.contains(&format!("downloading nitrosocke/Ghibli-Diffusion/{GHIBLI_CKPT}")), "{err}");
    assert!(!err.contains("unet/"), "{err}");
    // The standard layout: the preset's pinned commit as the snapshot (a commit needs no refs/),
    // links into blobs named by sha256 / sha1.
    let cache = case.repo_cache("nitrosocke/Ghibli-Diffusion");
    assert!(!cache.join("refs/main").exists(), "fetched by commit, not by branch");
    let snapshot = cache.join("snapshots").join(PINS[0]);
    let ckpt = snapshot.join(GHIBLI_CKPT);
    let bytes = std::fs::read(fixtures().join("single/sd1.ckpt")).unwrap();
    assert!(std::fs::symlink_metadata(&ckpt).unwrap().file_type().is_symlink());
    assert_eq!(std::fs::read_link(&ckpt).unwrap(), Path::new("../../blobs").join(sha256(&bytes)));
    assert_eq!(std::fs::read(&ckpt).unwrap(), bytes);
    let blobs = |cache: &Path| -> Vec<String> {
        std::fs::read_dir(cache.join("blobs"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(blobs(&cache).len(), 1, "{:?}", blobs(&cache));
    // The model card's licence reaches the provenance, and the file names the model.
    let params = crate::cli::png_text(&case.path("out.png"), "parameters").unwrap();
    assert!(params.contains(&format!("Model: nitrosocke/Ghibli-Diffusion/{GHIBLI_CKPT}@{}", PINS[0])), "{params}");
    let png = std::fs::read(case.path("out.png")).unwrap();
    assert!(String::from_utf8_lossy(&png).contains("creativeml-openrail-m"));

    // The repo id reads the folders: exactly the preset's files, beside the checkpoint.
    let o = case
        .cmd(&hub.endpoint())
        .args(RUN)
        .args(["--model", "nitrosocke/Ghibli-Diffusion", "-o", "folders.png"])
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("downloading nitrosocke/Ghibli-Diffusion/unet/diffusion_pytorch_model.safetensors"), "{err}");
    let unet = snapshot.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(tiny().join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    assert_eq!(std::fs::read_link(&unet).unwrap(), Path::new("../../../blobs").join(sha256(&bytes)));
    let vocab = std::fs::read(tiny().join("tokenizer/vocab.json")).unwrap();
    assert!(cache.join("blobs").join(git_sha1(&vocab)).is_file());
    assert_eq!(blobs(&cache).len(), 14, "{:?}", blobs(&cache));
    assert!(!blobs(&cache).iter().any(|b| b.ends_with(".incomplete")));

    // Second run: already cached, nothing downloaded (HEADs only).
    let before = hub.log().len();
    let o = case.cmd(&hub.endpoint()).args(RUN).arg("--overwrite").output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("downloading"), "{}", stderr(&o));
    assert!(hub.log()[before..].iter().all(|l| l.starts_with("HEAD ")), "{:?}", &hub.log()[before..]);

    // Hub gone: the complete cache works, with one warning line.
    hub.shut_down();
    std::fs::remove_file(case.path("out.png")).unwrap();
    let t = Instant::now();
    let o = case.cmd(&hub_gone()).args(RUN).output().unwrap();
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(t.elapsed() < Duration::from_secs(60));
    assert_eq!(err.matches("unreachable").count(), 1, "{err}");
    assert!(case.path("out.png").is_file());

    // --offline and HF_HUB_OFFLINE: no request at all, no warning.
    for offline in [true, false] {
        let mut c = case.cmd(&hub_gone());
        c.args(RUN).arg("--overwrite");
        if offline {
            c.arg("--offline");
        } else {
            c.env("HF_HUB_OFFLINE", "1");
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(!stderr(&o).contains("unreachable"), "{}", stderr(&o));
    }
}

/// An endpoint nobody listens on.
fn hub_gone() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("http://127.0.0.1:{port}")
}

#[test]
fn offline_with_an_empty_cache_lists_the_missing_files_and_the_fetch_command() {
    let case = Case::new();
    let o = case.cmd(&hub_gone()).args(RUN).arg("--offline").output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    for f in [GHIBLI_CKPT, "ghiblify --download-only --model ghibli-diffusion"] {
        assert!(err.contains(f), "{f} in {err}");
    }
    assert!(!case.path("out.png").exists());
}

#[test]
fn unreachable_hub_with_an_empty_cache_fails_within_ten_seconds() {
    let case = Case::new();
    let t = Instant::now();
    let o = case.cmd(&hub_gone()).args(RUN).output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(
        err.contains("unreachable") && err.contains("nitrosocke/Ghibli-Diffusion") && err.contains("--download-only"),
        "{err}"
    );
}

#[test]
fn a_cut_download_resumes_with_a_range_request() {
    let hub = TestHub::start();
    hub.add_folder("someone/tiny", &tiny());
    let file = "unet/diffusion_pytorch_model.safetensors";
    hub.state.lock().unwrap().cut_once.insert(file.into());
    let case = Case::new();
    let o = case.cmd(&hub.endpoint()).args(["--download-only", "--model", "someone/tiny"]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let len = std::fs::metadata(tiny().join(file)).unwrap().len();
    let resumed = format!("bytes={}-", len / 2);
    assert!(
        hub.log().iter().any(|l| l.contains("/cdn/someone/tiny/--/unet/") && l.ends_with(&resumed)),
        "{:?}",
        hub.log()
    );
    let blob = case.repo_cache("someone/tiny").join("snapshots").join(COMMIT).join(file);
    assert_eq!(std::fs::read(blob).unwrap(), std::fs::read(tiny().join(file)).unwrap());
    // The listing picked only what a run needs.
    assert!(String::from_utf8_lossy(&o.stdout).contains(COMMIT));
}

#[test]
fn a_partial_file_left_by_a_killed_run_is_resumed_not_restarted() {
    let hub = TestHub::start();
    hub.add_folder("someone/tiny", &tiny());
    let case = Case::new();
    let file = "vae/diffusion_pytorch_model.safetensors";
    let bytes = std::fs::read(tiny().join(file)).unwrap();
    let blobs = case.repo_cache("someone/tiny").join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let have = 100_000;
    std::fs::write(blobs.join(format!("{}.incomplete", sha256(&bytes))), &bytes[..have]).unwrap();
    let o = case.cmd(&hub.endpoint()).args(["--download-only", "--model", "someone/tiny"]).output().unwrap();
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("resuming someone/tiny/vae/diffusion_pytorch_model.safetensors"), "{err}");
    let vae_gets: Vec<String> =
        hub.log().into_iter().filter(|l| l.starts_with("GET /cdn/someone/tiny/--/vae/")).collect();
    assert_eq!(vae_gets, vec![format!("GET /cdn/someone/tiny/--/{file} bytes={have}-")]);
    assert_eq!(std::fs::read(blobs.join(sha256(&bytes))).unwrap(), bytes);
}

#[test]
fn content_that_does_not_match_its_sha256_is_refused_and_removed() {
    let hub = TestHub::start();
    hub.add_folder("someone/tiny", &tiny());
    let file = "text_encoder/model.safetensors";
    hub.state.lock().unwrap().corrupt.insert(file.into());
    let case = Case::new();
    let o = case.cmd(&hub.endpoint()).args(RUN).args(["--model", "someone/tiny"]).output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains(file) && err.contains("corrupt") && err.contains("sha256"), "{err}");
    let blobs = case.repo_cache("someone/tiny").join("blobs");
    let sha = sha256(&std::fs::read(tiny().join(file)).unwrap());
    assert!(!blobs.join(&sha).exists() && !blobs.join(format!("{sha}.incomplete")).exists());
    assert!(!case.path("out.png").exists());
}

#[test]
fn not_found_and_unauthorised_say_what_is_wrong() {
    let hub = TestHub::start();
    hub.add_folder("someone/tiny", &tiny());
    hub.add_folder("someone/private", &tiny());
    hub.state.lock().unwrap().private.insert("someone/private".into(), "hf_secret".into());
    let case = Case::new();
    let run = |model: &str, token: Option<&str>| {
        let mut c = case.cmd(&hub.endpoint());
        c.args(["--download-only", "--model", model]);
        if let Some(t) = token {
            c.env("HF_TOKEN", t);
        }
        let o = c.output().unwrap();
        (o.status.code(), stderr(&o))
    };
    let (code, err) = run("someone/missing", None);
    assert_eq!(code, Some(1));
    assert!(err.contains("'someone/missing' does not exist"), "{err}");
    let (code, err) = run("someone/tiny@v9", None);
    assert_eq!(code, Some(1));
    assert!(err.contains("no revision 'v9'"), "{err}");
    let (code, err) = run("someone/private", None);
    assert_eq!(code, Some(1));
    assert!(err.contains("HF_TOKEN") && err.contains("someone/private"), "{err}");
    let (code, err) = run("someone/private", Some("hf_secret"));
    assert_eq!(code, Some(0), "{err}");
    // The token goes to the hub, never to the CDN.
    let log = hub.log();
    assert!(log.iter().any(|l| l.starts_with("HEAD /someone/private/resolve/") && l.ends_with("[auth]")), "{log:?}");
    let cdn: Vec<&String> = log.iter().filter(|l| l.starts_with("GET /cdn/someone/private/")).collect();
    assert!(!cdn.is_empty() && cdn.iter().all(|l| !l.ends_with("[auth]")), "{cdn:?}");

    // A preset whose repo lacks a file: the 404 names the repo and the file.
    let mut files = hub.state.lock().unwrap().repos["someone/tiny"].clone();
    files.remove("tokenizer/merges.txt");
    hub.state.lock().unwrap().repos.insert("nitrosocke/Ghibli-Diffusion".into(), files);
    for (model, missing) in [("ghibli-diffusion", GHIBLI_CKPT), ("nitrosocke/Ghibli-Diffusion", "tokenizer/merges.txt")]
    {
        let (code, err) = run(model, None);
        assert_eq!(code, Some(1));
        assert!(err.contains("nitrosocke/Ghibli-Diffusion") && err.contains(missing) && err.contains("404"), "{err}");
    }
}

#[test]
fn list_models_prints_presets_with_size_and_licence() {
    let o = crate::common::ghiblify_cmd().arg("--list-models").output().unwrap();
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    for needle in
        ["ghibli-diffusion", "nitrosocke/Ghibli-Diffusion", "sd15", "GB", "creativeml-openrail-m", "(default)"]
    {
        assert!(out.contains(needle), "{needle} in {out}");
    }
}

#[test]
fn a_model_that_is_neither_a_preset_nor_owner_name_is_a_usage_error() {
    let case = Case::new();
    for (model, needle) in [("a/b/c", "'a/b/c'"), ("ghibli", "no such preset")] {
        let o = case.cmd(&hub_gone()).args(["--download-only", "--model", model]).output().unwrap();
        assert_eq!(o.status.code(), Some(1));
        assert!(stderr(&o).contains(needle), "{}", stderr(&o));
        assert!(o.stdout.is_empty());
    }
}

#[test]
fn fast_mode_fetches_lcm_lora_and_runs_the_lcm_sampler_without_guidance() {
    let hub = TestHub::start();
    serve_lcm_lora(&hub);
    serve_taesd(&hub);
    let case = Case::new();
    let o = case
        .cmd(&hub.endpoint())
        .args(["photo.png", "-o", "out.png", "--seed", "1", "--fast", "--model-dir"])
        .arg(tiny())
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("lora 'lcm-lora-sdv1-5': applied 150 of 150 tensors (unet 132, text encoder 18)"), "{err}");
    let params = crate::cli::png_text(&case.path("out.png"), "parameters").unwrap();
    assert!(
        params.contains("Steps: 8, Sampler: lcm, CFG scale: 1,") && params.contains("<lora:lcm-lora-sdv1-5:1>"),
        "{params}"
    );
    assert!(params.contains("VAE: madebyollin/taesd, "), "--fast takes TAESD: {params}");
    // --vae model keeps the model's own VAE.
    let o = case
        .cmd(&hub.endpoint())
        .args(["photo.png", "-o", "own.png", "--fast", "--vae", "model", "--model-dir"])
        .arg(tiny())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!crate::cli::png_text(&case.path("own.png"), "parameters").unwrap().contains("VAE:"));
    // Hub gone: model folder local, LoRA and TAESD from the cache, one warning for the run.
    let o = case
        .cmd(&hub_gone())
        .args(["photo.png", "-o", "gone.png", "--fast", "--model-dir"])
        .arg(tiny())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stderr(&o).matches("unreachable").count(), 1, "{}", stderr(&o));
    // Offline afterwards: the LoRA comes from the cache.
    let o = case
        .cmd(&hub_gone())
        .args(["photo.png", "-o", "out2.png", "--fast", "--offline", "--model-dir"])
        .arg(tiny())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn vae_taesd_is_fetched_from_its_repo_and_used() {
    let hub = TestHub::start();
    serve_taesd(&hub);
    let case = Case::new();
    let o =
        case.cmd(&hub.endpoint()).args(RUN).args(["--vae", "taesd", "-v", "--model-dir"]).arg(tiny()).output().unwrap();
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("vae: AutoencoderTiny from"), "{err}");
    assert!(hub.log().iter().any(|l| l.starts_with("GET /cdn/madebyollin/taesd/")));
    let params = crate::cli::png_text(&case.path("out.png"), "parameters").unwrap();
    assert!(params.contains("VAE: madebyollin/taesd, "), "{params}");
    // A VAE whose latent space does not fit is refused by name.
    let o = case
        .cmd(&hub_gone())
        .args(RUN)
        .args(["--vae"])
        .arg(tiny().parent().unwrap().join("tiny-odd/vae"))
        .args(["--overwrite", "--model-dir"])
        .arg(tiny())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("does not fit the model's latent space"), "{}", stderr(&o));
}

/// Serves the LCM-LoRA repo `--fast` fetches, with a stand-in of the same form (a diffusers-format
/// LoRA file).
fn serve_lcm_lora(hub: &TestHub) {
    let lora = std::fs::read(fixtures().join("lora/peft.safetensors")).unwrap();
    let files = BTreeMap::from([("pytorch_lora_weights.safetensors".to_string(), lora)]);
    hub.state.lock().unwrap().repos.insert("latent-consistency/lcm-lora-sdv1-5".into(), files);
}

/// Serves the tiny TAESD fixture as madebyollin/taesd.
fn serve_taesd(hub: &TestHub) {
    let dir = fixtures().join("tiny-taesd");
    let files: BTreeMap<String, Vec<u8>> = ["config.json", "diffusion_pytorch_model.safetensors"]
        .iter()
        .map(|f| (f.to_string(), std::fs::read(dir.join(f)).unwrap()))
        .collect();
    hub.state.lock().unwrap().repos.insert("madebyollin/taesd".into(), files);
}

#[test]
fn processes_sharing_a_cache_fetch_each_file_once() {
    let hub = TestHub::start();
    hub.add_folder("someone/tiny", &tiny());
    let case = Case::new();
    let children: Vec<_> = (0..3)
        .map(|_| {
            case.cmd(&hub.endpoint())
                .args(["--download-only", "-q", "--model", "someone/tiny"])
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    for file in [
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ] {
        let gets = hub.log().iter().filter(|l| l.starts_with(&format!("GET /cdn/someone/tiny/--/{file}"))).count();
        assert_eq!(gets, 1, "{file} fetched {gets} times");
        let p = case.repo_cache("someone/tiny").join("snapshots").join(COMMIT).join(file);
        assert_eq!(std::fs::read(p).unwrap(), std::fs::read(tiny().join(file)).unwrap());
    }
}

#[test]
fn preview_writes_the_picture_so_far_with_taesd() {
    let hub = TestHub::start();
    serve_taesd(&hub);
    let case = Case::new();
    let o = case
        .cmd(&hub.endpoint())
        .args(RUN)
        .args(["--preview", "prev.png", "--model-dir"])
        .arg(tiny())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let prev = image::open(case.path("prev.png")).unwrap();
    assert_eq!((prev.width(), prev.height()), (64, 48));
    assert!(!case.path("prev.png.tmp").exists());
    let o =
        case.cmd(&hub_gone()).args(RUN).args(["--preview", "prev.jpg", "--model-dir"]).arg(tiny()).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--preview 'prev.jpg'"), "{}", stderr(&o));
}

/// Every file under `dir` whose name starts with "evil" (what a traversal would have planted).
fn planted(dir: &Path) -> Vec<PathBuf> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("evil"))
        .map(|e| e.path().to_path_buf())
        .collect()
}

/// A hub serving the tiny model as `someone/tiny`, with `hostile` on one file.
fn hostile_hub(file: &str, hostile: Hostile) -> TestHub {
    let hub = TestHub::start();
    hub.add_folder("someone/tiny", &tiny());
    hub.state.lock().unwrap().hostile.insert(file.into(), hostile);
    hub
}

/// Fetching `someone/tiny` fails in one line (exit 1) containing every needle, within `limit`,
/// and nothing lands outside the cache.
fn refused(hub: &TestHub, needles: &[&str], limit: Duration) -> String {
    let case = Case::new();
    let t = Instant::now();
    let o = case
        .cmd(&hub.endpoint())
        .env("HF_HUB_DOWNLOAD_TIMEOUT", "1")
        .args(["--download-only", "--model", "someone/tiny", "-q"])
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(t.elapsed() < limit, "took {:?}: {err}", t.elapsed());
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    for n in needles {
        assert!(err.contains(n), "{n:?} in {err}");
    }
    assert!(planted(case.dir.path()).is_empty(), "planted: {:?}", planted(case.dir.path()));
    assert!(o.stdout.is_empty());
    err
}

#[test]
fn a_listing_entry_that_climbs_out_of_the_snapshot_is_refused() {
    let hub = TestHub::start();
    hub.add_folder("someone/tiny", &tiny());
    for bad in ["tokenizer/../../../../evil.json", "/tmp/evil.json", "tokenizer//evil.json"] {
        hub.state.lock().unwrap().extra_listing = vec![bad.to_string()];
        refused(&hub, &["unsafe entry", bad], Duration::from_secs(20));
    }
}

#[test]
fn etags_and_commits_that_are_not_hashes_are_refused() {
    let evil_etag = "../../../../evil-blob";
    let hub = hostile_hub("unet/config.json", Hostile::Etag(evil_etag.into()));
    refused(&hub, &["ETag", evil_etag, "unet/config.json"], Duration::from_secs(20));
    let hub = hostile_hub("unet/diffusion_pytorch_model.safetensors", Hostile::Etag("evil".into()));
    refused(&hub, &["ETag 'evil'"], Duration::from_secs(20));
    let evil_commit = "../../../evil-snapshot";
    let hub = hostile_hub("model_index.json", Hostile::Commit(evil_commit.into()));
    refused(&hub, &["commit id", evil_commit], Duration::from_secs(20));
}

#[test]
fn a_body_longer_than_announced_or_endless_stops_at_the_announced_size() {
    let file = "unet/diffusion_pytorch_model.safetensors";
    for h in [Hostile::LongerBody(4096), Hostile::Endless] {
        let hub = hostile_hub(file, h);
        refused(&hub, &["more than", "bytes"], Duration::from_secs(30));
    }
}

#[test]
fn a_trickling_body_runs_into_its_deadline() {
    // HF_HUB_DOWNLOAD_TIMEOUT=1: four seconds plus 0.3 MB at 64 KiB/s, ~9 s in all.
    let hub = hostile_hub("vae/diffusion_pytorch_model.safetensors", Hostile::Trickle(300));
    refused(&hub, &["too slow", "run again to resume"], Duration::from_secs(25));
}

#[test]
fn too_many_requests_is_retried_after_its_retry_after_a_bounded_number_of_times() {
    let hub = hostile_hub("unet/config.json", Hostile::Busy(2));
    let case = Case::new();
    let o = case.cmd(&hub.endpoint()).args(["--download-only", "--model", "someone/tiny"]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let heads = hub.log().iter().filter(|l| l.starts_with("HEAD /someone/tiny/resolve/main/unet/config.json")).count();
    assert_eq!(heads, 3, "two 429s waited out, then the answer");
    // A hub that stays busy: a bounded number of tries, then one line.
    let hub = hostile_hub("unet/config.json", Hostile::Busy(100));
    refused(&hub, &["429"], Duration::from_secs(30));
    let heads = hub.log().iter().filter(|l| l.starts_with("HEAD /someone/tiny/resolve/main/unet/config.json")).count();
    assert_eq!(heads, 4, "one try and three retries");
}

#[test]
fn a_listing_past_any_sane_size_is_refused() {
    let hub = TestHub::start();
    hub.add_folder("someone/tiny", &tiny());
    hub.state.lock().unwrap().huge_listing = true;
    refused(&hub, &["listing is larger than"], Duration::from_secs(30));
}

#[test]
fn offline_hints_name_a_command_that_fetches_what_is_missing() {
    // The model is cached; TAESD and a hub LoRA are not: the hint must fetch those.
    let hub = TestHub::start();
    add_ghibli(&hub);
    let case = Case::new();
    assert!(case.cmd(&hub.endpoint()).args(["--download-only", "-q"]).output().unwrap().status.success());
    for (extra, hint) in [
        (&["--vae", "taesd"][..], "ghiblify --download-only --vae taesd"),
        (
            &["--lora", "someone/loras/style.safetensors"][..],
            "ghiblify --download-only --lora someone/loras/style.safetensors",
        ),
    ] {
        let o = case.cmd(&hub.endpoint()).args(RUN).args(extra).args(["--offline", "-q"]).output().unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains(hint), "{hint} in {err}");
    }
}

#[test]
fn a_pinned_commit_the_hub_lacks_falls_back_to_main_with_one_warning() {
    let hub = TestHub::start();
    add_ghibli(&hub);
    hub.state.lock().unwrap().forget_pins = true;
    let case = Case::new();
    let o = case.cmd(&hub.endpoint()).args(RUN).output().unwrap();
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    let warnings: Vec<&str> = err.lines().filter(|l| l.starts_with("warning:")).collect();
    assert_eq!(warnings.len(), 1, "{err}");
    assert!(warnings[0].contains(PINS[0]) && warnings[0].contains("main"), "{err}");
    let cache = case.repo_cache("nitrosocke/Ghibli-Diffusion");
    assert_eq!(std::fs::read_to_string(cache.join("refs/main")).unwrap(), COMMIT);
    // A revision the user asks for does not fall back: it is an error.
    let o = case
        .cmd(&hub.endpoint())
        .args(RUN)
        .args(["--model", &format!("ghibli-diffusion@{}", PINS[1])])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("has no revision"), "{}", stderr(&o));
}

#[test]
fn a_single_file_checkpoint_in_a_hub_repo_is_fetched_and_run() {
    let hub = TestHub::start();
    let mut files = BTreeMap::new();
    for f in ["sd1.safetensors", "sd1.ckpt"] {
        files.insert(format!("weights/{f}"), std::fs::read(fixtures().join("single").join(f)).unwrap());
    }
    hub.state.lock().unwrap().repos.insert("someone/ghibli-single".into(), files);
    let case = Case::new();
    for f in ["sd1.safetensors", "sd1.ckpt"] {
        let model = format!("someone/ghibli-single/weights/{f}");
        let o = case.cmd(&hub.endpoint()).args(RUN).args(["--model", &model, "--overwrite"]).output().unwrap();
        assert!(o.status.success(), "{f}: {}", stderr(&o));
        let params = crate::cli::png_text(&case.path("out.png"), "parameters").unwrap();
        assert!(params.contains(&format!("Model: {model}")), "{params}");
    }
    // Offline, from the cache.
    let o = case
        .cmd(&hub.endpoint())
        .args(RUN)
        .args(["--model", "someone/ghibli-single/weights/sd1.ckpt", "--offline", "-o", "off.png"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn controlnets_come_from_the_hub_as_fp16_files_work_with_fast_and_offline() {
    // The tiny ControlNet served as lllyasviel's tile ControlNet, with an fp16 file beside the
    // full one (as the real repo has): the fp16 one is fetched, half the download.
    let hub = TestHub::start();
    let dir = fixtures().join("tiny-controlnet-sd1");
    let weights = std::fs::read(dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    let files: BTreeMap<String, Vec<u8>> = [
        ("config.json".to_string(), std::fs::read(dir.join("config.json")).unwrap()),
        ("diffusion_pytorch_model.safetensors".to_string(), weights.clone()),
        ("diffusion_pytorch_model.fp16.safetensors".to_string(), weights),
    ]
    .into_iter()
    .collect();
    hub.state.lock().unwrap().repos.insert("lllyasviel/control_v11f1e_sd15_tile".into(), files.clone());
    hub.state.lock().unwrap().repos.insert("lllyasviel/control_v11p_sd15_canny".into(), files);
    let case = Case::new();
    let args = ["--control", "tile:0.8", "--strength", "0.8", "--overwrite", "-v"];
    let o = case.cmd(&hub.endpoint()).args(RUN).args(args).arg("--model-dir").arg(tiny()).output().unwrap();
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("loaded ControlNet 'lllyasviel/control_v11f1e_sd15_tile'"), "{err}");
    let log = hub.log();
    let got =
        |f: &str| log.iter().any(|l| l.starts_with("GET /cdn/lllyasviel/control_v11f1e_sd15_tile/") && l.contains(f));
    assert!(got("diffusion_pytorch_model.fp16.safetensors") && !got("diffusion_pytorch_model.safetensors "), "{log:?}");
    let params = crate::cli::png_text(&case.path("out.png"), "parameters").unwrap();
    assert!(
        params.contains(r#"ControlNet 0: "Module: tile_resample, Model: control_v11f1e_sd15_tile, Weight: 0.8, Guidance Start: 0, Guidance End: 1""#),
        "{params}"
    );
    let license = crate::cli::png_text(&case.path("out.png"), "License").unwrap();
    assert!(license.contains("ControlNet lllyasviel/control_v11f1e_sd15_tile licence: openrail"), "{license}");
    // Offline from the cache, with the same picture.
    let first = std::fs::read(case.path("out.png")).unwrap();
    let o =
        case.cmd(&hub_gone()).args(RUN).args(args).arg("--offline").arg("--model-dir").arg(tiny()).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        image::load_from_memory(&first).unwrap().to_rgb8(),
        image::open(case.path("out.png")).unwrap().to_rgb8()
    );
    // canny from its own repo, together with --fast (LCM-LoRA + ControlNet, a common fast
    // recipe): the control image written is the photo's edges.
    serve_lcm_lora(&hub);
    serve_taesd(&hub);
    let o = case
        .cmd(&hub.endpoint())
        .args(["photo.png", "-o", "fast.png", "--seed", "1", "--size", "64", "--fast", "--control", "canny"])
        .args(["--save-control", "edges.png", "--model-dir"])
        .arg(tiny())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let params = crate::cli::png_text(&case.path("fast.png"), "parameters").unwrap();
    assert!(
        params.contains("Sampler: lcm")
            && params.contains(r#"ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny"#),
        "{params}"
    );
    let edges = image::open(case.path("edges.png")).unwrap().to_rgb8();
    assert!(edges.pixels().all(|p| p.0 == [0, 0, 0] || p.0 == [255, 255, 255]));
    assert!(edges.pixels().any(|p| p.0 == [255, 255, 255]), "no edges drawn");
    // A batch: one control image from each photo (two different photos, two different pictures).
    let dir = case.path("in");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(fixtures().join("photo-64x48.png"), dir.join("a.png")).unwrap();
    std::fs::copy(fixtures().join("photo-48x48.png"), dir.join("b.png")).unwrap();
    let o = case
        .cmd(&hub_gone())
        .args(["in", "-o", "out", "--steps", "2", "--seed", "1", "--size", "64", "--offline", "--control", "tile"])
        .arg("--model-dir")
        .arg(tiny())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    for f in ["out/a.png", "out/b.png"] {
        let params = crate::cli::png_text(&case.path(f), "parameters").unwrap();
        assert!(params.contains(r#"ControlNet 0: "Module: tile_resample"#), "{f}: {params}");
    }
    // A ControlNet missing from the cache offline: the command that fetches it.
    let empty = Case::new();
    let o = empty
        .cmd(&hub_gone())
        .args(RUN)
        .args(["--control", "canny", "--offline", "--model-dir"])
        .arg(tiny())
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("lllyasviel/control_v11p_sd15_canny") && err.contains("--control canny"), "{err}");
}
