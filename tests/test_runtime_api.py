"""The runtime's shared generation loop, sampler, state files, Python API and CLI, on both engines."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, tiny_model

from edge_lolcats.converters.gguf_export import export_gguf
from edge_lolcats.converters.onnx_export import export_onnx
from edge_lolcats.nn.generate import generate as torch_generate
from edge_lolcats.nn.model import linearize, state_bytes
from edge_lolcats.runtime import load
from edge_lolcats.runtime.generation import StopStrings, TextStream, current_rss_mb
from edge_lolcats.runtime.sampling import Sampler, Sampling, SamplingError
from edge_lolcats.runtime.state import StateFileError

NO_TORCH = "import sys; sys.modules['torch'] = None\n"


def trained_looking(seed=0):
    """A tiny linearized model with non-trivial feature maps and LoRA-free weights."""
    model = linearize(tiny_model("llama", seed=seed), window_size=8, feature_dim=8)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.feature_map_q.weight.normal_()
            layer.self_attn.feature_map_k.weight.normal_()
    return model


@pytest.fixture(scope="module")
def exports(tmp_path_factory, smol_tokenizer):
    folder = tmp_path_factory.mktemp("runtime")
    model = trained_looking()
    gguf, onnx_dir = str(folder / "m.gguf"), str(folder / "m-onnx")
    export_gguf(model, smol_tokenizer, gguf)
    export_onnx(model, smol_tokenizer, onnx_dir)
    other = str(folder / "other.gguf")
    export_gguf(trained_looking(seed=1), smol_tokenizer, other)
    return {"model": model, "gguf": gguf, "onnx": onnx_dir, "other": other, "dir": folder}


# --- sampler ----------------------------------------------------------------------------------


def test_sampler_filters():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=1000)
    best = int(logits.argmax())
    assert Sampler(Sampling())(logits) == best
    assert all(Sampler(Sampling(temperature=5.0, top_k=1, seed=s))(logits) == best for s in range(5))
    assert all(Sampler(Sampling(temperature=5.0, top_p=1e-6, seed=s))(logits) == best for s in range(5))
    top3 = set(np.argsort(logits)[-3:].tolist())
    draws = [Sampler(Sampling(temperature=50.0, top_k=3, seed=s))(logits) for s in range(60)]
    assert set(draws) == top3  # only the three best, and at a high temperature all of them
    a = Sampler(Sampling(temperature=1.0, seed=7))
    b = Sampler(Sampling(temperature=1.0, seed=7))
    assert [a(logits) for _ in range(20)] == [b(logits) for _ in range(20)]
    # repetition penalty: the best token, once in the context, loses to the runner-up
    second = int(np.argsort(logits)[-2])
    logits[best], logits[second] = 4.0, 3.0
    assert Sampler(Sampling(repetition_penalty=1.5))(logits, [best]) == second
    assert Sampler(Sampling(repetition_penalty=1.0))(logits, [best]) == best


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                                 dict(repetition_penalty=0), dict(temperature=float("nan"))])
def test_sampler_rejects_bad_arguments(bad):
    with pytest.raises(SamplingError):
        Sampling(**bad)


def test_stop_strings_are_never_streamed():
    stops = StopStrings(["</end>"])
    shown = []
    for piece in ["Hello", " wor", "ld</", "en", "d> and more"]:
        text, hit = stops.add(piece)
        shown.append(text)
        if hit:
            break
    assert hit and stops.text == "Hello world" and "".join(shown) == "Hello world"
    stops = StopStrings(["STOP"])
    shown = [stops.add(p)[0] for p in ["a S", "T", "x"]] + [stops.finish()]
    assert "".join(shown) == "a STx" and stops.text == "a STx"  # a false start is released


def test_text_stream_equals_full_decode(smol_tokenizer):
    text = "Grüße aus Köln 🙂 — naïve café, 東京."
    ids = smol_tokenizer.encode(text)
    stream = TextStream(smol_tokenizer)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == smol_tokenizer.decode(ids) and not any("\ufffd" in p for p in pieces)


# --- engines and the API ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gguf", "onnx"])
def test_api_greedy_matches_pytorch(exports, kind, smol_tokenizer):
    model = load(exports[kind])
    prompt = "Once upon a time, in a land far away, there lived"
    ids = smol_tokenizer.encode(prompt)
    expected = torch_generate(exports["model"], ids, max_new_tokens=30).token_ids
    session = model.session().feed(prompt, chunk_size=4)  # several prefill chunks, across the window of 8
    text = session.generate(30, stop_at_eos=False)
    assert session.last_token_ids == expected
    assert text == smol_tokenizer.decode(expected)
    assert session.stats.new_tokens == 30 and session.stats.context_tokens == len(ids) + 30
    assert session.stats.state_bytes == state_bytes(exports["model"])


def test_activations_option_reaches_the_gguf_engines(exports):
    """``activations`` picks how a GGUF file's quantized products take their input, on either GGUF
    engine; an ONNX folder fixed it when exported, so asking there is an error, as is a bad value."""
    for engine in ("compiled", "numpy"):
        assert load(exports["gguf"], gguf_engine=engine).engine.activations == "q8_0"
        assert load(exports["gguf"], gguf_engine=engine, activations="float32").engine.activations == "float32"
    with pytest.raises(ValueError, match="fixed when it is exported"):
        load(exports["onnx"], activations="float32")
    with pytest.raises(ValueError, match="activations must be one of"):
        load(exports["gguf"], activations="int4")


@pytest.mark.parametrize("kind", ["gguf", "onnx"])
def test_saved_state_continues_exactly(exports, kind, tmp_path):
    """Sampling with a seed: 20 tokens, save, restore in a fresh model object, 20 more == 40 at once."""
    options = dict(temperature=0.9, top_k=50, seed=3, stop_at_eos=False)
    whole = load(exports[kind]).session().feed("The river ran")
    whole.generate(40, **options)
    first = load(exports[kind]).session().feed("The river ran")
    first.generate(20, **options)
    path = str(tmp_path / "s.state")
    size = first.save(path)
    assert size < 2 * first.engine.state_bytes + 200_000
    resumed = load(exports[kind]).restore(path)
    resumed.generate(20, **{**options, "seed": None})  # the saved random stream goes on
    assert first.last_token_ids + resumed.last_token_ids == whole.last_token_ids
    # and a saved session takes more input: same as feeding it without the save
    a = resumed.feed(" Then").generate(5, stop_at_eos=False)
    b = whole.feed(" Then").generate(5, stop_at_eos=False)
    assert a == b


def test_chat_turns_continue_the_conversation(exports, tmp_path):
    """A later turn feeds only what the template writes after the previous answer: the session's
    text is then the template's rendering of the whole conversation, whether the answer ended at
    the end-of-turn token (pending, not yet fed) or not, and after a save and restore."""
    model = load(exports["gguf"])
    tok = model.tokenizer
    eos = tok.eos_token_ids[0]
    user1, answer, user2 = "Hi there", "Hello! How can I help?", "Tell me more."
    whole = tok.apply_chat_template([{"role": "user", "content": user1}, {"role": "assistant", "content": answer},
                                     {"role": "user", "content": user2}], add_generation_prompt=True)
    for ended_at_eos in (True, False):
        session = model.session()
        first = session.turn_text(user1)
        assert first == tok.apply_chat_template([{"role": "user", "content": user1}], add_generation_prompt=True)
        session.feed(first)
        session.feed(tok.encode(answer, add_special_tokens=False))
        if ended_at_eos:  # what generate leaves when it stops at the end-of-turn token
            session.pending = [eos]
            session.save(str(tmp_path / "chat.state"))
            session = model.restore(str(tmp_path / "chat.state"))
        eos_text = tok.decode([eos], skip_special_tokens=False) if ended_at_eos else ""
        assert first + answer + eos_text + session.turn_text(user2) == whole
    assert session.turn_text(user2).startswith(tok.decode([eos], skip_special_tokens=False))
    reply = session.chat(user2, max_new_tokens=4)
    assert isinstance(reply, str) and session.stats.new_tokens <= 4


def test_state_from_another_model_is_refused(exports, tmp_path):
    path = str(tmp_path / "s.state")
    load(exports["gguf"]).session().feed("Hello").save(path)
    with pytest.raises(StateFileError, match="only resumes on its own model"):
        load(exports["other"]).restore(path)
    # the ONNX export of the same model has the same fingerprint: its state layout is the same
    assert load(exports["onnx"]).restore(path).position == load(exports["gguf"]).restore(path).position
    with open(tmp_path / "junk.state", "wb") as f:
        f.write(b"not a state file")
    with pytest.raises(StateFileError, match="not a readable state file"):
        load(exports["gguf"]).restore(str(tmp_path / "junk.state"))


def test_version_1_state_files_are_refused_with_the_reason(exports, tmp_path, monkeypatch):
    """A state file from before the ring per KV head (version 1) cannot be read into today's layout."""
    import edge_lolcats.runtime.state as state_files

    path = str(tmp_path / "old.state")
    monkeypatch.setattr(state_files, "STATE_FILE_VERSION", 1)
    load(exports["gguf"]).session().feed("Hello").save(path)
    monkeypatch.undo()
    with pytest.raises(StateFileError, match="version 1 state file.*run the prompt again"):
        load(exports["gguf"]).restore(path)


