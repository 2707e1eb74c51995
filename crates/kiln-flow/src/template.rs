//! Templates in step specs: `${…}` holds an expression of [`crate::expr`]
//! (`${params.x}`, `${steps.scan.output.files[0]}`, `${item}`). A string that
//! is one template and nothing else becomes the expression's value as it
//! is (a number, a list); templates inside text are written into it (strings
//! as they are, other values as JSON). `$${` is a literal `${`.

use serde_json::Value;

use crate::expr::Expr;

/// Most templates in one spec.
pub const TEMPLATES_MAX: usize = 1_000;
/// Largest string a rendered template may make.
pub const RENDERED_TEXT_MAX: usize = 1024 * 1024;

#[derive(Clone, Debug, PartialEq)]
enum Part {
    Text(String),
    Expr(Expr),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Template {
    parts: Vec<Part>,
}

impl Template {
    /// `None` when the text holds no template (only text, perhaps with `$${`).
    pub fn parse(text: &str) -> Result<Option<Template>, String> {
        if !text.contains("${") {
            return Ok(None);
        }
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while let Some(at) = rest.find("${") {
            if at > 0 && rest[..at].ends_with('$') {
                // `$${`: the first `$` escapes the template.
                literal.push_str(&rest[..at - 1]);
                literal.push_str("${");
                rest = &rest[at + 2..];
                continue;
            }
            literal.push_str(&rest[..at]);
            let body = &rest[at + 2..];
            let end = closing_brace(body).ok_or_else(|| {
                format!("unclosed template at byte {}", text.len() - rest.len() + at)
            })?;
            let expr = Expr::parse(body[..end].trim()).map_err(|e| e.to_string())?;
            if !literal.is_empty() {
                parts.push(Part::Text(std::mem::take(&mut literal)));
            }
            parts.push(Part::Expr(expr));
            rest = &body[end + 1..];
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            parts.push(Part::Text(literal));
        }
        if !parts.iter().any(|p| matches!(p, Part::Expr(_))) {
            return Ok(None);
        }
        Ok(Some(Template { parts }))
    }

    /// One template and no text around it: renders to a value of any type.
    pub fn is_whole(&self) -> bool {
        matches!(self.parts.as_slice(), [Part::Expr(_)])
    }

    pub fn exprs(&self) -> impl Iterator<Item = &Expr> {
        self.parts.iter().filter_map(|p| match p {
            Part::Expr(e) => Some(e),
            Part::Text(_) => None,
        })
    }

    pub fn render(&self, context: &Value) -> Result<Value, String> {
        if let [Part::Expr(expr)] = self.parts.as_slice() {
            return expr
                .eval(context)
                .map_err(|e| format!("${{{}}}: {e}", expr.source()));
        }
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Expr(expr) => {
                    let value = expr
                        .eval(context)
                        .map_err(|e| format!("${{{}}}: {e}", expr.source()))?;
                    match value {
                        Value::String(s) => out.push_str(&s),
                        Value::Null => {}
                        other => out.push_str(&other.to_string()),
                    }
                }
            }
            if out.len() > RENDERED_TEXT_MAX {
                return Err(format!(
                    "a rendered template is over {RENDERED_TEXT_MAX} bytes; pass large values as artifacts"
                ));
            }
        }
        Ok(Value::String(out))
    }
}

