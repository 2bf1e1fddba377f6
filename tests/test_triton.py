"""Serving with Triton: the generated repository's configs parse with Triton's own parser, and a real
``tritonserver`` (from the nvidia-pytriton wheel, CPU, 127.0.0.1) serves an artifact: the same tokens as a direct
session, dynamic batching at work, a streamed answer equal to ``run``'s, and a bad image failing alone."""

from __future__ import annotations

import io
import json
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from prumerge.artifact.manifest import EngineFacts, Manifest
from prumerge.errors import ConfigError
from prumerge.runtime import Pipeline, VisionSession
from prumerge.samples import synthetic_images
from prumerge.triton.repository import TritonOptions, vision_config_gpu, write_repository
from tritonlocal import LocalTriton, available

pytestmark = pytest.mark.slow


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _parse(text: str):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def artifact(artifact_factory):
    return artifact_factory("llava", "prumerge", "padded", llm_precision="fp32")


@pytest.fixture(scope="module")
def repository(artifact, tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "repo"
    write_repository(artifact, out, TritonOptions(instances=1, max_batch=8, max_queue_delay_us=200_000))
    return out


def test_every_config_parses_with_tritons_parser(repository, artifact):
    models = repository / "models"
    manifest = Manifest.read(artifact)
    for name in ("prumerge_vision", "prumerge_llm", "prumerge"):
        for path in (models / name / "config.pbtxt", models / name / "configs" / "cpu.pbtxt"):
            config = _parse(path.read_text())
            assert config.name == name, path
    gpu = _parse((models / "prumerge_vision" / "config.pbtxt").read_text())
    assert gpu.backend == "onnxruntime" and gpu.max_batch_size == 8 and gpu.instance_group[0].kind == 1  # KIND_GPU
    assert gpu.dynamic_batching.max_queue_delay_microseconds == 200_000
    outputs = {o.name: o for o in gpu.output}
    assert list(outputs["tokens"].dims) == manifest.vision.outputs[0].shape[1:] and list(outputs["num_tokens"].reshape.shape) == []
    assert list(gpu.input[0].dims) == [3, 112, 112] and (models / "prumerge_vision" / "1" / "model.onnx").is_file()
    cpu = _parse((models / "prumerge_vision" / "configs" / "cpu.pbtxt").read_text())
    assert cpu.backend == "python" and cpu.instance_group[0].kind == 2  # KIND_CPU
    for name in ("prumerge_llm", "prumerge"):
        config = _parse((models / name / "config.pbtxt").read_text())
        assert config.backend == "python" and config.model_transaction_policy.decoupled
    # an artifact with an engine is served by TensorRT natively; the accelerator option for onnxruntime
    manifest.vision.engine = EngineFacts("vision.engine", {"max_batch": 4})
    text, kind = vision_config_gpu(manifest, 8, [2, 4], TritonOptions())
    plan = _parse(text)
    assert kind == "tensorrt_plan" and plan.platform == "tensorrt_plan" and plan.max_batch_size == 4
    assert list(plan.dynamic_batching.preferred_batch_size) == [2, 4]
    manifest.vision.engine = None
    accelerated = _parse(vision_config_gpu(manifest, 8, [], TritonOptions(ort_tensorrt=True))[0])
    assert accelerated.optimization.execution_accelerators.gpu_execution_accelerator[0].name == "tensorrt"


def test_repository_refusals(artifact_factory, artifact, tmp_path):
    with pytest.raises(ConfigError, match="--output padded"):
        write_repository(artifact_factory("llava", "prumerge", "dynamic"), tmp_path / "a")
    with pytest.raises(ConfigError, match="has no LLM"):
        write_repository(artifact_factory("llava", "prumerge", "padded"), tmp_path / "b")
    with pytest.raises(ConfigError, match="--max-batch must be in 1..16"):
        write_repository(artifact, tmp_path / "c", TritonOptions(max_batch=64))
    for bad in (dict(llm_instances=0), dict(max_inflight=0), dict(instances=True)):
        with pytest.raises(ConfigError, match="must be in 1.."):
            write_repository(artifact, tmp_path / "d", TritonOptions(**bad))
    assert not (tmp_path / "d").exists()


def test_llm_instances_and_inflight_bound_reach_the_configs(artifact, tmp_path):
    write_repository(artifact, tmp_path / "r", TritonOptions(llm_instances=3, max_inflight=5))
    llm = _parse((tmp_path / "r" / "models" / "prumerge_llm" / "configs" / "cpu.pbtxt").read_text())
    entry = _parse((tmp_path / "r" / "models" / "prumerge" / "configs" / "cpu.pbtxt").read_text())
    assert llm.instance_group[0].count == 3 and entry.instance_group[0].count == 1  # one entry instance: it is async
    assert entry.parameters["max_inflight"].string_value == "5"


def test_each_llm_instance_takes_its_share_of_the_cores(artifact, tmp_path, monkeypatch):
    """The LLM model reads its instance count from the config Triton hands it (JSON with protobuf field names) and
    sizes its decoder's threads to cores / instances, never below one."""
    import os

    from google.protobuf.json_format import MessageToJson

    from prumerge.triton.models._common import instance_threads

    write_repository(artifact, tmp_path / "r", TritonOptions(llm_instances=3))
    config = _parse((tmp_path / "r" / "models" / "prumerge_llm" / "configs" / "cpu.pbtxt").read_text())
    args = {"model_config": MessageToJson(config, preserving_proto_field_name=True)}
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert instance_threads(args) == 2  # 8 cores over 3 instances
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert instance_threads(args) == 1
    one = {"model_config": json.dumps({"instance_group": [{"count": 1, "kind": "KIND_CPU"}]})}
    assert instance_threads(one) == 2


@pytest.fixture(scope="module")
def server(repository, tmp_path_factory):
    reason = available()
    if reason:
        pytest.skip(reason)
    with LocalTriton(repository / "models", tmp_path_factory.mktemp("tritonserver")) as running:
        yield running


def test_vision_tokens_equal_a_direct_session(server, artifact):
    import tritonclient.http as http

    image = synthetic_images(1, seed=5)[0]
    session = VisionSession.open(artifact)
    from prumerge.runtime.preprocess import preprocess_batch

    feed = preprocess_batch([image], session.preprocess)
    client = http.InferenceServerClient(server.http)
    request = http.InferInput("pixel_values", list(feed.shape), "FP32")
    request.set_data_from_numpy(feed)
    result = client.infer("prumerge_vision", [request])
    direct = session.run_pixels(feed)
    # [B] outputs are [B, 1] to clients (config dims [1], reshaped to the graph's [B])
    assert np.array_equal(result.as_numpy("num_tokens").reshape(-1), direct.num_tokens)
    assert np.array_equal(result.as_numpy("indices"), direct.indices)
    np.testing.assert_array_equal(result.as_numpy("tokens"), direct.tokens)


def test_concurrent_requests_are_batched(server, artifact):
    import tritonclient.http as http

    session = VisionSession.open(artifact)
    from prumerge.runtime.preprocess import preprocess_batch

    feeds = [preprocess_batch([img], session.preprocess) for img in synthetic_images(8, seed=9)]
    before = server.stats("prumerge_vision")["model_stats"][0]["execution_count"]

    def one(feed):
        client = http.InferenceServerClient(server.http)
        request = http.InferInput("pixel_values", list(feed.shape), "FP32")
        request.set_data_from_numpy(feed)
        return client.infer("prumerge_vision", [request]).as_numpy("num_tokens")

    with ThreadPoolExecutor(8) as pool:
        counts = list(pool.map(one, feeds))
    assert [int(c.reshape(-1)[0]) for c in counts] == [int(session.run_pixels(f).num_tokens[0]) for f in feeds]
    stats = server.stats("prumerge_vision")["model_stats"][0]
    executions = stats["execution_count"] - before
    assert executions < 8, f"8 concurrent requests ran in {executions} executions: no batching"
    assert max(int(b["batch_size"]) for b in stats["batch_stats"]) > 1


def _stream(server, images: list, prompt: str, max_new_tokens: int = 8):
    """(text pieces, final result dict or error message) from the decoupled entry model over gRPC streaming."""
    import tritonclient.grpc as grpc

    responses: queue.Queue = queue.Queue()
    client = grpc.InferenceServerClient(server.grpc)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    inputs = [grpc.InferInput("IMAGE", [len(images)], "BYTES"), grpc.InferInput("PROMPT", [1], "BYTES"),
              grpc.InferInput("MAX_NEW_TOKENS", [1], "INT32")]
    inputs[0].set_data_from_numpy(np.array(images, dtype=object))
    inputs[1].set_data_from_numpy(np.array([prompt.encode()], dtype=object))
    inputs[2].set_data_from_numpy(np.array([max_new_tokens], dtype=np.int32))
    client.async_stream_infer("prumerge", inputs, enable_empty_final_response=True)
    pieces, final = [], None
    while True:
        result, error = responses.get(timeout=120)
        if error is not None:
            final = str(error)
            break
        response = result.get_response()
        if response.outputs:
            text = result.as_numpy("TEXT")[0].decode()
            result_json = result.as_numpy("RESULT")[0].decode()
            pieces.append(text)
            if result_json:
                final = json.loads(result_json)
        if response.parameters.get("triton_final_response") and response.parameters["triton_final_response"].bool_param:
            break
    client.stop_stream()
    client.close()
    return pieces, final


def test_streamed_answer_equals_run(server, artifact):
    images = synthetic_images(2, seed=3)
    prompt = "<image> describe"
    pieces, final = _stream(server, [_png(images[0])], prompt)
    expected = Pipeline.from_artifacts(artifact).generate(images[0], prompt, max_new_tokens=8)
    assert isinstance(final, dict), final
    assert "".join(pieces) == expected.text and final["token_ids"] == expected.token_ids
    assert final["visual_tokens"] == expected.visual_tokens and final["stop_reason"] == expected.stop_reason
    assert {"preprocess", "vision", "ttft", "server_total"} <= set(final["timings_ms"])


def test_concurrent_users_meet_in_the_vision_batcher_and_get_their_solo_answers(server, artifact):
    """Eight users at once on the entry model: the async entry model sends their images to ``prumerge_vision``
    together, so the dynamic batcher runs them in fewer executions than requests (the sequential entry model ran
    8 in 8), and every streamed answer is token for token the greedy answer of that image alone."""
    images = synthetic_images(8, seed=11)
    prompt = "<image> describe"
    pipeline = Pipeline.from_artifacts(artifact)
    solo = [pipeline.generate(image, prompt, max_new_tokens=6) for image in images]
    before = server.stats("prumerge_vision")["model_stats"][0]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda image: _stream(server, [_png(image)], prompt, max_new_tokens=6), images))
    after = server.stats("prumerge_vision")["model_stats"][0]
    inferences = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    assert inferences == 8 and executions < 8, (inferences, executions)
    for (pieces, final), expected in zip(answers, solo):
        assert isinstance(final, dict), final
        assert "".join(pieces) == expected.text and final["token_ids"] == expected.token_ids
        assert final["visual_tokens"] == expected.visual_tokens


