//! Reading photos (EXIF orientation, alpha on white, resize to the working size), converting to
//! and from tensors exactly as diffusers' `VaeImageProcessor` does, and writing results atomically
//! with provenance metadata.

use crate::error::{Error, Result};
use crate::provenance::Provenance;
use candle_core::{Device, Tensor};
use image::{DynamicImage, ImageDecoder, ImageEncoder, ImageReader, RgbImage};
use std::io::Write;
use std::path::Path;

/// Output formats, chosen by the output file's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Png,
    Jpeg,
    WebP,
}

impl OutputFormat {
    /// The file extension batch outputs get.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg => "jpg",
            Self::WebP => "webp",
        }
    }

    pub fn from_path(path: &Path) -> Option<Self> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "png" => Some(Self::Png),
            "jpg" | "jpeg" => Some(Self::Jpeg),
            "webp" => Some(Self::WebP),
            _ => None,
        }
    }
}

/// Opens a regular file for reading; a FIFO, socket or device is refused before it is opened (a
/// FIFO would block the run forever), and the open itself does not block (O_NONBLOCK).
pub fn open_regular(path: &Path) -> Result<std::fs::File> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::image(
            path,
            if meta.is_dir() { "a folder, not an image file" } else { "not a regular file" },
        ));
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(libc::O_NONBLOCK);
    }
    let f = opts.open(path).map_err(|e| Error::io(path, e))?;
    // It may have been swapped for something else between the two calls.
    if !f.metadata().map_err(|e| Error::io(path, e))?.is_file() {
        return Err(Error::image(path, "not a regular file"));
    }
    Ok(f)
}

/// Whether the JPEG ends with its EOI marker (FF D9), allowing some trailing padding.
fn jpeg_has_end_marker(path: &Path) -> Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let tail = len.min(4096);
    f.seek(SeekFrom::Start(len - tail)).map_err(|e| Error::io(path, e))?;
    let mut buf = Vec::with_capacity(tail as usize);
    f.read_to_end(&mut buf).map_err(|e| Error::io(path, e))?;
    Ok(buf.windows(2).any(|w| w == [0xFF, 0xD9]))
}

/// A decoding error, with the size limits spelled out when they were hit.
fn decode_error(path: &Path, e: image::ImageError) -> Error {
    match e {
        image::ImageError::Limits(_) => Error::image(
            path,
            format!(
                "image is larger than {MAX_SIDE} px on a side or {} MiB decoded; downscale it first",
                MAX_DECODE_BYTES >> 20
            ),
        ),
        e => Error::image(path, e),
    }
}

/// The largest side we decode.
pub const MAX_SIDE: u32 = 16384;
/// The most memory one decode may take.
pub const MAX_DECODE_BYTES: u64 = 1 << 30;

/// Decodes an image file (format from its content), applies its EXIF orientation, and flattens
/// it to 8-bit RGB, compositing any transparency on white.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let mut file = open_regular(path)?;
    // The format from the content alone: a text file named .jpg is "not an image", not a JPEG.
    let mut head = [0u8; 64];
    let n = {
        use std::io::{Read, Seek};
        let n = file.read(&mut head).map_err(|e| Error::io(path, e))?;
        file.rewind().map_err(|e| Error::io(path, e))?;
        n
    };
    let mut reader = ImageReader::new(std::io::BufReader::new(file));
    match image::guess_format(&head[..n]) {
        Ok(f) => reader.set_format(f),
        Err(_) if n == 0 => return Err(Error::image(path, "empty file")),
        Err(_) => return Err(Error::image(path, "not an image (its content is no format we can read)")),
    }
    // The JPEG decoder fills a cut-off file with grey instead of failing: look for the end marker.
    if reader.format() == Some(image::ImageFormat::Jpeg) && !jpeg_has_end_marker(path)? {
        return Err(Error::image(path, "truncated JPEG (no end-of-image marker)"));
    }
    // A photo is resized to ~512 px anyway; refuse what would take gigabytes to decode instead of
    // being killed for memory (a 20000x20000 RGBA image is 1.6 GB).
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(|e| decode_error(path, e))?;
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| decode_error(path, e))?;
    img.apply_orientation(orientation);
    if img.width() == 0 || img.height() == 0 {
        return Err(Error::image(path, "image has no pixels"));
    }
    Ok(if img.color().has_alpha() {
        let rgba = img.to_rgba32f();
        let mut out = RgbImage::new(rgba.width(), rgba.height());
        for (o, p) in out.pixels_mut().zip(rgba.pixels()) {
            let a = p[3];
            for c in 0..3 {
                o[c] = ((p[c] * a + (1.0 - a)) * 255.0).round().clamp(0.0, 255.0) as u8;
            }
        }
        out
    } else {
        img.to_rgb8()
    })
}

