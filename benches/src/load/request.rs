//! What the load generator sends: method, headers and body, from flags, a
//! request file, or a built-in template for the APIs models speak.

use std::path::Path;

use anyhow::Context as _;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, header};
use serde::Deserialize;

/// The request every worker sends, over and over.
#[derive(Clone, Debug)]
pub struct RequestTemplate {
    /// The method.
    pub method: Method,
    /// Headers besides `host`.
    pub headers: HeaderMap,
    /// The body (empty for none).
    pub body: Bytes,
}

impl Default for RequestTemplate {
    fn default() -> Self {
        RequestTemplate {
            method: Method::GET,
            headers: HeaderMap::new(),
            body: Bytes::new(),
        }
    }
}

/// Built-in request bodies for the APIs model servers speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Template {
    /// OpenAI `POST /v1/chat/completions`, whole answer.
    OpenaiChat,
    /// OpenAI chat completion with `stream: true` (server-sent events).
    OpenaiChatStream,
    /// OpenAI `POST /v1/completions`.
    OpenaiCompletions,
    /// OpenAI `POST /v1/embeddings`.
    OpenaiEmbeddings,
    /// KServe v2 `POST /v2/models/{model}/infer` with a small FP32 tensor.
    KserveV2,
}

impl Template {
    /// The path this template is sent to.
    pub fn path(self, model: &str) -> String {
        match self {
            Template::OpenaiChat | Template::OpenaiChatStream => "/v1/chat/completions".into(),
            Template::OpenaiCompletions => "/v1/completions".into(),
            Template::OpenaiEmbeddings => "/v1/embeddings".into(),
            Template::KserveV2 => format!("/v2/models/{model}/infer"),
        }
    }

    /// The request, for `model`.
    pub fn request(self, model: &str) -> RequestTemplate {
        let body = match self {
            Template::OpenaiChat | Template::OpenaiChatStream => serde_json::json!({
                "model": model,
                "messages": [{ "role": "user", "content": "Say hello to the mesh." }],
                "max_tokens": 16,
                "stream": self == Template::OpenaiChatStream,
            }),
            Template::OpenaiCompletions => {
                serde_json::json!({ "model": model, "prompt": "Say hello to the mesh.", "max_tokens": 16 })
            }
            Template::OpenaiEmbeddings => {
                serde_json::json!({ "model": model, "input": "Say hello to the mesh." })
            }
            Template::KserveV2 => serde_json::json!({
                "inputs": [{ "name": "input", "shape": [1, 4], "datatype": "FP32", "data": [0.1, 0.2, 0.3, 0.4] }],
            }),
        };
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if self == Template::OpenaiChatStream {
            headers.insert(
                header::ACCEPT,
                HeaderValue::from_static("text/event-stream"),
            );
        }
        RequestTemplate {
            method: Method::POST,
            headers,
            body: Bytes::from(serde_json::to_vec(&body).expect("JSON")),
        }
    }
}

/// A request file: YAML or JSON.
///
/// ```yaml
/// method: POST
/// headers: { content-type: application/json, authorization: Bearer x }
/// body: { model: llama, prompt: hi }   # or a string, sent as is
/// ```
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestFile {
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    body: Option<serde_json::Value>,
}

impl RequestTemplate {
    /// Reads a request file.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let file: RequestFile =
            serde_saphyr::from_str(&text).with_context(|| format!("{}", path.display()))?;
        let method = match &file.method {
            Some(m) => Method::from_bytes(m.as_bytes())
                .with_context(|| format!("{}: invalid method {m:?}", path.display()))?,
            // A body without a method is a POST, as with curl -d.
            None if file.body.is_some() => Method::POST,
            None => Method::GET,
        };
        let mut template = RequestTemplate {
            method,
            ..RequestTemplate::default()
        };
        for (name, value) in &file.headers {
            template.add_header(&format!("{name}: {value}"))?;
        }
        template.body = match file.body {
            None => Bytes::new(),
            Some(serde_json::Value::String(s)) => Bytes::from(s),
            Some(value) => {
                if !template.headers.contains_key(header::CONTENT_TYPE) {
                    template.headers.insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                }
                Bytes::from(serde_json::to_vec(&value)?)
            }
        };
        Ok(template)
    }

    /// Adds a `name: value` header, as `curl -H` takes it.
    pub fn add_header(&mut self, line: &str) -> anyhow::Result<()> {
        let (name, value) = line
            .split_once(':')
            .with_context(|| format!("header {line:?} is not `name: value`"))?;
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .with_context(|| format!("invalid header name in {line:?}"))?;
        let value = HeaderValue::from_str(value.trim())
            .with_context(|| format!("invalid header value in {line:?}"))?;
        self.headers.append(name, value);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_files_take_json_bodies_and_headers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("req.yaml");
        std::fs::write(
            &path,
            "headers: { authorization: Bearer t }\nbody: { model: llama, prompt: hi }\n",
        )
        .unwrap();
        let t = RequestTemplate::from_file(&path).unwrap();
        assert_eq!(t.method, Method::POST, "a body without a method means POST");
        assert_eq!(t.headers["authorization"], "Bearer t");
        assert_eq!(t.headers["content-type"], "application/json");
        let body: serde_json::Value = serde_json::from_slice(&t.body).unwrap();
        assert_eq!(body["model"], "llama");
    }

    #[test]
    fn templates_name_the_model() {
        let t = Template::OpenaiChatStream.request("m");
        let body: serde_json::Value = serde_json::from_slice(&t.body).unwrap();
        assert_eq!(
            (body["model"].as_str(), body["stream"].as_bool()),
            (Some("m"), Some(true))
        );
        assert_eq!(Template::KserveV2.path("resnet"), "/v2/models/resnet/infer");
    }
}
