"""The executor's scheduler on a real (tiny) model without Ray: continuous batching equals running
each request alone, across joins, leaves and a reconfiguration mid-batch, and for a burst prefilled
in packed forwards; a failing prefill fails its request alone; stop strings; cancellation, limits,
priority under a flood, streaming order, and stopping with nothing left unanswered."""

import threading
import time

import pytest
import torch

from catalog.knobs import Knobs
from catalog.rows import ModelIdentity
from placement.decode import Decoder, Sampling
from placement.models import REFERENCE_DIR, ByteTokenizer, HFTokenizer
from placement.session import open_session
from runtime.controller import Desired
from runtime.executor import Executor, IncrementalText, StopText, streamable
from runtime.limits import Limits, Rejected

PROMPTS = ["the cat sat on the mat", "a b c d e f g h i j k l m n o p", "hello", "moe experts are routed",
           "one two three four five six seven eight nine ten eleven twelve", "zz"]


@pytest.fixture(scope="module")
def session():
    return open_session(ModelIdentity("tiny-random"), "cpu")


@pytest.fixture(scope="module")
def plans(session):
    """Two plans computing the same function: every expert on the accelerator, or most fetched
    from the host (16-bit both: tokens must not change when the plan does)."""
    a, b = session.plan(Knobs()), session.plan(Knobs(gpu_experts=4, cache_slots=4))
    return {a.plan_id: a, b.plan_id: b}


def alone(session, plans, prompt: str, n: int, sampling: Sampling = Sampling()) -> list[int]:
    """The request decoded by itself, greedily unless told, to n tokens (no early stop: the tiny
    model's end-of-sequence is outside its vocabulary)."""
    session.apply(next(iter(plans.values())))
    ids = session.tokenizer.encode(prompt)
    dec = Decoder(session.model, session.engine, max_seqs=1, max_len=len(ids) + n + 1)
    return dec.generate([ids], n, sampling=sampling, fixed_length=True).sequences[0].ids


class Running:
    """An executor whose serving loop runs in a thread (started on demand), stopped at the end."""

    def __init__(self, session, plans, start=True, priorities=None, **limits):
        self.ex = Executor(session, plans, limits=Limits(**limits),
                           priority=lambda t: (priorities or {}).get(t, 1))
        self.ex.want(None)
        session.apply(next(iter(plans.values())))
        self.thread = threading.Thread(target=self.ex.serve_forever, args=(self.ex.reconcile,), daemon=True)
        if start:
            self.start()

    def start(self):
        self.thread.start()

    def __enter__(self):
        return self.ex

    def __exit__(self, *exc):
        self.ex.stop()
        if self.thread.is_alive():
            self.thread.join(30)
        assert not self.thread.is_alive()


def test_continuous_batching_equals_each_request_alone_across_joins_leaves_and_a_reconfiguration(session, plans):
    lengths = [9, 4, 14, 6, 11, 3]
    expected = [alone(session, plans, p, n) for p, n in zip(PROMPTS, lengths)]
    first, second = plans
    with Running(session, plans, max_seqs=3, max_batched_tokens=16) as ex:
        reqs = [ex.submit("a" if i % 2 else "b", p, n) for i, (p, n) in enumerate(zip(PROMPTS, lengths))]
        while ex.steps < 3:  # mid-batch: switch plans between two steps
            time.sleep(0.001)
        ex.want(Desired(second, "test", time.time()))
        results = [r.result(timeout=60) for r in reqs]
        ex.want(Desired(first, "test", time.time()))
        late = ex.submit("a", PROMPTS[0], lengths[0]).result(timeout=60)
    assert [r.tokens for r in reqs] == expected
    assert late["plan_id"] == first and late["new_tokens"] == lengths[0]
    assert all(r["finish_reason"] == "length" and r["new_tokens"] == n for r, n in zip(results, lengths))
    assert any(len(r["plan_ids"]) == 2 for r in results), [r["plan_ids"] for r in results]
    assert ex.history[0]["to"] == second and ex.history[0]["running"] >= 1
    # batching: far fewer steps than tokens (at most 3 sequences per step, joining as others leave)
    assert ex.steps < sum(lengths) - len(lengths)
    assert all(r["ttft_s"] > 0 and r["latency_s"] >= r["ttft_s"] for r in results)


