//! Token ids against transformers' CLIPTokenizer on a prompt suite (unicode, punctuation,
//! special-token text, over-long prompts), for a vocab.json + merges.txt folder (SD1) and a
//! tokenizer.json folder with pad token "!" (SD2).

use crate::common::fixtures;
use ghiblify::models::tokenizer::ClipTokenizer;

fn check(model: &str) {
    let text = std::fs::read_to_string(fixtures().join("tokenizer_ids.json")).unwrap();
    let all: serde_json::Value = serde_json::from_str(&text).unwrap();
    let tok = ClipTokenizer::load(&fixtures().join(format!("tiny-{model}")).join("tokenizer"), 77).unwrap();
    let cases = all[model].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(tok.encode(prompt).unwrap(), want, "{model}: prompt {prompt:?}");
    }
}

#[test]
fn sd1_vocab_and_merges_match_transformers() {
    check("sd1");
}

#[test]
fn sd2_tokenizer_json_with_pad_bang_matches_transformers() {
    check("sd2");
}

#[test]
fn long_prompts_are_cut_at_77_with_eos() {
    let tok = ClipTokenizer::load(&fixtures().join("tiny-sd1").join("tokenizer"), 77).unwrap();
    let ids = tok.encode(&"castle ".repeat(200)).unwrap();
    assert_eq!(ids.len(), 77);
    assert_eq!(ids[0], tok.bos);
    assert_eq!(ids[76], tok.eos);
    assert!(tok.overflow(&"castle ".repeat(200)) > 100);
}
