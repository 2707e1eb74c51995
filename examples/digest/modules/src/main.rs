//! The steps of the `source-digest` pipeline (examples/digest/digest.yaml):
//! `digest <stage> [args]` in a kiln `wasm` job. Files come and go through
//! `/scratch`, where kiln places a step's inputs and collects its artifacts;
//! structured results go to stdout as JSON, which later steps read as
//! `steps.<id>.output`.

use std::fmt::Write as _;
use std::fs;

const SCRATCH: &str = "/scratch";
const CORPUS: &str = "/scratch/corpus.tar";
/// Bounds on what intake accepts: a hostile tarball is refused, not unpacked.
const FILES_MAX: usize = 1000;
const FILE_BYTES_MAX: usize = 1 << 20;
const DIMS: usize = 32;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let stage = args.first().map(String::as_str).unwrap_or("");
    let done = match stage {
        "intake" => intake(),
        "classify" => classify(args.get(1).map(String::as_str).unwrap_or("")),
        "graph" => graph(),
        "embed" => embed(),
        "safety" => safety(),
        "register" => register(&args[1..]),
        _ => Err(format!("unknown stage {stage:?}")),
    };
    match done {
        Ok(json) => println!("{json}"),
        Err(error) => {
            eprintln!("{stage}: {error}");
            std::process::exit(1);
        }
    }
}

/// Decodes the tarball (base64 on stdin), checks every entry and keeps it
/// as `corpus.tar`; prints the files for the fan-out.
fn intake() -> Result<String, String> {
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).map_err(|e| e.to_string())?;
    let tar = base64_decode(text.trim())?;
    let files = untar(&tar)?;
    fs::write(CORPUS, &tar).map_err(|e| format!("{CORPUS}: {e}"))?;
    let names: Vec<String> = files.iter().map(|(name, _)| q(name)).collect();
    Ok(format!(
        "{{\"files\":[{}],\"bytes\":{}}}",
        names.join(","),
        files.iter().map(|(_, d)| d.len()).sum::<usize>()
    ))
}

/// One file: its language, size in lines and words, and how many imports.
fn classify(name: &str) -> Result<String, String> {
    let files = corpus()?;
    let (_, data) = files
        .iter()
        .find(|(n, _)| n == name)
        .ok_or_else(|| format!("no file {name:?} in the corpus"))?;
    let text = String::from_utf8_lossy(data);
    let summary = format!(
        "{{\"file\":{},\"language\":{},\"lines\":{},\"words\":{},\"imports\":{}}}",
        q(name),
        q(language(name)),
        text.lines().count(),
        text.split_whitespace().count(),
        imports(name, &text).len()
    );
    fs::write(format!("{SCRATCH}/summary.json"), &summary).map_err(|e| e.to_string())?;
    Ok(summary)
}

/// Which file uses which: Rust `mod`/`use crate::`, Python imports, C
/// `#include "…"`; targets inside the corpus are edges, the rest externals.
fn graph() -> Result<String, String> {
    let files = corpus()?;
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    let mut edges = std::collections::BTreeSet::new();
    let mut externals = std::collections::BTreeSet::new();
    for (name, data) in &files {
        for (path, module) in imports(name, &String::from_utf8_lossy(data)) {
            match names.iter().find(|n| **n == path) {
                Some(found) => edges.insert(format!("[{},{}]", q(name), q(found))),
                None => externals.insert(q(&module)),
            };
        }
    }
    let edges: Vec<String> = edges.into_iter().collect();
    let externals: Vec<String> = externals.into_iter().collect();
    let graph = format!(
        "{{\"nodes\":[{}],\"edges\":[{}],\"externals\":[{}]}}",
        names.iter().map(|n| q(n)).collect::<Vec<_>>().join(","),
        edges.join(","),
        externals.join(",")
    );
    fs::write(format!("{SCRATCH}/graph.json"), &graph).map_err(|e| e.to_string())?;
    Ok(format!(
        "{{\"nodes\":{},\"edges\":{},\"externals\":{}}}",
        names.len(),
        edges.len(),
        externals.len()
    ))
}

