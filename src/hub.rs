//! Model files from the Hugging Face hub into the standard cache shared with Python tools.
//!
//! hf-hub resolves the configuration (`HF_ENDPOINT`, `HF_HOME`, `HF_HUB_CACHE`) and answers
//! cache-only lookups; the transfer itself is ours because hf-hub 1.0 neither verifies content
//! nor resumes a cut download. It follows `huggingface_hub/file_download.py` (`hf_hub_download`):
//! a HEAD on `resolve/<revision>/<file>` without following the CDN redirect gives the commit
//! (`X-Repo-Commit`), the content id (`X-Linked-Etag` = sha256 for LFS files, `ETag` = git blob
//! sha1 for small ones) and the size; the body goes to `blobs/<etag>.incomplete` (resumed with
//! `Range`), is verified, renamed to `blobs/<etag>`, and linked from `snapshots/<commit>/<file>`,
//! with `refs/<revision>` holding the commit. A file diffusers already put there is not fetched.
//!
//! A hub is untrusted (`HF_ENDPOINT` may point at any mirror): every name it sends that becomes a
//! path (listing entries, ETags, commit ids) passes `crate::repo`'s checks first, a body never gets
//! past its announced size, each file has a total deadline scaled by its size (a trickle cannot
//! hold a run forever), listings are capped, and `429`/`503` are retried a bounded number of times
//! after their `Retry-After`.

use crate::error::{Error, Result};
use crate::printer::Printer;
use reqwest::blocking::{Client, Response};
use reqwest::header::{AUTHORIZATION, CONTENT_LENGTH, ETAG, LOCATION, RANGE};
use reqwest::StatusCode;
use serde::Deserialize;
use std::cell::RefCell;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `HF_HUB_OFFLINE` as huggingface_hub reads it.
pub fn offline_from_env() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

use crate::repo::is_commit;

/// The per-read timeout (huggingface_hub's `HF_HUB_DOWNLOAD_TIMEOUT`, in seconds; 30 by default):
/// a stalled transfer fails after it and is resumed.
fn read_timeout() -> Duration {
    let secs = std::env::var("HF_HUB_DOWNLOAD_TIMEOUT").ok().and_then(|v| v.trim().parse::<f64>().ok());
    Duration::from_secs_f64(secs.filter(|s| s.is_finite() && *s > 0.0).unwrap_or(30.0).min(3600.0))
}

/// The slowest average rate a download may keep: below it the per-file deadline runs out.
const MIN_BYTES_PER_SEC: u64 = 64 * 1024;
/// The most a file of unannounced size may be (configs, tokenizers: a few MB).
const MAX_UNSIZED: u64 = 64 << 20;
/// The most a tree listing may be: the largest repos list ~100k files in ~20 MB.
const MAX_LISTING_BYTES: u64 = 32 << 20;
/// How often a `429 Too Many Requests` / `503 Service Unavailable` is retried, and the longest
/// `Retry-After` honoured.
const BUSY_RETRIES: u32 = 3;
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

/// The time a whole file may take across its attempts: four read timeouts plus its size at
/// [`MIN_BYTES_PER_SEC`].
fn deadline_for(size: Option<u64>) -> Duration {
    read_timeout() * 4 + Duration::from_secs(size.unwrap_or(MAX_UNSIZED) / MIN_BYTES_PER_SEC)
}

/// Sends a request, waiting out `429`/`503` answers (their `Retry-After` seconds, at most
/// [`MAX_RETRY_AFTER`], else 1, 2, 4 s) up to [`BUSY_RETRIES`] times; the last answer is returned.
fn send_patiently(
    build: impl Fn() -> reqwest::blocking::RequestBuilder,
) -> std::result::Result<Response, reqwest::Error> {
    let mut attempt = 0;
    loop {
        let resp = build().send()?;
        let st = resp.status().as_u16();
        if !(st == 429 || st == 503) || attempt >= BUSY_RETRIES {
            return Ok(resp);
        }
        let wait = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs)
            .unwrap_or(Duration::from_secs(1 << attempt))
            .min(MAX_RETRY_AFTER);
        std::thread::sleep(wait);
        attempt += 1;
    }
}

/// Why a hub request did not give a file.
enum Failure {
    /// No answer (connection refused, DNS, timeout, 5xx): the cache may still serve.
    Unreachable(String),
    /// A definite answer (404, 401, bad content, disk error): report it.
    Fatal(Error),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Fatal(e)
    }
}

/// What the HEAD request tells about one file.
struct Meta {
    commit: String,
    etag: String,
    size: Option<u64>,
    /// Where the content is (the CDN for LFS files).
    url: String,
    /// Whether `url` is a redirect target (a signed CDN URL: it gets no token).
    redirected: bool,
}

