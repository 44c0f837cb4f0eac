"""Every kind of bad request gets an INVALID_ARG (HTTP 400) naming the problem, and the next good request is answered."""

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def tensor(mod, name, array, datatype):
    t = mod.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array)
    return t


def strings(*values):
    return np.array([[v if isinstance(v, bytes) else v.encode()] for v in values], dtype=np.object_)


GOOD_TEXT, GOOD_TASK = strings("a wonderful film"), strings("movie_review_sentiment")

CASES = {
    "wrong dtype": ([("TEXT", np.array([[1], [2]], np.int32), "INT32"), ("TASK", strings("movie_review_sentiment") , "BYTES")],
                    {}, "TEXT"),
    "wrong shape": ([("TEXT", np.array([[b"a", b"b"]], dtype=np.object_), "BYTES"), ("TASK", GOOD_TASK, "BYTES")],
                    {}, "TEXT"),
    "missing TASK": ([("TEXT", GOOD_TEXT, "BYTES")], {}, "TASK"),
    "missing TEXT": ([("TASK", GOOD_TASK, "BYTES")], {}, "TEXT"),
    "empty text": ([("TEXT", strings(""), "BYTES"), ("TASK", GOOD_TASK, "BYTES")], {}, "TEXT row 0 is empty"),
    "invalid UTF-8": ([("TEXT", strings(b"caf\xe9"), "BYTES"), ("TASK", GOOD_TASK, "BYTES")], {}, "not valid UTF-8"),
    "unknown task": ([("TEXT", GOOD_TEXT, "BYTES"), ("TASK", strings("no_such_task"), "BYTES")], {},
                     "unknown task 'no_such_task'"),
    "over-long text": ([("TEXT", strings("long " * 400), "BYTES"), ("TASK", GOOD_TASK, "BYTES")], {},
                       "402 tokens long, more than the 256"),
    "rows disagree": ([("TEXT", strings("a", "b"), "BYTES"), ("TASK", GOOD_TASK, "BYTES")], {}, ""),
    "token id outside vocabulary": ([("INPUT_IDS", np.array([[101, 99999, 102]], np.int32), "INT32"),
                                     ("TASK", GOOD_TASK, "BYTES")], {}, "outside the vocabulary"),
    "bad truncate parameter": ([("TEXT", GOOD_TEXT, "BYTES"), ("TASK", GOOD_TASK, "BYTES")], {"truncate": "maybe"},
                               "truncate"),
}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused_and_the_next_request_served(server, protocol, case):
    mod = httpclient if protocol == "http" else grpcclient
    client = mod.InferenceServerClient(server.http_url if protocol == "http" else server.grpc_url)
    inputs, parameters, message = CASES[case]
    with pytest.raises(InferenceServerException) as err:
        client.infer("chorus", [tensor(mod, *i) for i in inputs], parameters=parameters or None)
    status = str(err.value.status())
    assert status in ("400", "StatusCode.INVALID_ARGUMENT"), (status, str(err.value))
    assert message in str(err.value)
    good = client.infer("chorus", [tensor(mod, "TEXT", GOOD_TEXT, "BYTES"), tensor(mod, "TASK", GOOD_TASK, "BYTES")])
    assert good.as_numpy("LABEL")[0, 0] == b"positive"


def test_truncate_parameter_classifies_the_first_tokens(server):
    client = httpclient.InferenceServerClient(server.http_url)
    long = "a wonderful, moving film. " + "and then " * 300
    r = client.infer("chorus", [tensor(httpclient, "TEXT", strings(long), "BYTES"),
                                tensor(httpclient, "TASK", GOOD_TASK, "BYTES")], parameters={"truncate": True})
    assert r.as_numpy("LOGITS").shape == (1, 2) and np.isfinite(r.as_numpy("LOGITS")).all()


def test_one_bad_request_does_not_fail_its_batch_mates(server):
    """Requests batched together by Triton are checked one by one: a bad one fails alone."""
    client = httpclient.InferenceServerClient(server.http_url, concurrency=8)
    good = [tensor(httpclient, "TEXT", GOOD_TEXT, "BYTES"), tensor(httpclient, "TASK", GOOD_TASK, "BYTES")]
    bad = [tensor(httpclient, "TEXT", GOOD_TEXT, "BYTES"), tensor(httpclient, "TASK", strings("nope"), "BYTES")]
    pending = [client.async_infer("chorus", bad if i % 2 else good) for i in range(16)]
    for i, p in enumerate(pending):
        if i % 2:
            with pytest.raises(InferenceServerException, match="unknown task 'nope'"):
                p.get_result()
        else:
            assert p.get_result().as_numpy("LABEL")[0, 0] == b"positive"