def test_a_corrupt_image_fails_its_request_only(server):
    good = _png(synthetic_images(1, seed=4)[0])
    results = {}

    def ask(name, image):
        results[name] = _stream(server, [image], "<image> hi", max_new_tokens=2)

    threads = [threading.Thread(target=ask, args=(f"good{i}", good)) for i in range(3)]
    threads.append(threading.Thread(target=ask, args=("bad", b"\x89PNG\r\n\x1a\n broken")))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert isinstance(results["bad"][1], str) and "cannot decode image" in results["bad"][1]
    for i in range(3):
        assert isinstance(results[f"good{i}"][1], dict), results[f"good{i}"][1]


def test_a_prompt_over_the_context_fails_its_request_only(server, artifact):
    """A request whose prompt does not fit the model's context gets the runtime's one-line error, while concurrent
    good requests through the same entry model and LLM instances are answered."""
    context = Manifest.read(artifact).llm.context_length
    image = _png(synthetic_images(1, seed=5)[0])
    results = {}

    def ask(name, prompt):
        results[name] = _stream(server, [image], prompt, max_new_tokens=2)

    threads = [threading.Thread(target=ask, args=(f"good{i}", "<image> hi")) for i in range(3)]
    threads.append(threading.Thread(target=ask, args=("long", "<image> " + "hello " * (context + 1))))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert isinstance(results["long"][1], str) and "context is" in results["long"][1], results["long"][1]
    assert "Traceback" not in results["long"][1] and len(results["long"][1].splitlines()) == 1
    for i in range(3):
        assert isinstance(results[f"good{i}"][1], dict), results[f"good{i}"][1]


