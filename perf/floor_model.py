"""The do-nothing floor: a Python-backend model with chorus's inputs and outputs that does no work.

`perf.repos.floor_model` copies this file as the model's `1/model.py`, next to `chorus` in the same tritonserver, so
every served figure has beside it what Triton's Python backend itself costs on that host: execute() reads each
request's inputs and returns constant outputs of the right shapes (only those asked for).
"""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            task = pb_utils.get_input_tensor_by_name(request, "TASK").as_numpy()
            n = task.shape[0]
            outputs = {"LOGITS": np.zeros((n, 2), dtype=np.float32),
                       "LABEL": np.array([[b"positive"]] * n, dtype=np.object_),
                       "LABEL_NAMES": np.array([[b"negative", b"positive"]] * n, dtype=np.object_),
                       "STUDENTS": np.zeros((n, 1), dtype=np.int32)}
            wanted = set(request.requested_output_names()) or set(outputs)
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(k, v) for k, v in outputs.items() if k in wanted]))
        return responses
