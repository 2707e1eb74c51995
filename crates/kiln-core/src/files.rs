//! Files a job hands on: paths a sandbox produces (`outputs`), kept in the
//! blob store under the job once the attempt ends, and files of earlier jobs
//! placed in the sandbox before it starts (`inputs`). Pipelines build their
//! artefacts on this; a plain job may use it as well.
//!
//! Paths are relative (to the VM command's `cwd`, `/` without one, or to a
//! wasm run's `/scratch`) and kept to a plain grammar, so none can climb out
//! of its directory on the host or name something odd in the guest. Blob keys
//! are built from the job's tenant, never from anything a request says about
//! it, so a job can read only its own tenant's files.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Most outputs one job declares.
pub const OUTPUTS_MAX: usize = 64;
/// Most input files one job takes (a fan-in of a 10,000-way fan-out).
pub const INPUTS_MAX: usize = 10_000;
/// Longest path.
pub const PATH_MAX: usize = 1024;

/// Largest single file (what one frame of the guest agent carries).
pub const FILE_BYTES_MAX: u64 = 16 << 20;
/// Most bytes one attempt keeps, and most bytes of inputs it takes.
pub const BYTES_MAX: u64 = 256 << 20;

/// The `outputs` and `inputs` fields of a spec (the `wasm` and `vm` kinds).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobFiles {
    /// Relative paths the sandbox produces, kept when the attempt succeeds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<String>,
    /// Files of earlier jobs placed before the sandbox starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<FileInput>,
}

impl JobFiles {
    pub const FIELDS: [&'static str; 2] = ["outputs", "inputs"];

    pub fn is_empty(&self) -> bool {
        self.outputs.is_empty() && self.inputs.is_empty()
    }

    pub fn check(&self) -> Result<(), InvalidFiles> {
        check(&self.outputs, &self.inputs)
    }
}

/// A file of an earlier job of the same tenant, placed at `to` before the
/// sandbox starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FileInput {
    /// The job that produced it.
    pub job: i64,
    /// The path the job declared among its `outputs`.
    pub path: String,
    /// Where it goes; `path` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
}

impl FileInput {
    pub fn destination(&self) -> &str {
        self.to.as_deref().unwrap_or(&self.path)
    }
}

/// A file a job kept, as its result lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FileRef {
    pub path: String,
    pub size: u64,
    /// `sha256:<hex>` of the content.
    pub digest: String,
}

/// Why a path or a list of them was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidFiles(pub String);

/// Checks one relative path: segments of `[A-Za-z0-9._-]`, none empty,
/// `.` or `..`, no leading or trailing `/`, at most [`PATH_MAX`] bytes.
pub fn check_path(what: &str, path: &str) -> Result<(), InvalidFiles> {
    let bad = path.is_empty()
        || path.len() > PATH_MAX
        || path.starts_with('/')
        || path.ends_with('/')
        || path
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..")
        || !path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'.' | b'_' | b'-'));
    if bad {
        return Err(InvalidFiles(format!(
            "{what} must be a relative path of [A-Za-z0-9._-] segments without '.' or '..' \
             (at most {PATH_MAX} bytes), not {:?}",
            truncate(path, 80)
        )));
    }
    Ok(())
}

fn truncate(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Checks a spec's `outputs` and `inputs`: bounded counts, every path in the
/// grammar, no output named twice, no two inputs at one place.
pub fn check(outputs: &[String], inputs: &[FileInput]) -> Result<(), InvalidFiles> {
    if outputs.len() > OUTPUTS_MAX {
        return Err(InvalidFiles(format!("at most {OUTPUTS_MAX} outputs")));
    }
    if inputs.len() > INPUTS_MAX {
        return Err(InvalidFiles(format!("at most {INPUTS_MAX} inputs")));
    }
    let mut seen = std::collections::BTreeSet::new();
    for path in outputs {
        check_path("each of outputs", path)?;
        if !seen.insert(path.as_str()) {
            return Err(InvalidFiles(format!("output {path:?} is named twice")));
        }
    }
    let mut placed = std::collections::BTreeSet::new();
    for input in inputs {
        check_path("inputs[].path", &input.path)?;
        if let Some(to) = &input.to {
            check_path("inputs[].to", to)?;
        }
        if input.job <= 0 {
            return Err(InvalidFiles("inputs[].job must be a job id".into()));
        }
        if !placed.insert(input.destination()) {
            return Err(InvalidFiles(format!(
                "two inputs go to {:?}",
                input.destination()
            )));
        }
    }
    // A file cannot also be a directory of another input (`a` and `a/b`).
    for dest in &placed {
        let (from, to) = (format!("{dest}/"), format!("{dest}0"));
        if let Some(inner) = placed.range(from.as_str()..to.as_str()).next() {
            return Err(InvalidFiles(format!(
                "input {dest:?} would be the directory of input {inner:?}"
            )));
        }
    }
    Ok(())
}

/// Where a job's kept file lives in the blob store.
pub fn blob_key(tenant: &str, job: i64, path: &str) -> String {
    format!("files/{tenant}/{job}/{path}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_their_directory() {
        for good in ["a", "out/app", "a.b-c_d/e", "0/findings.json"] {
            assert!(check_path("p", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "a/",
            "a//b",
            "./a",
            "a/../b",
            "..",
            "a b",
            "a\0b",
            "ä",
        ] {
            assert!(check_path("p", bad).is_err(), "{bad:?}");
        }
        assert!(check_path("p", &"a".repeat(PATH_MAX + 1)).is_err());
    }

    #[test]
    fn lists_are_bounded_and_without_clashes() {
        let input = |job, path: &str, to: Option<&str>| FileInput {
            job,
            path: path.into(),
            to: to.map(Into::into),
        };
        assert!(check(&["a".into(), "b".into()], &[input(1, "a", None)]).is_ok());
        assert!(check(&["a".into(), "a".into()], &[]).is_err());
        assert!(check(&[], &[input(1, "a", None), input(2, "a", None)]).is_err());
        assert!(check(&[], &[input(1, "a", None), input(2, "a", Some("1/a"))]).is_ok());
        assert!(check(&[], &[input(1, "a", None), input(2, "b", Some("a/b"))]).is_err());
        assert!(check(&[], &[input(1, "a", None), input(2, "b", Some("a-x/b"))]).is_ok());
        assert!(check(&[], &[input(0, "a", None)]).is_err());
        assert!(check(&[], &[input(1, "a", Some("../x"))]).is_err());
        let many: Vec<String> = (0..=OUTPUTS_MAX).map(|i| format!("f{i}")).collect();
        assert!(check(&many, &[]).is_err());
    }

    #[test]
    fn keys_lead_with_the_tenant() {
        assert_eq!(blob_key("acme", 7, "out/app"), "files/acme/7/out/app");
    }
}