/// A hub session: the client configuration, the cache, and whether the network is usable.
pub struct Hub {
    endpoint: String,
    token: Option<String>,
    cache: PathBuf,
    offline: bool,
    /// Follows redirects (the content, from the CDN).
    http: Client,
    /// For the metadata HEAD, whose redirect is the answer.
    no_redirect: Client,
    client: hf_hub::HFClientSync,
    printer: Printer,
    /// Set after the first unanswered request: later files go to the cache at once.
    unreachable: RefCell<Option<String>>,
    /// Whether the "fetching …" line was printed.
    announced: std::cell::Cell<bool>,
    /// Whether the "unreachable, using the cache" warning was printed.
    warned: std::cell::Cell<bool>,
}

/// The token as huggingface_hub finds it: `HF_TOKEN`, else the file `huggingface-cli login` wrote.
fn resolve_token() -> Option<String> {
    if let Ok(t) = std::env::var("HF_TOKEN") {
        if !t.trim().is_empty() {
            return Some(t.trim().to_string());
        }
    }
    let path = std::env::var_os("HF_TOKEN_PATH").map(PathBuf::from).or_else(|| {
        let home = std::env::var_os("HF_HOME").map(PathBuf::from).or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(|x| PathBuf::from(x).join("huggingface"))
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface")))
        })?;
        Some(home.join("token"))
    })?;
    std::fs::read_to_string(path).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
}

impl Hub {
    pub fn new(offline: bool, printer: Printer) -> Result<Self> {
        let setup = |e: hf_hub::HFError| Error::Hub(format!("cannot set up the hub client (check HF_ENDPOINT): {e}"));
        let inner = hf_hub::HFClient::builder().build().map_err(setup)?;
        let endpoint = inner.endpoint().trim_end_matches('/').to_string();
        let cache = inner.cache_dir().to_path_buf();
        let client = hf_hub::HFClientSync::from_inner(inner).map_err(setup)?;
        let builder = || {
            Client::builder()
                .user_agent(format!("ghiblify/{}", env!("CARGO_PKG_VERSION")))
                .connect_timeout(Duration::from_secs(5))
                // Per read of the body in the blocking client: a stalled transfer fails and resumes.
                .timeout(read_timeout())
        };
        let built =
            |r: reqwest::Result<Client>| r.map_err(|e| Error::Hub(format!("cannot set up the HTTP client: {e}")));
        let http = built(builder().build())?;
        let no_redirect = built(builder().redirect(reqwest::redirect::Policy::none()).build())?;
        Ok(Self {
            endpoint,
            token: resolve_token(),
            cache,
            offline: offline || offline_from_env(),
            http,
            no_redirect,
            client,
            printer,
            unreachable: RefCell::new(None),
            announced: std::cell::Cell::new(false),
            warned: std::cell::Cell::new(false),
        })
    }

    /// One warning per run that the hub did not answer and the cache serves.
    fn warn_cached(&self, repo_id: &str) {
        if let Some(why) = self.unreachable.borrow().as_ref() {
            if !self.warned.replace(true) {
                self.printer.warn(format!(
                    "the hub at {} is unreachable ({why}); using the cached '{repo_id}' (and any other cached files)",
                    self.endpoint
                ));
            }
        }
    }

    fn repo_folder(&self, repo_id: &str) -> PathBuf {
        self.cache.join(format!("models--{}", repo_id.replace('/', "--")))
    }

    /// The cached copy of a file at a revision, as hf-hub resolves it (refs → snapshot).
    fn cached(&self, repo_id: &str, revision: &str, file: &str) -> Option<PathBuf> {
        let (owner, name) = repo_id.split_once('/')?;
        let p = self
            .client
            .model(owner, name)
            .download_file()
            .filename(file)
            .revision(revision.to_string())
            .local_files_only(true)
            .send()
            .ok()?;
        p.is_file().then_some(p)
    }

