//! What was made, as one typed record, and its writers: the A1111 `parameters` text (what
//! A1111-compatible tools and civitai read), PNG text chunks, the EXIF block of JPEG and WebP
//! outputs, and the XMP packet with IPTC's digital source type. Every writer formats the same
//! record; nothing reads it back by string key.

use std::io::Cursor;

/// IPTC's term for "a photo transformed or composited with a generative model's output".
pub const DIGITAL_SOURCE_TYPE: &str =
    "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia";

/// The model a picture was made with.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ModelRecord {
    /// The repo id (with `@revision` when pinned) or the folder's name (never a local path).
    pub name: String,
    /// A1111's short model hash (first 10 hex digits of the UNet weights' sha256), when cheap.
    pub hash: Option<String>,
    /// The licence its model card or preset states.
    pub license: Option<String>,
}

/// One LoRA merged into the model.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoraRecord {
    pub name: String,
    /// First 10 hex digits of the file's sha256 ("unknown" if it could not be read).
    pub hash: String,
    pub scale: f64,
}

/// One ControlNet that steered the picture (A1111's ControlNet fields).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ControlRecord {
    /// How its control image was made: canny, tile_resample, none (a prepared image).
    pub module: String,
    /// Its repo id or folder name.
    pub model: String,
    pub license: Option<String>,
    pub weight: f64,
    pub start: f64,
    pub end: f64,
}

/// Everything the outputs say about how they were made.
#[derive(Debug, Clone)]
pub struct Provenance {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub sampler: String,
    pub karras: bool,
    pub guidance: f64,
    pub strength: f64,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    pub model: ModelRecord,
    /// A replacement VAE (`--vae`), by repo id or folder name.
    pub vae: Option<String>,
    pub loras: Vec<LoraRecord>,
    /// The ControlNets that steered the picture.
    pub controlnets: Vec<ControlRecord>,
    /// The input photo's file name.
    pub source: String,
    /// The arithmetic when it was not f32 (`bf16`, `f16`, `bf16 weights`, …): the same settings
    /// give a slightly different picture in another precision.
    pub precision: Option<String>,
}

/// `ghiblify x.y.z`.
pub fn software() -> String {
    format!("ghiblify {}", env!("CARGO_PKG_VERSION"))
}

impl Provenance {
    /// The A1111 `parameters` text: prompt (LoRAs as `<lora:NAME:SCALE>`), negative prompt, then
    /// one line of `Key: value` settings.
    pub fn parameters(&self) -> String {
        let mut out = self.prompt.clone();
        for l in &self.loras {
            out.push_str(&format!(" <lora:{}:{}>", l.name, l.scale));
        }
        out.push_str(&format!("\nNegative prompt: {}\n", self.negative_prompt));
        let mut fields = vec![
            format!("Steps: {}", self.steps),
            format!("Sampler: {}{}", self.sampler, if self.karras { " Karras" } else { "" }),
            format!("CFG scale: {}", self.guidance),
            format!("Seed: {}", self.seed),
            format!("Size: {}x{}", self.width, self.height),
        ];
        if let Some(h) = &self.model.hash {
            fields.push(format!("Model hash: {h}"));
        }
        fields.push(format!("Model: {}", self.model.name));
        fields.push(format!("Denoising strength: {}", self.strength));
        if let Some(v) = &self.vae {
            fields.push(format!("VAE: {v}"));
        }
        if !self.loras.is_empty() {
            let hashes: Vec<String> = self.loras.iter().map(|l| format!("{}: {}", l.name, l.hash)).collect();
            fields.push(format!("Lora hashes: \"{}\"", hashes.join(", ")));
        }
        // A1111's ControlNet extension's fields.
        for (i, c) in self.controlnets.iter().enumerate() {
            let model = c.model.rsplit('/').next().unwrap_or(&c.model);
            fields.push(format!(
                "ControlNet {i}: \"Module: {}, Model: {model}, Weight: {}, Guidance Start: {}, Guidance End: {}\"",
                c.module, c.weight, c.start, c.end
            ));
        }
        if let Some(p) = &self.precision {
            fields.push(format!("Precision: {p}"));
        }
        fields.push(format!("Version: {}", software()));
        out.push_str(&fields.join(", "));
        out
    }

    /// "AI-generated: latent-diffusion img2img of 'photo.jpg'".
    pub fn source_line(&self) -> String {
        format!("AI-generated: latent-diffusion img2img of '{}'", self.source)
    }

    pub fn license_line(&self) -> String {
        let mut line =
            format!("model licence: {}", self.model.license.as_deref().unwrap_or("unknown (see the model card)"));
        for c in &self.controlnets {
            line.push_str(&format!(
                "; ControlNet {} licence: {}",
                c.model,
                c.license.as_deref().unwrap_or("unknown (see the model card)")
            ));
        }
        line
    }

