//! Batch conversion: inputs (files, folders walked recursively, or paths on stdin) → jobs with
//! mirrored output paths, deterministic per-file seeds, a stable shard split for job arrays, and the
//! JSON-lines report.

use crate::error::{Error, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::io::{BufRead, Write};
use std::path::{Component, Path, PathBuf};

/// One input to convert: where it is, and its path relative to the input root (mirrored under -o).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub input: PathBuf,
    pub rel: PathBuf,
    /// Why it cannot be converted, when the walk already knows (a file named like an image that
    /// is not one, a symlink loop): reported as failed, so no input goes unmentioned.
    pub problem: Option<String>,
}

impl Job {
    fn new(input: PathBuf, rel: PathBuf) -> Self {
        Self { input, rel, problem: None }
    }
}

/// Whether a file name has an image extension (`.jpg`, `.png`, `.heic`, ...): a folder's files
/// named so are inputs even when their content is not an image (they fail with the reason).
fn named_like_image(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
        image::ImageFormat::from_extension(e).is_some()
            || matches!(e.to_ascii_lowercase().as_str(), "heic" | "heif" | "jxl")
    })
}

/// Whether the file's content (not its extension) is an image format we can decode.
pub fn looks_like_image(path: &Path) -> bool {
    let mut head = [0u8; 64];
    let n = match std::fs::File::open(path).and_then(|mut f| std::io::Read::read(&mut f, &mut head)) {
        Ok(n) => n,
        Err(_) => return false,
    };
    n > 0 && image::guess_format(&head[..n]).is_ok()
}

/// A path given on the command line or stdin, as it should be mirrored: relative paths keep their
/// folders (without `.`), anything else (absolute, `..`) keeps only its file name.
fn mirrored(p: &Path) -> PathBuf {
    let parts: Vec<Component> = p.components().filter(|c| !matches!(c, Component::CurDir)).collect();
    if parts.iter().all(|c| matches!(c, Component::Normal(_))) && !parts.is_empty() {
        parts.iter().collect()
    } else {
        PathBuf::from(p.file_name().unwrap_or(p.as_os_str()))
    }
}

/// Expands the inputs: a file is one job (whatever its content: a non-image fails on its own line);
/// a folder contributes, sorted, the files below it that are images by content or named like
/// images (those that are not fail with the reason), following symbolic links (a loop fails on its
/// own line) and skipping `exclude` (the output folder, when it lies inside an input folder); `-`
/// reads one path per line from stdin.
pub fn collect(inputs: &[PathBuf], recursive: bool, exclude: Option<&Path>) -> Result<Vec<Job>> {
    let mut jobs = Vec::new();
    let exclude = exclude.and_then(|e| e.canonicalize().ok());
    for input in inputs {
        if input.as_os_str() == "-" {
            let mut stdin = std::io::stdin().lock();
            let mut line = Vec::new();
            loop {
                line.clear();
                if stdin.read_until(b'\n', &mut line).map_err(|e| Error::io("<stdin>", e))? == 0 {
                    break;
                }
                while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    line.pop();
                }
                if line.is_empty() {
                    continue;
                }
                // Paths are bytes on Unix: a name that is not UTF-8 is still a name.
                #[cfg(unix)]
                let p = PathBuf::from(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&line));
                #[cfg(not(unix))]
                let p = PathBuf::from(String::from_utf8_lossy(&line).into_owned());
                jobs.push(Job::new(p.clone(), mirrored(&p)));
            }
        } else if input.is_dir() {
            let walker = walkdir::WalkDir::new(input)
                .follow_links(true)
                .max_depth(if recursive { usize::MAX } else { 1 })
                .sort_by_file_name()
                .into_iter()
                .filter_entry(|e| {
                    e.depth() == 0 || exclude.as_ref().is_none_or(|x| e.path().canonicalize().ok().as_ref() != Some(x))
                });
            for entry in walker {
                let entry = match entry {
                    Ok(e) => e,
                    Err(e) => {
                        // A loop or an unreadable folder: that path fails, the others go on.
                        let path = e.path().unwrap_or(input).to_path_buf();
                        let rel = path.strip_prefix(input).unwrap_or(&path).to_path_buf();
                        let why = if e.loop_ancestor().is_some() {
                            "a symbolic link loop".to_string()
                        } else {
                            e.to_string()
                        };
                        jobs.push(Job { input: path, rel, problem: Some(why) });
                        continue;
                    }
                };
                if !entry.file_type().is_file() || is_temp_name(entry.path()) {
                    continue;
                }
                let rel = entry.path().strip_prefix(input).unwrap_or(entry.path()).to_path_buf();
                if looks_like_image(entry.path()) {
                    jobs.push(Job::new(entry.path().to_path_buf(), rel));
                } else if named_like_image(entry.path()) {
                    let problem = Some("named like an image, but its content is not one we can read".to_string());
                    jobs.push(Job { input: entry.path().to_path_buf(), rel, problem });
                }
            }
        } else if input.exists() {
            jobs.push(Job::new(input.clone(), mirrored(input)));
        } else {
            return Err(Error::usage(format!("input '{}': no such file or folder", input.display())));
        }
    }
    Ok(jobs)
}