    /// The local snapshot folder holding `files` of `repo_id`, fetching what the cache lacks.
    /// `cli` is the `--model` value, for the hint in errors.
    pub fn fetch(&self, repo_id: &str, revision: Option<&str>, files: &[String], cli: &str) -> Result<PathBuf> {
        check_repo_id(repo_id)?;
        let rev = revision.unwrap_or("main");
        crate::repo::check_revision(rev).map_err(|why| Error::Hub(format!("hub repo '{repo_id}': {why}")))?;
        for f in files {
            crate::repo::check_file_path(f).map_err(|why| Error::Hub(format!("hub repo '{repo_id}': {why}")))?;
        }
        let mut paths = Vec::new();
        let mut missing = Vec::new();
        for file in files {
            let got = if self.offline || self.unreachable.borrow().is_some() {
                None
            } else {
                match self.download(repo_id, rev, file) {
                    Ok(p) => Some(p),
                    Err(Failure::Fatal(e)) => return Err(e),
                    Err(Failure::Unreachable(why)) => {
                        *self.unreachable.borrow_mut() = Some(why);
                        None
                    }
                }
            };
            match got.or_else(|| self.cached(repo_id, rev, file)) {
                Some(p) => paths.push((p, file)),
                None => missing.push(file.as_str()),
            }
        }
        let fetch_cmd = format!("ghiblify --download-only {cli}");
        if !missing.is_empty() {
            let list = missing.join(", ");
            let cache = self.cache.display();
            return Err(Error::Hub(match self.unreachable.borrow().as_ref() {
                _ if self.offline => format!("offline (--offline or HF_HUB_OFFLINE): '{repo_id}' is not fully in the cache {cache}; missing: {list}; fetch them on a connected machine with: {fetch_cmd}"),
                Some(why) => format!("the hub at {} is unreachable ({why}) and the cache {cache} lacks from '{repo_id}': {list}; retry when online, fetch elsewhere with: {fetch_cmd}, or pass a local model folder with --model-dir", self.endpoint),
                None => unreachable!("a file is missing only offline or when the hub is unreachable"),
            }));
        }
        self.warn_cached(repo_id);
        let (first, file) =
            paths.first().ok_or_else(|| Error::Hub(format!("hub repo '{repo_id}': no files were requested")))?;
        snapshot_root(first, file).ok_or_else(|| Error::Hub(format!("unexpected cache path {}", first.display())))
    }

    /// As [`Self::fetch`] at a commit a preset pins; when the hub does not have that commit (a
    /// rewritten history, a mirror behind), one warning and `main` — a pin must never break the tool.
    pub fn fetch_pinned(&self, repo_id: &str, pin: &str, files: &[String], cli: &str) -> Result<PathBuf> {
        match self.fetch(repo_id, Some(pin), files, cli) {
            Err(Error::NoRevision { .. }) => {
                self.printer.warn(format!(
                    "'{repo_id}' is pinned to {pin}, which the hub at {} does not have; using its main branch",
                    self.endpoint
                ));
                self.fetch(repo_id, None, files, cli)
            }
            r => r,
        }
    }

    /// One file (a LoRA) from a repo; returns its local path.
    pub fn fetch_file(&self, repo_id: &str, revision: Option<&str>, file: &str, cli: &str) -> Result<PathBuf> {
        let root = self.fetch(repo_id, revision, &[file.to_string()], cli)?;
        Ok(root.join(file))
    }

    fn auth(&self, req: reqwest::blocking::RequestBuilder) -> reqwest::blocking::RequestBuilder {
        match &self.token {
            Some(t) => req.header(AUTHORIZATION, format!("Bearer {t}")),
            None => req,
        }
    }

    /// HEAD `resolve/<rev>/<file>`, following only relative redirects (a renamed repo), as
    /// huggingface_hub does: the CDN redirect's own headers carry the metadata.
    fn head(&self, repo_id: &str, rev: &str, file: &str) -> std::result::Result<Meta, Failure> {
        let mut url = format!(
            "{}/{repo_id}/resolve/{}/{}",
            self.endpoint,
            encode(rev),
            file.split('/').map(encode).collect::<Vec<_>>().join("/")
        );
        for _ in 0..5 {
            let resp = send_patiently(|| self.auth(self.no_redirect.head(&url)).timeout(Duration::from_secs(10)))
                .map_err(|e| Failure::Unreachable(short_error(&e)))?;
            let st = resp.status();
            let h = resp.headers();
            let header = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
            let location = header(LOCATION.as_str());
            if st.is_redirection() && header("x-repo-commit").is_none() {
                if let Some(loc) = location.as_ref().filter(|l| l.starts_with('/')) {
                    url = format!("{}{loc}", self.endpoint);
                    continue;
                }
            }
            if !(st.is_success() || st.is_redirection()) {
                return Err(self.http_error(st, header("x-error-code"), repo_id, rev, file));
            }
            let etag = header("x-linked-etag")
                .or_else(|| header(ETAG.as_str()))
                .map(|e| e.trim_start_matches("W/").trim_matches('"').to_string());
            let commit = header("x-repo-commit");
            let size = header("x-linked-size").or_else(|| header(CONTENT_LENGTH.as_str())).and_then(|s| s.parse().ok());
            let (Some(etag), Some(commit)) = (etag, commit) else {
                return Err(Failure::Fatal(Error::Hub(format!(
                    "{url}: the server sent no ETag or X-Repo-Commit; is HF_ENDPOINT ({}) a Hugging Face hub?",
                    self.endpoint
                ))));
            };
            // Both become paths in the cache (blobs/<etag>, snapshots/<commit>): checked first.
            let unsafe_name = |why: String| {
                Failure::Fatal(Error::Hub(format!(
                    "the hub at {} answered for '{repo_id}/{file}' with an unusable name: {why}; refusing it",
                    self.endpoint
                )))
            };
            crate::repo::check_etag(&etag).map_err(unsafe_name)?;
            crate::repo::check_commit(&commit).map_err(unsafe_name)?;
            let target = match location {
                Some(l) if st.is_redirection() && l.starts_with('/') => format!("{}{l}", self.endpoint),
                Some(l) if st.is_redirection() => l,
                _ => url.clone(),
            };
            return Ok(Meta { commit, etag, size, redirected: target != url, url: target });
        }
        Err(Failure::Fatal(Error::Hub(format!("{url}: too many redirects"))))
    }