def test_gguf_files_before_the_recurrence_keys_run_the_first_recurrence():
    """Format 1 and 2 files carry no recurrence keys: they are read as the first models' recurrence
    (feature maps after RoPE, no decay, no sinks), which is what they were trained with."""
    from edge_lolcats.arch.hybrid import Recurrence
    from edge_lolcats.converters import gguf_names as names
    from edge_lolcats.formats.gguf_io import GGUFFile

    key = lambda k: k.format(arch=names.LOLCATS_ARCH)  # noqa: E731
    old = {names.KEY_ARCHITECTURE: names.LOLCATS_ARCH, key(names.KEY_WINDOW_SIZE): 64, key(names.KEY_FEATURE_DIM): 64,
           key(names.KEY_FEATURE_MAP): "hedgehog"}
    lol = GGUFFile("old.gguf", old, {}).lolcats(num_layers=3)
    assert Recurrence.of(lol) == Recurrence() and lol["layers"] == ["hybrid"] * 3
    new = {**old, key(names.KEY_FEATURE_MAPS): "pre_rope", key(names.KEY_DECAY): True, key(names.KEY_SINK_TOKENS): 4}
    assert Recurrence.of(GGUFFile("new.gguf", new, {}).lolcats(3)) == Recurrence("pre_rope", True, 4)


