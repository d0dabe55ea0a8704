"""The `qos` command line."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger("qos")


# --- shared options -------------------------------------------------------------------------------
def _bytes(text: str) -> int:
    """'80000000', '6GiB', '512MB' -> bytes."""
    from catalog.knobs import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_model_args(p: argparse.ArgumentParser, *, required: bool = False) -> None:
    p.add_argument("--model", default=None if required else "tiny-random", required=required,
                   help="built-in (tiny-random, mixtral-8x7b-shape, reference), local HF directory or hub id")
    p.add_argument("--layers", type=int, help="keep only the first N decoder layers")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="the accelerator tier (auto: cuda when present)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="weights' dtype (auto: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights and of random selection")


CALIB_HELP = ("text file the frequency and sensitivity selections score experts on "
              "(default: PTB train in the data folder)")


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    from catalog.knobs import add_flags

    add_flags(p)
    p.add_argument("--calib", help=CALIB_HELP)
    p.add_argument("--data", help="data folder (default: $QOS_DATA_DIR or ../shared/data)")


def _identity(args):
    """The model the flags name (its dtype and fingerprint are filled in when it loads)."""
    from catalog.rows import ModelIdentity

    return ModelIdentity(args.model, args.layers, None if args.dtype == "auto" else args.dtype, args.seed,
                         getattr(args, "calib", None))


def _session(args):
    """Load the model under the engine (no plan applied yet)."""
    from placement.session import open_session

    return open_session(_identity(args), args.device, data=args.data, host_budget=getattr(args, "host_budget", None))


def _session_and_plan(args):
    """Load the model, put the engine in charge of its experts, and apply the plan the knobs ask for."""
    from catalog.knobs import knobs_from_args

    knobs_from_args(args, total=1 << 30)  # bad knobs fail before anything heavy is loaded
    session = _session(args)
    plan = session.plan(knobs_from_args(args, session.spec.num_layers * session.spec.num_experts))
    return session, plan, session.apply(plan)


# --- commands ------------------------------------------------------------------------------------
def cmd_plan(args) -> dict:
    from catalog.knobs import knobs_from_args
    from placement.plan import build_plan
    from placement.session import model_spec

    if args.selection != "random":  # scores come from running the model
        session, plan, _ = _session_and_plan(args)
        spec = session.spec
    else:
        spec = model_spec(_identity(args), args.device)
        plan = build_plan(spec, knobs_from_args(args, spec.num_layers * spec.num_experts))
    out = {"model": args.model, "selection": args.selection, **plan.summary(spec)}
    if args.show_states:
        out["plan"] = plan.to_dict()
    return out


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def cmd_generate(args) -> dict:
    """Decode through the serving decoder: once to warm it up (graph capture, kernel compilation),
    then timed."""
    from placement.decode import Decoder, Sampling

    sampling = Sampling(args.temperature, args.top_p, args.sample_seed)
    session, plan, report = _session_and_plan(args)
    engine, tok = session.engine, session.tokenizer
    ids = tok.encode(args.prompt)
    if not ids:
        raise ValueError("the prompt is empty after tokenization")
    context = session.model.config.max_position_embeddings
    if len(ids) + args.max_new_tokens >= context:
        raise ValueError(f"the prompt is {len(ids)} tokens and --max-new-tokens {args.max_new_tokens}: together "
                         f"not below the model's context of {context}")
    decoder = Decoder(session.model, engine, max_seqs=1, max_len=len(ids) + args.max_new_tokens + 1)
    decoder.generate([ids], args.max_new_tokens, sampling=sampling, eos_token_id=tok.eos_token_id)
    engine.reset_stats()
    run = decoder.generate([ids], args.max_new_tokens, sampling=sampling, eos_token_id=tok.eos_token_id)
    gen = run.sequences[0]
    return {
        "model": args.model,
        "plan_id": plan.plan_id,
        "text": tok.decode(gen.ids),
        "finish_reason": gen.finish_reason,
        "prompt_tokens": gen.prompt_tokens,
        "new_tokens": gen.new_tokens,
        "ttft_s": round(gen.ttft_s, 6),
        "prefill_tok_s": round(gen.prefill_tok_s, 3),
        "decode_tok_s": None if gen.decode_tok_s is None else round(gen.decode_tok_s, 3),
        "decode_graphs": decoder.reason or "on",
        **{k: v for k, v in plan.summary(engine.spec).items() if k != "plan_id"},
        "memory": engine.memory(),
        "expert_stats": engine.stats.as_dict(),
        "apply": report.as_dict(),
        "device": str(engine.accel),
    }


def _profiler(args):
    """Load the model under the engine and a Profiler with the command's measurement settings."""
    from profiler.profile import Profiler, Settings

    settings = Settings(datasets=tuple(d for d in args.datasets.split(",") if d), data=args.data,
                        seqlen=args.seqlen, max_windows=args.max_windows, prompt_tokens=args.prompt_tokens,
                        new_tokens=args.new_tokens, repeats=args.repeats, batch_sizes=args.batch_sizes,
                        max_spread=args.max_spread, retries=args.retries,
                        ppl_batch=args.ppl_batch)
    return Profiler(_session(args), settings)