def test_a_client_leaving_mid_stream_stops_its_decode(server, artifact, repository):
    """A client that cancels its stream on the entry model after the first piece: ``prumerge_llm`` (reached by
    BLS, which this backend cannot cancel) sees the request's flag and stops its decode far short of the tokens
    asked for (its log line says after how many pieces), the flag is lowered, and the next request is answered."""
    import re
    import time

    import tritonclient.grpc as grpc

    from prumerge.triton.cancel import CancelBoard

    image = synthetic_images(1, seed=6)[0]
    # long enough that the decode cannot finish before a loaded machine's gRPC delivers the cancel (400 tokens of
    # the tiny test LLM, ~0.4 s, once did on a busy 2-core machine)
    prompt, asked = "<image> describe", 1600
    solo = Pipeline.from_artifacts(artifact).generate(image, prompt, max_new_tokens=asked)
    assert solo.stop_reason == "max_new_tokens", "the check needs an answer that runs to its token limit"
    pattern = re.compile(rf"prumerge_llm: cancelled after (\d+) pieces \(of at most {asked} tokens\)")
    before = len(pattern.findall(server.log.read_text(errors="replace")))

    pieces: queue.Queue = queue.Queue()
    client = grpc.InferenceServerClient(server.grpc)
    client.start_stream(callback=lambda result, error: pieces.put((result, error)))
    inputs = [grpc.InferInput("IMAGE", [1], "BYTES"), grpc.InferInput("PROMPT", [1], "BYTES"),
              grpc.InferInput("MAX_NEW_TOKENS", [1], "INT32")]
    inputs[0].set_data_from_numpy(np.array([_png(image)], dtype=object))
    inputs[1].set_data_from_numpy(np.array([prompt.encode()], dtype=object))
    inputs[2].set_data_from_numpy(np.array([asked], dtype=np.int32))
    client.async_stream_infer("prumerge", inputs)
    result, error = pieces.get(timeout=120)
    assert error is None and result.as_numpy("TEXT")[0], error
    client.stop_stream(cancel_requests=True)
    client.close()

    deadline = time.monotonic() + 120
    while len(found := pattern.findall(server.log.read_text(errors="replace"))) == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(found) > before, "prumerge_llm never reported the cancelled decode:\n" + server.tail()
    assert int(found[-1]) < asked - 50, f"the decode went on for {found[-1]} of {asked} pieces"
    board = CancelBoard.for_repository(repository / "models" / "prumerge_llm").directory
    pieces_after, final = _stream(server, [_png(image)], prompt, max_new_tokens=4)
    assert isinstance(final, dict), final
    assert not any(board.iterdir()), "a cancel flag was left behind"


