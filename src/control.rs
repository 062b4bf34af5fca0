//! ControlNets as the command line names them: `--control canny|tile[:SCALE]` (a default
//! ControlNet per kind, its control image made from each photo, as A1111's and ComfyUI's
//! preprocessors do) or `--controlnet DIR|REPO_ID[:SCALE]` with a prepared `--control-image`; the
//! guidance window; and the control image of one photo (the pipeline side is
//! [`crate::pipeline::Control`]).

use crate::error::{Error, Result};
use crate::repo::RepoRef;
use image::RgbImage;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// What `--control KIND` fetches (presets/controlnets/kinds.json).
#[derive(Debug, Clone, Deserialize)]
pub struct Kind {
    pub repo: String,
    pub license: String,
    pub download_size_mb: u64,
    pub description: String,
}

/// The kinds `--control` knows, by name, in the order `--list-models` shows them.
pub fn kinds() -> Vec<(String, Kind)> {
    let v: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(include_str!("../presets/controlnets/kinds.json")).expect("kinds.json is valid");
    v.into_iter()
        .filter(|(k, _)| !k.starts_with('_'))
        .map(|(k, v)| (k, serde_json::from_value(v).expect("every kind has its fields")))
        .collect()
}

/// Where a ControlNet's folder comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum ControlSource {
    Dir(PathBuf),
    Hub(RepoRef),
}

/// How its control image is made.
#[derive(Debug, Clone, PartialEq)]
pub enum ControlInput {
    /// The photo's edges (`cv2.Canny` with these thresholds).
    Canny { low: f64, high: f64 },
    /// The photo itself.
    Tile,
    /// A prepared image, resized to the working size.
    Image(PathBuf),
}

impl ControlInput {
    /// A1111's "Module" name.
    pub fn module(&self) -> &'static str {
        match self {
            ControlInput::Canny { .. } => "canny",
            ControlInput::Tile => "tile_resample",
            ControlInput::Image(_) => "none",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ControlSpec {
    pub source: ControlSource,
    pub input: ControlInput,
    pub scale: f64,
    /// The licence of a kind's default ControlNet.
    pub license: Option<String>,
}

impl ControlSpec {
    /// How pictures and messages name the ControlNet: its repo id or folder name.
    pub fn name(&self) -> String {
        match &self.source {
            ControlSource::Hub(r) => r.id.clone(),
            ControlSource::Dir(d) => d.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        }
    }
}

/// Every ControlNet of a run and the window they act in.
#[derive(Debug, Clone, PartialEq)]
pub struct Controls {
    pub specs: Vec<ControlSpec>,
    /// `--control-start` / `--control-end`: the fraction of the denoising steps they act in.
    pub start: f64,
    pub end: f64,
    /// `--save-control FILE`: where the (first) control image is written.
    pub save: Option<PathBuf>,
}

impl Default for Controls {
    fn default() -> Self {
        Self { specs: Vec::new(), start: 0.0, end: 1.0, save: None }
    }
}

/// The raw flags.
#[derive(Debug, Default)]
pub struct ControlArgs<'a> {
    pub control: &'a [String],
    pub controlnet: &'a [String],
    pub control_image: &'a [PathBuf],
    pub start: Option<f64>,
    pub end: Option<f64>,
    pub canny_thresholds: Option<&'a str>,
    pub save: Option<PathBuf>,
}

/// `TARGET[:SCALE]` ([`crate::lora::split_scale`]), the scale within [0, 10].
fn split_scale<'a>(spec: &'a str, setting: &'static str) -> Result<(&'a str, f64)> {
    let (target, scale) = crate::lora::split_scale(spec);
    if !scale.is_finite() || !(0.0..=10.0).contains(&scale) {
        return Err(Error::setting(setting, format!("'{spec}': the scale must be within [0, 10], got {scale}")));
    }
    Ok((target, scale))
}

