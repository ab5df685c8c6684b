//! Render `deploy/helm/tollgate` without the `helm` binary, which no
//! registry this project builds from carries (Debian, PyPI, npm, crates.io).
//!
//! The chart is kept to Helm's core: Go templates (rendered by the `gtmpl`
//! crate, a port of Go's text/template) over `.Values`, `.Release` and
//! `.Chart` and `.Files` (read as `index .Files "files/x" | toString`, which
//! needs no method calls), plus the five Helm functions it uses — `toYaml`,
//! `nindent`, `quote`, `default`, `toString` — implemented here with Helm's
//! semantics (toYaml trims the final newline; nindent prefixes a newline). Output is the
//! multi-document YAML `helm template` prints, without its `# Source:`
//! comments. `deploy/manifests/tollgate.yaml` is this output for the default
//! values, so the plain manifests and the chart cannot drift apart.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use gtmpl::{Context, Func, FuncError, Template, Value};

pub fn chart_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/helm/tollgate")
}

pub fn manifests_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/manifests/tollgate.yaml")
}

/// Render the chart at `dir` with its values.yaml merged with `overrides`
/// (YAML, nested keys override one by one), as release `name` in `namespace`.
pub fn render(dir: &Path, name: &str, namespace: &str, overrides: &str) -> Result<String, String> {
    let read =
        |p: PathBuf| std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()));
    let values_text = read(dir.join("values.yaml"))?;
    let values_text = if overrides.trim().is_empty() {
        values_text
    } else {
        crate::node::merge_yaml(&values_text, overrides)
    };
    let values: serde_json::Value =
        serde_yaml::from_str(&values_text).map_err(|e| format!("values.yaml: {e}"))?;
    let chart: serde_yaml::Value = serde_yaml::from_str(&read(dir.join("Chart.yaml"))?)
        .map_err(|e| format!("Chart.yaml: {e}"))?;
    // Helm's `.Files`: every file of the chart outside templates/, by path
    // relative to the chart (only files/ holds any here).
    let mut files = serde_json::Map::new();
    if let Ok(entries) = std::fs::read_dir(dir.join("files")) {
        for e in entries.filter_map(Result::ok) {
            let name = format!("files/{}", e.file_name().to_string_lossy());
            files.insert(name, read(e.path())?.into());
        }
    }
    let ctx = serde_json::json!({
        "Files": files,
        "Values": values,
        "Release": {"Name": name, "Namespace": namespace, "Service": "Helm"},
        "Chart": {
            "Name": chart["name"].as_str(),
            "Version": chart["version"].as_str(),
            "AppVersion": chart["appVersion"].as_str(),
        },
    });
    let mut templates: Vec<PathBuf> = std::fs::read_dir(dir.join("templates"))
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    // Helm's install order for the kinds here, then file name.
    templates.sort_by_key(|p| {
        let n = p.file_name().unwrap().to_string_lossy().into_owned();
        let rank = [
            "serviceaccount",
            "rbac",
            "configmap",
            "ca-bundle",
            "service",
            "daemonset",
        ]
        .iter()
        .position(|k| n.starts_with(k))
        .unwrap_or(99);
        (rank, n)
    });
    let mut out = String::new();
    for path in templates {
        let mut t = Template::default();
        t.add_funcs(&[
            ("toYaml", to_yaml as Func),
            ("nindent", nindent as Func),
            ("quote", quote as Func),
            ("default", default as Func),
            ("toString", to_string as Func),
        ]);
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        t.parse(read(path.clone())?)
            .map_err(|e| format!("{file}: {e}"))?;
        let text = t
            .render(&Context::from(to_value(&ctx)))
            .map_err(|e| format!("{file}: {e}"))?;
        for doc in text.split("\n---\n") {
            let doc = doc.trim_start_matches("---\n");
            if doc
                .lines()
                .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
            {
                continue;
            }
            out.push_str("---\n");
            out.push_str(doc.trim_end());
            out.push('\n');
        }
    }
    Ok(out)
}

fn to_value(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::Nil,
        serde_json::Value::Bool(b) => Value::from(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::from(i),
            None => Value::from(n.as_f64().unwrap_or(0.0)),
        },
        serde_json::Value::String(s) => Value::from(s.as_str()),
        serde_json::Value::Array(a) => Value::Array(a.iter().map(to_value).collect()),
        serde_json::Value::Object(o) => Value::Map(
            o.iter()
                .map(|(k, v)| (k.clone(), to_value(v)))
                .collect::<HashMap<_, _>>(),
        ),
    }
}

fn from_value(v: &Value) -> serde_json::Value {
    match v {
        Value::Nil | Value::NoValue | Value::Function(_) => serde_json::Value::Null,
        Value::Bool(b) => (*b).into(),
        Value::String(s) => s.as_str().into(),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => i.into(),
            (None, Some(f)) => f.into(),
            _ => serde_json::Value::Null,
        },
        Value::Array(a) => a.iter().map(from_value).collect(),
        Value::Map(m) | Value::Object(m) => {
            // Sorted keys, as Helm's toYaml prints them.
            let sorted: std::collections::BTreeMap<_, _> =
                m.iter().map(|(k, v)| (k.clone(), from_value(v))).collect();
            serde_json::Value::Object(sorted.into_iter().collect())
        }
    }
}

fn arg<'a>(args: &'a [Value], i: usize, name: &str) -> Result<&'a Value, FuncError> {
    args.get(i)
        .ok_or_else(|| FuncError::Generic(format!("{name}: missing argument {}", i + 1)))
}

fn to_yaml(args: &[Value]) -> Result<Value, FuncError> {
    let v = from_value(arg(args, 0, "toYaml")?);
    let s = serde_yaml::to_string(&v).map_err(|e| FuncError::Generic(e.to_string()))?;
    Ok(Value::from(s.trim_end_matches('\n')))
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn nindent(args: &[Value]) -> Result<Value, FuncError> {
    let n = match arg(args, 0, "nindent")? {
        Value::Number(n) => n.as_u64().unwrap_or(0) as usize,
        _ => return Err(FuncError::Generic("nindent: width must be a number".into())),
    };
    let pad = " ".repeat(n);
    let body = text(arg(args, 1, "nindent")?);
    let lines: Vec<String> = body.lines().map(|l| format!("{pad}{l}")).collect();
    Ok(Value::from(format!("\n{}", lines.join("\n"))))
}

fn quote(args: &[Value]) -> Result<Value, FuncError> {
    let s = text(arg(args, 0, "quote")?);
    Ok(Value::from(serde_json::Value::from(s).to_string()))
}

fn to_string(args: &[Value]) -> Result<Value, FuncError> {
    Ok(Value::from(text(arg(args, 0, "toString")?)))
}

fn default(args: &[Value]) -> Result<Value, FuncError> {
    let d = arg(args, 0, "default")?;
    match args.get(1) {
        Some(Value::Nil) | Some(Value::NoValue) | None => Ok(d.clone()),
        Some(Value::String(s)) if s.is_empty() => Ok(d.clone()),
        Some(v) => Ok(v.clone()),
    }
}
