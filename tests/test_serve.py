"""The Ray Serve application end to end on a local cluster of the test's own (CPU, tiny-random): `qos
serve` with two replicas, the OpenAI client and raw HTTP through Serve's proxy, handles, a changed
config deployed while a client streams, a squeeze on every replica, Prometheus metrics scraped from
Ray's exporter, `qos stop`."""

import json
import time
import urllib.error
import urllib.request

import pandas as pd
import pytest
import yaml

from qos.cli import main
from tests.test_http import KEYS, front, post, slos  # noqa: F401 (front: the fixture)
from tests.test_profiler import needs_data

openai = pytest.importorskip("openai")


def scrape(port: int) -> dict:
    """{(metric name, frozenset of labels): value} from Ray's Prometheus exporter."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


@needs_data
@pytest.mark.ray
def test_serve_app_with_two_replicas_http_handles_live_config_metrics_and_stop(front, tmp_path, monkeypatch):
    from runtime import ray_app

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_metrics_report_interval_ms", "1000")  # metrics reach the exporter within a second
    slo_file = tmp_path / "slos.yaml"
    slo_file.write_text(yaml.safe_dump(slos()))
    config, port, metrics_port = tmp_path / "serve.yaml", ray_app.free_port(), ray_app.free_port()
    url = f"http://127.0.0.1:{port}"
    with ray_app.local_cluster(num_cpus=6, _metrics_export_port=metrics_port):
        assert main(["serve", "--front", str(front), "--slos", str(slo_file), "--name", "test-app", "--config",
                     str(config), "--device", "cpu", "--tick", "0.5", "--max-seqs", "4", "--replicas", "2",
                     "--port", str(port), "--json"]) == 0
        written = yaml.safe_load(config.read_text())
        assert written["http_options"] == {"host": "127.0.0.1", "port": port}  # loopback unless asked
        assert written["applications"][0]["deployments"][0]["user_config"]["slos"] == slos()

        replicas = ray_app.statuses("test-app")
        assert len(replicas) == 2 and len({r["replica"] for r in replicas}) == 2
        assert all(r["plan"]["quantized"] == 0 for r in replicas)  # nobody active, quality preferred

        # the OpenAI client through Serve's proxy
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEYS["batch"], max_retries=0, timeout=120)
        done = client.completions.create(model="tiny-random", prompt="the market", max_tokens=6, temperature=0)
        assert done.usage.completion_tokens == 6 and done.model_extra["qos"]["tenant"] == "batch"
        chat = client.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=4)
        assert chat.choices[0].message.role == "assistant"
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="tiny-random", prompt="the market", max_tokens=6, temperature=0, stream=True))
        assert streamed == done.choices[0].text
        assert post(url, "/v1/completions", {"model": "tiny-random", "prompt": "hi", "max_tokens": -1})[0] == 400
        assert post(url, "/v1/completions", {"model": "tiny-random", "prompt": "hi"}, key="sk-unknown-key-12345")[0] \
            == 401
        with urllib.request.urlopen(f"{url}/health", timeout=30) as r:
            assert r.status == 200

        # handles: what `qos submit` and Python clients use
        handle = ray_app.handle("test-app")
        calls = [handle.generate.remote(t, "the market", 16) for t in ("interactive", "batch") * 4]
        with pytest.raises(ValueError, match="unknown tenant 'nobody'"):
            ray_app.result(handle.generate.remote("nobody", "hi"))
        with pytest.raises(ValueError, match="top_p must be a number in"):
            ray_app.result(handle.generate.remote("batch", "hi", 3, top_p=5))
        pieces = list(ray_app.stream(handle, "batch", "the market", 8))
        assert len(pieces) > 1

        # a changed config deployed (as `serve deploy` does) while a client streams: the SLOs and a
        # squeeze on every replica move the plan; the stream loses nothing
        stream = client.completions.create(model="tiny-random", prompt="the market", max_tokens=48, stream=True,
                                           stream_options={"include_usage": True})
        first = next(iter(stream))
        smallest = int(pd.read_csv(front)["gpu_bytes"].min())
        written["applications"][0]["deployments"][0]["user_config"]["slos"] = slos(prefer="throughput")
        config.write_text(yaml.safe_dump(written))
        assert main(["serve", "--config", str(config), "--json"]) == 0
        start = time.perf_counter()
        squeezed = ray_app.statuses("test-app", free_bytes=smallest - replicas[0]["memory"]["gpu_bytes"] + 1,
                                    set_free=True)
        assert time.perf_counter() - start < 10 and len(squeezed) == 2
        assert all(s["prefer"] == "throughput" and s["plan"]["gpu_bytes"] <= smallest for s in squeezed)
        assert {s["replica"] for s in squeezed} == {r["replica"] for r in replicas}  # reconfigured, not restarted
        rest = list(stream)
        assert rest[-1].usage.completion_tokens == 48 and first.choices
        assert [ray_app.result(c)["new_tokens"] for c in calls] == [16] * 8

        # status answers at once while requests queue
        flood = [handle.generate.remote("batch", "the market", 16) for _ in range(60)]
        time.sleep(0.5)
        start = time.perf_counter()
        assert main(["status", "--name", "test-app", "--json"]) == 0
        assert time.perf_counter() - start < 5
        assert len([ray_app.result(c) for c in flood]) == 60

        # metrics, through Ray's exporter in Prometheus' format, tagged per replica
        deadline, samples = time.time() + 60, {}
        while time.time() < deadline:
            samples = scrape(metrics_port)
            if total(samples, "ray_qos_requests_total", tenant="batch") >= 60 and \
                    total(samples, "ray_qos_reconfigurations_total") >= 2:
                break
            time.sleep(1)
        assert total(samples, "ray_qos_requests_total", tenant="batch") >= 60
        assert total(samples, "ray_qos_generation_tokens_total", tenant="interactive") >= 4 * 16
        assert total(samples, "ray_qos_time_to_first_token_seconds_count", tenant="batch") >= 60
        assert total(samples, "ray_qos_reconfigurations_total") >= 2  # a shrink on each replica
        tagged = {dict(ls)["replica"] for (n, ls), v in samples.items() if n == "ray_qos_plan_info" and v == 1}
        assert len(tagged) == 2

        assert main(["stop", "--name", "test-app"]) == 0
        with pytest.raises(urllib.error.HTTPError):  # Serve's proxy has no application to route to
            urllib.request.urlopen(f"{url}/health", timeout=5)
        assert main(["status", "--name", "test-app"]) == 2  # no such application: one line


def test_the_written_serve_config_is_valid_and_bad_input_is_one_line(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    from runtime import ray_app

    slo_file = tmp_path / "slos.yaml"
    slo_file.write_text(yaml.safe_dump(slos()))
    config = ray_app.write_config(tmp_path / "serve.yaml", front="front.csv", slos=str(slo_file), replicas=2,
                                  max_replicas=4, limits={"max_seqs": 8}, device="cpu")
    ServeDeploySchema.model_validate(config)  # what `serve run`/`serve deploy` check
    deployment = config["applications"][0]["deployments"][0]
    assert deployment["autoscaling_config"] == {"min_replicas": 2, "max_replicas": 4, "target_ongoing_requests": 8}
    assert yaml.safe_load((tmp_path / "serve.yaml").read_text()) == config
    watched = ray_app.write_config(tmp_path / "w.yaml", front="front.csv", slos=str(slo_file), watch_slos=True)
    assert watched["applications"][0]["deployments"][0]["user_config"] == {"slo_file": str(slo_file.resolve())}

    with pytest.raises(ValueError, match="unknown tenant 'nobody'"):
        ray_app.write_config(tmp_path / "x.yaml", front="f.csv", slos=str(slo_file), anonymous_tenant="nobody")
    with pytest.raises(ValueError, match="max_replicas"):
        ray_app.write_config(tmp_path / "x.yaml", front="f.csv", slos=str(slo_file), replicas=3, max_replicas=2)
    with pytest.raises(ValueError, match="unknown application args colour"):
        ray_app.build({"front": "f.csv", "colour": "red"})
    (tmp_path / "bad.yaml").write_text("applications: 3\n")
    with pytest.raises(ValueError, match="not a Serve config"):
        ray_app.deploy(tmp_path / "bad.yaml")