    fn http_error(&self, st: StatusCode, code: Option<String>, repo_id: &str, rev: &str, file: &str) -> Failure {
        let token_hint = if self.token.is_some() {
            "the token in HF_TOKEN has no access to it"
        } else {
            "set HF_TOKEN to a token with access (https://huggingface.co/settings/tokens)"
        };
        let msg = match (st.as_u16(), code.as_deref()) {
            (401, _) | (403, Some("GatedRepo")) => format!("hub repo '{repo_id}' needs authentication ({st}): it is private or gated; {token_hint}, after accepting its terms on the model page"),
            (403, _) => format!("hub repo '{repo_id}': access denied ({st}); {token_hint}"),
            (404, Some("RepoNotFound")) => format!("hub repo '{repo_id}' does not exist at {} (404; a private repo also needs HF_TOKEN)", self.endpoint),
            (404, Some("RevisionNotFound")) => {
                return Failure::Fatal(Error::NoRevision { repo: repo_id.to_string(), revision: rev.to_string() })
            }
            (404, _) => format!("hub repo '{repo_id}' has no file '{file}' at revision '{rev}' (404)"),
            (s, _) if s >= 500 || s == 429 => return Failure::Unreachable(format!("{st}")),
            _ => format!("hub repo '{repo_id}', file '{file}': unexpected answer {st}"),
        };
        Failure::Fatal(Error::Hub(msg))
    }

