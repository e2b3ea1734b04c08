//! OpenAI-compatible endpoints of the mock: the model list, chat and text
//! completions (whole, or streamed as server-sent events ending with
//! `data: [DONE]`), and embeddings.
//!
//! Completions carry OpenAI's `usage` as OpenAI sends it: in a whole
//! answer, and in a stream only when the request asks with
//! `"stream_options": {"include_usage": true}` — then every chunk has
//! `"usage": null` and one last chunk before `[DONE]` has no choices and
//! the counts. The counts of one request are the same either way: the
//! prompt's tokens are a quarter of its text's bytes (at least one), the
//! completion's are its words.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};

use super::{Abort, MockBody, Model, Paced, ServerState};

/// Which completion API a request came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Api {
    Chat,
    Completions,
}

pub(super) fn models(models: &[Arc<Model>]) -> Response<MockBody> {
    let data: Vec<Value> = models
        .iter()
        .map(|m| json!({ "id": m.spec.name, "object": "model", "created": 0, "owned_by": "infermesh-bench" }))
        .collect();
    super::json(StatusCode::OK, &json!({ "object": "list", "data": data }))
}

fn error(status: StatusCode, message: String, kind: &str) -> Response<MockBody> {
    super::json(
        status,
        &json!({ "error": { "message": message, "type": kind, "param": null, "code": null } }),
    )
}

/// The request's JSON and model, or the error answer.
fn parse<'a>(
    state: &'a ServerState,
    body: &[u8],
) -> Result<(Value, &'a Arc<Model>), Box<Response<MockBody>>> {
    let invalid =
        |status, message: String| Box::new(error(status, message, "invalid_request_error"));
    let request: Value = serde_json::from_slice(body)
        .map_err(|e| invalid(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))?;
    let name = request["model"]
        .as_str()
        .ok_or_else(|| invalid(StatusCode::BAD_REQUEST, "`model` is required".into()))?;
    let model = state.model(name).ok_or_else(|| {
        invalid(
            StatusCode::NOT_FOUND,
            format!("The model `{name}` does not exist."),
        )
    })?;
    Ok((request, model))
}

fn injected(code: u16) -> Response<MockBody> {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    error(status, format!("injected fault: {code}"), "server_error")
}

pub(super) async fn generate(
    state: &ServerState,
    body: &[u8],
    api: Api,
) -> Result<Response<MockBody>, Abort> {
    let (request, model) = match parse(state, body) {
        Ok(parsed) => parsed,
        Err(response) => return Ok(*response),
    };
    let plan = model.plan();
    let running = match super::admit(model, &plan, injected).await? {
        Ok(running) => running,
        Err(response) => return Ok(response),
    };
    let spec = &model.spec;
    let mut words: Vec<String> = match &spec.reply {
        Some(reply) => reply.split_inclusive(' ').map(str::to_owned).collect(),
        None => (0..spec.tokens).map(|i| format!("token{i} ")).collect(),
    };
    if let Some(max) = request["max_tokens"]
        .as_u64()
        .or_else(|| request["max_completion_tokens"].as_u64())
    {
        words.truncate(max as usize);
    }
    let tokens = words.len();
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let id = format!(
        "{}-mock-{created}",
        if api == Api::Chat { "chatcmpl" } else { "cmpl" }
    );
    let prompt_tokens = prompt_tokens(api, &request);
    let usage = json!({ "prompt_tokens": prompt_tokens, "completion_tokens": tokens, "total_tokens": prompt_tokens + tokens });

    if request["stream"].as_bool() == Some(true) {
        let include_usage = request["stream_options"]["include_usage"].as_bool() == Some(true);
        let with_usage = |mut chunk: Value| {
            if include_usage {
                chunk["usage"] = Value::Null;
            }
            sse(&chunk)
        };
        let mut chunks: Vec<Bytes> = words
            .iter()
            .enumerate()
            .map(|(i, word)| {
                with_usage(chunk(
                    api,
                    &id,
                    created,
                    &spec.name,
                    Some(word),
                    i == 0,
                    None,
                ))
            })
            .collect();
        chunks.push(with_usage(chunk(
            api,
            &id,
            created,
            &spec.name,
            None,
            false,
            Some("stop"),
        )));
        if include_usage {
            // OpenAI's last chunk: no choices, the whole answer's usage.
            let mut last = chunk(api, &id, created, &spec.name, None, false, None);
            last["choices"] = json!([]);
            last["usage"] = usage;
            chunks.push(sse(&last));
        }
        chunks.push(Bytes::from_static(b"data: [DONE]\n\n"));
        let body = Paced::new(
            chunks,
            plan.first_token,
            spec.inter_token_delay.get(),
            running,
        )
        .boxed_unsync();
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
        return Ok(response);
    }

    super::wait(plan.latency).await;
    running.complete();
    let text: String = words.concat();
    let choice = match api {
        Api::Chat => {
            json!({ "index": 0, "message": { "role": "assistant", "content": text }, "finish_reason": "stop", "logprobs": null })
        }
        Api::Completions => {
            json!({ "index": 0, "text": text, "finish_reason": "stop", "logprobs": null })
        }
    };
    Ok(super::json(
        StatusCode::OK,
        &json!({
            "id": id,
            "object": if api == Api::Chat { "chat.completion" } else { "text_completion" },
            "created": created,
            "model": spec.name,
            "choices": [choice],
            "usage": usage,
        }),
    ))
}