def test_streaming_gives_tokens_in_order_and_cancel_ends_a_request_early(session, plans):
    with Running(session, plans, max_seqs=2) as ex:
        req = ex.submit("a", PROMPTS[1], 40)
        got = []
        for tok in req.stream(timeout=30):
            got.append(tok)
            if len(got) == 3:
                req.cancel()
        result = req.result(timeout=30)
        assert result["finish_reason"] == "cancelled" and got == req.tokens and 3 <= len(got) < 40
        assert ex.submit("b", PROMPTS[0], 5).result(timeout=30)["new_tokens"] == 5  # its slot was freed
        waiting = Running(session, plans, start=False)  # cancelled before it was ever admitted
        with waiting as idle:
            r = idle.submit("a", "hello", 5)
            r.cancel()
            waiting.start()
            assert r.result(timeout=30)["finish_reason"] == "cancelled" and r.tokens == []


def test_a_request_past_its_deadline_ends_with_what_it_has_running_or_waiting(session, plans):
    with Running(session, plans, max_seqs=1) as ex:
        slow = ex.submit("a", PROMPTS[1], 200, timeout_s=0.15)  # runs, then times out mid-way
        queued = ex.submit("b", "hello", 5, timeout_s=0.05)  # waits behind it past its deadline
        done = slow.result(timeout=30)
        assert done["finish_reason"] == "timeout" and 0 < done["new_tokens"] < 200
        assert queued.result(timeout=30)["finish_reason"] == "timeout" and queued.tokens == []
        assert ex.submit("a", "hello", 3).result(timeout=30)["new_tokens"] == 3
        with pytest.raises(Rejected, match="timeout_s must be a positive number"):
            ex.submit("a", "hi", 3, timeout_s=0)


def test_limits_are_checked_at_submit_with_errors_that_name_them(session, plans):
    runner = Running(session, plans, start=False, max_seqs=1, max_queue=2, max_len=64, max_new_tokens=50)
    with runner as ex:
        held = [ex.submit("a", "hello", 4), ex.submit("a", "hello", 4)]
        with pytest.raises(Rejected, match="queue full: 2 requests are waiting"):
            ex.submit("b", "hello", 4)
        with pytest.raises(Rejected, match=r"prompt is \d+ tokens and max_new_tokens is 40: together above the 63"):
            ex.submit("a", " ".join(["word"] * 40), 40)
        with pytest.raises(Rejected, match="above this server's limit of 50"):
            ex.submit("a", "hi", 51)
        for bad, match in [(dict(temperature=-1.0), "temperature"), (dict(top_p=2.0), "top_p"),
                           (dict(stop=[""]), "stop"), (dict(seed="x"), "seed")]:
            with pytest.raises(Rejected, match=match):
                ex.submit("a", "hi", 3, **bad)
        for n in (0, True, 2.5):
            with pytest.raises(Rejected, match="max_new_tokens must be a positive integer"):
                ex.submit("a", "hi", n)
        runner.start()
        assert [h.result(timeout=30)["new_tokens"] for h in held] == [4, 4]


def test_a_high_priority_tenant_is_not_starved_by_a_flood(session, plans):
    runner = Running(session, plans, start=False, priorities={"flood": 0, "vip": 2}, max_seqs=1)
    done = []
    with runner as ex:
        flood = [ex.submit("flood", f"spam {i}", 3) for i in range(12)]
        vip = [ex.submit("vip", "important", 3), ex.submit("vip", "urgent", 3)]
        runner.start()
        for r in vip + flood:
            r.result(timeout=60)
        done = sorted(flood + vip, key=lambda r: r.result()["latency_s"])
    order = [r.tenant for r in done]
    # admitted one at a time: the VIP's two requests come among the first four, not after twelve
    assert "vip" in order[:2] and order[:4].count("vip") == 2, order
    # FIFO within a tenant
    flood_done = [r for r in done if r.tenant == "flood"]
    assert [r.id for r in flood_done] == sorted(r.id for r in flood_done)


def test_stop_answers_everything_accepted_and_refuses_new_requests(session, plans):
    runner = Running(session, plans, max_seqs=1)
    with runner as ex:
        reqs = [ex.submit("a", "hello", 30) for _ in range(4)]
        while not reqs[0].tokens:
            time.sleep(0.001)
    outcomes = []
    for r in reqs:
        try:
            outcomes.append(r.result(timeout=1)["finish_reason"])
        except Rejected as err:
            assert "the server stopped before request" in str(err)
            outcomes.append("refused")
    assert outcomes[0] == "aborted" and outcomes.count("refused") >= 2
    with pytest.raises(Rejected, match="the server is stopping"):
        ex.submit("a", "hello", 3)