impl Controls {
    /// Checks and combines the flags; `single_input` is whether one photo is converted.
    pub fn from_args(a: ControlArgs, single_input: bool) -> Result<Self> {
        let (low, high) = match a.canny_thresholds {
            None => (100.0, 200.0),
            Some(t) => {
                let bad = || {
                    Error::setting(
                        "canny_thresholds",
                        format!("'{t}': expected LOW,HIGH, two numbers within [0, 10000]"),
                    )
                };
                let (l, h) = t.split_once(',').ok_or_else(bad)?;
                let (l, h): (f64, f64) = (l.trim().parse().map_err(|_| bad())?, h.trim().parse().map_err(|_| bad())?);
                if !(0.0..=10000.0).contains(&l) || !(0.0..=10000.0).contains(&h) {
                    return Err(bad());
                }
                (l.min(h), l.max(h))
            }
        };
        let mut specs = Vec::new();
        let known = kinds();
        for c in a.control {
            let (kind, scale) = split_scale(c, "control")?;
            let Some((_, k)) = known.iter().find(|(n, _)| n == kind) else {
                let names: Vec<&str> = known.iter().map(|(n, _)| n.as_str()).collect();
                return Err(Error::setting(
                    "control",
                    format!(
                        "'{c}': unknown kind '{kind}' (one of: {}; or --controlnet with --control-image)",
                        names.join(", ")
                    ),
                ));
            };
            let input = if kind == "canny" { ControlInput::Canny { low, high } } else { ControlInput::Tile };
            let repo = RepoRef { id: k.repo.clone(), revision: None };
            specs.push(ControlSpec {
                source: ControlSource::Hub(repo),
                input,
                scale,
                license: Some(k.license.clone()),
            });
        }
        if a.controlnet.len() != a.control_image.len() {
            return Err(Error::usage(format!(
                "each --controlnet needs its --control-image, in the same order ({} --controlnet, {} --control-image)",
                a.controlnet.len(),
                a.control_image.len()
            )));
        }
        if !a.control_image.is_empty() && !single_input {
            return Err(Error::usage(
                "--control-image is one picture for one photo; to convert several, use --control canny or tile, which make one from each photo",
            ));
        }
        for (c, img) in a.controlnet.iter().zip(a.control_image) {
            let (target, scale) = split_scale(c, "controlnet")?;
            let p = Path::new(target);
            let source = if p.is_dir() {
                ControlSource::Dir(p.to_path_buf())
            } else if RepoRef::looks_like(target) && !p.exists() {
                ControlSource::Hub(
                    RepoRef::parse(target).map_err(|why| Error::setting("controlnet", format!("'{c}': {why}")))?,
                )
            } else {
                return Err(Error::setting("controlnet", format!("'{c}': not a folder or a hub repo id (owner/name)")));
            };
            if !img.is_file() {
                return Err(Error::setting("control_image", format!("'{}': no such file", img.display())));
            }
            specs.push(ControlSpec { source, input: ControlInput::Image(img.clone()), scale, license: None });
        }
        let start = a.start.unwrap_or(0.0);
        let end = a.end.unwrap_or(1.0);
        if !(0.0..=1.0).contains(&start) {
            return Err(Error::setting("control_start", format!("must be within [0, 1], got {start}")));
        }
        if !(0.0..=1.0).contains(&end) || end <= start {
            return Err(Error::setting(
                "control_end",
                format!("must be within ({start}, 1] (after --control-start), got {end}"),
            ));
        }
        if specs.is_empty() {
            if a.start.is_some() || a.end.is_some() || a.canny_thresholds.is_some() || a.save.is_some() {
                return Err(Error::usage(
                    "--control-start, --control-end, --canny-thresholds and --save-control need --control or --controlnet",
                ));
            }
        } else if a.canny_thresholds.is_some() && !specs.iter().any(|s| matches!(s.input, ControlInput::Canny { .. })) {
            return Err(Error::usage("--canny-thresholds needs --control canny"));
        }
        if a.save.is_some() && !single_input {
            return Err(Error::usage("--save-control writes one control image: it works with one input"));
        }
        if let Some(p) = &a.save {
            if crate::image_io::OutputFormat::from_path(p) != Some(crate::image_io::OutputFormat::Png) {
                return Err(Error::usage(format!(
                    "--save-control '{}': the control image is written as PNG; name it .png",
                    p.display()
                )));
            }
        }
        Ok(Self { specs, start, end, save: a.save })
    }
}

/// The control image of `photo` (already at the working size) for one ControlNet, as RGB.
pub fn control_image(input: &ControlInput, photo: &RgbImage) -> Result<RgbImage> {
    Ok(match input {
        ControlInput::Canny { low, high } => {
            image::DynamicImage::ImageLuma8(crate::canny::canny(photo, *low, *high)).to_rgb8()
        }
        ControlInput::Tile => photo.clone(),
        ControlInput::Image(path) => {
            let img = crate::image_io::load_rgb(path)?;
            crate::image_io::resize_to(img, photo.width(), photo.height())
        }
    })
}
