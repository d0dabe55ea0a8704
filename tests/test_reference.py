"""The bundled reference model: loads offline, and our perplexity agrees with an independent,
plain transformers computation."""

import math

import pytest
import torch

from placement.engine import Engine
from placement.models import REFERENCE_DIR, load_model
from catalog.knobs import Knobs
from placement.plan import build_plan
from catalog.data import DATASETS, data_dir, eval_text
from profiler.perplexity import eval_windows, perplexity

HAVE_WIKI = (data_dir() / DATASETS["wikitext2"]).is_file()


def test_reference_checkpoint_is_small_and_loads_with_plain_transformers():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    size = sum(f.stat().st_size for f in REFERENCE_DIR.iterdir() if f.is_file())
    assert size <= 24 * 2**20
    model = AutoModelForCausalLM.from_pretrained(REFERENCE_DIR, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(REFERENCE_DIR, local_files_only=True)
    assert model.config.model_type == "mixtral" and model.config.num_local_experts == 8
    assert len(tok("the market fell")["input_ids"]) > 0


@pytest.mark.skipif(not HAVE_WIKI, reason="WikiText-2 not found (set QOS_DATA_DIR)")
def test_16bit_perplexity_matches_a_plain_transformers_loop():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    windows_wanted = 3
    text = eval_text("wikitext2")

    # Independent: stock model and tokenizer, labels=input_ids, transformers' own loss.
    model = AutoModelForCausalLM.from_pretrained(REFERENCE_DIR, dtype=torch.float32, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(REFERENCE_DIR, local_files_only=True)
    seqlen = min(2048, model.config.max_position_embeddings)
    enc = tok(text, return_tensors="pt").input_ids
    nlls = []
    with torch.no_grad():
        for i in range(windows_wanted):
            batch = enc[:, i * seqlen : (i + 1) * seqlen]
            nlls.append(model(batch, labels=batch).loss.item())
    plain = math.exp(sum(nlls) / len(nlls))

    # Ours: the engine serving every expert at 16 bits, our windows, our loss.
    loaded = load_model("reference", device="cpu")
    engine = Engine(loaded.model)
    engine.apply(build_plan(engine.spec, Knobs(gpu_experts=4)))  # some experts fetched from the host
    windows, _ = eval_windows(loaded.tokenizer, "wikitext2", text, seqlen=seqlen, max_windows=windows_wanted)
    ours = perplexity(loaded.model, "wikitext2", windows).ppl
    assert ours == pytest.approx(plain, rel=1e-3)