def test_what_each_tenant_and_plan_got_is_measured_online(session, plans):
    first, second = plans
    with Running(session, plans, max_seqs=2) as ex:
        done = [ex.submit(t, p, 6).result(timeout=60) for t, p in [("a", PROMPTS[0]), ("a", PROMPTS[2]), ("b", PROMPTS[3])]]
        ex.want(Desired(second, "test", time.time()))
        done.append(ex.submit("b", PROMPTS[4], 6).result(timeout=60))
        cancelled = ex.submit("b", PROMPTS[1], 100)
        cancelled.cancel()
        cancelled.result(timeout=60)
        a, b = ex.delivered("tenant", "a"), ex.delivered("tenant", "b")
        by_plan = ex.delivered_by_plan()
    assert a["requests"] == 2 and b["requests"] == 2  # a cancelled request is not a measurement
    assert a["ttft_s"]["p50"] <= a["ttft_s"]["p95"] == max(r["ttft_s"] for r in done[:2])
    assert b["tpot_ms"]["p95"] == max(r["tpot_ms"] for r in done[2:]) and b["delivered_tok_s"] > 0
    assert {k: v["requests"] for k, v in by_plan.items()} == {first: 3, second: 1}
    assert ex.delivered("tenant", "nobody") == {"requests": 0}