def cmd_search(args) -> dict:
    """NSGA-II over the knobs; every measured row goes to --out with the Pareto-optimal ones marked."""
    from profiler.search import Search, check_search_speed

    if not args.datasets:
        raise ValueError("search needs perplexity: give at least one dataset in --datasets")
    if args.trials < 1:
        raise ValueError(f"--trials must be >= 1, got {args.trials}")
    check_search_speed(args.speed, args.batch_sizes, screened=args.screen)  # before loading anything
    profiler = _profiler(args)
    cost = None
    if args.screen:
        from profiler.costmodel import calibrate

        cost = calibrate(profiler.engine, profiler.prompt, profiler.calib_ids(), new_tokens=args.new_tokens)
        log.info("cost model: %s", cost.as_dict())
    search = Search(profiler, args.out, gpu_budget=args.gpu_budget, known=args.profile or [],
                    selection_seed=args.seed, cost=cost, margin=args.screen_margin, speed=args.speed,
                    remeasure=args.remeasure, host_budget=args.host_budget)
    study = search.run(args.trials, seed=args.seed, storage=args.storage, study_name=args.study_name,
                       sweep_steps=args.sweep_steps, progress=not args.quiet)
    df = search.write_front(study)
    return {"out": args.out, "trials": len(study.trials), **search.counts(study), "plans": len(df),
            "measured_now": search.measured_here, "screened_out": search.screened_out,
            "pareto_optimal": int(df["pareto"].sum())}


def cmd_profile(args) -> dict:
    """Measure every plan of a grid; append one row per new plan to the CSV (resumable)."""
    from tqdm import tqdm

    from catalog.knobs import Knobs, parse_grid
    from catalog.rows import read_profile
    from profiler.profile import profile_grid

    read_profile(args.out)  # a file that is no profile fails before the model loads
    profiler = _profiler(args)
    spec = profiler.engine.spec
    combos = parse_grid(args.grid, spec.num_layers * spec.num_experts)
    budget = {} if args.gpu_budget is None else {"gpu_budget": args.gpu_budget}
    host = {} if args.host_budget is None else {"host_budget": args.host_budget}
    knob_sets = [Knobs(**{"seed": args.seed, **(budget if not {"gpu_budget", "gpu_experts"} & set(c) else {}),
                          **host, **c})
                 for c in combos]  # bad knobs fail before measuring
    return profile_grid(profiler, knob_sets, args.out, remeasure=args.remeasure, progress=lambda it: tqdm(
        it, desc=f"profiling {args.model}", unit="plan", disable=args.quiet))


def _read_measured(path: str, datasets: str | None):
    """The file's rows that passed (timed runs in agreement), with `ppl`; flagged ones are named."""
    from catalog.rows import passed, read_profile, with_ppl

    if not Path(path).is_file():
        raise ValueError(f"cannot read {path}: no such file")
    df = read_profile(path)
    if df.empty:
        raise ValueError(f"{path} has no measured plans")
    good = passed(df)
    if len(good) < len(df):
        print(f"{len(df) - len(good)} flagged plan(s) left out (their timed runs disagree; measure them again with "
              f"qos profile --remeasure flagged): {', '.join(df.loc[df['flagged'], 'plan_id'].astype(str))}",
              file=sys.stderr)
    if good.empty:
        raise ValueError(f"every plan of {path} is flagged")
    return with_ppl(good, datasets.split(",") if datasets else None)


