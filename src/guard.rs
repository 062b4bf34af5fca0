//! Every file ghiblify writes goes through here: [`Guard`] refuses a path that is an input (by
//! device and inode, so hard links and symlinks to an input count) or another output of the same
//! run, and [`AtomicFile`] writes through a temporary file in the target folder, renamed into place
//! only when complete, with the permissions the process umask gives new files (a temporary file's
//! own 0600 would otherwise survive the rename). Temporary files a killed run left behind are
//! removed by the next run that writes in that folder.

use crate::error::{Error, Result};
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A file's identity: (device, inode) on Unix, the canonical path elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum FileId {
    #[cfg(unix)]
    Inode(u64, u64),
    #[cfg(not(unix))]
    Path(PathBuf),
}

fn file_id(p: &Path) -> Option<FileId> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(p).ok()?;
        Some(FileId::Inode(m.dev(), m.ino()))
    }
    #[cfg(not(unix))]
    {
        p.canonicalize().ok().map(FileId::Path)
    }
}

/// The absolute, normalised form of a path that may not exist yet (its folder must).
pub fn normalized(p: &Path) -> Option<PathBuf> {
    if let Ok(c) = p.canonicalize() {
        return Some(c);
    }
    let parent = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    Some(parent.canonicalize().ok()?.join(p.file_name()?))
}

/// The inputs of a run and the outputs claimed so far.
#[derive(Debug, Default)]
pub struct Guard {
    inputs: HashSet<FileId>,
    /// Normalised output path → what it is ("-o", "--report", ...).
    outputs: HashMap<PathBuf, String>,
    /// Outputs that already exist, by identity (a hard link between two outputs).
    output_ids: HashMap<FileId, String>,
    /// Folders read as inputs (a model folder): nothing is written inside them.
    input_trees: Vec<PathBuf>,
}

impl Guard {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records an input (an input that cannot be read is not recorded: it fails on its own).
    pub fn add_input(&mut self, p: &Path) {
        if let Some(id) = file_id(p) {
            self.inputs.insert(id);
        }
    }

    /// Records a folder read as input (a model folder): no output may be written inside it.
    pub fn add_input_tree(&mut self, dir: &Path) {
        if let Ok(d) = dir.canonicalize() {
            self.input_trees.push(d);
        }
    }

    pub fn is_input(&self, p: &Path) -> bool {
        file_id(p).is_some_and(|id| self.inputs.contains(&id))
            || normalized(p).is_some_and(|n| self.input_trees.iter().any(|t| n.starts_with(t)))
    }

    /// Claims `p` as an output called `what`: refused when it is an input or another output.
    pub fn claim(&mut self, p: &Path, what: &str) -> Result<()> {
        if self.is_input(p) {
            return Err(Error::output(
                p,
                format!("{what} is an input file (or a link to one); refusing to overwrite it"),
            ));
        }
        let key = normalized(p).unwrap_or_else(|| p.to_path_buf());
        if let Some(other) = self.outputs.get(&key) {
            return Err(Error::output(p, format!("{what} is also {other}")));
        }
        if let Some(id) = file_id(p) {
            if let Some(other) = self.output_ids.get(&id) {
                return Err(Error::output(p, format!("{what} is a link to {other}")));
            }
            self.output_ids.insert(id, what.to_string());
        }
        self.outputs.insert(key, what.to_string());
        Ok(())
    }
}

/// A file being written: a temporary file beside its target, renamed over it by [`Self::commit`].
/// Made before the work starts, it also proves the target folder is writable.
pub struct AtomicFile {
    target: PathBuf,
    tmp: tempfile::NamedTempFile,
}

impl AtomicFile {
    pub fn create(target: &Path) -> Result<Self> {
        let dir = folder_of(target);
        clean_stale_partials(dir);
        let prefix = temp_prefix();
        let mut b = tempfile::Builder::new();
        b.prefix(&prefix).suffix(".partial");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            // The mode new files get (0666 less the umask), not tempfile's private 0600.
            b.permissions(std::fs::Permissions::from_mode(0o666));
        }
        let tmp = b.tempfile_in(dir).map_err(|e| Error::io(dir, strip_path(e)))?;
        Ok(Self { target: target.to_path_buf(), tmp })
    }

    /// The file it will become.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Writes the content, syncs it and renames it over the target.
    pub fn commit(mut self, write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>) -> Result<()> {
        let target = self.target.clone();
        let f = self.tmp.as_file_mut();
        write(f).and_then(|()| f.flush()).and_then(|()| f.sync_all()).map_err(|e| Error::io(&target, e))?;
        self.tmp.persist(&target).map_err(|e| Error::io(&target, e.error))?;
        Ok(())
    }

    /// Renames the (empty or partly written) file over the target now and keeps writing to it:
    /// for a report written line by line, which replaces an old report in one step and then
    /// grows with the run.
    pub fn into_appending(self) -> Result<std::fs::File> {
        let target = self.target.clone();
        self.tmp.persist(&target).map_err(|e| Error::io(&target, e.error))
    }
}

