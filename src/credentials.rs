//! C2PA Content Credentials (C2PA specification 2.x, through the `c2pa` crate with its
//! rust-native crypto): every picture gets a signed manifest saying it was made from the input
//! photo (`c2pa.opened` with the photo as its `parentOf` ingredient, by hash — the photo itself
//! and its thumbnail are not embedded) and edited by a trained model (`c2pa.edited` with IPTC's
//! `compositeWithTrainedAlgorithmicMedia`, ghiblify as the software agent, the model, LoRA and
//! VAE names and licences as parameters), plus the generation settings as ghiblify's own
//! assertion. Camera makers, Adobe, news agencies and social networks read these; `c2patool` or
//! the CAI verify site show them.
//!
//! Signing: a certificate chain and key (`--c2pa-cert`, `--c2pa-key`, PEM) for people who have one;
//! otherwise a per-user ES256 key with a certificate from a per-user local CA, made on first use and
//! kept in the user's config folder (mode 0600). Such a manifest is valid and tamper-evident but
//! not trusted (no public CA vouches for the key): it proves the picture is unchanged since it
//! was signed on this account, not who the account is.

use crate::error::{Error, Result};
use crate::image_io::OutputFormat;
use crate::provenance::{software, Provenance, DIGITAL_SOURCE_TYPE};
use std::io::Cursor;
use std::path::{Path, PathBuf};

/// A signing certificate chain (end entity first) and its private key, PEM.
#[derive(Clone)]
pub struct Credentials {
    pub cert_chain: Vec<u8>,
    pub key: Vec<u8>,
    /// Where they came from, for messages.
    pub origin: PathBuf,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({})", self.origin.display())
    }
}

/// The label of ghiblify's own assertion (the generation settings).
pub const SETTINGS_ASSERTION: &str = "org.ghiblify.generation";

impl Credentials {
    /// `--c2pa-cert FILE --c2pa-key FILE`.
    pub fn from_files(cert: &Path, key: &Path) -> Result<Self> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| Error::io(p, e));
        let creds = Self { cert_chain: read(cert)?, key: read(key)?, origin: cert.to_path_buf() };
        // A key that does not match or a file that is not PEM fails now, not after a picture.
        creds.signer()?;
        Ok(creds)
    }

    /// The per-user key and certificate chain in `dir/signing.pem` (normally under
    /// [`default_dir`]), made on first use. Processes starting together (a Slurm array) agree on
    /// one: each writes its own and links it into place, and the ones that lose use the winner's.
    pub fn per_user(dir: &Path) -> Result<Self> {
        let file = dir.join("signing.pem");
        if !file.is_file() {
            make_per_user(dir, &file)?;
        }
        let pem = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
        // The chain's certificates, then the private key.
        let at = pem.find("-----BEGIN PRIVATE KEY-----").ok_or_else(|| {
            Error::usage(format!(
                "C2PA signing file '{}' has no private key; remove it to make a new one",
                file.display()
            ))
        })?;
        let creds =
            Self { cert_chain: pem.as_bytes()[..at].to_vec(), key: pem.as_bytes()[at..].to_vec(), origin: file };
        creds.signer()?;
        Ok(creds)
    }

    fn signer(&self) -> Result<c2pa::BoxedSigner> {
        c2pa::create_signer::from_keys(&self.cert_chain, &self.key, c2pa::SigningAlg::Es256, None).map_err(|e| {
            Error::usage(format!(
                "C2PA signing credentials '{}': {e} (an ES256 (P-256) certificate chain and key, PEM)",
                self.origin.display()
            ))
        })
    }
}

/// `$XDG_CONFIG_HOME/ghiblify/c2pa`, else `~/.config/ghiblify/c2pa`.
pub fn default_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("ghiblify").join("c2pa"))
}

/// A local CA and an end-entity ES256 certificate it signs, as the C2PA certificate profile asks
/// (version 3, not self-signed, digitalSignature, an allowed EKU, key identifiers), valid ten years.
fn make_per_user(dir: &Path, file: &Path) -> Result<()> {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
        KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
    };
    let fail = |e: rcgen::Error| Error::usage(format!("cannot make the C2PA signing key in '{}': {e}", dir.display()));
    let user = std::env::var("USER").or_else(|_| std::env::var("USERNAME")).unwrap_or_else(|_| "user".into());
    let now = time_now();
    let mut ca = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("ghiblify local CA ({user})"));
    dn.push(DnType::OrganizationName, "ghiblify (self-issued, untrusted)");
    ca.distinguished_name = dn;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = now;
    ca.not_after = now + time::Duration::days(3650);
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(fail)?;
    let ca = CertifiedIssuer::self_signed(ca, ca_key).map_err(fail)?;
    let mut ee = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("ghiblify ({user})"));
    dn.push(DnType::OrganizationName, "ghiblify (self-issued, untrusted)");
    ee.distinguished_name = dn;
    ee.is_ca = IsCa::ExplicitNoCa;
    ee.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // id-kp-emailProtection and id-kp-documentSigning (1.3.6.1.5.5.7.3.36).
    ee.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::EmailProtection,
        ExtendedKeyUsagePurpose::Other(vec![1, 3, 6, 1, 5, 5, 7, 3, 36]),
    ];
    ee.use_authority_key_identifier_extension = true;
    ee.not_before = now;
    ee.not_after = now + time::Duration::days(3650);
    let ee_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(fail)?;
    let ee_cert = ee.signed_by(&ee_key, &ca).map_err(fail)?;
    create_private_dir(dir)?;
    let pem = format!("{}{}{}", ee_cert.pem(), ca.pem(), ee_key.serialize_pem());
    let tmp = dir.join(format!(".signing-{}.pem", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    write_private(&tmp, pem.as_bytes())?;
    // A hard link never replaces: the first process to link wins, the others read its file.
    let linked = std::fs::hard_link(&tmp, file);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(Error::io(file, e)),
        _ => Ok(()),
    }
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn create_private_dir(dir: &Path) -> Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir).map_err(|e| Error::io(dir, e))
}

