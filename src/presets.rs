//! Model presets as data (`presets/*.json`, compiled in so the binary needs no files beside it):
//! the repo, a revision, the exact files a run reads, licence, trigger words and the generation
//! defaults that suit the model.

use serde::Deserialize;

/// A model preset (`presets/*.json`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    pub name: String,
    pub description: String,
    pub repo: String,
    /// A commit to pin; `null` follows `main`.
    pub revision: Option<String>,
    pub family: String,
    pub license: String,
    pub license_url: String,
    pub trigger_words: Vec<String>,
    /// Approximate download size of what the preset's name fetches, for `--list-models`.
    pub download_size_mb: u64,
    /// Exactly the files an img2img run reads from the repo's diffusers folders (never a whole
    /// repo, never `.bin`/`.ckpt`): what `--model REPO_ID` fetches.
    pub files: Vec<String>,
    /// A single-file checkpoint (LDM layout) at the repo's root that the preset's name reads
    /// instead of the folders: the same fine-tune in half the download.
    #[serde(default)]
    pub single_file: Option<String>,
    /// LoRAs merged into the model (`--lora` specs).
    #[serde(default)]
    pub loras: Vec<String>,
    pub defaults: PresetDefaults,
}

/// Generation settings that suit a preset; each is overridden by its flag.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresetDefaults {
    pub prompt: String,
    pub negative_prompt: String,
    pub strength: f64,
    pub steps: usize,
    pub guidance: f64,
    pub sampler: String,
    #[serde(default)]
    pub karras: bool,
}

/// Every preset file; a unit test checks this list against the `presets/` folder.
const PRESETS: &[(&str, &str)] = &[
    ("ghibli-diffusion.json", include_str!("../presets/ghibli-diffusion.json")),
    ("sd15.json", include_str!("../presets/sd15.json")),
];

pub const DEFAULT_PRESET: &str = "ghibli-diffusion";

pub fn presets() -> Vec<Preset> {
    PRESETS
        .iter()
        .map(|(file, text)| {
            serde_json::from_str(text)
                .unwrap_or_else(|e| panic!("presets/{file} is invalid: {e} (checked by a unit test)"))
        })
        .collect()
}

pub fn preset(name: &str) -> Option<Preset> {
    presets().into_iter().find(|p| p.name == name)
}

pub fn default_preset() -> Preset {
    preset(DEFAULT_PRESET).expect("the default preset exists (checked by a unit test)")
}

/// `--list-models`: one line per preset.
pub fn list_models() -> String {
    let what = |p: &Preset| match &p.single_file {
        Some(f) => format!("{}/{f}", p.repo),
        None => p.repo.clone(),
    };
    let width = presets().iter().map(|p| what(p).len()).max().unwrap_or(0);
    let mut out = String::new();
    for p in presets() {
        let default = if p.name == DEFAULT_PRESET { " (default)" } else { "" };
        out.push_str(&format!(
            "{:<18} {:<width$} {:>6.1} GB  {}  {}{default}\n",
            p.name,
            what(&p),
            p.download_size_mb as f64 / 1000.0,
            p.license,
            p.description
        ));
    }
    out.push_str("\nControlNets (--control KIND[:SCALE]):\n");
    for (name, k) in crate::control::kinds() {
        out.push_str(&format!(
            "{name:<18} {:<width$} {:>6.1} GB  {}  {}\n",
            k.repo,
            k.download_size_mb as f64 / 1000.0,
            k.license,
            k.description
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_parse_and_every_file_is_listed() {
        let ps = presets();
        assert_eq!(default_preset().repo, "nitrosocke/Ghibli-Diffusion");
        assert!(preset("sd15").is_some());
        let on_disk: Vec<String> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/presets"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".json"))
            .collect();
        assert_eq!(on_disk.len(), PRESETS.len(), "every presets/*.json must be listed in PRESETS");
        for p in &ps {
            assert!(on_disk.contains(&format!("{}.json", p.name)), "preset {} is in presets/{}.json", p.name, p.name);
            assert!(p.files.iter().all(|f| !f.ends_with(".bin") && !f.ends_with(".ckpt")));
            if let Some(f) = &p.single_file {
                assert!(
                    crate::repo::check_file_path(f).is_ok() && (f.ends_with(".ckpt") || f.ends_with(".safetensors"))
                );
            }
            for c in ["unet", "vae", "text_encoder"] {
                assert!(
                    p.files.iter().any(|f| f.starts_with(&format!("{c}/")) && f.ends_with(".safetensors")),
                    "{} lacks {c} weights",
                    p.name
                );
            }
            assert!(
                p.defaults.sampler.parse::<crate::samplers::SamplerKind>().is_ok(),
                "{}: sampler {}",
                p.name,
                p.defaults.sampler
            );
        }
    }
}
