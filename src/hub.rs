//! Model files from the Hugging Face hub, through hf-hub, into the standard cache shared with
//! Python tools (`HF_HOME`, `HF_HUB_CACHE`, `HF_ENDPOINT`, `HF_TOKEN` are honoured by hf-hub).
//! Verified, resumable downloads, offline mode and the full set of presets are a later issue; this
//! is the working path for the default model.

use crate::error::{Error, Result};
use crate::printer::Printer;
use hf_hub::progress::{DownloadEvent, ProgressEvent, ProgressHandler};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A model preset, kept as data in `models/*.json` and compiled in (so the binary needs no files
/// beside it): the repo, the exact files an img2img run needs and nothing else, and its licence.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Preset {
    pub name: String,
    pub repo: String,
    pub revision: Option<String>,
    pub family: String,
    pub license: String,
    pub license_url: String,
    pub trigger_words: Vec<String>,
    pub files: Vec<String>,
}

const DEFAULT_PRESET_JSON: &str = include_str!("../models/ghibli-diffusion.json");

/// The default model: nitrosocke/Ghibli-Diffusion, an SD1.5 fine-tune on Studio Ghibli frames.
pub fn default_preset() -> Preset {
    serde_json::from_str(DEFAULT_PRESET_JSON).expect("models/ghibli-diffusion.json is valid (checked by a unit test)")
}

struct BarHandler {
    printer: Printer,
    bar: Mutex<Option<indicatif::ProgressBar>>,
    name: String,
}

impl ProgressHandler for BarHandler {
    fn on_progress(&self, event: &ProgressEvent) {
        let ProgressEvent::Download(ev) = event else { return };
        let mut bar = self.bar.lock().unwrap_or_else(|e| e.into_inner());
        match ev {
            DownloadEvent::Start { total_bytes, .. } => {
                *bar = Some(self.printer.bytes_bar(*total_bytes, &self.name));
            }
            DownloadEvent::Progress { files } => {
                if let (Some(b), Some(f)) = (bar.as_ref(), files.last()) {
                    if f.total_bytes > 0 {
                        b.set_length(f.total_bytes);
                    }
                    b.set_position(f.bytes_completed);
                }
            }
            DownloadEvent::AggregateProgress { bytes_completed, total_bytes, .. } => {
                if let Some(b) = bar.as_ref() {
                    b.set_length(*total_bytes);
                    b.set_position(*bytes_completed);
                }
            }
            DownloadEvent::Complete => {
                if let Some(b) = bar.take() {
                    b.finish_and_clear();
                }
            }
        }
    }
}

/// Downloads (or finds in the cache) `files` of `repo_id` and returns the local snapshot folder,
/// a diffusers-layout model folder.
pub fn fetch(repo_id: &str, revision: Option<&str>, files: &[String], printer: Printer) -> Result<PathBuf> {
    let (owner, name) = repo_id
        .split_once('/')
        .filter(|(o, n)| !o.is_empty() && !n.is_empty() && !n.contains('/'))
        .ok_or_else(|| Error::Argument(format!("--model '{repo_id}': expected a hub repo id like 'owner/name'")))?;
    let client = hf_hub::HFClient::builder()
        .retry_max_attempts(2)
        .build_sync()
        .map_err(|e| Error::Hub(format!("cannot set up the hub client: {e}")))?;
    let repo = client.model(owner, name);
    let mut root: Option<PathBuf> = None;
    for file in files {
        // Cache first: a file the user already has (from diffusers too) is not fetched again.
        let cached = repo.download_file().filename(file.as_str()).maybe_revision(revision.map(String::from)).local_files_only(true).send();
        let path = match cached {
            Ok(p) => p,
            Err(_) => {
                printer.info(format!("downloading {repo_id}/{file}"));
                let handler = BarHandler { printer, bar: Mutex::new(None), name: file.clone() };
                repo.download_file()
                    .filename(file.as_str())
                    .maybe_revision(revision.map(String::from))
                    .progress(hf_hub::progress::Progress::new(handler))
                    .send()
                    .map_err(|e| {
                        Error::Hub(format!(
                            "could not fetch '{file}' from hub repo '{repo_id}': {e}; download the model elsewhere and pass its folder with --model-dir DIR"
                        ))
                    })?
            }
        };
        if root.is_none() {
            root = snapshot_root(&path, file);
        }
    }
    root.ok_or_else(|| Error::Hub(format!("hub repo '{repo_id}': no files were requested")))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_preset_parses() {
        let p = default_preset();
        assert_eq!(p.repo, "nitrosocke/Ghibli-Diffusion");
        assert!(p.files.iter().any(|f| f == "unet/diffusion_pytorch_model.safetensors"));
    }

    #[test]
    fn snapshot_root_strips_the_repo_path() {
        let p = Path::new("/c/models--a--b/snapshots/abc/unet/config.json");
        assert_eq!(snapshot_root(p, "unet/config.json").unwrap(), Path::new("/c/models--a--b/snapshots/abc"));
    }
}
