//! A batch job's input as it is uploaded (`POST /v1/files`,
//! `multipart/form-data`, `purpose=batch`): one JSON request per line, each
//! naming its model in `body.model`. Reading the models lets model rules
//! decide an upload like the calls it will make, instead of refusing every
//! upload because its model cannot be read.
use serde::Serialize;

/// What an uploaded file is, as far as policy and the record care.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BatchInput {
    /// The form's `purpose` (`batch`, `fine-tune`, `assistants`, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    /// The file's name and size as uploaded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
    pub file_bytes: u64,
    /// JSONL lines read, and those with no readable `body.model`.
    pub lines: u64,
    pub lines_without_model: u64,
    /// The distinct models the lines name, in order of appearance (at most
    /// `MAX_MODELS`; more make the upload unreadable for model rules).
    pub models: Vec<String>,
}

/// Distinct models listed; an upload naming more is treated as one whose
/// models cannot be read (model rules then apply `without_model`).
pub const MAX_MODELS: usize = 16;

impl BatchInput {
    /// The models, when every line named one and there are few enough to
    /// decide on: what model rules may judge the upload by.
    pub fn decidable_models(&self) -> Option<&[String]> {
        (self.lines > 0 && self.lines_without_model == 0 && self.models.len() <= MAX_MODELS)
            .then_some(self.models.as_slice())
    }
}

/// Read an upload's form: its `purpose` and its `file` part's JSONL. None
/// when `content_type` is not multipart or the form cannot be read. The
/// body is whole in memory already (bounded by `tls.max_request_body`).
pub async fn read(content_type: &str, body: hyper::body::Bytes) -> Option<BatchInput> {
    let boundary = multer::parse_boundary(content_type).ok()?;
    let stream = futures::stream::once(async move { Ok::<_, std::convert::Infallible>(body) });
    let mut form = multer::Multipart::new(stream, boundary);
    let mut input = BatchInput::default();
    let mut saw_file = false;
    while let Ok(Some(field)) = form.next_field().await {
        match field.name() {
            Some("purpose") => input.purpose = field.text().await.ok(),
            Some("file") => {
                input.filename = field.file_name().map(str::to_owned);
                let data = field.bytes().await.ok()?;
                input.file_bytes = data.len() as u64;
                jsonl_models(&data, &mut input);
                saw_file = true;
            }
            _ => {}
        }
    }
    saw_file.then_some(input)
}

/// Count the lines and collect the distinct `body.model` values.
fn jsonl_models(data: &[u8], input: &mut BatchInput) {
    for line in data.split(|b| *b == b'\n') {
        let line = line.trim_ascii();
        if line.is_empty() {
            continue;
        }
        input.lines += 1;
        let model = serde_json::from_slice::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v["body"]["model"].as_str().map(str::to_owned));
        match model {
            Some(m) => {
                if !input.models.contains(&m) && input.models.len() <= MAX_MODELS {
                    input.models.push(m);
                }
            }
            None => input.lines_without_model += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(file: &str) -> (String, hyper::body::Bytes) {
        let body = format!(
            "--XyZ\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
             --XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\
             Content-Type: application/octet-stream\r\n\r\n{file}\r\n--XyZ--\r\n"
        );
        ("multipart/form-data; boundary=XyZ".into(), body.into())
    }

    fn line(model: &str) -> String {
        format!(
            r#"{{"custom_id":"r","method":"POST","url":"/v1/chat/completions","body":{{"model":"{model}","messages":[]}}}}"#
        )
    }

    #[tokio::test]
    async fn an_upload_names_its_models() {
        let jsonl = [line("gpt-4o-mini"), line("gpt-4o"), line("gpt-4o-mini")].join("\n");
        let (ct, body) = form(&jsonl);
        let got = read(&ct, body).await.unwrap();
        assert_eq!(got.purpose.as_deref(), Some("batch"));
        assert_eq!(got.filename.as_deref(), Some("in.jsonl"));
        assert_eq!(got.file_bytes, jsonl.len() as u64);
        assert_eq!((got.lines, got.lines_without_model), (3, 0));
        assert_eq!(got.models, ["gpt-4o-mini", "gpt-4o"]);
        assert_eq!(got.decidable_models().unwrap(), ["gpt-4o-mini", "gpt-4o"]);
    }

    #[tokio::test]
    async fn what_cannot_be_decided_on_says_so() {
        // A line without a model hides what it will call.
        let (ct, body) = form(&format!(
            "{}\n{{\"custom_id\":\"x\"}}\n",
            line("gpt-4o-mini")
        ));
        let got = read(&ct, body).await.unwrap();
        assert_eq!((got.lines, got.lines_without_model), (2, 1));
        assert!(got.decidable_models().is_none());
        // Too many models to list.
        let many: Vec<String> = (0..=MAX_MODELS).map(|i| line(&format!("m{i}"))).collect();
        let (ct, body) = form(&many.join("\n"));
        assert!(read(&ct, body).await.unwrap().decidable_models().is_none());
        // An empty file, a form without a file, not a form at all.
        let (ct, body) = form("");
        assert!(read(&ct, body).await.unwrap().decidable_models().is_none());
        assert!(
            read("multipart/form-data; boundary=XyZ", "--XyZ--\r\n".into())
                .await
                .is_none()
        );
        assert!(read("application/json", "{}".into()).await.is_none());
        assert!(
            read("multipart/form-data; boundary=XyZ", "garbage".into())
                .await
                .is_none()
        );
    }
}