/// The working size for an image of `w`×`h`: the long side becomes `size` (both sides rounded
/// down to a multiple of `multiple`), aspect kept. An image already at that size is left alone.
pub fn working_size(w: u32, h: u32, size: u32, multiple: u32) -> (u32, u32) {
    let (long, short) = if w >= h { (w, h) } else { (h, w) };
    let long_out = (size / multiple * multiple).max(multiple);
    let short_out = ((short as f64 * long_out as f64 / long as f64).round() as u32 / multiple * multiple).max(multiple);
    if w >= h {
        (long_out, short_out)
    } else {
        (short_out, long_out)
    }
}

/// Resizes to `w`×`h` exactly as Pillow's `Image.resize(size, Image.LANCZOS)` does, which is what
/// diffusers' `VaeImageProcessor` calls: an image that needs resampling gets the same pixels here
/// as in the reference, so parity holds for photos of any size. The image crate's Lanczos3 differs
/// from Pillow's by a few levels per pixel (other support rounding and no 8-bit fixed point).
pub fn resize_to(img: RgbImage, w: u32, h: u32) -> RgbImage {
    if img.width() == w && img.height() == h {
        return img;
    }
    pil_resample::lanczos(&img, w, h)
}

/// A port of Pillow's two-pass separable resampler (`src/libImaging/Resample.c`:
/// `precompute_coeffs`, `normalize_coeffs_8bpc`, `ImagingResample{Horizontal,Vertical}_8bpc`,
/// `ImagingResampleInner`) for the Lanczos filter on 8-bit RGB: f64 coefficients normalised to
/// 22-bit fixed point, an 8-bit intermediate image, horizontal pass first.
mod pil_resample {
    use image::RgbImage;

    const PRECISION_BITS: u32 = 32 - 8 - 2;
    const SUPPORT: f64 = 3.0;

    fn sinc(x: f64) -> f64 {
        if x == 0.0 {
            1.0
        } else {
            let x = x * std::f64::consts::PI;
            x.sin() / x
        }
    }

    fn lanczos_filter(x: f64) -> f64 {
        if (-3.0..3.0).contains(&x) {
            sinc(x) * sinc(x / 3.0)
        } else {
            0.0
        }
    }

    /// Per output pixel: first input index and the fixed-point weights.
    pub(super) fn coeffs(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
        let scale = in_size as f32 as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = SUPPORT * filterscale;
        let ss = 1.0 / filterscale;
        (0..out_size)
            .map(|xx| {
                let center = (xx as f64 + 0.5) * scale;
                // C's (int) cast truncates toward zero before the clamp.
                let xmin = ((center - support + 0.5) as i64).max(0) as usize;
                let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
                let n = xmax.saturating_sub(xmin);
                let w: Vec<f64> =
                    (0..n).map(|x| lanczos_filter((x as f64 + xmin as f64 - center + 0.5) * ss)).collect();
                let total: f64 = w.iter().sum();
                let fixed = w
                    .iter()
                    .map(|&k| {
                        let k = if total != 0.0 { k / total } else { k };
                        let v = k * (1u32 << PRECISION_BITS) as f64;
                        (if k < 0.0 { -0.5 + v } else { 0.5 + v }) as i32
                    })
                    .collect();
                (xmin, fixed)
            })
            .collect()
    }

    fn clip8(ss: i32) -> u8 {
        (ss >> PRECISION_BITS).clamp(0, 255) as u8
    }

    fn apply(weights: &[i32], samples: impl Iterator<Item = u8>) -> u8 {
        let mut ss: i32 = 1 << (PRECISION_BITS - 1);
        for (k, v) in weights.iter().zip(samples) {
            ss = ss.wrapping_add((v as i32).wrapping_mul(*k));
        }
        clip8(ss)
    }