def test_a_burst_is_prefilled_in_packed_forwards_and_each_request_decodes_as_alone(session, plans, monkeypatch):
    """Requests submitted together are prefilled several prompts per forward (within the step's
    token budget and prefill_chunk rows, a chunk that overflows a forward going on in the next)
    and decode as each alone would, greedy or seeded."""
    n = 7
    kinds = [Sampling() if i % 2 else Sampling(temperature=1.3, seed=i) for i in range(len(PROMPTS))]
    expected = [alone(session, plans, p, n, k) for p, k in zip(PROMPTS, kinds)]
    monkeypatch.setattr(Decoder, "prefill_chunk", property(lambda self: 8))  # rows per forward, as the kernels' limit
    runner = Running(session, plans, start=False, max_seqs=len(PROMPTS), max_batched_tokens=40)
    forwards = []
    with runner as ex:
        real = ex.decoder.prefill_many
        ex.decoder.prefill_many = lambda chunks: forwards.append([len(ids) for _, ids, _ in chunks]) or real(chunks)
        reqs = [ex.submit("a", p, n, temperature=k.temperature, seed=k.seed) for p, k in zip(PROMPTS, kinds)]
        runner.start()
        results = [r.result(timeout=60) for r in reqs]
        counters = ex.loop_counters()
    assert [r.tokens for r in reqs] == expected
    assert all(r["finish_reason"] == "length" and r["ttft_s"] > 0 for r in results)
    prompt_tokens = sum(r["prompt_tokens"] for r in results)
    assert sum(map(sum, forwards)) == counters["prefill_tokens"] == prompt_tokens
    assert all(sum(f) <= 8 for f in forwards) and max(map(len, forwards)) > 1, forwards
    # one prompt per forward would take 20 of them (each prompt in chunks of 8)
    assert len(forwards) == counters["prefill_forwards"] < sum(-(-r["prompt_tokens"] // 8) for r in results)
    assert counters["decode_tokens"] == len(PROMPTS) * (n - 1) and counters["decode_steps"] == ex.steps
    assert counters["busy_s"] >= counters["prefill_s"] + counters["decode_s"] and counters["host_s"] >= 0


def test_a_failing_packed_prefill_fails_only_the_request_that_fails_alone(session, plans):
    expected = [alone(session, plans, p, 4) for p in PROMPTS[:3]]
    runner = Running(session, plans, start=False, max_seqs=4)
    with runner as ex:
        real = ex.decoder.prefill_many

        def prefill_many(chunks):
            if any(ord("~") in ids for _, ids, _ in chunks):
                raise RuntimeError("boom")
            return real(chunks)

        ex.decoder.prefill_many = prefill_many
        reqs = [ex.submit("a", p, 4) for p in [PROMPTS[0], "~~~", *PROMPTS[1:3]]]
        runner.start()
        with pytest.raises(RuntimeError, match="boom"):
            reqs[1].result(timeout=60)
        assert [r.result(timeout=60)["new_tokens"] for r in reqs[::2] + reqs[3:]] == [4, 4, 4]
        assert ex.submit("b", "~~~", 3).exception(timeout=60) is not None  # still fails alone, and alone
        assert ex.submit("b", PROMPTS[0], 4).result(timeout=60)["new_tokens"] == 4
    assert [r.tokens for r in (reqs[0], reqs[2], reqs[3])] == expected


def test_a_stop_string_ends_a_request_before_it(session, plans):
    full = alone(session, plans, PROMPTS[0], 40)
    text = session.tokenizer.decode(full)
    stop = next(run for run in text.split("\ufffd") if len(run) >= 2)  # whole characters only
    with Running(session, plans, max_seqs=2) as ex:
        done = ex.submit("a", PROMPTS[0], 40, stop=["never there", stop]).result(timeout=60)
    assert done["finish_reason"] == "stop" and done["text"] == text[:text.index(stop)]
    assert 0 < done["new_tokens"] < 40


@pytest.mark.parametrize("which", ["bytes", "hf"])
def test_stop_strings_of_any_length_are_found_incrementally_where_they_end(which):
    if which == "bytes":
        tok = ByteTokenizer(512)
    else:
        from transformers import AutoTokenizer

        tok = HFTokenizer(AutoTokenizer.from_pretrained(REFERENCE_DIR))
    text = "Naïve café ✓ — the stop string may be a long one, spanning many tokens; then more text follows."
    ids = tok.encode(text)
    stream, pieces = IncrementalText(tok), []
    for i in range(1, len(ids) + 1):
        pieces.append(stream.add(ids[:i]))
    assert "".join(pieces) == tok.decode(ids)  # whole characters only, each once
    stop = "a long one, spanning many tokens"
    check = StopText(tok, ("not in it", stop))
    hits = [i for i in range(1, len(ids) + 1) if check.hit(ids[:i])]
    first = next(i for i in range(1, len(ids) + 1) if stop in tok.decode(ids[:i]))
    assert hits == [first]  # found at the token that completes it, whatever its length in tokens
    assert len(tok.encode(stop)) > 8


def test_streamable_holds_back_what_could_begin_a_stop_string():
    assert streamable("hello wor", ("world",)) == len("hello ")  # "wor" may become "world"
    assert streamable("hello wox", ("world",)) == len("hello wox")
    assert streamable("say END now", ("END", "x")) == len("say ")  # never past a stop string
    assert streamable("ab", ("abc", "b")) == 1  # "a", up to the stop string "b"
    assert streamable("a", ("abc",)) == 0
    assert streamable("anything", ()) == len("anything")


def test_streamed_pieces_never_show_text_the_answer_cuts_off(session, plans):
    """A stop string spanning several pieces: the stream is the final text, piece by piece, and no
    piece ever holds the stop string's beginning."""
    from runtime.server import Server

    full = alone(session, plans, PROMPTS[0], 40)
    text = session.tokenizer.decode(full)
    stop = next(run for run in text.split("\ufffd")[1:] if len(run) >= 2)[:3]  # whole characters, tokens in
    with Running(session, plans, max_seqs=2) as ex:
        req = ex.submit("a", PROMPTS[0], 40, stop=[stop])
        fake = type("S", (), {"session": session})()
        pieces = list(Server.pieces(fake, req))
    final = req.result()["text"]
    assert final == text[:text.index(stop)] and "".join(pieces) == final
    shown = ""
    for p in pieces:
        shown += p
        assert stop not in shown and final.startswith(shown)


def test_a_cpu_server_runs_torch_on_limits_cpu_threads_and_puts_torch_s_setting_back(session, plans):
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # (whatever the machine has: a setting the server must change and put back)

    def serve(cpu_threads: int) -> set[int]:
        """torch's threads as the serving loop sees them, step after step."""
        ex = Executor(session, plans, limits=Limits(cpu_threads=cpu_threads))
        ex.want(None)
        session.apply(next(iter(plans.values())))
        seen = set()

        def between_steps():
            seen.add(torch.get_num_threads())
            ex.reconcile()

        thread = threading.Thread(target=ex.serve_forever, args=(between_steps,), daemon=True)
        thread.start()
        ex.submit("a", "hello", 2).result(timeout=60)
        ex.stop()
        thread.join(30)
        return seen

    try:
        assert serve(1) == {1} and torch.get_num_threads() == 2
        assert serve(0) == {2}  # 0: torch's own setting
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="cpu-threads must be an integer >= 0"):
        Limits(cpu_threads=-1)