/// The prompt's tokens, by the mock's rule: a quarter of the bytes of its
/// text (the messages' contents, or the completion prompt), at least one.
/// They depend on the prompt only, so a request counts the same whether
/// it asks for a stream or not.
fn prompt_tokens(api: Api, request: &Value) -> usize {
    fn text_bytes(value: &Value) -> usize {
        match value {
            Value::String(s) => s.len(),
            // Content parts (`[{"type":"text","text":...}]`) or prompts.
            Value::Array(items) => items
                .iter()
                .map(|item| match item {
                    Value::Object(part) => part.get("text").map_or(0, text_bytes),
                    other => text_bytes(other),
                })
                .sum(),
            _ => 0,
        }
    }
    let bytes = match api {
        Api::Chat => request["messages"].as_array().map_or(0, |messages| {
            messages.iter().map(|m| text_bytes(&m["content"])).sum()
        }),
        Api::Completions => text_bytes(&request["prompt"]),
    };
    bytes.div_ceil(4).max(1)
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
            json!({ "index": 0, "delta": delta, "finish_reason": finish, "logprobs": null })
        }
        Api::Completions => {
            json!({ "index": 0, "text": word.unwrap_or(""), "finish_reason": finish, "logprobs": null })
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

pub(super) async fn embeddings(
    state: &ServerState,
    body: &[u8],
) -> Result<Response<MockBody>, Abort> {
    let (request, model) = match parse(state, body) {
        Ok(parsed) => parsed,
        Err(response) => return Ok(*response),
    };
    let inputs: Vec<String> = match &request["input"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) if !items.is_empty() => items.iter().map(|i| i.to_string()).collect(),
        _ => {
            return Ok(error(
                StatusCode::BAD_REQUEST,
                "`input` must be a string or a non-empty array".into(),
                "invalid_request_error",
            ));
        }
    };
    let plan = model.plan();
    let running = match super::admit(model, &plan, injected).await? {
        Ok(running) => running,
        Err(response) => return Ok(response),
    };
    super::wait(plan.latency).await;
    running.complete();
    let dimensions = model.spec.embedding_dimensions;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, text)| json!({ "object": "embedding", "index": index, "embedding": vector(text, dimensions) }))
        .collect();
    let tokens: usize = inputs.iter().map(|i| i.len() / 4 + 1).sum();
    Ok(super::json(
        StatusCode::OK,
        &json!({
            "object": "list",
            "data": data,
            "model": model.spec.name,
            "usage": { "prompt_tokens": tokens, "total_tokens": tokens },
        }),
    ))
}

/// A unit vector that depends only on `text`.
fn vector(text: &str, dimensions: usize) -> Vec<f64> {
    let raw: Vec<f64> = (0..dimensions)
        .map(|i| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (text, i).hash(&mut h);
            (h.finish() % 2001) as f64 / 1000.0 - 1.0
        })
        .collect();
    let norm = raw
        .iter()
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt()
        .max(f64::MIN_POSITIVE);
    raw.iter().map(|x| x / norm).collect()
}
