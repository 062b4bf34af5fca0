//! Names that come from users and servers and become paths in the cache: repo ids, revisions,
//! commit ids, ETags (blob names) and file paths inside a repo. Every such string passes one of
//! these checks before it touches the file system, so neither a mirror (`HF_ENDPOINT` may point
//! anywhere) nor a typo can reach outside the cache.
//!
//! The rules are the hub's own: huggingface_hub's `validate_repo_id` for repo ids, git's
//! `check-ref-format` for revisions, 40 hex digits for commits, and 64 (sha256, LFS) or 40 (git
//! blob sha1) hex digits for ETags.

/// A hub repo and an optional revision: `owner/name[@revision]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoRef {
    pub id: String,
    pub revision: Option<String>,
}

impl RepoRef {
    /// Parses `owner/name[@revision]`; the message says what is wrong.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (id, revision) = match s.split_once('@') {
            Some((_, "")) => return Err("empty revision after '@'".into()),
            Some((id, rev)) => (id, Some(rev.to_string())),
            None => (s, None),
        };
        check_repo_id(id)?;
        if let Some(r) = &revision {
            check_revision(r)?;
        }
        Ok(Self { id: id.to_string(), revision })
    }

    /// Whether `s` has the shape of a repo id (`owner/name`, nothing else), before validation.
    pub fn looks_like(s: &str) -> bool {
        let id = s.split_once('@').map_or(s, |(id, _)| id);
        id.split('/').count() == 2 && !id.split('/').any(str::is_empty)
    }

    /// The revision to ask for: the pinned one or `main`.
    pub fn rev(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
    }
}

impl std::fmt::Display for RepoRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.revision {
            Some(r) => write!(f, "{}@{r}", self.id),
            None => f.write_str(&self.id),
        }
    }
}

/// `owner/name` as the hub accepts it: each part 1–96 characters of ASCII letters, digits, `-`,
/// `_`, `.`, not starting or ending with `-` or `.`, without `--` or `..`.
pub fn check_repo_id(id: &str) -> Result<(), String> {
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && !p.starts_with(['-', '.'])
            && !p.ends_with(['-', '.'])
            && !p.contains("--")
            && !p.contains("..")
    };
    match id.split_once('/') {
        Some((owner, name)) if part_ok(owner) && part_ok(name) => Ok(()),
        _ => Err(format!("'{id}' is not a hub repo id (owner/name: letters, digits, '-', '_', '.')")),
    }
}

/// A branch, tag, `refs/pr/N` or commit, as git accepts ref names (`git check-ref-format`): no
/// `..`, no empty or dot-leading segments, no control characters or `~^:?*[\`, no `@{`, no
/// `.lock` ending; at most 256 bytes. It becomes `refs/<revision>` in the cache.
pub fn check_revision(rev: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("revision '{}' {why}", rev.escape_debug()));
    if rev.is_empty() || rev.len() > 256 {
        return bad("must be 1 to 256 characters");
    }
    if rev.bytes().any(|b| b.is_ascii_control() || b" ~^:?*[\\".contains(&b)) || rev.contains("@{") || rev == "@" {
        return bad("has a character git does not allow in a ref name");
    }
    if rev.split('/').any(|seg| seg.is_empty() || seg.starts_with('.') || seg.ends_with(".lock")) || rev.contains("..")
    {
        return bad("is not a valid git ref name");
    }
    Ok(())
}

/// A commit id: 40 lower-case hex digits (what the hub's `X-Repo-Commit` carries).
pub fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A server's commit id, checked before it names a snapshot folder.
pub fn check_commit(s: &str) -> Result<(), String> {
    if is_commit(s) {
        Ok(())
    } else {
        Err(format!("commit id '{}' is not 40 hex digits", s.escape_debug()))
    }
}

/// An ETag that names a blob: the sha256 of an LFS file (64 hex digits) or the git blob sha1 of a
/// small one (40 hex digits).
pub fn check_etag(s: &str) -> Result<(), String> {
    let hex = s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if hex && (s.len() == 64 || s.len() == 40) {
        Ok(())
    } else {
        Err(format!("ETag '{}' is not a sha256 (64 hex digits) or a git sha1 (40)", s.escape_debug()))
    }
}

/// A file path inside a repo: relative, '/'-separated, normalised (no empty, `.` or `..`
/// segments), no backslashes or control characters, at most 1024 bytes.
pub fn check_file_path(p: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("file path '{}' {why}", p.escape_debug()));
    if p.is_empty() || p.len() > 1024 {
        return bad("must be 1 to 1024 characters");
    }
    if p.bytes().any(|b| b.is_ascii_control() || b == b'\\') {
        return bad("has a control character or a backslash");
    }
    if p.starts_with('/') || p.split('/').any(|seg| seg.is_empty() || seg == "." || seg == "..") {
        return bad("is not a relative, normalised path");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_follow_the_hub_rules() {
        for ok in ["nitrosocke/Ghibli-Diffusion", "a/b", "stable-diffusion-v1-5/stable-diffusion-v1-5", "x_y/z.1"] {
            assert!(check_repo_id(ok).is_ok(), "{ok}");
        }
        for bad in ["a", "a/b/c", "../b", "a/..", "a/.b", "a/b-", "a--b/c", "a/b..c", "/b", "a/", "a b/c", "a/b\0"] {
            assert!(check_repo_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn revisions_follow_git_ref_rules() {
        for ok in ["main", "v1.0", "refs/pr/9", "7600fd7538c9030fb60fa7bca17bf048c86466b3"] {
            assert!(check_revision(ok).is_ok(), "{ok}");
        }
        for bad in ["", "../../x", "a/../b", "/abs", "a//b", "a/", ".hidden", "x.lock", "a b", "a\nb", "a@{1}", "a:b"] {
            assert!(check_revision(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn commits_etags_and_paths() {
        assert!(check_commit("7600fd7538c9030fb60fa7bca17bf048c86466b3").is_ok());
        assert!(check_commit("../../../../tmp").is_err());
        assert!(check_commit("7600FD7538C9030FB60FA7BCA17BF048C86466B3").is_err());
        assert!(check_etag(&"a".repeat(64)).is_ok());
        assert!(check_etag(&"0".repeat(40)).is_ok());
        for bad in ["../../x", "abc", &"g".repeat(64), &"a".repeat(63)] {
            assert!(check_etag(bad).is_err(), "{bad}");
        }
        for ok in ["unet/config.json", "a/b/c.safetensors", "README.md"] {
            assert!(check_file_path(ok).is_ok(), "{ok}");
        }
        for bad in ["", "/etc/passwd", "tokenizer/../../x", "a//b", "./a", "a/.", "a\\b", "a\nb"] {
            assert!(check_file_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn repo_refs_parse_with_revisions() {
        let r = RepoRef::parse("a/b@refs/pr/1").unwrap();
        assert_eq!((r.id.as_str(), r.rev()), ("a/b", "refs/pr/1"));
        assert_eq!(RepoRef::parse("a/b").unwrap().rev(), "main");
        assert!(RepoRef::parse("a/b@").is_err());
        assert!(RepoRef::parse("a/b@../../x").is_err());
    }
}