    pub fn lanczos(img: &RgbImage, w: u32, h: u32) -> RgbImage {
        let (iw, ih) = (img.width() as usize, img.height() as usize);
        let (w, h) = (w as usize, h as usize);
        let src = img.as_raw();
        let vert = coeffs(ih, h);
        // Rows the vertical pass reads; only those are resampled horizontally.
        let first = vert.first().map(|c| c.0).unwrap_or(0);
        let last = vert.last().map(|c| c.0 + c.1.len()).unwrap_or(0);
        let (tmp, tw) = if w != iw {
            let horiz = coeffs(iw, w);
            let mut tmp = vec![0u8; (last - first) * w * 3];
            for y in first..last {
                let row = &src[y * iw * 3..(y + 1) * iw * 3];
                for (xx, (xmin, k)) in horiz.iter().enumerate() {
                    for c in 0..3 {
                        tmp[((y - first) * w + xx) * 3 + c] = apply(k, (0..k.len()).map(|x| row[(xmin + x) * 3 + c]));
                    }
                }
            }
            (tmp, w)
        } else {
            (src[first * iw * 3..last * iw * 3].to_vec(), iw)
        };
        if h == ih && w != iw {
            return RgbImage::from_raw(w as u32, h as u32, tmp).expect("buffer size");
        }
        let mut out = vec![0u8; h * tw * 3];
        for (yy, (ymin, k)) in vert.iter().enumerate() {
            let y0 = ymin - first;
            for xx in 0..tw {
                for c in 0..3 {
                    out[(yy * tw + xx) * 3 + c] = apply(k, (0..k.len()).map(|y| tmp[((y0 + y) * tw + xx) * 3 + c]));
                }
            }
        }
        RgbImage::from_raw(tw as u32, h as u32, out).expect("buffer size")
    }
}

/// (1, 3, H, W) f32 in [-1, 1]: `2 · (x / 255) - 1` in f32, as `VaeImageProcessor` computes it.
pub fn to_tensor(img: &RgbImage) -> Result<Tensor> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let data: Vec<f32> = img.as_raw().iter().map(|&v| 2.0 * (v as f32 / 255.0) - 1.0).collect();
    Ok(Tensor::from_vec(data, (h, w, 3), &Device::Cpu)?.permute((2, 0, 1))?.unsqueeze(0)?.contiguous()?)
}

/// A control image for a ControlNet: (1, 3, H, W) in [0, 1], as diffusers' control image
/// processor gives it (`np.array(img).astype(np.float32) / 255.0`, not normalised).
pub fn to_control_tensor(img: &RgbImage) -> Result<Tensor> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let data: Vec<f32> = img.as_raw().iter().map(|&v| v as f32 / 255.0).collect();
    Ok(Tensor::from_vec(data, (h, w, 3), &Device::Cpu)?.permute((2, 0, 1))?.unsqueeze(0)?.contiguous()?)
}

/// (H, W, 3) in [0, 1] → 8-bit, rounding half to even like numpy's `(x * 255).round()`.
pub fn to_rgb8(t: &Tensor) -> Result<RgbImage> {
    let (h, w, _) = t.dims3()?;
    let v = t.flatten_all()?.to_vec1::<f32>()?;
    let bytes = v.iter().map(|&x| (x * 255.0).round_ties_even().clamp(0.0, 255.0) as u8).collect();
    Ok(RgbImage::from_raw(w as u32, h as u32, bytes).expect("w·h·3 bytes from an (h, w, 3) tensor"))
}

/// Inserts an XMP APP1 segment after the JPEG's leading APPn segments (JFIF, Exif).
fn jpeg_with_xmp(jpeg: Vec<u8>, xmp: &str) -> std::io::Result<Vec<u8>> {
    const NS: &[u8] = b"http://ns.adobe.com/xap/1.0/\0";
    let len = 2 + NS.len() + xmp.len();
    if len > u16::MAX as usize || jpeg.len() < 4 || jpeg[..2] != [0xFF, 0xD8] {
        return Ok(jpeg);
    }
    let mut pos = 2;
    while pos + 4 <= jpeg.len() && jpeg[pos] == 0xFF && (0xE0..=0xEF).contains(&jpeg[pos + 1]) {
        pos += 2 + u16::from_be_bytes([jpeg[pos + 2], jpeg[pos + 3]]) as usize;
    }
    let mut out = Vec::with_capacity(jpeg.len() + len + 2);
    out.extend_from_slice(&jpeg[..pos]);
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(NS);
    out.extend_from_slice(xmp.as_bytes());
    out.extend_from_slice(&jpeg[pos..]);
    Ok(out)
}