/// A vector per file: lower-cased words hashed into 32 buckets (FNV-1a),
/// scaled to unit length. Enough to compare files; no model needed.
fn embed() -> Result<String, String> {
    let files = corpus()?;
    let mut out = String::from("{\"dims\":32,\"vectors\":{");
    for (i, (name, data)) in files.iter().enumerate() {
        let mut v = [0f64; DIMS];
        let text = String::from_utf8_lossy(data).to_lowercase();
        for word in text.split(|c: char| !c.is_ascii_alphanumeric()).filter(|w| !w.is_empty()) {
            let h = word
                .bytes()
                .fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
            v[(h % DIMS as u64) as usize] += 1.0;
        }
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-9);
        let cells: Vec<String> = v.iter().map(|x| format!("{:.4}", x / norm)).collect();
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{}:[{}]", q(name), cells.join(","));
    }
    out.push_str("}}");
    fs::write(format!("{SCRATCH}/embeddings.json"), &out).map_err(|e| e.to_string())?;
    Ok(format!("{{\"files\":{},\"dims\":{DIMS}}}", files.len()))
}

/// Secrets in the corpus: private keys and cloud access keys are critical,
/// passwords written into files are warnings.
fn safety() -> Result<String, String> {
    let files = corpus()?;
    let (mut critical, mut warnings) = (0, 0);
    let mut findings = Vec::new();
    for (name, data) in &files {
        for (n, line) in String::from_utf8_lossy(data).lines().enumerate() {
            let lower = line.to_lowercase();
            let rule = if line.contains("PRIVATE KEY-----") {
                critical += 1;
                "private-key"
            } else if has_access_key(line) {
                critical += 1;
                "access-key"
            } else if lower.contains("password") && (line.contains('=') || line.contains(':')) {
                warnings += 1;
                "password"
            } else {
                continue;
            };
            findings.push(format!(
                "{{\"file\":{},\"line\":{},\"rule\":{}}}",
                q(name),
                n + 1,
                q(rule)
            ));
        }
    }
    Ok(format!(
        "{{\"critical\":{critical},\"warnings\":{warnings},\"findings\":[{}]}}",
        findings.join(",")
    ))
}

/// The digest: every file's summary (from the fanned-out classify step),
/// the graph, the embeddings' size, the safety counts and the corpus
/// fingerprint, tied to the run.
fn register(args: &[String]) -> Result<String, String> {
    let [run, fingerprint, critical, warnings] = args else {
        return Err("register RUN FINGERPRINT CRITICAL WARNINGS".into());
    };
    let mut summaries = Vec::new();
    let mut index = 0;
    while let Ok(text) = fs::read_to_string(format!("{SCRATCH}/classify/{index}/summary.json")) {
        summaries.push(text);
        index += 1;
    }
    let graph = fs::read_to_string(format!("{SCRATCH}/graph.json")).map_err(|e| format!("graph.json: {e}"))?;
    let embeddings = fs::metadata(format!("{SCRATCH}/embeddings.json"))
        .map_err(|e| format!("embeddings.json: {e}"))?
        .len();
    let digest = format!(
        "{{\"run\":{},\"fingerprint\":{},\"safety\":{{\"critical\":{},\"warnings\":{}}},\
         \"files\":[{}],\"graph\":{},\"embeddings\":{{\"dims\":{DIMS},\"bytes\":{embeddings}}}}}",
        q(run),
        q(fingerprint.split_whitespace().next().unwrap_or("")),
        num(critical)?,
        num(warnings)?,
        summaries.join(","),
        graph.trim()
    );
    fs::write(format!("{SCRATCH}/digest.json"), &digest).map_err(|e| e.to_string())?;
    Ok(format!("{{\"files\":{},\"digest_bytes\":{}}}", summaries.len(), digest.len()))
}

fn num(text: &str) -> Result<u64, String> {
    text.trim().parse().map_err(|_| format!("{text:?} is not a count"))
}