    /// Makes sure `snapshots/<commit>/<file>` exists, downloading its blob if needed.
    fn download(&self, repo_id: &str, rev: &str, file: &str) -> std::result::Result<PathBuf, Failure> {
        let meta = self.head(repo_id, rev, file)?;
        let folder = self.repo_folder(repo_id);
        let blob = folder.join("blobs").join(&meta.etag);
        if !blob.is_file() {
            // One writer per blob across processes (a Slurm array sharing a cache), on the lock
            // file huggingface_hub uses, so Python tools and ghiblify also exclude each other.
            let locks = self.cache.join(".locks").join(folder.file_name().expect("a repo folder has a name"));
            std::fs::create_dir_all(&locks).map_err(|e| Error::io(&locks, e))?;
            let lock_path = locks.join(format!("{}.lock", meta.etag));
            let lock = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)
                .map_err(|e| Error::io(&lock_path, e))?;
            lock.lock().map_err(|e| Error::io(&lock_path, e))?;
            // Another process may have finished it while we waited.
            if !blob.is_file() {
                self.download_blob(&meta, &blob, repo_id, file)?;
            }
        }
        let pointer = folder.join("snapshots").join(&meta.commit).join(file);
        link_pointer(&blob, &pointer)?;
        if !is_commit(rev) {
            let r = folder.join("refs").join(rev);
            if std::fs::read_to_string(&r).ok().as_deref() != Some(meta.commit.as_str()) {
                let dir = r.parent().expect("refs/<rev> has a parent");
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
                crate::guard::write_atomically(&r, |f| f.write_all(meta.commit.as_bytes()))?;
            }
        }
        Ok(pointer)
    }

    /// Streams the content into `<blob>.incomplete`, resuming what an earlier run left with a
    /// `Range` request, retrying a cut transfer a few times, then verifies and renames it.
    fn download_blob(&self, meta: &Meta, blob: &Path, repo_id: &str, file: &str) -> std::result::Result<(), Failure> {
        let dir = blob.parent().expect("blobs/<etag> has a parent");
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let part = PathBuf::from(format!("{}.incomplete", blob.display()));
        let bar = self.printer.bytes_bar(meta.size.unwrap_or(0), file);
        let resumed = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
        if !self.announced.replace(true) {
            self.printer.info(format!(
                "fetching '{repo_id}' into the Hugging Face cache {} (once; later runs use the cache)",
                self.cache.display()
            ));
        }
        // Weights (LFS files) get a line each; small files only with -v.
        let say = |m: String| if meta.etag.len() == 64 { self.printer.info(m) } else { self.printer.verbose(m) };
        if resumed > 0 {
            say(format!(
                "resuming {repo_id}/{file} at {:.1} of {:.1} MB",
                resumed as f64 / 1e6,
                meta.size.unwrap_or(0) as f64 / 1e6
            ));
        } else {
            say(format!(
                "downloading {repo_id}/{file}{}",
                meta.size.map(|s| format!(" ({:.1} MB)", s as f64 / 1e6)).unwrap_or_default()
            ));
        }
        // Only the hub itself gets the token, never the (signed) URL it redirects to.
        let same_host = !meta.redirected;
        const ATTEMPTS: u32 = 5;
        let mut last_error = String::new();
        let mut done = false;
        let deadline = std::time::Instant::now() + deadline_for(meta.size);
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(500 << attempt.min(4)));
            }
            match self.transfer(meta, &part, same_host, &bar, deadline) {
                Ok(()) => {
                    done = true;
                    break;
                }
                Err(Failure::Unreachable(why)) => last_error = why,
                Err(f) => {
                    bar.finish_and_clear();
                    return Err(f);
                }
            }
        }
        bar.finish_and_clear();
        if !done {
            // The partial file stays: the next run resumes from it.
            return Err(Failure::Fatal(Error::Hub(format!(
                "downloading '{file}' from '{repo_id}' failed {ATTEMPTS} times ({last_error}); run again to resume"
            ))));
        }
        let len = std::fs::metadata(&part).map_err(|e| Error::io(&part, e))?.len();
        if let Some(size) = meta.size.filter(|&s| s != len) {
            let _ = std::fs::remove_file(&part);
            return Err(Failure::Fatal(Error::Hub(format!("'{file}' from '{repo_id}': got {len} bytes, the hub announced {size}; the bad copy was removed, run again"))));
        }
        let (kind, got) = content_hash(&part, &meta.etag)?;
        if got != meta.etag {
            let _ = std::fs::remove_file(&part);
            return Err(Failure::Fatal(Error::Hub(format!(
                "'{file}' from '{repo_id}' is corrupt: its {kind} is {got}, the hub says {}; the bad copy was removed, run again",
                meta.etag
            ))));
        }
        std::fs::rename(&part, blob).map_err(|e| Error::io(blob, e))?;
        Ok(())
    }

    /// One GET of the rest of the content into `part`, never past the announced size (or
    /// [`MAX_UNSIZED`]) and never past `deadline`.
    fn transfer(
        &self,
        meta: &Meta,
        part: &Path,
        same_host: bool,
        bar: &indicatif::ProgressBar,
        deadline: std::time::Instant,
    ) -> std::result::Result<(), Failure> {
        let mut have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
        if meta.size.is_some_and(|s| have > s) {
            have = 0;
        }
        if meta.size == Some(have) && have > 0 {
            return Ok(());
        }
        let mut resp: Response = send_patiently(|| {
            let mut req = self.http.get(&meta.url);
            if same_host {
                req = self.auth(req);
            }
            if have > 0 {
                req = req.header(RANGE, format!("bytes={have}-"));
            }
            req
        })
        .map_err(|e| Failure::Unreachable(short_error(&e)))?;
        let st = resp.status();
        let append = match st {
            StatusCode::PARTIAL_CONTENT => {
                let start = resp
                    .headers()
                    .get("content-range")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("bytes ")?.split('-').next()?.parse::<u64>().ok());
                if start != Some(have) {
                    return Err(Failure::Unreachable(format!("the server resumed at {start:?}, not {have}")));
                }
                true
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                // What we have is not a prefix of this content: start over.
                let _ = std::fs::remove_file(part);
                return Err(Failure::Unreachable("the partial download did not match; restarting".into()));
            }
            s if s.is_success() => false,
            s if s.is_server_error() || s.as_u16() == 429 => return Err(Failure::Unreachable(format!("{s}"))),
            s => return Err(Failure::Fatal(Error::Hub(format!("{}: unexpected answer {s}", meta.url)))),
        };
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(part)
            .map_err(|e| Error::io(part, e))?;
        let mut pos = if append { have } else { 0 };
        bar.set_position(pos);
        let limit = meta.size.unwrap_or(MAX_UNSIZED);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            if std::time::Instant::now() > deadline {
                let _ = out.flush();
                // The partial file stays for the next run to resume.
                return Err(Failure::Fatal(Error::Hub(format!(
                    "{}: too slow: {pos} of {} bytes after {:.0} s (it may take {:.0} s, at least {} KiB/s); run again to resume",
                    meta.url,
                    meta.size.map(|s| s.to_string()).unwrap_or_else(|| "?".into()),
                    deadline_for(meta.size).as_secs_f64(),
                    deadline_for(meta.size).as_secs_f64(),
                    MIN_BYTES_PER_SEC / 1024
                ))));
            }
            // Never more than the announced size: one byte past it is enough to know it lies.
            let room = (limit + 1 - pos).min(buf.len() as u64) as usize;
            let n = match resp.read(&mut buf[..room]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    let _ = out.flush();
                    return Err(Failure::Unreachable(format!("connection lost after {pos} bytes: {e}")));
                }
            };
            if pos + n as u64 > limit {
                drop(out);
                let _ = std::fs::remove_file(part);
                return Err(Failure::Fatal(Error::Hub(format!(
                    "{}: the server sent more than the {limit} bytes {}; the copy was removed",
                    meta.url,
                    if meta.size.is_some() { "it announced" } else { "a file without an announced size may have" }
                ))));
            }
            out.write_all(&buf[..n]).map_err(|e| Error::io(part, e))?;
            pos += n as u64;
            bar.set_position(pos);
        }
        out.sync_all().map_err(|e| Error::io(part, e))?;
        if let Some(size) = meta.size.filter(|&s| pos < s) {
            return Err(Failure::Unreachable(format!("connection closed at {pos} of {size} bytes")));
        }
        Ok(())
    }
}