/// A file only its owner can read (the private key, and its certificate beside it), written whole.
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    let mut f = o.open(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(|e| Error::io(path, e))
}

fn mime(format: OutputFormat) -> &'static str {
    match format {
        OutputFormat::Png => "image/png",
        OutputFormat::Jpeg => "image/jpeg",
        OutputFormat::WebP => "image/webp",
    }
}

/// The MIME type of an input photo for the ingredient (by content).
fn photo_mime(bytes: &[u8]) -> &'static str {
    match image::guess_format(bytes) {
        Ok(image::ImageFormat::Png) => "image/png",
        Ok(image::ImageFormat::Jpeg) => "image/jpeg",
        Ok(image::ImageFormat::WebP) => "image/webp",
        Ok(image::ImageFormat::Gif) => "image/gif",
        Ok(image::ImageFormat::Tiff) => "image/tiff",
        Ok(image::ImageFormat::Bmp) => "image/bmp",
        Ok(image::ImageFormat::Avif) => "image/avif",
        _ => "application/octet-stream",
    }
}

/// Embeds a signed manifest for `record` into `picture` (the encoded file, metadata included) and
/// returns the new bytes. `photo` is the input photo the picture was made from.
pub fn sign(
    picture: &[u8],
    format: OutputFormat,
    title: &str,
    record: &Provenance,
    photo: &Path,
    creds: &Credentials,
) -> Result<Vec<u8>> {
    let fail = |e: c2pa::Error| Error::Output { path: PathBuf::from(title), msg: format!("C2PA manifest: {e}") };
    let definition = serde_json::json!({
        "title": title,
        "format": mime(format),
        "claim_generator_info": [{"name": "ghiblify", "version": env!("CARGO_PKG_VERSION")}],
    });
    let mut builder =
        c2pa::Builder::from_context(c2pa::Context::new()).with_definition(definition.to_string()).map_err(fail)?;
    // The photo, by hash: its own bytes and a thumbnail of it stay out of the manifest.
    let photo_bytes = std::fs::read(photo).map_err(|e| Error::io(photo, e))?;
    let photo_sha256 = {
        use sha2::Digest;
        format!("{:x}", sha2::Sha256::digest(&photo_bytes))
    };
    let ingredient = serde_json::json!({
        "title": photo.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        "relationship": "parentOf",
        "label": "photo",
        // The ingredient assertion has no field for a plain file hash; its metadata takes
        // namespaced custom fields (the photo is bound by hash without being embedded).
        "metadata": {"org.ghiblify.sha256": photo_sha256},
    });
    builder
        .add_ingredient_from_stream(ingredient.to_string(), photo_mime(&photo_bytes), &mut Cursor::new(photo_bytes))
        .map_err(fail)?;
    builder
        .add_action(serde_json::json!({"action": "c2pa.opened", "parameters": {"ingredientIds": ["photo"]}}))
        .map_err(fail)?;
    let loras: Vec<serde_json::Value> = record
        .loras
        .iter()
        .map(|l| serde_json::json!({"name": l.name, "sha256_10": l.hash, "scale": l.scale}))
        .collect();
    let mut parameters = serde_json::json!({
        "model": record.model.name,
        "model_hash": record.model.hash,
        "model_license": record.model.license.as_deref().unwrap_or("unknown"),
        "vae": record.vae,
        "loras": loras,
    });
    if !record.controlnets.is_empty() {
        parameters["controlnets"] = serde_json::json!(record.controlnets);
    }
    builder
        .add_action(serde_json::json!({
            "action": "c2pa.edited",
            "digitalSourceType": DIGITAL_SOURCE_TYPE,
            "softwareAgent": {"name": "ghiblify", "version": env!("CARGO_PKG_VERSION")},
            "description": "latent-diffusion img2img of the photo",
            "parameters": parameters,
        }))
        .map_err(fail)?;
    let settings = serde_json::json!({
        "software": software(),
        "input_sha256": photo_sha256,
        "prompt": record.prompt,
        "negative_prompt": record.negative_prompt,
        "steps": record.steps,
        "sampler": record.sampler,
        "karras": record.karras,
        "guidance": record.guidance,
        "strength": record.strength,
        "seed": record.seed,
        "width": record.width,
        "height": record.height,
        "precision": record.precision.as_deref().unwrap_or("f32"),
        "parameters": record.parameters(),
    });
    builder.add_assertion_json(SETTINGS_ASSERTION, &settings).map_err(fail)?;
    let signer = creds.signer()?;
    let mut out = Cursor::new(Vec::new());
    builder.sign(signer.as_ref(), mime(format), &mut Cursor::new(picture), &mut out).map_err(fail)?;
    Ok(out.into_inner())
}