def test_cancel_board_keys_never_leave_the_board(tmp_path):
    """Keys are 128-bit hex: a key naming a path (a direct client's CANCEL_KEY) is ignored, never touched."""
    from prumerge.triton.cancel import CancelBoard

    board = CancelBoard(tmp_path / "board")
    outside = tmp_path / "victim"
    outside.write_text("keep")
    for key in ("../victim", str(outside), "", None, "A" * 32, "0" * 31):
        board.cancel(key)
        board.clear(key)
        assert not board.cancelled(key)
    assert outside.read_text() == "keep" and not any(board.directory.iterdir())
    key = board.new_key()
    assert not board.cancelled(key)
    board.cancel(key)
    assert board.cancelled(key) and not board.cancelled(board.new_key())
    board.clear(key)
    assert not board.cancelled(key)
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    with pytest.raises(PermissionError, match="not a private directory"):
        CancelBoard(shared)


# ------------------------------------------------------------------------------------------------ question graphs
@pytest.fixture(scope="module")
def question_artifact(cdpruner_artifact):
    """CDPruner keeping 9 of 64 patches: the vision graph reads the question besides the pixels (conftest's)."""
    return cdpruner_artifact


@pytest.fixture(scope="module")
def question_server(question_artifact, tmp_path_factory):
    reason = available()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("triton-question") / "repo"
    write_repository(question_artifact, out, TritonOptions(instances=1, max_batch=4, max_queue_delay_us=1000))
    config = _parse((out / "models" / "prumerge_vision" / "config.pbtxt").read_text())
    assert [list(i.dims) for i in config.input][1:] == [[-1, 64], [-1]]  # the question's rows: any count
    with LocalTriton(out / "models", tmp_path_factory.mktemp("tritonserver-question")) as running:
        yield running


def test_the_entry_model_passes_the_question_to_a_question_reading_graph(question_server, question_artifact):
    """The entry model embeds each request's prompt (the artifact's tokenizer and table, padded with masked rows to
    a multiple of 16 so that nearby lengths batch) and sends it with the pixels: each streamed answer is ``run``'s
    for that prompt, and a direct ``prumerge_vision`` call with a question keeps the session's set."""
    import tritonclient.http as http

    from prumerge.runtime.preprocess import preprocess_batch

    image = synthetic_images(1, seed=4)[0]
    pipeline = Pipeline.from_artifacts(question_artifact)
    feed = preprocess_batch([image], pipeline.vision.preprocess)
    kept = {}
    for prompt in ("<image> what is in this picture", "<image> describe the image in detail red green blue"):
        pieces, final = _stream(question_server, [_png(image)], prompt)
        expected = pipeline.generate(image, prompt, max_new_tokens=8)
        assert isinstance(final, dict), final
        assert "".join(pieces) == expected.text and final["token_ids"] == expected.token_ids
        question = pipeline.question(prompt, 1)
        direct = pipeline.vision.run_pixels(feed, question)
        client = http.InferenceServerClient(question_server.http)
        inputs = [http.InferInput("pixel_values", list(feed.shape), "FP32")]
        inputs[0].set_data_from_numpy(feed)
        for name, array in question.items():
            inputs.append(http.InferInput(name, list(array.shape), "FP32"))
            inputs[-1].set_data_from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        served = client.infer("prumerge_vision", inputs)
        assert np.array_equal(served.as_numpy("indices"), direct.indices)
        kept[prompt] = tuple(direct.indices[0])
    assert len(set(kept.values())) == 2  # the two questions keep different sets: the question reached the graph
