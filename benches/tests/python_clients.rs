//! The mock model server against real client libraries: OpenAI's Python
//! SDK (whole and streamed answers, embeddings, errors) and tritonclient
//! (KServe v2). `./test.sh` installs them from PyPI.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[test]
fn openai_and_tritonclient_talk_to_the_mock() {
    let mut mock = Command::new(env!("CARGO_BIN_EXE_infermesh-bench"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--model",
            "llama",
            "--model",
            "mistral",
        ])
        .args([
            "--tokens",
            "5",
            "--latency",
            "1ms",
            "--token-interval",
            "1ms",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(mock.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let address = line
        .strip_prefix("mock model server listening on ")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected first line: {line}"))
        .to_owned();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/clients.py");
    let out = Command::new("python3").arg(script).arg(&address).output();
    let _ = mock.kill();
    let _ = mock.wait();
    let out = out.expect("python3 runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the Python clients failed (install them with `pip install -r benches/tests/python/requirements.txt`, or run ./test.sh):\n{stderr}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("python clients: ok"));
}
