//! The model a request names, for route rules that match on it (like
//! Envoy AI Gateway's model header, but read from the request itself): the
//! `{name}` of a KServe v2 / Open Inference Protocol path, else the
//! `model` field of an OpenAI-style JSON body.
//!
//! Reading the body is a bounded peek: at most [`PEEK_BYTES`], done only
//! when a listener has model matches and the path names no model. The
//! frames read are handed on unchanged, ahead of the rest of the body, so
//! the upstream sees exactly what the client sent.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::BytesMut;
use http::Request;
use http::header::CONTENT_TYPE;
use http_body_util::BodyExt;

use crate::core::body::{ProxyBody, prepend};
use crate::core::context::BodyModel;

/// The most of a request body read to find its model. A body that is not
/// whole within it names no model (its rules with model matches do not
/// match; others still may).
pub(crate) const PEEK_BYTES: usize = 64 * 1024;

/// The model `request` names, by its path or by its body (if
/// [`read_body_model`] read it).
pub(crate) fn of<B>(request: &Request<B>) -> Option<&str> {
    from_path(request.uri().path()).or_else(|| {
        request
            .extensions()
            .get::<BodyModel>()
            .and_then(|m| m.0.as_deref())
    })
}

/// The `{name}` of a KServe v2 path: `/v2/models/{name}` and below.
pub(crate) fn from_path(path: &str) -> Option<&str> {
    let name = path.strip_prefix("/v2/models/")?.split('/').next()?;
    (!name.is_empty()).then_some(name)
}

/// Whether the model of `request` may be in its body: no model in the
/// path, a body to read, and JSON (or no content type at all).
pub(crate) fn may_be_in_body<B: http_body::Body>(request: &Request<B>) -> bool {
    let json = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v.to_ascii_lowercase().contains("json"));
    json && !request.body().is_end_stream() && from_path(request.uri().path()).is_none()
}

/// Reads up to [`PEEK_BYTES`] of the body to find its `model` field, and
/// notes it in the request's extensions ([`BodyModel`]). The body goes on
/// with every frame read, in order, then the rest.
pub(crate) async fn read_body_model(request: Request<ProxyBody>) -> Request<ProxyBody> {
    let (mut parts, mut body) = request.into_parts();
    let mut read = VecDeque::new();
    let mut data = BytesMut::new();
    let mut whole = false;
    while data.len() <= PEEK_BYTES {
        match body.frame().await {
            None => {
                whole = true;
                break;
            }
            Some(Ok(frame)) => {
                if let Some(chunk) = frame.data_ref() {
                    data.extend_from_slice(chunk);
                }
                read.push_back(Ok(frame));
            }
            Some(Err(error)) => {
                // The error goes on to the upstream exchange, which fails
                // with it as it would have.
                read.push_back(Err(error));
                break;
            }
        }
    }
    let model = whole
        .then(|| BodyFields::of(&data).model.map(Arc::from))
        .flatten();
    parts.extensions.insert(BodyModel(model));
    Request::from_parts(parts, prepend(read, body))
}

/// The top-level fields of a JSON request body that the proxy looks at
/// (OpenAI-compatible APIs): none for a body that is not a JSON object.
#[derive(Debug, Default, serde::Deserialize)]
pub struct BodyFields {
    /// The model the body names, when it is a string.
    #[serde(default, deserialize_with = "string_or_none")]
    pub model: Option<String>,
    /// Whether the body asks for a streamed answer (`"stream": true`).
    #[serde(default, deserialize_with = "true_or_false")]
    pub stream: bool,
}

impl BodyFields {
    /// The fields of `body`.
    pub fn of(body: &[u8]) -> Self {
        // Only an object has fields (serde would fill them from an array).
        let object = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
        if !object {
            return BodyFields::default();
        }
        serde_json::from_slice(body).unwrap_or_default()
    }
}

fn string_or_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let value: serde_json::Value = serde::Deserialize::deserialize(d)?;
    Ok(match value {
        serde_json::Value::String(s) => Some(s),
        _ => None,
    })
}

fn true_or_false<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    let value: serde_json::Value = serde::Deserialize::deserialize(d)?;
    Ok(value == serde_json::Value::Bool(true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::body::{boxed, full};
    use bytes::Bytes;

    #[test]
    fn kserve_paths_name_their_model() {
        assert_eq!(from_path("/v2/models/resnet/infer"), Some("resnet"));
        assert_eq!(
            from_path("/v2/models/resnet/versions/2/infer"),
            Some("resnet")
        );
        assert_eq!(from_path("/v2/models/resnet"), Some("resnet"));
        assert_eq!(from_path("/v2/models/"), None);
        assert_eq!(from_path("/v1/chat/completions"), None);
    }

    #[tokio::test]
    async fn the_body_names_its_model_and_goes_on_unchanged() {
        let text =
            r#"{"messages":[{"role":"user","content":"hi"}],"model":"llama-3-8b","stream":true}"#;
        let request = Request::post("/v1/chat/completions")
            .header(CONTENT_TYPE, "application/json")
            .body(full(text))
            .unwrap();
        assert!(may_be_in_body(&request));
        let request = read_body_model(request).await;
        assert_eq!(of(&request), Some("llama-3-8b"));
        let body = request.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, text);
    }

    #[tokio::test]
    async fn a_body_too_large_or_not_json_names_no_model_and_loses_nothing() {
        let large = format!(
            r#"{{"model":"m","input":"{}"}}"#,
            "x".repeat(PEEK_BYTES + 10)
        );
        let chunks: Vec<Result<_, std::convert::Infallible>> = large
            .as_bytes()
            .chunks(4096)
            .map(|c| Ok(http_body::Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        let body = boxed(http_body_util::StreamBody::new(futures_util::stream::iter(
            chunks,
        )));
        let request = read_body_model(Request::post("/v1/embeddings").body(body).unwrap()).await;
        assert_eq!(of(&request), None);
        let body = request.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body.len(), large.len());

        let request = read_body_model(Request::post("/x").body(full("model=m")).unwrap()).await;
        assert_eq!(of(&request), None);
        // An array is not an object with a model field, though serde
        // would read one from it; nor is a model that is not a string.
        for body in [r#"["m"]"#, r#"{"model":7}"#] {
            let request = read_body_model(Request::post("/x").body(full(body)).unwrap()).await;
            assert_eq!(of(&request), None, "{body}");
        }
        let request = Request::post("/x")
            .header(CONTENT_TYPE, "text/plain")
            .body(full("{}"))
            .unwrap();
        assert!(!may_be_in_body(&request));
    }
}