/// Percent-encodes one path segment (revision names like `refs/pr/1` included).
fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A request error's innermost cause, on one line ("connection refused", "timed out", ...).
fn short_error(e: &reqwest::Error) -> String {
    let mut src: &dyn std::error::Error = e;
    while let Some(s) = src.source() {
        src = s;
    }
    let what = if e.is_timeout() { "timed out".to_string() } else { src.to_string() };
    what.lines().next().unwrap_or_default().to_string()
}

/// A file's sha256, lower-case hex (the hub's LFS ETag; A1111's hashes are its prefixes).
pub fn file_sha256(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut std::fs::File::open(path)?, &mut h)?;
    Ok(format!("{:x}", h.finalize()))
}

/// The hash the hub's ETag is (checked by `repo::check_etag` to be one of these): sha256 (64 hex
/// digits) for LFS files, the git blob sha1 (`sha1("blob <len>\0" + data)`, 40 hex digits) for
/// small files.
fn content_hash(path: &Path, etag: &str) -> Result<(&'static str, String)> {
    use sha2::Digest;
    let io = |e| Error::io(path, e);
    if etag.len() == 64 {
        return Ok(("sha256", file_sha256(path).map_err(io)?));
    }
    let len = std::fs::metadata(path).map_err(io)?.len();
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {len}\0").as_bytes());
    std::io::copy(&mut std::fs::File::open(path).map_err(io)?, &mut h).map_err(io)?;
    Ok(("git sha1", format!("{:x}", h.finalize())))
}

/// `snapshots/<commit>/<file>` → `../..(/..)*/blobs/<etag>`, relative like huggingface_hub's.
fn link_pointer(blob: &Path, pointer: &Path) -> Result<()> {
    let dir = pointer.parent().expect("a snapshot path has a parent");
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    if pointer.is_file() && std::fs::canonicalize(pointer).ok() == std::fs::canonicalize(blob).ok() {
        return Ok(());
    }
    let _ = std::fs::remove_file(pointer);
    #[cfg(unix)]
    {
        // pointer = <repo>/snapshots/<commit>/<a>/<b>; blob = <repo>/blobs/<etag>.
        let repo = blob.parent().and_then(Path::parent).expect("blobs/<etag> lives in the repo folder");
        let depth = pointer.strip_prefix(repo).map(|p| p.components().count() - 1).unwrap_or(0);
        let mut rel = PathBuf::new();
        for _ in 0..depth {
            rel.push("..");
        }
        rel.push("blobs");
        rel.push(blob.file_name().expect("a blob has a name"));
        match std::os::unix::fs::symlink(&rel, pointer) {
            // Another process linked it between our remove and our link: same target.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            r => r.map_err(|e| Error::io(pointer, e)),
        }
    }
    #[cfg(not(unix))]
    {
        std::fs::copy(blob, pointer).map(|_| ()).map_err(|e| Error::io(pointer, e))
    }
}

/// The gate every repo id passes before it names a cache folder.
fn check_repo_id(repo_id: &str) -> Result<()> {
    crate::repo::check_repo_id(repo_id).map_err(|why| Error::Hub(format!("hub repo: {why}")))
}

/// `…/snapshots/<commit>/unet/config.json` minus `unet/config.json`.
fn snapshot_root(path: &Path, file: &str) -> Option<PathBuf> {
    let depth = Path::new(file).components().count();
    let mut p = path.to_path_buf();
    for _ in 0..depth {
        p = p.parent()?.to_path_buf();
    }
    Some(p)
}