fn corpus() -> Result<Vec<(String, Vec<u8>)>, String> {
    untar(&fs::read(CORPUS).map_err(|e| format!("{CORPUS}: {e}"))?)
}

/// Regular files of a ustar archive, each name checked: relative, no `..`,
/// bounded in number and size.
fn untar(tar: &[u8]) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut files = Vec::new();
    let mut at = 0;
    while at + 512 <= tar.len() {
        let header = &tar[at..at + 512];
        if header.iter().all(|b| *b == 0) {
            break;
        }
        let field = |from: usize, len: usize| {
            let raw = &header[from..from + len];
            let end = raw.iter().position(|b| *b == 0).unwrap_or(len);
            String::from_utf8_lossy(&raw[..end]).into_owned()
        };
        let size = usize::from_str_radix(field(124, 12).trim(), 8).map_err(|_| "bad size field")?;
        let (prefix, name) = (field(345, 155), field(0, 100));
        let name = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
        let body = at + 512;
        let end = body.checked_add(size).filter(|e| *e <= tar.len()).ok_or("truncated archive")?;
        if matches!(header[156], b'0' | 0) {
            let name = name.trim_start_matches("./").to_string();
            if name.starts_with('/') || name.split('/').any(|p| p == "..") || name.is_empty() {
                return Err(format!("unsafe path {name:?}"));
            }
            if size > FILE_BYTES_MAX || files.len() == FILES_MAX {
                return Err(format!("{name}: over the limits"));
            }
            files.push((name, tar[body..end].to_vec()));
        }
        at = body + size.div_ceil(512) * 512;
    }
    Ok(files)
}

fn language(name: &str) -> &'static str {
    match name.rsplit('.').next().unwrap_or("") {
        "rs" => "rust",
        "py" => "python",
        "c" | "h" => "c",
        "md" => "markdown",
        "toml" => "toml",
        _ => "text",
    }
}

/// What a file refers to: the corpus path it would be, and the name to
/// show when it is not in the corpus.
fn imports(name: &str, text: &str) -> Vec<(String, String)> {
    let dir = name.rsplit_once('/').map_or("", |(d, _)| d);
    let join = |file: &str| if dir.is_empty() { file.to_string() } else { format!("{dir}/{file}") };
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        let word = |prefix: &str| {
            line.strip_prefix(prefix).map(|rest| {
                rest.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '.'))
                    .next()
                    .unwrap_or("")
                    .to_string()
            })
        };
        match language(name) {
            "rust" => {
                if let Some(m) = word("mod ").filter(|_| line.ends_with(';')) {
                    out.push((join(&format!("{m}.rs")), m));
                } else if let Some(m) = word("use crate::") {
                    out.push((join(&format!("{m}.rs")), m));
                } else if let Some(m) = word("use ") {
                    let krate = m.split("::").next().unwrap_or("").to_string();
                    out.push((krate.clone(), krate));
                }
            }
            "python" => {
                if let Some(m) = word("import ").or_else(|| word("from ")) {
                    out.push((join(&format!("{}.py", m.replace('.', "/"))), m));
                }
            }
            "c" => {
                if let Some(rest) = line.strip_prefix("#include \"") {
                    let header = rest.trim_end_matches('"');
                    out.push((join(header), header.to_string()));
                } else if let Some(rest) = line.strip_prefix("#include <") {
                    let header = rest.trim_end_matches('>').to_string();
                    out.push((header.clone(), header));
                }
            }
            _ => {}
        }
    }
    out.retain(|(path, _)| !path.is_empty());
    out.dedup();
    out
}

fn has_access_key(line: &str) -> bool {
    line.match_indices("AKIA").any(|(i, _)| {
        let rest = &line.as_bytes()[i + 4..];
        rest.len() >= 16 && rest[..16].iter().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
    })
}

/// A JSON string.
fn q(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn base64_decode(text: &str) -> Result<Vec<u8>, String> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=') {
        acc = (acc << 6) | value(c).ok_or("the tarball is not base64")? as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Ok(out)
}