/// The byte offset of the `}` that closes a template body, skipping braces
/// inside quoted strings and nested maps.
fn closing_brace(body: &str) -> Option<usize> {
    let mut depth = 1usize;
    let mut quote: Option<u8> = None;
    let mut escaped = false;
    for (i, b) in body.bytes().enumerate() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == q {
                quote = None;
            }
            continue;
        }
        match b {
            b'"' | b'\'' => quote = Some(b),
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// Every template in a JSON value, with its path (`.args[0]`). Keys are not
/// templated. An error names the path of the bad template.
pub fn templates_in(value: &Value) -> Result<Vec<(String, Template)>, (String, String)> {
    let mut found = Vec::new();
    walk(value, &mut String::new(), &mut found, 0)?;
    Ok(found)
}

fn walk(
    value: &Value,
    path: &mut String,
    found: &mut Vec<(String, Template)>,
    depth: usize,
) -> Result<(), (String, String)> {
    if depth > 64 {
        return Err((path.clone(), "nested too deeply".into()));
    }
    match value {
        Value::String(text) => {
            if let Some(template) = Template::parse(text).map_err(|e| (path.clone(), e))? {
                if found.len() >= TEMPLATES_MAX {
                    return Err((path.clone(), format!("more than {TEMPLATES_MAX} templates")));
                }
                found.push((path.clone(), template));
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                walk(item, path, found, depth + 1)?;
                path.truncate(len);
            }
        }
        Value::Object(map) => {
            for (key, item) in map {
                let len = path.len();
                path.push('.');
                path.push_str(key);
                walk(item, path, found, depth + 1)?;
                path.truncate(len);
            }
        }
        _ => {}
    }
    Ok(())
}

/// The value with every template rendered against `context`; strings
/// without a template (and `$${` escapes) come out as text.
pub fn render_value(value: &Value, context: &Value) -> Result<Value, String> {
    render_at(value, context, &mut String::new(), 0)
}

fn render_at(
    value: &Value,
    context: &Value,
    path: &mut String,
    depth: usize,
) -> Result<Value, String> {
    if depth > 64 {
        return Err(format!("{path}: nested too deeply"));
    }
    Ok(match value {
        Value::String(text) => match Template::parse(text).map_err(|e| format!("{path}: {e}"))? {
            Some(template) => template
                .render(context)
                .map_err(|e| format!("{path}: {e}"))?,
            None => Value::String(text.replace("$${", "${")),
        },
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                out.push(render_at(item, context, path, depth + 1)?);
                path.truncate(len);
            }
            Value::Array(out)
        }
        Value::Object(map) => {
            let mut out = serde_json::Map::new();
            for (key, item) in map {
                let len = path.len();
                path.push('.');
                path.push_str(key);
                out.insert(key.clone(), render_at(item, context, path, depth + 1)?);
                path.truncate(len);
            }
            Value::Object(out)
        }
        other => other.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn context() -> Value {
        json!({
            "params": {"name": "world", "n": 3, "files": ["a.txt", "b.txt"]},
            "run": {"id": 42},
            "steps": {"scan": {"exit_code": 0, "stdout": "{\"critical\": 0}", "output": {"critical": 0, "tags": ["x"]}}},
            "item": "a.txt",
        })
    }

    fn render(text: &str) -> Value {
        render_value(&json!(text), &context()).unwrap()
    }

    #[test]
    fn whole_templates_keep_their_type_and_text_templates_interpolate() {
        assert_eq!(render("${params.n}"), json!(3));
        assert_eq!(render("${params.files}"), json!(["a.txt", "b.txt"]));
        assert_eq!(render("hello ${params.name}!"), json!("hello world!"));
        assert_eq!(render("run-${run.id}-${params.n}"), json!("run-42-3"));
        assert_eq!(
            render("tags=${steps.scan.output.tags}"),
            json!("tags=[\"x\"]")
        );
        assert_eq!(render("${ {\"a\": \"}\"}.a }"), json!("}"));
        assert_eq!(
            render("cost $${literal} ${params.n}"),
            json!("cost ${literal} 3")
        );
        assert_eq!(render("$${not a template}"), json!("${not a template}"));
        assert_eq!(render("no templates"), json!("no templates"));
        assert_eq!(render("${steps.scan.output.missing}x"), json!("x"));
    }

    #[test]
    fn nested_specs_render_and_list_their_templates() {
        let spec = json!({"args": ["-n", "${params.n}"], "env": {"WHO": "${item}"}, "k": 1});
        assert_eq!(
            render_value(&spec, &context()).unwrap(),
            json!({"args": ["-n", 3], "env": {"WHO": "a.txt"}, "k": 1})
        );
        let paths: Vec<String> = templates_in(&spec)
            .unwrap()
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        assert_eq!(paths, vec![".args[1]", ".env.WHO"]);
    }

    #[test]
    fn bad_templates_name_their_place() {
        let (path, message) = templates_in(&json!({"a": ["${params.}"]})).unwrap_err();
        assert_eq!(path, ".a[0]");
        assert!(!message.is_empty());
        let (_, message) = templates_in(&json!("${params.x")).unwrap_err();
        assert!(message.contains("unclosed"), "{message}");
        assert!(render_value(&json!({"x": "${1 / 0}"}), &context())
            .unwrap_err()
            .starts_with(".x: "));
    }
}