/// The files of a diffusers-layout repo an img2img run needs, picked from its listing: each
/// component's config, its safetensors weights (the fp16 variant when computing in half
/// precision and present; shards with their index), the tokenizer files, the scheduler config,
/// model_index.json and the model card. `.bin`/`.ckpt` are never taken.
pub fn select_files(listing: &[String], half: bool) -> std::result::Result<Vec<String>, String> {
    let has = |f: &str| listing.iter().any(|l| l == f);
    let mut out: Vec<String> = ["model_index.json", "README.md", "scheduler/scheduler_config.json"]
        .iter()
        .filter(|f| has(f))
        .map(|f| f.to_string())
        .collect();
    if !has("scheduler/scheduler_config.json") {
        return Err("it has no scheduler/scheduler_config.json (not a diffusers-layout pipeline)".into());
    }
    out.extend(listing.iter().filter(|f| f.starts_with("tokenizer/") && !f.ends_with(".bin")).cloned());
    for (comp, stem) in
        [("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model")]
    {
        let config = format!("{comp}/config.json");
        if !has(&config) {
            return Err(format!("it has no {config}"));
        }
        out.push(config);
        let order = crate::models::weight_variants(stem, half).map(|n| format!("{comp}/{n}"));
        let pick = order.iter().find_map(|name| {
            if has(name) {
                return Some(vec![name.to_string()]);
            }
            let index = format!("{name}.index.json");
            let shard_prefix = name.trim_end_matches(".safetensors");
            has(&index).then(|| {
                let mut v = vec![index.clone()];
                v.extend(
                    listing
                        .iter()
                        .filter(|l| l.starts_with(&format!("{shard_prefix}-")) && l.ends_with(".safetensors"))
                        .cloned(),
                );
                v
            })
        });
        match pick {
            Some(v) => out.extend(v),
            None => {
                return Err(format!(
                    "it has no safetensors weights for {comp}/ (only .bin/.ckpt files cannot be loaded; convert them)"
                ))
            }
        }
    }
    Ok(out)
}

