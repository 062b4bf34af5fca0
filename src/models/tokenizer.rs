//! The CLIP BPE tokenizer as transformers' `CLIPTokenizer` (5.x, tokenizers backend) builds it in
//! `models/clip/tokenization_clip.py`: NFC, whitespace runs → " ", lowercase; CLIP's split regex;
//! byte-level BPE with the `</w>` end-of-word suffix; bos/eos around at most `model_max_length - 2`
//! tokens, padded with the pad token (SD1: `<|endoftext|>`, SD2: `!` = id 0).
//!
//! A folder with `tokenizer.json` is loaded as is; one with only `vocab.json` + `merges.txt`
//! (what real SD repos ship) gets the same pipeline assembled here.

use crate::error::{Error, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::str::FromStr;

const CLIP_SPLIT: &str = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

#[derive(Debug)]
pub struct ClipTokenizer {
    inner: tokenizers::Tokenizer,
    dir: PathBuf,
    pub max_length: usize,
    pub bos: u32,
    pub eos: u32,
    pub pad: u32,
}

/// A token name in tokenizer_config.json: a plain string or an AddedToken object.
fn token_name(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

fn read_json_opt(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map(Some).map_err(|e| Error::config(path, format!("malformed JSON: {e}")))
}

impl ClipTokenizer {
    /// Loads `dir` (a model's `tokenizer/` folder). `fallback_max_length` is the text encoder's
    /// `max_position_embeddings`, used when the folder does not state `model_max_length`.
    pub fn load(dir: &Path, fallback_max_length: usize) -> Result<Self> {
        let err = |msg: String| Error::Tokenizer { path: dir.to_path_buf(), msg };
        let cfg = read_json_opt(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let special = read_json_opt(&dir.join("special_tokens_map.json"))?.unwrap_or(Value::Null);
        let name = |key: &str, default: &str| {
            token_name(cfg.get(key)).or_else(|| token_name(special.get(key))).unwrap_or_else(|| default.to_string())
        };
        let bos_t = name("bos_token", "<|startoftext|>");
        let eos_t = name("eos_token", "<|endoftext|>");
        let unk_t = name("unk_token", "<|endoftext|>");
        let pad_t = name("pad_token", "<|endoftext|>");

        let json_path = dir.join("tokenizer.json");
        let mut inner = if json_path.is_file() {
            tokenizers::Tokenizer::from_file(&json_path).map_err(|e| err(format!("tokenizer.json: {e}")))?
        } else {
            let vocab_path = dir.join("vocab.json");
            let merges_path = dir.join("merges.txt");
            if !vocab_path.is_file() || !merges_path.is_file() {
                return Err(err("needs tokenizer.json, or vocab.json and merges.txt".into()));
            }
            let vocab: Value = read_json_opt(&vocab_path)?.unwrap_or(Value::Null);
            let vocab_map = vocab.as_object().ok_or_else(|| err("vocab.json is not a JSON object".into()))?;
            let merges_text = std::fs::read_to_string(&merges_path).map_err(|e| Error::io(&merges_path, e))?;
            let merges: Vec<Value> = merges_text
                .lines()
                .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
                .map(|l| {
                    let mut it = l.split(' ');
                    match (it.next(), it.next(), it.next()) {
                        (Some(a), Some(b), None) => Ok(json!([a, b])),
                        _ => Err(err(format!("merges.txt: malformed line {l:?}"))),
                    }
                })
                .collect::<Result<_>>()?;
            let id = |t: &str| {
                vocab_map.get(t).and_then(|v| v.as_u64()).ok_or_else(|| err(format!("vocab.json lacks {t:?}")))
            };
            // transformers registers bos/eos/unk/pad as special added tokens, matched on the raw text.
            let mut added: Vec<(u64, String)> = Vec::new();
            for t in [&pad_t, &bos_t, &eos_t, &unk_t] {
                let i = id(t)?;
                if !added.iter().any(|(j, _)| *j == i) {
                    added.push((i, t.clone()));
                }
            }
            added.sort();
            let added: Vec<Value> = added
                .into_iter()
                .map(|(i, t)| json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
                .collect();
            let spec = json!({
                "version": "1.0",
                "truncation": null,
                "padding": null,
                "added_tokens": added,
                "normalizer": {"type": "Sequence", "normalizers": [
                    {"type": "NFC"},
                    {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
                    {"type": "Lowercase"}]},
                "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": CLIP_SPLIT}, "behavior": "Removed", "invert": true},
                    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
                "post_processor": {"type": "RobertaProcessing", "sep": [eos_t, id(&eos_t)?], "cls": [bos_t, id(&bos_t)?],
                                   "trim_offsets": false, "add_prefix_space": false},
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {"type": "BPE", "dropout": null, "unk_token": unk_t, "continuing_subword_prefix": "",
                          "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false,
                          "ignore_merges": false, "vocab": vocab, "merges": merges}
            });
            tokenizers::Tokenizer::from_str(&spec.to_string())
                .map_err(|e| err(format!("vocab.json/merges.txt: {e}")))?
        };
        // Padding and truncation are ours (below), whatever tokenizer.json says.
        inner.with_truncation(None).map_err(|e| err(e.to_string()))?;
        inner.with_padding(None);

        let lookup = |t: &str| inner.token_to_id(t).ok_or_else(|| err(format!("token {t:?} is not in the vocabulary")));
        let (bos, eos, pad) = (lookup(&bos_t)?, lookup(&eos_t)?, lookup(&pad_t)?);
        let max_length = cfg
            .get("model_max_length")
            .and_then(|v| v.as_f64())
            .filter(|&m| m >= 2.0 && m <= fallback_max_length as f64)
            .map(|m| m as usize)
            .unwrap_or(fallback_max_length);
        Ok(Self { inner, dir: dir.to_path_buf(), max_length, bos, eos, pad })
    }

    /// Ids as diffusers' `encode_prompt` gets them: `padding="max_length"`, `truncation=True`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer { path: self.dir.clone(), msg: e.to_string() })?;
        let body = enc.get_ids();
        let keep = body.len().min(self.max_length - 2);
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos);
        ids.extend_from_slice(&body[..keep]);
        ids.push(self.eos);
        ids.resize(self.max_length, self.pad);
        Ok(ids)
    }

    /// How many prompt tokens were cut (for a warning, as diffusers logs one).
    pub fn overflow(&self, text: &str) -> usize {
        self.inner.encode(text, false).map(|e| e.get_ids().len().saturating_sub(self.max_length - 2)).unwrap_or(0)
    }
}
