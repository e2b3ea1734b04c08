//! KServe v2 / Open Inference Protocol endpoints of the mock. Every model
//! answers its inputs, renamed `output_<input name>`, each number times
//! the model's `scale` (1: an identity model).

use std::sync::Arc;

use http::{Response, StatusCode};
use serde_json::{Value, json};

use super::{Abort, MockBody, Model};

fn error(status: StatusCode, message: String) -> Response<MockBody> {
    super::json(status, &json!({ "error": message }))
}

fn unknown(name: &str) -> Response<MockBody> {
    error(StatusCode::NOT_FOUND, format!("model {name} not found"))
}

pub(super) fn server_metadata() -> Response<MockBody> {
    super::json(
        StatusCode::OK,
        &json!({ "name": "infermesh-bench-mock", "version": env!("CARGO_PKG_VERSION"), "extensions": [] }),
    )
}

pub(super) fn model_metadata(model: Option<&Arc<Model>>) -> Response<MockBody> {
    let Some(model) = model else {
        return error(StatusCode::NOT_FOUND, "model not found".into());
    };
    super::json(
        StatusCode::OK,
        &json!({
            "name": model.spec.name,
            "versions": ["1"],
            "platform": "infermesh-mock",
            "inputs": [{ "name": "input", "datatype": "FP32", "shape": [-1] }],
            "outputs": [{ "name": "output_input", "datatype": "FP32", "shape": [-1] }],
        }),
    )
}

pub(super) fn model_ready(model: Option<&Arc<Model>>, name: &str) -> Response<MockBody> {
    match model {
        Some(_) => super::json(StatusCode::OK, &json!({ "name": name, "ready": true })),
        None => unknown(name),
    }
}

pub(super) async fn infer(
    model: Option<&Arc<Model>>,
    name: &str,
    body: &[u8],
) -> Result<Response<MockBody>, Abort> {
    let Some(model) = model else {
        return Ok(unknown(name));
    };
    let request: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return Ok(error(
                StatusCode::BAD_REQUEST,
                format!("invalid JSON body: {e}"),
            ));
        }
    };
    let Some(inputs) = request["inputs"].as_array().filter(|i| !i.is_empty()) else {
        return Ok(error(
            StatusCode::BAD_REQUEST,
            "`inputs` must be a non-empty array of tensors".into(),
        ));
    };
    let mut outputs = Vec::with_capacity(inputs.len());
    for (i, input) in inputs.iter().enumerate() {
        let (Some(input_name), Some(shape), Some(datatype), Some(data)) = (
            input["name"].as_str(),
            input.get("shape"),
            input["datatype"].as_str(),
            input.get("data"),
        ) else {
            return Ok(error(
                StatusCode::BAD_REQUEST,
                format!("inputs[{i}] needs name, shape, datatype and data"),
            ));
        };
        let data = scaled(data, model.spec.scale);
        outputs.push(json!({ "name": format!("output_{input_name}"), "shape": shape, "datatype": datatype, "data": data }));
    }
    let plan = model.plan();
    let running = match super::admit(model, &plan, |code| {
        error(
            StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            format!("injected fault: {code}"),
        )
    })
    .await?
    {
        Ok(running) => running,
        Err(response) => return Ok(response),
    };
    super::wait(plan.latency).await;
    running.complete();
    let mut response = json!({ "model_name": name, "model_version": "1", "outputs": outputs });
    if let Some(id) = request.get("id") {
        response["id"] = id.clone();
    }
    Ok(super::json(StatusCode::OK, &response))
}

/// `data` with every number multiplied by `scale`.
fn scaled(data: &Value, scale: f64) -> Value {
    match data {
        Value::Number(n) if scale != 1.0 => n.as_f64().map_or(Value::Null, |x| json!(x * scale)),
        Value::Array(items) => Value::Array(items.iter().map(|i| scaled(i, scale)).collect()),
        other => other.clone(),
    }
}