/// Our own temporary files (left behind only by a killed run) are never inputs.
pub fn is_temp_name(p: &Path) -> bool {
    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(".ghiblify-") && n.ends_with(".partial"))
}

fn digest(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize().into()
}

fn rel_bytes(rel: &Path) -> Vec<u8> {
    // '/'-joined components, so the same tree gives the same seeds and shards on every OS.
    rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect::<Vec<_>>().join("/").into_bytes()
}

/// The seed for one file: from the base seed and its relative path, so it does not depend on the
/// order of the files, on the shard, or on which other files are in the run.
pub fn file_seed(base: u64, rel: &Path) -> u64 {
    let d = digest(&[b"ghiblify-seed", &base.to_le_bytes(), &rel_bytes(rel)]);
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}

/// Shard `k` of `n` (1-based) takes the files whose path hash falls in it: stable under re-runs,
/// file order and added files.
pub fn in_shard(rel: &Path, k: usize, n: usize) -> bool {
    let d = digest(&[b"ghiblify-shard", &rel_bytes(rel)]);
    (u64::from_le_bytes(d[..8].try_into().expect("8 bytes")) % n as u64) as usize == k - 1
}

/// Parses `K/N` (1 ≤ K ≤ N).
pub fn parse_shard(s: &str) -> Result<(usize, usize)> {
    let bad = || Error::setting("shard", format!("must be K/N with 1 <= K <= N (e.g. 2/8), got '{s}'"));
    let (k, n) = s.split_once('/').ok_or_else(bad)?;
    let (k, n): (usize, usize) = (k.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
    if k == 0 || n == 0 || k > n {
        return Err(bad());
    }
    Ok((k, n))
}

/// One line of `--report`.
#[derive(Debug, Serialize)]
pub struct ReportLine<'a> {
    pub input: &'a str,
    pub output: &'a str,
    pub status: &'a str,
    pub error: Option<String>,
    pub seed: u64,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub seconds: f64,
    /// What the picture's own provenance says of the model (absent until a model is loaded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<&'a crate::provenance::ModelRecord>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub loras: &'a [crate::provenance::LoraRecord],
}

/// The JSON-lines report, flushed line by line so a killed run keeps what it did.
pub struct Report {
    out: Option<(PathBuf, std::io::BufWriter<std::fs::File>)>,
}

impl Report {
    pub fn create(path: Option<&Path>) -> Result<Self> {
        let out = match path {
            // A new report replaces an old one in one step (never truncated in place), then grows
            // line by line.
            Some(p) => {
                Some((p.to_path_buf(), std::io::BufWriter::new(crate::guard::AtomicFile::create(p)?.into_appending()?)))
            }
            None => None,
        };
        Ok(Self { out })
    }
    pub fn write(&mut self, line: &ReportLine) -> Result<()> {
        if let Some((path, w)) = &mut self.out {
            let text = serde_json::to_string(line).map_err(|e| Error::output(path.clone(), e))?;
            writeln!(w, "{text}").and_then(|_| w.flush()).map_err(|e| Error::io(path.clone(), e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_depend_on_base_and_path_only() {
        let a = file_seed(1, Path::new("x/a.jpg"));
        assert_eq!(a, file_seed(1, Path::new("x/a.jpg")));
        assert_ne!(a, file_seed(2, Path::new("x/a.jpg")));
        assert_ne!(a, file_seed(1, Path::new("x/b.jpg")));
    }

    #[test]
    fn shards_partition_the_inputs() {
        let files: Vec<PathBuf> = (0..200).map(|i| PathBuf::from(format!("d{}/f{i}.png", i % 7))).collect();
        for f in &files {
            assert_eq!((1..=3).filter(|&k| in_shard(f, k, 3)).count(), 1);
        }
        let sizes: Vec<usize> = (1..=3).map(|k| files.iter().filter(|f| in_shard(f, k, 3)).count()).collect();
        assert!(sizes.iter().all(|&s| s > 40), "{sizes:?}");
    }

    #[test]
    fn shard_syntax() {
        assert_eq!(parse_shard("2/8").unwrap(), (2, 8));
        for bad in ["0/3", "4/3", "a/3", "3", "1/0"] {
            assert!(parse_shard(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mirrored_paths() {
        assert_eq!(mirrored(Path::new("./a/b.jpg")), PathBuf::from("a/b.jpg"));
        assert_eq!(mirrored(Path::new("/abs/b.jpg")), PathBuf::from("b.jpg"));
        assert_eq!(mirrored(Path::new("../up/b.jpg")), PathBuf::from("b.jpg"));
    }
}