def cmd_front(args) -> dict:
    """Print the Pareto-optimal plans of a profile or search file."""
    from catalog.pareto import front, parse_objectives

    df = _read_measured(args.file, args.datasets)
    objectives = parse_objectives(args.objectives)
    best = front(df, objectives)
    columns = ["plan_id", "quantized", "bits", "selection", "gpu_experts", "offload", "prefetch", "attn_bits",
               "decode_tok_s", "ppl", "gpu_bytes"]
    best = best[[c for c in columns if c in best.columns]]
    if not args.json:
        print(f"{len(best)} of {len(df)} plans are Pareto-optimal for {args.objectives}:")
        print(best.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return {"file": args.file, "plans": len(df), "front": best.to_dict(orient="records")}


def cmd_plot(args) -> dict:
    """Write the front picture and the throughput heatmap of a profile or search file."""
    from pathlib import Path

    from catalog.plots import plot_front, plot_heatmap

    df = _read_measured(args.file, args.datasets)
    stem = Path(args.out_prefix or Path(args.file).with_suffix(""))
    title = args.title or f"{df['model'].iloc[0]} on {df['device_name'].iloc[0]}"
    paths = [plot_front(df, Path(f"{stem}_front.png"), title), plot_heatmap(df, Path(f"{stem}_heatmap.png"), title)]
    for p in paths:
        print(f"wrote {p}")
    return {"pictures": [str(p) for p in paths]}


def read_prompts(path: str) -> list[dict]:
    """A JSON-lines file of {"prompt": TEXT, "max_new_tokens": N?}; errors name the line."""
    import json as _json

    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as err:
        raise ValueError(f"cannot read prompts file {path}: {err.strerror}") from None
    prompts = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = _json.loads(line)
        except _json.JSONDecodeError as err:
            raise ValueError(f"{path}:{i}: not JSON ({err.msg})") from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"]:
            raise ValueError(f'{path}:{i}: each line must be an object with a non-empty "prompt" string')
        n = item.get("max_new_tokens", 32)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{path}:{i}: max_new_tokens must be a positive integer, got {n!r}")
        prompts.append({"prompt": item["prompt"], "max_new_tokens": n})
    if not prompts:
        raise ValueError(f"{path} has no prompts")
    return prompts


def cmd_serve(args) -> dict:
    """Write a Ray Serve config for the front and SLOs (or take --config as it is) and deploy it on a
    running Ray cluster; returns once every replica serves."""
    from runtime import ray_app

    if args.front is None and args.config is None:
        raise ValueError("give --front and --slos (a Serve config is written for them), or --config of one")
    config = args.config or f"runs/serve-{args.name}.yaml"
    if args.front is not None:
        if args.slos is None:
            raise ValueError("--slos is required with --front")
        from catalog.rows import read_front
        from placement.session import identity_for
        from runtime.limits import Limits

        limits = Limits(max_seqs=args.max_seqs, max_batched_tokens=args.max_batched_tokens,
                        max_queue=args.max_queue, max_len=args.max_len, max_new_tokens=args.max_new_tokens,
                        cpu_threads=args.cpu_threads)
        rows = read_front(args.front, speed=args.speed)  # a bad front fails here, not inside the cluster
        identity_for(rows[0].identity, model=args.model, layers=args.layers, source=args.front)
        ray_app.connect(args.address)
        num_gpus = args.num_gpus
        if num_gpus is None:
            num_gpus = 1 if ray_app.cluster_gpus() >= 1 and args.device != "cpu" else 0
        ray_app.write_config(
            config, front=args.front, slos=args.slos, watch_slos=args.watch_slos, app=args.name,
            replicas=args.replicas, max_replicas=args.max_replicas, num_gpus=num_gpus, host=args.host, port=args.port,
            model=args.model, layers=args.layers, device=None if args.device == "auto" else args.device,
            tick_s=args.tick, free_memory=args.free_memory, data=args.data, speed=args.speed,
            limits=dataclasses.asdict(limits), anonymous_tenant=args.anonymous_tenant,
            served_model_name=args.served_model_name, host_budget=args.host_budget)
    if os.environ.get("RAY_AUTH_MODE") == "disabled":
        print("qos serve: warning: Ray token auth is off (RAY_AUTH_MODE=disabled): any process that reaches "
              "this cluster can call the server and run code on it", file=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"qos serve: warning: the HTTP API listens on {args.host}, beyond this machine; only API keys "
              f"in the SLO file guard it", file=sys.stderr)
    ray_app.connect(args.address)
    apps = ray_app.deploy(config, wait_s=args.wait)
    replicas = ray_app.statuses(apps[0])
    return {"config": config, "applications": apps, "replicas": len(replicas),
            "plan_ids": [r["plan_id"] for r in replicas], "model": replicas[0]["model"]}


def cmd_status(args) -> dict:
    from runtime import ray_app

    ray_app.connect(args.address)
    replicas = ray_app.statuses(args.name, free_bytes=args.free_memory, set_free=args.free_memory is not None,
                                replica=args.replica)
    return {"app": args.name, "replicas": replicas}


def cmd_submit(args) -> dict:
    """Send a tenant's prompts to the server; one result per prompt, in order."""
    import json as _json

    from runtime import ray_app

    prompts = read_prompts(args.prompts)
    ray_app.connect(args.address)
    handle = ray_app.handle(args.name)
    tenants = [t["name"] for t in ray_app.result(handle.status.remote())["tenants"]]
    if args.tenant not in tenants:  # the job fails at once, naming the tenants the server knows
        raise ValueError(f"unknown tenant {args.tenant!r}; the server's tenants: {', '.join(tenants)}")
    results = ray_app.generate_all(handle, [(args.tenant, p["prompt"], p["max_new_tokens"]) for p in prompts])
    lines = "\n".join(_json.dumps(r) for r in results) + "\n"
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(lines)
    else:
        print(lines, end="")
    return {"tenant": args.tenant, "answered": len(results), "out": args.out}


def cmd_stop(args) -> dict:
    from runtime import ray_app

    ray_app.connect(args.address)
    ray_app.stop(args.name)
    return {"stopped": args.name}


def cmd_cache(args) -> dict:
    """The on-disk variant cache: what it holds by model and quantizer, and pruning it to a size."""
    from placement import variants

    root = Path(args.dir) if args.dir else variants.cache_root()
    out = {"cache_dir": str(root)}
    if args.prune_to is not None:
        out["prune"] = variants.prune(args.prune_to, root, dry_run=args.dry_run)
    files = variants.cache_files(root)
    groups: dict[tuple[str, str], dict] = {}
    for f in files:
        g = groups.setdefault((f["model"], f["quantizer"]), {"model": f["model"], "quantizer": f["quantizer"],
                                                             "files": 0, "bytes": 0, "last_used": f["used"]})
        g["files"] += 1
        g["bytes"] += f["bytes"]
    out.update(files=len(files), bytes=sum(f["bytes"] for f in files),
               folders=[{**g, "last_used": time.strftime("%Y-%m-%d %H:%M", time.localtime(g["last_used"]))}
                        for g in groups.values()])
    return out


def cmd_demo(args) -> dict:
    """The whole loop: profile, front, serve, two tenants' jobs, an SLO change, a memory squeeze."""
    from placement.models import REFERENCE_DIR
    from qos.demo import run

    model = args.model or ("reference" if (REFERENCE_DIR / "config.json").exists() else "tiny-random")
    if not args.json:
        return run(model, None if args.device == "auto" else args.device)
    with contextlib.redirect_stdout(sys.stderr):  # --json: the one JSON object alone on stdout
        return run(model, None if args.device == "auto" else args.device)


# --- entry point ---------------------------------------------------------------------------------
class _Help(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it has none to show or says it already."""

    def _get_help_string(self, action):
        text, default = action.help or "", action.default
        if (not action.option_strings or "default" in text or default is None or default is False
                or default is argparse.SUPPRESS):
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (tuple, list)) else str(default)
        shown = shown.replace("%", "%%")  # argparse %-formats the help afterwards
        return f"{text} (default: {shown})" if text else f"default: {shown}"


def build_parser() -> argparse.ArgumentParser:
    from qos import __version__
    from runtime.limits import Limits

    parser = argparse.ArgumentParser(prog="qos", description="Serve MoE models with mixed-precision, offloaded experts.")
    parser.add_argument("--version", action="version", version=f"moe-qos {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser = functools.partial(sub.add_parser, formatter_class=_Help)

    p = sub.add_parser("plan", parents=[common], help="build a plan from knobs and print what it costs")
    _add_model_args(p)
    _add_plan_args(p)
    p.add_argument("--show-states", action="store_true", help="include every expert's state")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("generate", parents=[common], help="generate text under a plan and time it")
    _add_model_args(p)
    _add_plan_args(p)
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--sample-seed", type=int, help="makes sampling reproducible")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_generate)

    measure = argparse.ArgumentParser(add_help=False)  # what qos profile and qos search share
    _add_model_args(measure)
    m = measure.add_argument
    m("--data", help="data folder (default: $QOS_DATA_DIR or ../shared/data)")
    m("--datasets", default="wikitext2,ptb,c4", help="comma-separated; empty to skip perplexity")
    m("--seqlen", type=int, help="perplexity window (default: min(2048, model context))")
    m("--max-windows", type=int, help="cap the perplexity windows per dataset (quick runs)")
    m("--ppl-batch", type=int, default=1, help="perplexity windows per forward pass")
    m("--prompt-tokens", type=int, default=64, help="prompt length of the timed runs (WikiText-2 text)")
    m("--new-tokens", type=int, default=32, help="tokens decoded per timed run")
    m("--repeats", type=int, default=3, help="timed runs per plan (the median is kept)")
    m("--batch-sizes", type=_int_list, default=(1,), metavar="N,N,...",
      help="also time decoding with this many concurrent sequences, e.g. 1,4,16 (batch 1 always; default: 1)")
    m("--max-spread", type=float, default=0.25, metavar="RATIO",
      help="timed runs of a plan disagreeing by more than this, (max - min) / median, are measured again; "
           "a row that never agrees is flagged and left out of fronts, the policy and the search")
    m("--retries", type=int, default=2, help="measurements again, at most, of a plan whose runs disagree "
      "(default: %(default)s)")
    m("--remeasure", metavar="all|flagged|PLAN_ID,...",
      help="measure again plans already in the files instead of reusing them")
    m("--calib", help=CALIB_HELP)
    m("--quiet", action="store_true", help="no progress bar")
    m("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("profile", parents=[common, measure], help="measure throughput, memory and perplexity over a grid of plans")
    p.add_argument("--grid", required=True,
                   help='knob values to combine, e.g. "quantized=0,25%%,50%%;bits=4,2;gpu_experts=50%%,100%%;'
                        'selection=random,sensitivity;prefetch=0,1"')
    p.add_argument("--out", required=True, help="CSV file; plans already in it are skipped")
    p.add_argument("--gpu-budget", type=_bytes, metavar="BYTES",
                   help="accelerator bytes (e.g. 20GiB) for every plan of the grid that names neither "
                        "gpu_experts nor gpu_budget: its accelerator experts follow")
    p.add_argument("--host-budget", type=_bytes, metavar="BYTES",
                   help="host memory bytes (e.g. 64GiB) every plan's host-tier experts may hold: a plan of the "
                        "grid over it is an error")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("search", parents=[common, measure], help="NSGA-II search for the Pareto front of plans (optuna)")
    p.add_argument("--trials", type=int, required=True,
                   help="trials of the sampler beyond the sweep's points (--sweep-steps + 1 of them, run first)")
    p.add_argument("--out", required=True, help="CSV of every measured plan, Pareto-optimal ones marked")
    p.add_argument("--storage", help="optuna storage: a journal file path or an SQLite URL (resumable)")
    p.add_argument("--study-name", default="moe-qos", help="the optuna study's name in --storage")
    p.add_argument("--gpu-budget", type=_bytes, metavar="BYTES",
                   help="accelerator bytes (e.g. 20GiB): a constraint of the search")
    p.add_argument("--profile", action="append", help="profile CSV whose measurements are reused (repeatable)")
    p.add_argument("--sweep-steps", type=int, default=8,
                   help="the paper's sweep, run first: quantized count in this many steps, 0 to 100%%")
    p.add_argument("--screen", action="store_true",
                   help="calibrate the cost model and skip measuring plans it predicts a measured plan beats")
    p.add_argument("--screen-margin", type=float, default=0.15, metavar="RATIO",
                   help="how much faster the beating plan must be, 0.15 = 15%%")
    p.add_argument("--speed", default="decode_tok_s", metavar="COLUMN",
                   help="the throughput to maximise: decode_tok_s (batch 1), agg_tok_s_bN (N sequences in "
                        "aggregate) or seq_tok_s_bN, with N in --batch-sizes")
    p.add_argument("--host-budget", type=_bytes, metavar="BYTES",
                   help="host memory bytes (e.g. 64GiB) a plan's host-tier experts may hold: a constraint of the "
                        "search (plans over it are not measured)")
    p.set_defaults(func=cmd_search)

    ray_common = argparse.ArgumentParser(add_help=False)
    ray_common.add_argument("--name", default="moe-qos", help="the Serve application's name")
    ray_common.add_argument("--address", help="Ray cluster address (default: auto, a local `ray start --head`)")
    ray_common.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("serve", parents=[common, ray_common],
                       help="deploy the server as a Ray Serve application (OpenAI-compatible HTTP API)")
    p.add_argument("--front", help="a front or profile CSV of measured plans (it names the model they were "
                   "measured on)")
    p.add_argument("--slos", help="tenant SLOs (YAML), written into the Serve config as its user_config")
    p.add_argument("--config", metavar="YAML",
                   help="the Serve config: written here from --front and --slos, or deployed as it is without "
                        "them (default: runs/serve-NAME.yaml)")
    p.add_argument("--watch-slos", action="store_true",
                   help="put the SLO file's path in the config instead of its content: the server re-reads "
                        "the file when it changes (one machine)")
    p.add_argument("--replicas", type=int, default=1, help="replicas, each with its own model (one per GPU)")
    p.add_argument("--max-replicas", type=int, metavar="N",
                   help="let Serve autoscale from --replicas up to N replicas by requests in flight")
    p.add_argument("--num-gpus", type=float, default=None,
                   help="GPUs per replica (default: 1 when the cluster has GPUs and --device is not cpu, else 0)")
    p.add_argument("--host", default="127.0.0.1", help="where the HTTP API listens (loopback unless you say)")
    p.add_argument("--port", type=int, default=8000, help="the HTTP API's port")
    p.add_argument("--anonymous-tenant", metavar="TENANT",
                   help="the tenant of HTTP requests without an API key (default: they are refused)")
    p.add_argument("--served-model-name", metavar="NAME", help="the model name clients pass (default: the front's)")
    p.add_argument("--wait", type=float, default=900.0, help="seconds to wait for every replica to serve")
    p.add_argument("--model", help="the model to serve: must be the one the front was measured on (default: the front's)")
    p.add_argument("--layers", type=int, help="with --model: the layers the front was measured with (default: all)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the server runs the model (auto: cuda when the replica has a GPU)")
    p.add_argument("--tick", type=float, default=1.0, help="seconds between controller ticks")
    p.add_argument("--free-memory", type=_bytes, metavar="BYTES",
                   help="start with this much free accelerator memory, simulated (e.g. 30MB; CPU machines, tests)")
    p.add_argument("--host-budget", type=_bytes, metavar="BYTES",
                   help="host memory bytes (e.g. 64GiB) each replica's host-tier experts may hold: the server "
                        "never chooses a plan of the front over it, and fails to start if none fits")
    p.add_argument("--data", help="data folder, for calibration text of scored selections")
    p.add_argument("--speed", default="decode_tok_s", metavar="COLUMN",
                   help="the front's column that tenants' min_decode_tok_s is checked against: decode_tok_s "
                        "(batch 1), or seq_tok_s_bN (per sequence with N running) for a busy server "
                        "(default: %(default)s)")
    limits = p.add_argument_group("scheduling limits")
    d = Limits()
    limits.add_argument("--max-seqs", type=int, default=d.max_seqs,
                        help="sequences decoded at once")
    limits.add_argument("--max-batched-tokens", type=int, default=d.max_batched_tokens,
                        help="tokens per step: one per running sequence plus prompt chunks")
    limits.add_argument("--max-queue", type=int, default=d.max_queue,
                        help="requests waiting for a slot before new ones are refused")
    limits.add_argument("--max-len", type=int, default=d.max_len,
                        help="positions per sequence, prompt plus new tokens; at most the model's context "
                             "(default: %(default)s)")
    limits.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                        help="the most new tokens a request may ask for")
    limits.add_argument("--cpu-threads", type=int, default=d.cpu_threads,
                        help="torch's threads while serving a model on the CPU; 0: torch's default")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("status", parents=[common, ray_common],
                       help="every replica's plan, budget, tenants and history")
    p.add_argument("--free-memory", "--set-free-memory", dest="free_memory", type=_bytes, metavar="BYTES",
                   help="simulate this much free accelerator memory (e.g. 30MB, 24GiB) on every replica (or "
                        "--replica), then tick")
    p.add_argument("--replica", metavar="ID", help="with --free-memory: only this replica (ids: qos status)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("submit", parents=[common, ray_common], help="send a tenant's prompts (JSON lines) to the server")
    p.add_argument("--tenant", required=True, help="the tenant (named in the server's SLO file) the prompts are for")
    p.add_argument("--prompts", required=True, help='JSON lines: {"prompt": "...", "max_new_tokens": 32}')
    p.add_argument("--out", help="results as JSON lines (default: stdout)")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("stop", parents=[common, ray_common],
                       help="delete the Serve application (every accepted request is answered first)")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("front", parents=[common], help="print the Pareto-optimal plans of a profile or search file")
    p.add_argument("file", help="a CSV written by qos profile or qos search")
    p.add_argument("--objectives", default="decode_tok_s:max,ppl:min,gpu_bytes:min",
                   help="COLUMN:max|min, comma-separated; ppl is the mean of the datasets")
    p.add_argument("--datasets", help="which ppl_ columns make up ppl (default: all measured)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_front)

    p = sub.add_parser("plot", parents=[common], help="pictures of a profile or search file (PNG)")
    p.add_argument("file", help="a CSV written by qos profile or qos search")
    p.add_argument("--out-prefix", help="default: the file's path without .csv")
    p.add_argument("--datasets", help="which ppl_ columns make up ppl (default: all measured)")
    p.add_argument("--title", help="the pictures' title (default: the model and the device)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("cache", parents=[common], help="what the on-disk variant cache holds; prune it to a size")
    p.add_argument("--dir", help="the cache folder (default: $QOS_CACHE_DIR, else ~/.cache/moe-qos)")
    p.add_argument("--prune-to", type=_bytes, metavar="BYTES",
                   help="delete the least recently used variants until the cache holds at most BYTES (0: all)")
    p.add_argument("--dry-run", action="store_true", help="with --prune-to: say what would go, delete nothing")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("demo", parents=[common], help="the whole loop on the reference model")
    p.add_argument("--model", help="default: the bundled reference model (tiny-random if absent)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="the accelerator tier (auto: cuda when present)")
    p.add_argument("--json", action="store_true", help="print one JSON object (the narrative goes to stderr)")
    p.set_defaults(func=cmd_demo)
    return parser


def _bytes_text(n: float) -> str:
    """Decimal units, as --gpu-budget 20GB reads them: 42.7 GB, 881.98 kB."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.4g} {unit}"
    return f"{n:g} B"


def _human(key: str, value) -> str:
    """A value as a person reads it: sizes in units, rates in percent, floats to 4 digits."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={_human(k, v)}" for k, v in value.items())
    if isinstance(value, list):
        return f"{len(value)} entries (--json shows them)" if value and isinstance(value[0], dict) else \
            ", ".join(_human(key, v) for v in value)
    if isinstance(value, bool) or value is None or not isinstance(value, (int, float)):
        return str(value)
    if "bytes" in key.split("_") or key.endswith("_fetched"):
        return _bytes_text(value)
    if key.endswith(("rate", "accuracy")) and 0 <= value <= 1:
        return f"{100 * value:.1f}%"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


STATUS_KEYS = ("replica", "model", "plan_id", "desired_plan_id", "last_decision", "free_bytes", "budget_bytes",
               "running", "waiting", "reconfigurations", "slo_rejections_total")


def _print_human(result: dict) -> None:
    if isinstance(result.get("replicas"), list):  # qos status: the headline of each replica (--json: all)
        for status in result["replicas"]:
            _print_human({k: status[k] for k in STATUS_KEYS} | {
                "tenants": ", ".join(f"{t['name']} ({t['running']} running, {t['waiting']} waiting)"
                                     for t in status["tenants"])})
            print()
        return
    for key, value in result.items():
        print(f"{key:>16}: {_human(key, value)}")


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, or a bad flag (argparse printed the one-line error)
        return exit_.code
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    try:
        result = args.func(args)
        if args.json:
            print(json.dumps(result, default=str))
        elif args.command not in ("demo", "front", "plot", "submit"):
            _print_human(result)
    except ValueError as err:  # bad input: one clear line, no traceback
        print(f"qos {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader left (qos front F | head): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 1
    return 0