impl Hub {
    /// The file listing of a repo at a revision (`/api/models/<repo>/tree/<rev>?recursive=true`).
    fn list(&self, repo_id: &str, revision: Option<&str>) -> std::result::Result<Vec<String>, Failure> {
        #[derive(Deserialize)]
        struct Entry {
            #[serde(rename = "type")]
            kind: String,
            path: String,
        }
        let rev = revision.unwrap_or("main");
        let url = format!("{}/api/models/{repo_id}/tree/{}?recursive=true", self.endpoint, encode(rev));
        let resp = send_patiently(|| self.auth(self.http.get(&url)).timeout(Duration::from_secs(15)))
            .map_err(|e| Failure::Unreachable(short_error(&e)))?;
        if !resp.status().is_success() {
            let code = resp.headers().get("x-error-code").and_then(|v| v.to_str().ok()).map(str::to_string);
            return Err(self.http_error(resp.status(), code, repo_id, rev, ""));
        }
        let fatal = |why: String| Failure::Fatal(Error::Hub(format!("hub repo '{repo_id}': {why}")));
        // Read at most the cap (plus one byte to know it was passed), within the deadline of a
        // file that size.
        let deadline = std::time::Instant::now() + deadline_for(Some(MAX_LISTING_BYTES));
        let mut body = Vec::new();
        let mut reader = resp.take(MAX_LISTING_BYTES + 1);
        let mut buf = vec![0u8; 1 << 16];
        loop {
            if std::time::Instant::now() > deadline {
                return Err(Failure::Unreachable("the file listing took too long".into()));
            }
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => body.extend_from_slice(&buf[..n]),
                Err(e) => return Err(Failure::Unreachable(format!("file listing cut: {e}"))),
            }
        }
        if body.len() as u64 > MAX_LISTING_BYTES {
            return Err(fatal(format!("its file listing is larger than {} MiB; refusing it", MAX_LISTING_BYTES >> 20)));
        }
        let entries: Vec<Entry> =
            serde_json::from_slice(&body).map_err(|e| fatal(format!("unreadable file listing: {e}")))?;
        let files: Vec<String> = entries.into_iter().filter(|e| e.kind == "file").map(|e| e.path).collect();
        // Entries become paths under snapshots/<commit>/: each is checked before it is used.
        for f in &files {
            crate::repo::check_file_path(f)
                .map_err(|why| fatal(format!("its file listing has an unsafe entry: {why}")))?;
        }
        Ok(files)
    }

    /// The files to fetch for a non-preset repo: from its listing, or offline from the cached
    /// snapshot (whatever it holds is loaded and checked by the model loader).
    pub fn repo_files(&self, repo_id: &str, revision: Option<&str>, half: bool) -> Result<Option<Vec<String>>> {
        let Some(listing) = self.listing(repo_id, revision)? else { return Ok(None) };
        select_files(&listing, half).map(Some).map_err(|why| Error::Hub(format!("hub repo '{repo_id}': {why}")))
    }

    /// A repo's file listing; `None` offline or when the hub cannot be reached (remembered, so the
    /// run's later fetches go to the cache at once).
    fn listing(&self, repo_id: &str, revision: Option<&str>) -> Result<Option<Vec<String>>> {
        check_repo_id(repo_id)?;
        if self.offline {
            return Ok(None);
        }
        match self.list(repo_id, revision) {
            Ok(listing) => Ok(Some(listing)),
            Err(Failure::Fatal(e)) => Err(e),
            Err(Failure::Unreachable(why)) => {
                *self.unreachable.borrow_mut() = Some(why);
                Ok(None)
            }
        }
    }

    /// The files of a single-component repo (a ControlNet): `config.json` and the first weight
    /// variant it has of `stem` — the fp16 file first when `half`, as it halves the download and
    /// the loader converts it anyway. `None` offline or when the hub cannot be reached.
    pub fn component_files(
        &self,
        repo_id: &str,
        revision: Option<&str>,
        stem: &str,
        half: bool,
    ) -> Result<Option<Vec<String>>> {
        let Some(listing) = self.listing(repo_id, revision)? else { return Ok(None) };
        let has = |f: &str| listing.iter().any(|l| l == f);
        if !has("config.json") {
            return Err(Error::Hub(format!("hub repo '{repo_id}': it has no config.json at its root")));
        }
        let weights = crate::models::weight_variants(stem, half).into_iter().find(|n| has(n)).ok_or_else(|| {
            Error::Hub(format!("hub repo '{repo_id}': it has no {stem}.safetensors (or .fp16.safetensors) at its root"))
        })?;
        Ok(Some(vec!["config.json".to_string(), weights]))
    }

    /// The cached snapshot of a repo at a revision, when the listing cannot be had.
    pub fn cached_snapshot(&self, repo_id: &str, revision: Option<&str>, cli: &str) -> Result<PathBuf> {
        check_repo_id(repo_id)?;
        let rev = revision.unwrap_or("main");
        crate::repo::check_revision(rev).map_err(|why| Error::Hub(format!("hub repo '{repo_id}': {why}")))?;
        let folder = self.repo_folder(repo_id);
        let commit = if is_commit(rev) {
            Some(rev.to_string())
        } else {
            std::fs::read_to_string(folder.join("refs").join(rev)).ok().map(|s| s.trim().to_string())
        }
        // A refs file is a commit id or nothing (it names a folder).
        .filter(|c| is_commit(c));
        let snap = commit
            .map(|c| folder.join("snapshots").join(c))
            // A pipeline's folders, or a single component's (a ControlNet) config at the root.
            .filter(|d| {
                d.join("model_index.json").is_file() || d.join("unet").is_dir() || d.join("config.json").is_file()
            });
        match snap {
            Some(s) => {
                self.warn_cached(repo_id);
                Ok(s)
            }
            None => Err(Error::Hub(format!(
                "'{repo_id}' (revision {rev}) is not in the cache {}{}; fetch it on a connected machine with: ghiblify --download-only {cli}",
                self.cache.display(),
                self.unreachable.borrow().as_ref().map(|w| format!(" and the hub at {} is unreachable ({w})", self.endpoint)).unwrap_or_default()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_root_strips_the_repo_path() {
        let p = Path::new("/c/models--a--b/snapshots/abc/unet/config.json");
        assert_eq!(snapshot_root(p, "unet/config.json").unwrap(), Path::new("/c/models--a--b/snapshots/abc"));
    }

    #[test]
    fn file_selection_prefers_safetensors_and_the_precision_asked_for() {
        let listing: Vec<String> = [
            "model_index.json",
            "scheduler/scheduler_config.json",
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
            "unet/config.json",
            "unet/diffusion_pytorch_model.bin",
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.fp16.safetensors",
            "text_encoder/config.json",
            "text_encoder/model.safetensors.index.json",
            "text_encoder/model-00001-of-00002.safetensors",
            "text_encoder/model-00002-of-00002.safetensors",
            "v1-5-pruned.ckpt",
            "safety_checker/model.safetensors",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let f32 = select_files(&listing, false).unwrap();
        assert!(f32.contains(&"unet/diffusion_pytorch_model.safetensors".into()));
        assert!(f32.contains(&"vae/diffusion_pytorch_model.fp16.safetensors".into()), "falls back to the only variant");
        assert!(f32.contains(&"text_encoder/model-00002-of-00002.safetensors".into()));
        assert!(!f32.iter().any(|f| f.ends_with(".bin") || f.ends_with(".ckpt") || f.starts_with("safety_checker")));
        let f16 = select_files(&listing, true).unwrap();
        assert!(f16.contains(&"unet/diffusion_pytorch_model.fp16.safetensors".into()));
        let bin_only: Vec<String> = listing
            .iter()
            .filter(|f| !f.starts_with("unet/diffusion_pytorch_model.") || f.ends_with(".bin"))
            .cloned()
            .collect();
        assert!(select_files(&bin_only, false).unwrap_err().contains("unet/"));
    }

    #[test]
    fn git_blob_sha1_matches_git() {
        // `printf 'hello\n' | git hash-object --stdin`
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, b"hello\n").unwrap();
        let h = content_hash(&p, "ce013625030ba8dba906f756967f9e9ca394464a").unwrap();
        assert_eq!(h.1, "ce013625030ba8dba906f756967f9e9ca394464a");
    }
}
