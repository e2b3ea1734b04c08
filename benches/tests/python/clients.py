"""The mock model server, driven by the real client libraries users run:
OpenAI's Python SDK and NVIDIA's tritonclient (KServe v2 over HTTP).

Usage: python3 clients.py HOST:PORT   (exits non-zero on the first mismatch)
"""

import sys

import numpy as np
import openai
import tritonclient.http as triton

address = sys.argv[1]
client = openai.OpenAI(base_url=f"http://{address}/v1", api_key="unused", max_retries=0)

models = [m.id for m in client.models.list()]
assert models == ["llama", "mistral"], models

chat = client.chat.completions.create(
    model="llama", messages=[{"role": "user", "content": "hi"}], max_tokens=3
)
assert chat.choices[0].message.content == "token0 token1 token2 ", chat
assert chat.usage.completion_tokens == 3, chat.usage

pieces = []
for chunk in client.chat.completions.create(
    model="mistral", messages=[{"role": "user", "content": "hi"}], stream=True
):
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
assert pieces == [f"token{i} " for i in range(5)], pieces

text = "".join(
    c.choices[0].text
    for c in client.completions.create(model="llama", prompt="x", max_tokens=2, stream=True)
)
assert text == "token0 token1 ", text

embedding = client.embeddings.create(model="llama", input=["a", "b"])
assert len(embedding.data) == 2 and len(embedding.data[0].embedding) == 8, embedding

try:
    client.chat.completions.create(model="gpt-9", messages=[])
    raise AssertionError("an unknown model must fail")
except openai.NotFoundError as e:
    assert "gpt-9" in str(e), e

kserve = triton.InferenceServerClient(url=address)
assert kserve.is_server_live() and kserve.is_server_ready()
assert kserve.is_model_ready("llama")
assert kserve.get_model_metadata("llama")["name"] == "llama"
tensor = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
inputs = [triton.InferInput("x", list(tensor.shape), "FP32")]
inputs[0].set_data_from_numpy(tensor, binary_data=False)
result = kserve.infer("llama", inputs, outputs=[triton.InferRequestedOutput("output_x", binary_data=False)])
assert np.array_equal(result.as_numpy("output_x"), tensor), result.get_response()

print("python clients: ok")
