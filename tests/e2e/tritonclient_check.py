"""Talk to a running saliency-service with the unmodified `tritonclient` package; print what it saw as JSON.

Run as a separate process: tritonclient registers the Open Inference Protocol's messages under the same
names as the server's stubs, and one protobuf descriptor pool cannot hold both.

    python tritonclient_check.py ADDRESS MODEL INPUT.npy
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException


def main(address: str, model: str, input_path: str) -> dict[str, object]:
    client = triton.InferenceServerClient(address)
    metadata = client.get_model_metadata(model, as_json=True)
    x = np.load(input_path)
    tensor = triton.InferInput(metadata["inputs"][0]["name"], list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    outputs = [triton.InferRequestedOutput("logits"), triton.InferRequestedOutput("logits", class_count=3)]
    # Two requests for one output name are not allowed in one call: classification goes in a second call.
    logits = client.infer(model, [tensor], outputs=outputs[:1], request_id="check-1")
    classes = client.infer(model, [tensor], outputs=outputs[1:])
    try:
        client.get_model_metadata("no-such-model")
        unknown = "no error"
    except InferenceServerException as error:
        unknown = str(error.status())
    return {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "server": client.get_server_metadata(as_json=True),
        "metadata": metadata,
        "index": client.get_model_repository_index(as_json=True),
        "id": logits.get_response().id,
        "logits": logits.as_numpy("logits").tolist(),
        "classification": [[entry.decode() for entry in row] for row in classes.as_numpy("logits")],
        "unknown_model_status": unknown,
    }


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])))
