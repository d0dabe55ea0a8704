import json

import pytest

from qos.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_json_has_the_contract_fields(capsys):
    code, out, _ = run(capsys, "plan", "--model", "tiny-random", "--quantized", "6", "--bits", "3",
                       "--gpu-experts", "9", "--json")
    assert code == 0
    row = json.loads(out)
    assert {"plan_id", "experts_total", "quantized", "bits", "gpu_experts", "gpu_bytes", "host_bytes"} <= row.keys()
    assert (row["experts_total"], row["quantized"], row["bits"], row["gpu_experts"]) == (16, 6, 3, 9)


def test_prefetch_flag_is_a_plan_knob(capsys):
    base = ["plan", "--model", "tiny-random", "--gpu-experts", "8", "--json"]
    rows = [json.loads(run(capsys, *base, *extra)[1]) for extra in ([], ["--prefetch"], ["--prefetch", "--offload", "cpu"])]
    assert [r["prefetch"] for r in rows] == [False, True, False]  # cpu offload has nothing to prefetch into
    assert rows[0]["plan_id"] != rows[1]["plan_id"] and rows[0]["gpu_bytes"] == rows[1]["gpu_bytes"]


def test_plan_from_budget_on_the_mixtral_shape_without_loading_weights(capsys):
    code, out, _ = run(capsys, "plan", "--model", "mixtral-8x7b-shape", "--dtype", "bfloat16",
                       "--quantized", "256", "--bits", "4", "--gpu-budget", "20GiB", "--json")
    row = json.loads(out)
    assert code == 0 and row["experts_total"] == 256
    assert row["gpu_bytes"] <= 20 * 2**30 < row["gpu_bytes"] + row["host_bytes"]


def test_generate_json(capsys):
    code, out, _ = run(capsys, "generate", "--model", "tiny-random", "--quantized", "4", "--gpu-experts", "8",
                       "--offload", "cpu", "--prompt", "hello there", "--max-new-tokens", "6", "--json")
    assert code == 0
    row = json.loads(out)
    assert row["new_tokens"] == 6 and row["decode_tok_s"] > 0 and isinstance(row["text"], str)
    assert row["plan_id"] and row["expert_stats"]["cpu_calls"] > 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--quantized", "17"], "quantized=17 exceeds the model's 16 experts"),
        (["--quantized", "2", "--bits", "6"], "bits=6 is not supported"),
        (["--gpu-budget", "1KB"], "smaller than the model's non-expert weights"),
        (["--selection", "magic"], "selection='magic' is not supported"),
        (["--offload", "nvme"], "offload='nvme' is not supported"),
        (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    ],
)
def test_bad_input_is_one_clear_line(capsys, argv, message):
    code, out, err = run(capsys, "plan", *argv)
    assert code == 2 and message in err and "Traceback" not in err and out == ""


def test_bad_byte_count_is_rejected_by_the_parser(capsys):
    assert main(["plan", "--gpu-budget", "lots"]) == 2
    assert "not a byte count: 'lots'" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "hi"}\nnot json\n', "p.jsonl:2: not JSON"),
    ('{"text": "hi"}\n', 'p.jsonl:1: each line must be an object with a non-empty "prompt" string'),
    ('{"prompt": "hi", "max_new_tokens": 0}\n', "p.jsonl:1: max_new_tokens must be a positive integer, got 0"),
    ("\n\n", "has no prompts"),
])
def test_malformed_prompt_files_name_the_line(tmp_path, content, message):
    from qos.cli import read_prompts

    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_prompts(str(path))


def test_every_option_has_help_and_shows_its_default():
    import argparse

    from qos.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        formatter = command._get_formatter()
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"qos {name} {action.option_strings or action.dest} has no help"
            text = formatter._get_help_string(action) % {**vars(action), "prog": name}
            shows = action.default is not None and action.default is not False and action.default is not argparse.SUPPRESS
            if action.option_strings and shows:
                assert "default" in text, f"qos {name} {action.option_strings}: {text!r} hides its default"
    assert "(default: 1)" in sub.choices["profile"].format_help()  # --batch-sizes' tuple, shown as a list


def test_text_output_reads_in_units(capsys):
    from qos.cli import _human

    assert _human("gpu_bytes", 42_671_284_736) == "42.67 GB" and _human("host_bytes", 0) == "0 B"
    assert _human("hit_rate", 0.6470588235294118) == "64.7%" and _human("ttft_s", 0.0265451) == "0.02655"
    assert _human("memory", {"gpu_bytes": 1_545_536, "hit_rate": None}) == "gpu_bytes=1.546 MB, hit_rate=None"
    code, out, _ = run(capsys, "plan", "--model", "tiny-random", "--gpu-experts", "8")
    assert code == 0 and "gpu_bytes: 1.546 MB" in out and "host_bytes: 786.4 kB" in out


def test_serve_host_budget_reaches_the_deployment_config(tmp_path, monkeypatch, capsys):
    """`qos serve --host-budget 64GiB` writes the byte count into the Serve application's args, which
    the deployment (and so the Server in each replica) takes; the cluster itself is faked."""
    import inspect

    import pandas as pd
    import yaml

    from catalog.knobs import Knobs, knob_cells
    from catalog.rows import ModelIdentity
    from runtime import ray_app

    front = tmp_path / "front.csv"
    pd.DataFrame([{**ModelIdentity("tiny-random").cells(), "plan_id": "p1", "precision_id": "x",
                   **knob_cells(Knobs()), "decode_tok_s": 10.0, "ppl_wikitext2": 5.0, "gpu_bytes": 100,
                   "host_bytes": 0}]).to_csv(front, index=False)
    slos = tmp_path / "slos.yaml"
    slos.write_text("tenants: [{name: a}]\n")
    monkeypatch.setattr(ray_app, "connect", lambda address=None: None)
    monkeypatch.setattr(ray_app, "cluster_gpus", lambda: 0)
    monkeypatch.setattr(ray_app, "deploy", lambda path, wait_s: ["moe-qos"])
    monkeypatch.setattr(ray_app, "statuses", lambda app: [{"plan_id": "p1", "model": "tiny-random"}])
    config = tmp_path / "serve.yaml"
    base = ["serve", "--front", str(front), "--slos", str(slos), "--config", str(config), "--json"]
    code, out, err = run(capsys, *base, "--host-budget", "64GiB")
    assert code == 0, err
    args = yaml.safe_load(config.read_text())["applications"][0]["args"]
    assert args["host_budget"] == 64 * 2**30
    assert "host_budget" in inspect.signature(ray_app.QosServer.func_or_class).parameters
    ray_app.build(args)  # an arg the application accepts
    assert run(capsys, *base)[0] == 0 and "host_budget" not in yaml.safe_load(config.read_text())["applications"][0]["args"]
    code, _, err = run(capsys, *base, "--host-budget", "lots")
    assert code == 2 and "not a byte count: 'lots'" in err
