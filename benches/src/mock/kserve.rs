//! KServe v2 / Open Inference Protocol endpoints of the mock. Every model
//! is an identity model: its outputs are its inputs, renamed
//! `output_<input name>`.

use std::time::Duration;

use http::{Response, StatusCode};
use serde_json::{Value, json};

use super::{MockBody, MockOptions};

fn error(status: StatusCode, message: String) -> Response<MockBody> {
    super::json(status, &json!({ "error": message }))
}

fn known(options: &MockOptions, name: &str) -> bool {
    options.models.iter().any(|m| m == name)
}

pub(super) fn server_metadata() -> Response<MockBody> {
    super::json(
        StatusCode::OK,
        &json!({ "name": "infermesh-bench-mock", "version": env!("CARGO_PKG_VERSION"), "extensions": [] }),
    )
}

pub(super) fn model_metadata(options: &MockOptions, name: &str) -> Response<MockBody> {
    if !known(options, name) {
        return error(StatusCode::NOT_FOUND, format!("model {name} not found"));
    }
    super::json(
        StatusCode::OK,
        &json!({
            "name": name,
            "versions": ["1"],
            "platform": "infermesh-mock",
            "inputs": [{ "name": "input", "datatype": "FP32", "shape": [-1] }],
            "outputs": [{ "name": "output_input", "datatype": "FP32", "shape": [-1] }],
        }),
    )
}

pub(super) fn model_ready(options: &MockOptions, name: &str) -> Response<MockBody> {
    if known(options, name) {
        super::json(StatusCode::OK, &json!({ "name": name, "ready": true }))
    } else {
        error(StatusCode::NOT_FOUND, format!("model {name} not found"))
    }
}

pub(super) async fn infer(options: &MockOptions, name: &str, body: &[u8]) -> Response<MockBody> {
    if !known(options, name) {
        return error(StatusCode::NOT_FOUND, format!("model {name} not found"));
    }
    let request: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")),
    };
    let Some(inputs) = request["inputs"].as_array().filter(|i| !i.is_empty()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "`inputs` must be a non-empty array of tensors".into(),
        );
    };
    let mut outputs = Vec::with_capacity(inputs.len());
    for (i, input) in inputs.iter().enumerate() {
        let (Some(input_name), Some(shape), Some(datatype), Some(data)) = (
            input["name"].as_str(),
            input.get("shape"),
            input["datatype"].as_str(),
            input.get("data"),
        ) else {
            return error(
                StatusCode::BAD_REQUEST,
                format!("inputs[{i}] needs name, shape, datatype and data"),
            );
        };
        outputs.push(json!({ "name": format!("output_{input_name}"), "shape": shape, "datatype": datatype, "data": data }));
    }
    if options.latency > Duration::ZERO {
        tokio::time::sleep(options.latency).await;
    }
    let mut response = json!({ "model_name": name, "model_version": "1", "outputs": outputs });
    if let Some(id) = request.get("id") {
        response["id"] = id.clone();
    }
    super::json(StatusCode::OK, &response)
}