def test_rss_does_not_grow_while_decoding(exports):
    session = load(exports["gguf"]).session().feed("Start")
    session.generate(500, stop_at_eos=False)
    before = current_rss_mb()
    session.generate(3000, stop_at_eos=False)
    after = current_rss_mb()
    assert session.position > 3500
    assert after - before < 8, (before, after)  # a KV cache of this model would add ~1.5 MB per 1000 tokens * layers


# --- CLI on the runtime -------------------------------------------------------------------------


def cli_without_torch(*args, cwd):
    code = NO_TORCH + "from edge_lolcats.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd)


def test_cli_generate_runs_without_torch_and_resumes(exports, tmp_path):
    gguf = exports["gguf"]
    base = ["generate", gguf, "--max-new-tokens", "12", "--json", "--temperature", "0.8", "--seed", "5"]
    r = cli_without_torch(*base, "--prompt", "The garden", "--save-state", str(tmp_path / "a.state"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("text", "token_ids", "prefill_tokens_per_s", "decode_tokens_per_s", "state_bytes", "peak_rss_mb",
                "context_tokens", "engine"):
        assert key in out, key
    assert out["engine"] == "gguf" and len(out["token_ids"]) == 12 and out["state_bytes"] > 0
    # continue from the state file with more prompt text
    r2 = cli_without_torch("generate", gguf, "--prompt", " and", "--load-state", str(tmp_path / "a.state"),
                           "--max-new-tokens", "5", "--json", cwd=tmp_path)
    assert r2.returncode == 0, r2.stderr
    assert json.loads(r2.stdout)["context_tokens"] == out["context_tokens"] + 1 + 5


@pytest.mark.parametrize("args, message", [
    (["--prompt", "x", "--temperature", "-1"], "temperature"),
    (["--prompt", "x", "--temperature", "0.5", "--top-p", "2"], "top_p"),
    (["--prompt", "x", "--repetition-penalty", "0"], "repetition_penalty"),
    (["--prompt", "   "], "empty prompt"),
    (["--prompt-file", "latin1.txt"], "not UTF-8"),
    (["--prompt", "x", "--load-state", "other.state"], "only resumes on its own model"),
])
def test_cli_runtime_bad_input_is_one_line(exports, tmp_path, args, message):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    load(exports["other"]).session().feed("Hi").save(str(tmp_path / "other.state"))
    r = cli_without_torch("generate", exports["gguf"], *args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_cli_runtime_refuses_damaged_models(exports, tmp_path):
    data = open(exports["gguf"], "rb").read()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 3])
    r = cli_without_torch("generate", str(tmp_path / "cut.gguf"), "--prompt", "x", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