/// Writes `path` atomically (see [`AtomicFile`]).
pub fn write_atomically(path: &Path, write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>) -> Result<()> {
    AtomicFile::create(path)?.commit(write)
}

fn folder_of(p: &Path) -> &Path {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// tempfile adds the path to its errors; ours add it too (once is enough).
fn strip_path(e: std::io::Error) -> std::io::Error {
    std::io::Error::from(e.kind())
}

/// This host's name, for temporary file names (a shared folder may see runs from several hosts).
fn host() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_default();
    let clean: String = name.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(32).collect();
    if clean.is_empty() {
        "host".into()
    } else {
        clean
    }
}

/// `.ghiblify-<host>-<pid>-`: who wrote a temporary file, so the next run knows whether its
/// writer is gone.
fn temp_prefix() -> String {
    format!(".ghiblify-{}-{}-", host(), std::process::id())
}

/// Temporary files older than this are removed whoever wrote them.
const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Removes `.ghiblify-*.partial` files in `dir` that a killed run left: written on this host by a
/// process that no longer exists, or older than a day. Once per folder per run.
fn clean_stale_partials(dir: &Path) {
    static DONE: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);
    let key = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    {
        let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
        if !done.get_or_insert_with(HashSet::new).insert(key) {
            return;
        }
    }
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let me = host();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !crate::batch::is_temp_name(Path::new(&name)) {
            continue;
        }
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|a| a > STALE_AFTER);
        // `.ghiblify-<host>-<pid>-<random>.partial`: the writer is gone when it ran here and its
        // process does not exist any more.
        let dead = name
            .strip_prefix(".ghiblify-")
            .and_then(|rest| rest.strip_prefix(&format!("{me}-")))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| {
                pid != std::process::id()
                    && !Path::new(&format!("/proc/{pid}")).exists()
                    && Path::new("/proc/self").exists()
            });
        if old || dead {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_links_and_repeated_outputs_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let input = d.path().join("in.png");
        std::fs::write(&input, b"x").unwrap();
        std::fs::hard_link(&input, d.path().join("hard.png")).unwrap();
        let mut g = Guard::new();
        g.add_input(&input);
        assert!(g.claim(&input, "-o").is_err());
        assert!(g.claim(&d.path().join("hard.png"), "--report").is_err(), "a hard link is the input");
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(&input, d.path().join("soft.png")).unwrap();
            assert!(g.claim(&d.path().join("soft.png"), "--trace").is_err(), "a symlink to the input");
        }
        g.claim(&d.path().join("out.png"), "-o").unwrap();
        let err = g.claim(&d.path().join("./out.png"), "--preview").unwrap_err().to_string();
        assert!(err.contains("--preview is also -o"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn atomic_files_get_the_umask_mode_and_stale_partials_go() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        // A partial from a process that does not exist on this host, and one from elsewhere.
        let dead = d.path().join(format!(".ghiblify-{}-4194304-abc.partial", host()));
        let other = d.path().join(".ghiblify-otherhost-1-abc.partial");
        std::fs::write(&dead, b"").unwrap();
        std::fs::write(&other, b"").unwrap();
        let target = d.path().join("out.txt");
        write_atomically(&target, |f| f.write_all(b"hello")).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"hello");
        let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o777;
        assert_ne!(mode, 0o600, "not the temporary file's private mode");
        assert_eq!(mode & 0o044, 0o044 & !umask_of_this_process(), "readable as the umask allows");
        assert!(!dead.exists(), "a dead writer's partial is removed");
        assert!(other.exists(), "another host's recent partial stays");
    }

    #[cfg(unix)]
    fn umask_of_this_process() -> u32 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| l.strip_prefix("Umask:").map(|v| u32::from_str_radix(v.trim(), 8).ok()))?
            })
            .unwrap_or(0o022)
    }
}