    /// The PNG text chunks, in order.
    pub fn png_text(&self) -> Vec<(&'static str, String)> {
        vec![
            ("parameters", self.parameters()),
            ("Software", software()),
            ("Source", self.source_line()),
            ("Model", self.model.name.clone()),
            ("License", self.license_line()),
        ]
    }

    /// The XMP packet: IPTC digital source type, the creator tool, the description, the model and
    /// its licence.
    pub fn xmp(&self) -> String {
        format!(
            "<?xpacket begin=\"\u{feff}\" id=\"W5M0MpCehiHzreSzNTczkc9d\"?>\n\
<x:xmpmeta xmlns:x=\"adobe:ns:meta/\">\n\
 <rdf:RDF xmlns:rdf=\"http://www.w3.org/1999/02/22-rdf-syntax-ns#\">\n\
  <rdf:Description rdf:about=\"\"\n\
    xmlns:Iptc4xmpExt=\"http://iptc.org/std/Iptc4xmpExt/2008-02-29/\"\n\
    xmlns:xmp=\"http://ns.adobe.com/xap/1.0/\"\n\
    xmlns:dc=\"http://purl.org/dc/elements/1.1/\"\n\
    Iptc4xmpExt:DigitalSourceType=\"{DIGITAL_SOURCE_TYPE}\"\n\
    xmp:CreatorTool=\"{}\">\n\
   <dc:description><rdf:Alt><rdf:li xml:lang=\"x-default\">{}</rdf:li></rdf:Alt></dc:description>\n\
   <dc:source>{}</dc:source>\n\
   <dc:rights><rdf:Alt><rdf:li xml:lang=\"x-default\">{}</rdf:li></rdf:Alt></dc:rights>\n\
  </rdf:Description>\n\
 </rdf:RDF>\n\
</x:xmpmeta>\n\
<?xpacket end=\"r\"?>",
            xml_escape(&software()),
            xml_escape(&self.source_line()),
            xml_escape(&self.model.name),
            xml_escape(&self.license_line())
        )
    }

    /// The EXIF block (big-endian TIFF, as piexif writes it) for JPEG and WebP: ImageDescription
    /// (the source line), Software, and the `parameters` text in the Exif UserComment, where
    /// A1111-compatible tools look for it in JPEGs (see [`user_comment`]).
    pub fn exif(&self) -> std::io::Result<Vec<u8>> {
        use exif::{Field, In, Tag, Value};
        // ASCII fields: keep them ASCII (non-ASCII prompt text lives in UserComment).
        let ascii = |s: &str| {
            s.chars().map(|c| if c.is_ascii() && !c.is_ascii_control() { c } else { '?' }).collect::<String>()
        };
        let params = self.parameters();
        let comment = user_comment(&params);
        let fields = [
            Field {
                tag: Tag::ImageDescription,
                ifd_num: In::PRIMARY,
                value: Value::Ascii(vec![ascii(&self.source_line()).into_bytes()]),
            },
            Field {
                tag: Tag::Software,
                ifd_num: In::PRIMARY,
                value: Value::Ascii(vec![ascii(&software()).into_bytes()]),
            },
            Field { tag: Tag::UserComment, ifd_num: In::PRIMARY, value: Value::Undefined(comment, 0) },
        ];
        let mut w = exif::experimental::Writer::new();
        for f in &fields {
            w.push_field(f);
        }
        let mut buf = Cursor::new(Vec::new());
        // Big-endian TIFF, as piexif writes it (and the EXIF spec allows).
        w.write(&mut buf, false).map_err(std::io::Error::other)?;
        Ok(buf.into_inner())
    }
}

/// An Exif UserComment exactly as A1111 writes one (`piexif.helper.UserComment.dump(text,
/// encoding="unicode")`): the 8-byte `UNICODE\0` prefix and the text in UTF-16 big-endian, which is
/// what `piexif.helper.UserComment.load` — A1111's reader, and the parsers built on it — decodes.
pub fn user_comment(text: &str) -> Vec<u8> {
    let mut out = b"UNICODE\0".to_vec();
    out.extend(text.encode_utf16().flat_map(u16::to_be_bytes));
    out
}

/// The text of an Exif UserComment as piexif's loader reads it: `ASCII\0\0\0` + ASCII,
/// `UNICODE\0` + UTF-16 big-endian, or an unknown/JIS prefix (returned as `None`).
pub fn read_user_comment(bytes: &[u8]) -> Option<String> {
    let (prefix, body) = (bytes.get(..8)?, &bytes[8..]);
    match prefix {
        b"ASCII\0\0\0" => Some(String::from_utf8_lossy(body).into_owned()),
        b"UNICODE\0" => {
            let units: Vec<u16> = body.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
            String::from_utf16(&units).ok()
        }
        _ => None,
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}
