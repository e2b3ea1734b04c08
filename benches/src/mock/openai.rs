//! OpenAI-compatible endpoints of the mock: the model list, chat and text
//! completions, whole or streamed as server-sent events ending with
//! `data: [DONE]`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};

use super::{MockBody, MockOptions, Paced};

/// Which completion API a request came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Api {
    Chat,
    Completions,
}

pub(super) fn models(options: &MockOptions) -> Response<MockBody> {
    let data: Vec<Value> = options
        .models
        .iter()
        .map(|m| json!({ "id": m, "object": "model", "created": 0, "owned_by": "infermesh-bench" }))
        .collect();
    super::json(StatusCode::OK, &json!({ "object": "list", "data": data }))
}

fn error(status: StatusCode, message: String, kind: &str) -> Response<MockBody> {
    super::json(
        status,
        &json!({ "error": { "message": message, "type": kind, "code": null } }),
    )
}

pub(super) async fn generate(options: &MockOptions, body: &[u8], api: Api) -> Response<MockBody> {
    let request: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("invalid JSON body: {e}"),
                "invalid_request_error",
            );
        }
    };
    let Some(model) = request["model"].as_str() else {
        return error(
            StatusCode::BAD_REQUEST,
            "`model` is required".into(),
            "invalid_request_error",
        );
    };
    if !options.models.iter().any(|m| m == model) {
        return error(
            StatusCode::NOT_FOUND,
            format!("The model `{model}` does not exist."),
            "invalid_request_error",
        );
    }
    let tokens = request["max_tokens"]
        .as_u64()
        .map_or(options.tokens, |max| options.tokens.min(max as usize));
    let words: Vec<String> = (0..tokens).map(|i| format!("token{i} ")).collect();
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let id = format!(
        "{}-mock-{created}",
        if api == Api::Chat { "chatcmpl" } else { "cmpl" }
    );
    let prompt_tokens = body.len() / 4;

    if request["stream"].as_bool() == Some(true) {
        let mut chunks: Vec<Bytes> = words
            .iter()
            .enumerate()
            .map(|(i, word)| sse(&chunk(api, &id, created, model, Some(word), i == 0, None)))
            .collect();
        chunks.push(sse(&chunk(
            api,
            &id,
            created,
            model,
            None,
            false,
            Some("stop"),
        )));
        chunks.push(Bytes::from_static(b"data: [DONE]\n\n"));
        let body = Paced::new(chunks, options.latency, options.token_interval).boxed_unsync();
        let mut response = Response::new(body);
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("no-cache"),
        );
        return response;
    }

    let generation = options.latency + options.token_interval.saturating_mul(tokens as u32);
    if generation > Duration::ZERO {
        tokio::time::sleep(generation).await;
    }
    let text: String = words.concat();
    let choice = match api {
        Api::Chat => {
            json!({ "index": 0, "message": { "role": "assistant", "content": text }, "finish_reason": "stop" })
        }
        Api::Completions => json!({ "index": 0, "text": text, "finish_reason": "stop" }),
    };
    super::json(
        StatusCode::OK,
        &json!({
            "id": id,
            "object": if api == Api::Chat { "chat.completion" } else { "text_completion" },
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": { "prompt_tokens": prompt_tokens, "completion_tokens": tokens, "total_tokens": prompt_tokens + tokens },
        }),
    )
}

fn chunk(
    api: Api,
    id: &str,
    created: u64,
    model: &str,
    word: Option<&str>,
    first: bool,
    finish: Option<&str>,
) -> Value {
    let choice = match api {
        Api::Chat => {
            let mut delta = serde_json::Map::new();
            if first {
                delta.insert("role".into(), "assistant".into());
            }
            if let Some(word) = word {
                delta.insert("content".into(), word.into());
            }
            json!({ "index": 0, "delta": delta, "finish_reason": finish })
        }
        Api::Completions => {
            json!({ "index": 0, "text": word.unwrap_or(""), "finish_reason": finish })
        }
    };
    json!({
        "id": id,
        "object": if api == Api::Chat { "chat.completion.chunk" } else { "text_completion" },
        "created": created,
        "model": model,
        "choices": [choice],
    })
}

fn sse(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}