/// Appends an `XMP ` chunk to an extended (VP8X) WebP file and sets its XMP flag.
fn webp_with_xmp(mut webp: Vec<u8>, xmp: &str) -> Vec<u8> {
    if webp.len() < 21 || &webp[..4] != b"RIFF" || &webp[8..12] != b"WEBP" || &webp[12..16] != b"VP8X" {
        return webp;
    }
    webp[20] |= 0x04;
    webp.extend_from_slice(b"XMP ");
    webp.extend_from_slice(&(xmp.len() as u32).to_le_bytes());
    webp.extend_from_slice(xmp.as_bytes());
    if xmp.len() % 2 == 1 {
        webp.push(0);
    }
    let riff = (webp.len() - 8) as u32;
    webp[4..8].copy_from_slice(&riff.to_le_bytes());
    webp
}

/// Saves `img` atomically with its provenance, if any (see [`encode`]).
pub fn save_as(img: &RgbImage, path: &Path, format: OutputFormat, provenance: Option<&Provenance>) -> Result<()> {
    let bytes = encode(img, path, format, provenance)?;
    crate::guard::write_atomically(path, |f| f.write_all(&bytes))
}

/// Encodes `img` with its provenance, if any: PNG as text chunks (`parameters` in the A1111 form —
/// tEXt when Latin-1, else iTXt —, `Software`, `Source`, `Model`, `License`) plus the XMP packet;
/// JPEG as EXIF (see [`Provenance::exif`]) plus an XMP APP1 segment; WebP as EXIF plus an XMP chunk.
/// Nothing of the input's own metadata (GPS, camera serial) is ever copied. `path` names the
/// output in errors.
pub fn encode(img: &RgbImage, path: &Path, format: OutputFormat, provenance: Option<&Provenance>) -> Result<Vec<u8>> {
    let to_io = |e: image::ImageError| std::io::Error::other(e.to_string());
    let bytes: Vec<u8> = (|| -> std::io::Result<Vec<u8>> {
        let mut buf = Vec::new();
        match format {
            OutputFormat::Png => {
                let mut enc = png::Encoder::new(&mut buf, img.width(), img.height());
                enc.set_color(png::ColorType::Rgb);
                enc.set_depth(png::BitDepth::Eight);
                if let Some(p) = provenance {
                    for (k, v) in p.png_text() {
                        let latin1 = v.chars().all(|c| (c as u32) < 256);
                        if latin1 {
                            enc.add_text_chunk(k.to_string(), v)
                        } else {
                            enc.add_itxt_chunk(k.to_string(), v)
                        }
                        .map_err(std::io::Error::other)?;
                    }
                    enc.add_itxt_chunk("XML:com.adobe.xmp".into(), p.xmp()).map_err(std::io::Error::other)?;
                }
                let mut writer = enc.write_header().map_err(std::io::Error::other)?;
                writer.write_image_data(img.as_raw()).map_err(std::io::Error::other)?;
                writer.finish().map_err(std::io::Error::other)?;
            }
            OutputFormat::Jpeg => {
                let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, 95);
                if let Some(p) = provenance {
                    enc.set_exif_metadata(p.exif()?).map_err(std::io::Error::other)?;
                }
                img.write_with_encoder(enc).map_err(to_io)?;
                if let Some(p) = provenance {
                    buf = jpeg_with_xmp(buf, &p.xmp())?;
                }
            }
            OutputFormat::WebP => {
                let mut enc = image::codecs::webp::WebPEncoder::new_lossless(&mut buf);
                if let Some(p) = provenance {
                    enc.set_exif_metadata(p.exif()?).map_err(std::io::Error::other)?;
                }
                img.write_with_encoder(enc).map_err(to_io)?;
                if let Some(p) = provenance {
                    buf = webp_with_xmp(buf, &p.xmp());
                }
            }
        }
        Ok(buf)
    })()
    .map_err(|e| Error::output(path, format!("cannot encode: {e}")))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn working_size_keeps_aspect_and_multiple_of_8() {
        assert_eq!(working_size(640, 480, 512, 8), (512, 384));
        assert_eq!(working_size(480, 640, 512, 8), (384, 512));
        assert_eq!(working_size(451, 300, 512, 8), (512, 336));
        assert_eq!(working_size(64, 48, 64, 8), (64, 48));
        assert_eq!(working_size(1000, 10, 512, 8), (512, 8));
        assert_eq!(working_size(100, 100, 100, 8), (96, 96));
    }

    #[test]
    fn tensor_round_trip_is_exact() {
        let img = RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8 * 50, y as u8 * 100, 255]));
        let t = to_tensor(&img).unwrap();
        assert_eq!(t.dims(), &[1, 3, 3, 5]);
        let back = ((t.squeeze(0).unwrap().permute((1, 2, 0)).unwrap() + 1.0).unwrap() / 2.0).unwrap();
        assert_eq!(to_rgb8(&back).unwrap(), img);
    }
}
